"""How the sampling and judge clients pace their requests, so that a slow server gets less load, not more.

Against a server that emgate started itself (the sample stage's vLLM servers, the judge that `emgate run` serves),
a slow answer is not a lost one: vLLM keeps working on it, so a timeout that resends only adds load. There,
requests have no read timeout, and retries (with backoff, honouring Retry-After: the OpenAI client's own) happen
only on connection errors, 429 and 5xx. Concurrency adapts to the measured latency: it starts at
`START_CONCURRENCY`, doubles while the mean latency of a window of completions stays within `LATENCY_TOLERANCE`
times the best window seen, then grows by one per window and shrinks by a quarter when latency rises beyond it.

Against a remote API (OpenAI, a KServe endpoint), the client keeps the usual semantics: a timeout per request, the
same retries on timeouts too, and a fixed number of requests in flight.

In both modes a stage in which no response arrives for `stall_timeout_s` while requests are in flight fails with
`StalledError`, naming the server, instead of waiting forever. Every HTTP attempt is counted, so the stage report
says how many were retries and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
START_CONCURRENCY = 8  # requests in flight at first against our own server (bench/README.md: 2 and 4 cost 0.86x on 8 prompts)
LATENCY_TOLERANCE = 2.0  # a window whose mean latency is within this factor of the best window "holds"
CONNECT_TIMEOUT_S = 10.0  # seconds to open a connection to our own server (it is on this machine or pod)
WATCH_INTERVAL_S = 1.0  # seconds between stall checks


class StalledError(RuntimeError):
    """No response from a server for the stall timeout while requests were in flight."""


@dataclass
class Pacer:
    """One stage's pacing against one server: the limit on requests in flight, the stall watchdog, the counts."""

    what: str  # e.g. "judge at http://127.0.0.1:18231/v1", for messages
    own_server: bool  # started by emgate (adaptive, no resend on timeout) or remote (fixed, timeout per request)
    max_concurrency: int
    timeout_s: float  # per request, remote servers only
    stall_timeout_s: float
    setting: str = ""  # the recipe field of the stall timeout, named in the error
    limit: int = 0
    peak: int = 0
    attempts: int = 0  # HTTP requests sent, retries included
    responses: Counter[str] = field(default_factory=Counter)  # status code -> count
    calls: int = 0  # requests the stage made (each may take several attempts)
    in_flight: int = 0
    latency_max: float = 0.0  # seconds, the slowest successful request
    best_latency: float | None = None
    slow_start: bool = True
    last_progress: float = field(default_factory=time.monotonic)
    _window: list[float] = field(default_factory=list)
    _cond: asyncio.Condition | None = None

    def __post_init__(self) -> None:
        self.limit = min(START_CONCURRENCY, self.max_concurrency) if self.own_server else self.max_concurrency
        self.peak = self.limit

    # ---- the HTTP client ------------------------------------------------------------------------------
    def timeout(self) -> Any:
        from openai import Timeout

        if self.own_server:
            return Timeout(None, connect=CONNECT_TIMEOUT_S)
        return Timeout(self.timeout_s)

    def http_client(self) -> Any:
        """The OpenAI client's own HTTP client, with hooks that count every attempt and every response's status."""
        from openai import DefaultAsyncHttpxClient

        async def on_request(request: Any) -> None:
            self.attempts += 1

        async def on_response(response: Any) -> None:
            self.responses[str(response.status_code)] += 1
            self.last_progress = time.monotonic()

        return DefaultAsyncHttpxClient(timeout=self.timeout(),
                                       event_hooks={"request": [on_request], "response": [on_response]})

    # ---- requests in flight ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of `limit` places for a request; its latency, when it succeeds, adapts the limit."""
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            await cond.wait_for(lambda: self.in_flight < self.limit)
            if self.in_flight == 0:
                self.last_progress = time.monotonic()  # a stall is counted from the first request in flight
            self.in_flight += 1
        started = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            async with cond:
                self.in_flight -= 1
                self.calls += 1
                if ok:
                    self.last_progress = time.monotonic()
                    latency = self.last_progress - started
                    self.latency_max = max(self.latency_max, latency)
                    if self.own_server:
                        self._adapt(latency)
                cond.notify_all()

    def _adapt(self, latency: float) -> None:
        self._window.append(latency)
        if len(self._window) < self.limit:
            return
        mean = sum(self._window) / len(self._window)
        self._window.clear()
        self.best_latency = mean if self.best_latency is None else min(self.best_latency, mean)
        if mean <= self.best_latency * LATENCY_TOLERANCE:
            self.limit = min(self.max_concurrency, self.limit * 2 if self.slow_start else self.limit + 1)
        else:
            self.slow_start = False
            self.limit = max(1, self.limit * 3 // 4)
        self.peak = max(self.peak, self.limit)

    # ---- the stall watchdog ---------------------------------------------------------------------------
    async def guard(self, work: Awaitable[T]) -> T:
        """Await `work`; raise StalledError (and cancel it) when nothing answers for stall_timeout_s."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(WATCH_INTERVAL_S, self.stall_timeout_s))
                if done:
                    return task.result()
                idle = time.monotonic() - self.last_progress
                if self.in_flight and idle > self.stall_timeout_s:
                    raise StalledError(
                        f"{self.what} sent no response for {idle:.0f} s with {self.in_flight} request(s) in flight "
                        f"({self.setting or 'stall_timeout_s'} = {self.stall_timeout_s:g} s): the server is stuck or "
                        "far slower than expected; check its log, lower the concurrency or raise the timeout")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def report(self) -> dict[str, Any]:
        return {"mode": "own_server" if self.own_server else "remote", "attempts": self.attempts, "calls": self.calls,
                "retries": max(0, self.attempts - self.calls), "responses": dict(sorted(self.responses.items())),
                "connection_errors": max(0, self.attempts - sum(self.responses.values())),
                "concurrency": {"start": min(START_CONCURRENCY, self.max_concurrency) if self.own_server
                                else self.max_concurrency, "final": self.limit, "peak": self.peak,
                                "max": self.max_concurrency},
                "latency_max_s": round(self.latency_max, 3),
                "timeout_s": None if self.own_server else self.timeout_s, "stall_timeout_s": self.stall_timeout_s}
