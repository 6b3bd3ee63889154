"""Ctrl-C and SIGTERM on `emgate run`: stop every process the run started, however deep, and say so in one line.

Why the servers' own safeguards are not enough under the KFP local runner: kfp.local runs each task from a
ThreadPoolExecutor worker thread as `sh -c ... python -m kfp.dsl.executor_main`, in emgate's process group, and
forwards no signal. A SIGINT or SIGTERM sent to `emgate run` alone (kill PID, a supervisor, a CI runner) never
reaches the task; the exception it raises in emgate's main thread then waits in the executor's shutdown for the
task to finish, so SIGTERM seems to do nothing, and a second Ctrl-C leaves the task running as an orphan. A vLLM
server's PR_SET_PDEATHSIG fires only when its own parent (the task's process) dies, which then never happens.

So `emgate run` makes itself a child subreaper (orphaned descendants are re-parented to it, not to init, so none
escapes), and its signal handler stops the whole tree: SIGTERM to every descendant, STOP_GRACE_S for them to
exit (a stage stops its vLLM server, vLLM its engine workers), then SIGKILL to what is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
STOP_GRACE_S = 12.0  # seconds between SIGTERM and SIGKILL for the run's processes (all stopped within 30 s)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt: not an error, a stop)
    """`emgate run` got SIGINT or SIGTERM; its processes are already stopped."""

    def __init__(self, signum: int, stopped: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.stopped = signum, stopped

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 128 + self.signum)


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux 3.4+); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _parents() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
        out[int(entry.name)] = (int(fields[1]), fields[0])
    return out


def descendants(pid: int | None = None) -> list[int]:
    """Every living (non-zombie) process below `pid` (default: this one)."""
    root = os.getpid() if pid is None else pid
    table = _parents()
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    found, todo = [], list(children.get(root, []))
    while todo:
        p = todo.pop()
        if table[p][1] != "Z":
            found.append(p)
        todo += children.get(p, [])
    return found


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def stop_descendants(grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM every descendant, SIGKILL the ones still there after `grace_s`; returns how many there were."""
    seen: set[int] = set()
    deadline = time.monotonic() + grace_s
    while True:
        _reap()
        alive = descendants()
        if not alive:
            return len(seen)
        sig = signal.SIGKILL if time.monotonic() > deadline else signal.SIGTERM
        for p in alive:
            if sig == signal.SIGKILL or p not in seen:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)
        seen.update(alive)
        time.sleep(0.2)


@contextlib.contextmanager
def stop_everything_on_signal() -> Iterator[None]:
    """Inside: SIGINT or SIGTERM stops every descendant process, then raises Interrupted. A second signal while
    stopping is ignored (the processes get SIGKILL after the grace period anyway)."""
    become_subreaper()
    stopping = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print(f"\nemgate: {signal.Signals(signum).name}: stopping the run's processes (at most "
              f"{STOP_GRACE_S + 2:.0f} s)...", file=sys.stderr, flush=True)
        raise Interrupted(signum, stop_descendants(STOP_GRACE_S))

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
