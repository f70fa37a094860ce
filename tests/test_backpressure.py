"""Back-pressure clients can follow: the queue's Retry-After estimates when a slot frees, and a
used-up usage window answers queued requests at once, without a CLI turn. On trio's mock clock
over fake sessions (tests/fakes.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from ccwrap_trio.config import Config
from ccwrap_trio.errors import QueueFull, UsageLimitReached
from ccwrap_trio.supervisor import Supervisor

from .fakes import TURN_S, FakeSessions, fake_rss

CONFIG = Config(standby=False, query_timeout_s=600.0)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def supervised(
    sessions: FakeSessions, *, workers: int = 1, **overrides: object
) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(dataclasses.replace(CONFIG, **overrides),  # type: ignore[arg-type]
                            sessions, sessions=workers, rss_probe=fake_rss({}))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        yield supervisor
        nursery.cancel_scope.cancel()


async def test_queue_full_retry_after_follows_the_backlog(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, max_queue=4) as supervisor:
        for i in range(3):  # recent history: each query takes 2 s + the fake's turn
            await supervisor.query(f"slow=2 warm-up {i}")
        service_s = 2 + TURN_S
        waits: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.query, "slow=2 runs")
            with trio.fail_after(1):
                while supervisor.statistics().active_queries != 1:
                    await trio.sleep(0.01)
            for i in range(4):  # four wait
                nursery.start_soon(supervisor.query, f"slow=2 #{i}")
                with trio.fail_after(1):
                    while supervisor.statistics().queued != i + 1:
                        await trio.sleep(0.01)
            for _ in range(3):
                with pytest.raises(QueueFull) as caught:
                    supervisor.submit("refused")
                assert caught.value.retry_after_s is not None
                waits.append(caught.value.retry_after_s)
    # The backlog (1 running + 4 waiting) times the median service time, plus the client's own
    # slot; each later rejection is promised the slot after the one before (spread, not a herd).
    assert waits == pytest.approx([6 * service_s, 7 * service_s, 8 * service_s], abs=0.2)


async def test_retry_after_divides_by_the_sessions(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, max_queue=1, workers=2) as supervisor:
        for i in range(3):
            await supervisor.query(f"slow=4 warm-up {i}")
        with trio.fail_after(5):
            while any(w.status != "healthy" for w in supervisor.statistics().sessions):
                await trio.sleep(0.01)
        async with trio.open_nursery() as nursery:
            for i in range(2):  # two run
                nursery.start_soon(supervisor.query, f"slow=4 #{i}")
                with trio.fail_after(1):
                    while supervisor.statistics().active_queries != i + 1:
                        await trio.sleep(0.01)
            nursery.start_soon(supervisor.query, "slow=4 waits")
            with trio.fail_after(1):
                while supervisor.statistics().queued != 1:
                    await trio.sleep(0.01)
            assert supervisor.statistics().active_queries == 2
            with pytest.raises(QueueFull) as caught:
                supervisor.submit("refused")
    # (2 running + 1 waiting + this one) x 4.05 s / 2 sessions.
    assert caught.value.retry_after_s == pytest.approx(4 * (4 + TURN_S) / 2, abs=0.2)


async def test_queue_full_retry_after_is_at_least_one_second(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, max_queue=1) as supervisor:
        await supervisor.query("warm-up")  # 0.05 s per query
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.query, "slow=1 runs")
            with trio.fail_after(1):
                while supervisor.statistics().active_queries != 1:
                    await trio.sleep(0.01)
            supervisor.submit("waits").close()  # queued, then abandoned
            with pytest.raises(QueueFull) as caught:
                supervisor.submit("refused")
    assert caught.value.retry_after_s == 1.0


async def test_used_up_window_answers_queued_requests_without_a_turn(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions()
    outcomes: list[str] = []
    async with supervised(sessions) as supervisor:

        async def ask(text: str) -> None:
            try:
                outcomes.append((await supervisor.query(text)).text)
            except UsageLimitReached as exc:
                outcomes.append(f"429 {exc.window} {exc.retry_after_s:g}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "slow=1 usage-limit=100")
            with trio.fail_after(1):
                while supervisor.statistics().active_queries != 1:
                    await trio.sleep(0.01)
            for i, text in enumerate(("queued one", "queued two")):
                nursery.start_soon(ask, text)
                with trio.fail_after(1):
                    while supervisor.statistics().queued != i + 1:
                        await trio.sleep(0.01)
        with pytest.raises(UsageLimitReached):
            supervisor.submit("new")
        stats = supervisor.statistics()
    assert sessions.current.prompts == ["slow=1 usage-limit=100"]  # no turn for the others
    assert len(outcomes) == 3 and all(o.startswith("429 five_hour ") for o in outcomes)
    assert all(99 <= float(o.rsplit(" ", 1)[1]) <= 101 for o in outcomes)
    assert stats.limits is not None and stats.limits.limited
    assert stats.counters.rejected == 1
    assert stats.status == "healthy"
