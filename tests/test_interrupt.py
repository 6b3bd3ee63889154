"""emgate.interrupt on a process tree shaped like `emgate run`'s (no model): a child in a session of its own (as
vLLM servers are), its worker, an orphan whose parent exited (re-parented to the subreaper), and one that ignores
SIGTERM. SIGINT and SIGTERM stop all of them and exit 130 and 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

TREE = r'''
import os, signal, subprocess, sys, time
from emgate import interrupt
interrupt.STOP_GRACE_S = 3.0
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
with_worker = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)", *sleeper]
orphan_maker = [sys.executable, "-c", "import subprocess, sys; subprocess.Popen(sys.argv[1:])", *sleeper]  # exits at once
try:
    with interrupt.stop_everything_on_signal():
        subprocess.Popen(with_worker, start_new_session=True)  # like a vLLM server and its engine worker
        subprocess.Popen(stubborn)
        subprocess.run(orphan_maker, check=True)
        print("ready", flush=True)
        time.sleep(600)
except interrupt.Interrupted as stop:
    print(f"stopped {stop.stopped}", flush=True)
    sys.exit(stop.exit_code)
'''


def tagged(tag: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"EMGATE_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreaper and /proc are Linux's")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_whole_tree(sig: signal.Signals, code: int) -> None:
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EMGATE_TEST_TAG": tag}, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    assert len(tagged(tag)) == 5  # itself, the server and its worker, the stubborn child, the orphan (re-parented)
    started = time.monotonic()
    proc.send_signal(sig)
    out, errors = proc.communicate(timeout=30)
    assert proc.returncode == code, errors
    assert out.strip() == "stopped 4"
    assert f"emgate: {sig.name}: stopping the run's processes" in errors and "Traceback" not in errors
    assert time.monotonic() - started < 10  # SIGKILL after the (shortened) grace for the one ignoring SIGTERM
    assert tagged(tag) == []


STAGE = r'''
import sys, time
from pathlib import Path
from emgate.kfp.runtime import stage
from emgate.recipe import load_recipe
recipe_json = load_recipe(Path(sys.argv[1])).to_json()
with stage("sample_answers", recipe_json):
    print("in stage", flush=True)
    time.sleep(600)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and signals as on Linux")
def test_a_stage_stops_itself_when_emgate_run_is_killed(smoke_recipe_path: Path) -> None:
    """SIGKILL to `emgate run` cannot be handled: each stage watches $EMGATE_RUN_PID and stops itself."""
    from emgate.kfp.runtime import RUN_PID_ENV, RUN_WATCH_INTERVAL_S

    fake_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    task = subprocess.Popen([sys.executable, "-c", STAGE, str(smoke_recipe_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, RUN_PID_ENV: str(fake_run.pid)})
    assert task.stdout is not None and task.stdout.readline().strip() == "in stage"
    time.sleep(RUN_WATCH_INTERVAL_S + 1)
    assert task.poll() is None  # the run is alive: the stage goes on
    fake_run.kill()
    fake_run.wait()
    assert task.wait(timeout=3 * RUN_WATCH_INTERVAL_S + 5) == -signal.SIGTERM
