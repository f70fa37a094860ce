"""Issue 10 (part A): the worker loop under faults and bad timing, on fakes and trio's mock clock.

A received query is never lost, every await on the CLI has a deadline, and a failing /proc read
(out of file descriptors) costs a number in a log line, never the worker.
"""

from __future__ import annotations

import dataclasses
import errno
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccwrap_trio import protocol
from ccwrap_trio.config import Config
from ccwrap_trio.errors import CcwrapError, SessionCrashed
from ccwrap_trio.supervisor import Supervisor

from .fakes import FakeSessions, fake_rss

CONFIG = Config(
    standby=False,
    query_timeout_s=30.0,
    interrupt_grace_s=5.0,
    clear_timeout_s=2.0,
    memory_sample_interval_s=1.0,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def supervised(sessions: FakeSessions, **overrides: object) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(
        dataclasses.replace(CONFIG, **overrides),  # type: ignore[arg-type]
        sessions,
        rss_probe=fake_rss({}),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        yield supervisor
        nursery.cancel_scope.cancel()


async def wait_healthy(supervisor: Supervisor) -> None:
    with trio.fail_after(3600):
        while supervisor.statistics().status != "healthy":
            await trio.sleep(0.01)


async def test_query_received_as_the_idle_tick_expires_is_answered(
    clock: trio.testing.MockClock,
) -> None:
    """Finding 4: the query is delivered, then time passes the idle deadline before the worker
    runs again (a loaded host): it used to vanish with the idle tick's nursery."""
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        await wait_healthy(supervisor)
        await trio.testing.wait_all_tasks_blocked()  # the worker waits for a query
        with supervisor.submit("just in time") as handle:
            # No checkpoint between delivery and the jump: the worker wakes past its deadline.
            clock.jump(CONFIG.memory_sample_interval_s)
            event = await handle.next_event()
            while not isinstance(event, protocol.TurnResult):
                event = await handle.next_event()
        assert event.text == "echo: just in time"
        assert trio.current_time() < CONFIG.query_timeout_s


async def test_clear_that_never_answers_replaces_the_session(
    clock: trio.testing.MockClock,
) -> None:
    """Finding 2: a CLI frozen in the between-request /clear used to wedge the worker for good."""
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        first = await supervisor.query("hang-clear please")
        assert first.text == "echo: hang-clear please"
        frozen = sessions.current
        # The worker is stuck in /clear until clear_timeout_s; then a new session serves.
        second = await supervisor.query("after the freeze")
        assert second.text == "echo: after the freeze"
        assert sessions.current is not frozen and frozen in sessions.closed
        stats = supervisor.statistics()
        assert stats.counters.timeout_restarts == 1
        assert stats.counters.restart_count == 1
        assert stats.restarts[-1].kind == "timeout"
        assert "CCWRAP_CLEAR_TIMEOUT" in stats.restarts[-1].detail
        assert stats.status == "healthy"
        assert stats.counters.successes == 2


async def test_clear_in_the_empty_retry_has_a_deadline(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        await wait_healthy(supervisor)
        sessions.current.hang_clear = True
        with pytest.raises(SessionCrashed, match="CCWRAP_CLEAR_TIMEOUT"):
            await supervisor.query("empty-once then frozen")
        assert trio.current_time() < CONFIG.query_timeout_s
        ok = await supervisor.query("next")
        assert ok.text == "echo: next"
        assert supervisor.statistics().counters.timeout_restarts == 1


async def test_health_says_restarting_while_a_frozen_clear_is_replaced(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions(spawn_s=5.0)
    async with supervised(sessions) as supervisor:
        await supervisor.query("hang-clear now")
        # Past the /clear deadline, inside the spawn of the replacement.
        await trio.sleep(CONFIG.clear_timeout_s + 1.0)
        stats = supervisor.statistics()
        assert stats.status == "restarting"
        assert not stats.invoker_connected


async def test_rss_probe_out_of_file_descriptors_is_not_fatal(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 1: psutil raises a bare OSError(EMFILE) without fds; it escaped the worker."""

    async def emfile(pid: int) -> float:
        raise OSError(errno.EMFILE, "Too many open files")

    sessions = FakeSessions()
    supervisor = Supervisor(
        dataclasses.replace(CONFIG, turn_limit=2, proactive_pct=100, isolation="none"), sessions,
        rss_probe=emfile,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        for i in range(3):  # past the sample interval and through a (hard) restart
            assert (await supervisor.query(f"q{i}")).text == f"echo: q{i}"
            await trio.sleep(CONFIG.memory_sample_interval_s)
        assert supervisor.statistics().counters.hard_restarts == 1
        nursery.cancel_scope.cancel()
    assert "CLI memory not measured" in caplog.text


# -- the chaos property: every accepted query gets exactly one outcome, whatever the timing ------

PROMPTS = ["ok", "slow=0.3", "crash", "empty-once", "hang", "error:boom", "hang-clear"]

client_plan = st.tuples(
    st.sampled_from(PROMPTS),
    st.integers(0, 8),  # ticks (of 0.05 s) before submitting
    st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0]),  # clock jump right after submitting
    st.one_of(st.none(), st.integers(0, 20)),  # abandon after this many ticks (disconnect)
)


async def _chaos(
    plans: list[tuple[str, int, float, int | None]], pool: int, timeouts: bool = False
) -> None:
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    config = dataclasses.replace(
        CONFIG, memory_sample_interval_s=0.1, query_timeout_s=20.0, interrupt_grace_s=0.5,
        clear_timeout_s=0.5, turn_limit=4, max_queue=4, sessions=pool,
    )
    supervisor = Supervisor(config, FakeSessions(spawn_s=0.1), sessions=pool,
                            rss_probe=fake_rss({}))
    outcomes: dict[int, list[str]] = {i: [] for i in range(len(plans))}

    async def client(i: int, prompt: str, delay: int, jump: float, leave: int | None) -> None:
        if prompt == "hang" and not timeouts:
            leave = min(leave or 20, 20)  # its client gives up: it must not starve the others
        await trio.sleep(delay * 0.05)
        try:
            handle = supervisor.submit(f"{prompt} #{i}")
        except CcwrapError as exc:
            outcomes[i].append(f"rejected:{type(exc).__name__}")
            return
        if jump:
            clock.jump(jump)  # time passes before anyone else runs: deadlines expire at once
        with handle:
            with trio.move_on_after(math.inf if leave is None else leave * 0.05):
                try:
                    while True:
                        event = await handle.next_event()
                        if isinstance(event, protocol.TurnResult):
                            outcomes[i].append("success")
                            return
                except CcwrapError as exc:
                    outcomes[i].append(f"error:{type(exc).__name__}")
                    return
            outcomes[i].append("disconnect")

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            async with trio.open_nursery() as clients:
                for i, plan in enumerate(plans):
                    clients.start_soon(client, i, *plan)
            # Abandoned turns are still being interrupted and drained: wait for the workers.
            while (s := supervisor.statistics()).active_queries or s.queued:
                await trio.sleep(0.05)
            stats = supervisor.statistics()
            nursery.cancel_scope.cancel()

    for i, (prompt, *_rest) in enumerate(plans):
        assert len(outcomes[i]) == 1, (i, prompt, outcomes[i])
        # A lost query shows as a timeout: no turn takes that long unless hangs may time out.
        if outcomes[i][0] == "error:QueryTimeout":
            assert timeouts, (i, prompt, outcomes)
    c = stats.counters
    assert c.total_requests == len(plans)
    assert c.total_requests == c.successes + c.total_errors + c.rejected, c
    assert c.disconnects == sum(o == ["disconnect"] for o in outcomes.values())
    assert c.successes == sum(o == ["success"] for o in outcomes.values())
    assert stats.active_queries == 0 and stats.queued == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=st.lists(client_plan, min_size=1, max_size=8), pool=st.integers(1, 2))
def test_every_accepted_query_gets_exactly_one_outcome(
    plans: list[tuple[str, int, float, int | None]], pool: int
) -> None:
    trio.run(_chaos, plans, pool, clock=trio.testing.MockClock(autojump_threshold=0))


def test_query_timeout_is_still_one_outcome() -> None:
    """The property's own check: a hanging turn times out once and counts once."""
    trio.run(_chaos, [("hang", 0, 0.0, None), ("ok", 1, 0.0, None)], 1, True,
             clock=trio.testing.MockClock(autojump_threshold=0))


# -- the CLI's own retries fit the query timeout ----------------------------------------------


def test_cli_retries_are_bounded_by_default() -> None:
    """Finding 7: 10 CLI retries of a failing API took ~3 minutes before the client heard."""
    env = Config.load({"CCWRAP_QUERY_TIMEOUT": "90"}).child_env
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "2"
    assert env["API_TIMEOUT_MS"] == "30000"  # three attempts fit the query timeout
    assert int(Config.load({}).child_env["API_TIMEOUT_MS"]) * 3 <= 300_000


def test_operator_values_for_cli_retries_win() -> None:
    env = Config.load({"CLAUDE_CODE_MAX_RETRIES": "7", "API_TIMEOUT_MS": "1234"}).child_env
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "7"
    assert env["API_TIMEOUT_MS"] == "1234"


async def test_turn_ends_at_the_deadline_even_if_the_client_never_asks(
    clock: trio.testing.MockClock,
) -> None:
    """Finding 6: a client stuck sending to a reader that never reads never calls next_event,
    so nothing timed its turn out: the worker was held as long as the CLI ran."""
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        with supervisor.submit("hang until interrupted", stream=True):
            # Nobody reads this handle (its caller is blocked elsewhere) past its deadline.
            await trio.sleep(CONFIG.query_timeout_s + 2.0)
            ok = await supervisor.query("next")
            assert ok.text == "echo: next"
            assert trio.current_time() < 2 * CONFIG.query_timeout_s
        stats = supervisor.statistics()
    assert sessions.current.interrupts == 1
    assert stats.counters.timeouts == 1
    assert stats.counters.restart_count == 0
