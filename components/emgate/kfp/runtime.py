"""What every KFP component body does around its stage: load the recipe, time the stage, report user errors
as one clear line (no traceback) and exit non-zero, so KFP marks the task failed."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from emgate.recipe import Recipe

TIMINGS_ENV = "EMGATE_TIMINGS_FILE"
RUN_PID_ENV = "EMGATE_RUN_PID"  # set by `emgate run` for its local tasks
RUN_WATCH_INTERVAL_S = 2.0  # seconds between checks that `emgate run` is still there


def user_errors() -> tuple[type[BaseException], ...]:
    from emgate.adapters import AdapterError
    from emgate.assets import AssetError
    from emgate.io import DataError
    from emgate.models import ModelError
    from emgate.pacing import StalledError
    from emgate.policy import PolicyBelowFloor
    from emgate.recipe import RecipeError
    from emgate.stages.finetune import TrainingError
    from emgate.stages.judge import JudgeError
    from emgate.stages.validate import ValidationFailed
    from emgate.vllm_server import ServerError

    return (AdapterError, AssetError, DataError, ModelError, RecipeError, JudgeError, ValidationFailed, ServerError,
            TrainingError, FileNotFoundError, StalledError, PolicyBelowFloor)


def stop_with_the_run() -> None:
    """When `emgate run` ($EMGATE_RUN_PID) is gone, even by SIGKILL, SIGTERM this stage: its vLLM servers (which
    get SIGTERM when the stage dies) go with it. The local runner starts tasks through `sh`, which nothing stops
    when emgate dies, so the stage watches for itself; on a cluster the variable is not set."""
    pid = os.environ.get(RUN_PID_ENV, "")
    if not pid.isdigit():
        return

    def watch() -> None:
        while True:
            time.sleep(RUN_WATCH_INTERVAL_S)
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:  # alive, another user's: not ours to watch
                return

    threading.Thread(target=watch, name="emgate-run-watch", daemon=True).start()


@contextmanager
def stage(name: str, recipe_json: str) -> Iterator[Recipe]:
    started = time.monotonic()
    status = "failed"
    stop_with_the_run()
    try:
        from emgate.slices import PINNED_ENV, PRIVATE_READERS, check_private_sets, recipe_for_stage, stage_of

        recipe = recipe_for_stage(recipe_json, name, os.environ.get(PINNED_ENV))
        if stage_of(name) in PRIVATE_READERS:
            from emgate.floor import private_question_hashes

            check_private_sets(recipe, name, private_question_hashes())
        yield recipe
        status = "ok"
    except user_errors() as exc:
        print(f"\nemgate: stage {name} failed: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        path = os.environ.get(TIMINGS_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"stage": name, "seconds": time.monotonic() - started, "status": status}) + "\n")
