"""emgate.pacing: concurrency that follows the server's latency, and the stall watchdog (no server needed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from emgate.pacing import START_CONCURRENCY, Pacer, StalledError


def pacer(own_server: bool = True, maximum: int = 32, stall_timeout_s: float = 60) -> Pacer:
    return Pacer(what="test server", own_server=own_server, max_concurrency=maximum, timeout_s=5,
                 stall_timeout_s=stall_timeout_s, setting="serving.stall_timeout_s")


async def load(p: Pacer, requests: int, latency) -> list[int]:
    """`requests` requests whose latency is latency(requests in flight); returns the in-flight count each one saw."""
    seen: list[int] = []

    async def one() -> None:
        async with p.slot():
            seen.append(p.in_flight)
            await asyncio.sleep(latency(p.in_flight))

    await p.guard(asyncio.gather(*(one() for _ in range(requests))))
    return seen


def test_a_server_with_spare_capacity_gets_the_full_concurrency() -> None:
    p = pacer(maximum=16)
    seen = asyncio.run(load(p, 120, lambda n: 0.01))
    assert p.limit == p.peak == 16 and max(seen) == 16
    assert seen[:START_CONCURRENCY] == list(range(1, START_CONCURRENCY + 1))  # it started low ...
    assert max(seen[:2 * START_CONCURRENCY]) <= START_CONCURRENCY  # ... and held there for the first window


def test_a_saturated_server_gets_less_load_not_more() -> None:
    """Latency grows with the square of the requests in flight past 4: the limit settles far below the maximum."""
    p = pacer(maximum=64)
    seen = asyncio.run(load(p, 200, lambda n: 0.004 * max(1, n / 4) ** 2))
    assert max(seen) <= p.peak <= 16  # slow start overshoots by one doubling at most, then backs off
    assert p.limit <= 12 and not p.slow_start


def test_a_remote_api_keeps_its_fixed_concurrency_and_timeout() -> None:
    p = pacer(own_server=False, maximum=8)
    seen = asyncio.run(load(p, 40, lambda n: 0.005 * n * n))
    assert p.limit == p.peak == 8 and max(seen) == 8
    assert p.timeout().read == 5 and pacer().timeout().read is None  # our own server: no read timeout at all


def test_no_response_for_the_stall_timeout_fails_with_a_named_error() -> None:
    p = pacer(stall_timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(StalledError, match=r"test server sent no response for \d s with 2 request\(s\) in flight "
                                           r"\(serving\.stall_timeout_s = 1\.5 s\)"):
        asyncio.run(load(p, 2, lambda n: 3600))
    assert 1.5 <= time.monotonic() - started < 4
    assert p.in_flight == 0  # the stuck requests were cancelled


def test_slow_but_steady_progress_is_not_a_stall() -> None:
    """Each request takes longer than the stall timeout would allow in total, but answers keep arriving."""
    p = pacer(stall_timeout_s=1.0, maximum=2)
    asyncio.run(load(p, 12, lambda n: 0.4))
    assert p.calls == 12
