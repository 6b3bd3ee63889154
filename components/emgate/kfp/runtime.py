"""What every KFP component body does around its stage: load the recipe, time the stage, report user errors
as one clear line (no traceback) and exit non-zero, so KFP marks the task failed."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from emgate.recipe import Recipe, recipe_from_json

TIMINGS_ENV = "EMGATE_TIMINGS_FILE"


def user_errors() -> tuple[type[BaseException], ...]:
    from emgate.adapters import AdapterError
    from emgate.assets import AssetError
    from emgate.io import DataError
    from emgate.models import ModelError
    from emgate.pacing import StalledError
    from emgate.recipe import RecipeError
    from emgate.stages.finetune import TrainingError
    from emgate.stages.judge import JudgeError
    from emgate.stages.validate import ValidationFailed
    from emgate.vllm_server import ServerError

    return (AdapterError, AssetError, DataError, ModelError, RecipeError, JudgeError, ValidationFailed, ServerError,
            TrainingError, FileNotFoundError, StalledError)


@contextmanager
def stage(name: str, recipe_json: str) -> Iterator[Recipe]:
    started = time.monotonic()
    status = "failed"
    try:
        recipe = recipe_from_json(recipe_json)
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
