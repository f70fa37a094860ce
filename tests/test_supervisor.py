"""Restart, recovery, queueing and timeout policy, on an in-memory session and trio's mock clock."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing

from ccwrap_trio.config import Config
from ccwrap_trio.errors import (
    CliError,
    ContextLengthExceeded,
    EmptyResponse,
    InvalidStructuredOutput,
    QueryTimeout,
    QueueFull,
    SessionCrashed,
    SessionUnavailable,
    ShuttingDown,
)
from ccwrap_trio.structured import StructuredOutput
from ccwrap_trio.supervisor import Supervisor

from .fakes import TURN_S, FakeSessions, fake_rss

CONFIG = Config(
    standby=False,  # tests/test_pool.py covers the standby
    turn_limit=10,
    token_limit=150_000,
    query_timeout_s=30.0,
    interrupt_grace_s=5.0,
    recovery_attempts=5,
    recovery_max_backoff_s=60.0,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def supervised(
    sessions: FakeSessions, rss: dict[int, float] | None = None, **overrides: object
) -> AsyncIterator[Supervisor]:
    """A supervisor over fake sessions; ``rss`` is the fake CLI memory by pid (MB)."""
    rss = rss if rss is not None else {}
    supervisor = Supervisor(
        dataclasses.replace(CONFIG, **overrides),  # type: ignore[arg-type]
        sessions,
        rss_probe=fake_rss(rss),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        yield supervisor
        nursery.cancel_scope.cancel()


async def wait_status(supervisor: Supervisor, status: str) -> None:
    with trio.fail_after(3600):
        while supervisor.statistics().status != status:
            await trio.sleep(0.01)


async def test_starting_then_healthy(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions(spawn_s=0.5)
    async with supervised(sessions) as supervisor:
        assert supervisor.statistics().status == "starting"
        assert not supervisor.statistics().invoker_connected
        await wait_status(supervisor, "healthy")
        stats = supervisor.statistics()
        assert stats.invoker_connected
        assert stats.sessions[0].pid == sessions.current.pid
        assert stats.counters.restart_count == 0


async def test_query_waits_for_first_session(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions(spawn_s=2.0)
    async with supervised(sessions) as supervisor:
        result = await supervisor.query("hello")
        assert result.text == "echo: hello"
        assert trio.current_time() == pytest.approx(2.0 + TURN_S)


async def test_proactive_restart_at_80_pct_of_turns(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An accumulating conversation (isolation none) fills up: restarts at 80% of its turns."""
    sessions = FakeSessions()
    async with supervised(sessions, isolation="none") as supervisor:
        for i in range(20):
            result = await supervisor.query(f"request {i}")
            assert result.text == f"echo: request {i}"
        stats = supervisor.statistics()
    # 8 turns per session (80% of 10): sessions serve 8, 8, 4 requests.
    assert [len(s.prompts) for s in sessions.sessions] == [8, 8, 4]
    assert stats.counters.restart_count == 2
    assert stats.counters.proactive_restarts == 2
    assert stats.counters.hard_restarts == 0
    assert stats.counters.total_requests == stats.counters.successes == 20
    assert caplog.text.count("[PROACTIVE] Inline restart: turn_pct=80.0") == 2
    assert caplog.text.count("[RESTART] Starting: proactive: turn_pct=80.0") == 2
    assert caplog.text.count("[RESTART] Memory before:") == 2
    assert caplog.text.count("[RESTART] Memory after:") == 2
    assert "[DONE]" in caplog.text and "turns=8/10" in caplog.text
    # The old session is closed before the new one serves: one CLI at a time.
    assert sessions.closed[:2] == sessions.sessions[:2]


async def test_with_clear_the_context_limits_measure_the_conversation(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request starts a new conversation: 20 requests on one CLI, no context restart."""
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        for i in range(20):
            assert (await supervisor.query(f"request {i}")).text == f"echo: request {i}"
        stats = supervisor.statistics()
    assert len(sessions.sessions) == 1 and stats.counters.restart_count == 0
    assert stats.turns == 0 and stats.tokens == 0  # cleared after the last answer
    assert stats.sessions[0].requests == 20
    assert "turns=1/10" in caplog.text and "turns=2/10" not in caplog.text


async def test_lifetime_restart_after_max_requests(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, session_max_requests=8) as supervisor:
        for i in range(20):
            assert (await supervisor.query(f"request {i}")).text == f"echo: request {i}"
        stats = supervisor.statistics()
    assert [len(s.prompts) for s in sessions.sessions] == [8, 8, 4]
    assert stats.counters.restart_count == stats.counters.lifetime_restarts == 2
    assert stats.counters.proactive_restarts == 0
    assert caplog.text.count("[RESTART] Starting: lifetime: requests=8") == 2
    assert stats.sessions[0].max_requests == 8


async def test_age_restart_between_requests(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, session_max_age_s=100.0) as supervisor:
        await supervisor.query("young")
        await trio.sleep(150)  # idle past the age: the idle check recycles it
        await supervisor.query("after")
        stats = supervisor.statistics()
    assert stats.counters.age_restarts == 1 and len(sessions.sessions) == 2
    assert "[RESTART] Starting: age: age=" in caplog.text
    assert sessions.sessions[1].prompts == ["after"]


async def test_an_idle_session_that_served_nothing_is_never_recycled(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, session_max_age_s=10.0) as supervisor:
        await wait_status(supervisor, "healthy")
        await trio.sleep(100)
        stats = supervisor.statistics()
    assert len(sessions.sessions) == 1 and stats.counters.restart_count == 0


async def test_a_pool_staggers_its_first_lifetimes(clock: trio.testing.MockClock) -> None:
    """Sessions that start together must not all retire together (and wait for spares)."""
    config = dataclasses.replace(CONFIG, session_max_requests=1000)
    supervisor = Supervisor(config, FakeSessions(), sessions=4)
    budgets = [worker.statistics().max_requests for worker in supervisor.workers]
    assert budgets == [1000, 875, 750, 625]


async def test_repairs_stop_when_the_conversation_is_full(caplog: pytest.LogCaptureFixture) -> None:
    """A request whose own repair turns fill the context gets its answer (a 502) at once.

    The real clock: validation runs in a thread, which the mock clock would take for idleness.
    """
    sessions = FakeSessions()
    schema = StructuredOutput({"type": "integer"})
    async with supervised(sessions, turn_limit=2, schema_repairs=5) as supervisor:
        with pytest.raises(InvalidStructuredOutput, match="after 1 repair turns"):
            await supervisor.query("not a number", structured=schema)
        stats = supervisor.statistics()
    assert stats.counters.schema_repairs == 1  # 2 turns: the conversation's limit
    assert "[WARN] Conversation full (turns=2/2" in caplog.text
    assert stats.turns == 0  # cleared for the next request


async def test_isolation_clears_between_requests(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        for i in range(3):
            await supervisor.query(f"r{i}")
        await trio.sleep(1)
        assert sessions.current.clears == 3  # after each answer, off the request's path
    sessions = FakeSessions()
    async with supervised(sessions, isolation="none") as supervisor:
        for i in range(3):
            await supervisor.query(f"r{i}")
        assert sessions.current.clears == 0


async def test_token_thresholds_proactive_and_hard(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, isolation="none") as supervisor:
        await supervisor.query("tokens=130000")  # 86.7%: proactive before the next query
        await supervisor.query("next")
        assert len(sessions.sessions) == 2
        await supervisor.query("tokens=160000")  # past 100%: the safety net
        await supervisor.query("after")
        stats = supervisor.statistics()
    assert stats.counters.proactive_restarts == 1
    assert stats.counters.hard_restarts == 1
    assert stats.counters.restart_count == 2
    assert "ctx=130000/150000 (86.7%)" in caplog.text
    assert "[PROACTIVE] Inline restart: token_pct=86.7" in caplog.text
    assert "[RESTART] Starting: hard: token_pct=106.7" in caplog.text


async def test_recovery_backoff_then_offline_then_heals(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = FakeSessions(spawn_s=0.0)
    sessions.fail_spawns = True
    async with supervised(sessions) as supervisor:
        await wait_status(supervisor, "restarting")
        await trio.sleep(1 + 2 + 4 + 8 + 16 - 0.5)
        assert supervisor.statistics().status == "restarting"
        await trio.sleep(1)
        assert supervisor.statistics().status == "offline"
        # The first spawn, then five recovery attempts after 1, 2, 4, 8 and 16 s.
        assert sessions.spawn_times == [0, 1, 3, 7, 15, 31]
        with pytest.raises(SessionUnavailable):
            await supervisor.query("while offline")
        # Offline is not forever: one attempt every max backoff (60 s).
        await trio.sleep(60)
        assert sessions.spawn_times[-1] == 91
        sessions.fail_spawns = False
        await trio.sleep(60)
        assert supervisor.statistics().status == "healthy"
        result = await supervisor.query("healed")
        assert result.text == "echo: healed"
        stats = supervisor.statistics()
    for n, delay in enumerate([1, 2, 4, 8, 16], start=1):
        assert f"[RECOVERY] Attempt {n}/5 in {delay}s..." in caplog.text
    assert "[RESTART] FAILED: fake spawn failure" in caplog.text
    assert stats.counters.recovery_attempts == 7
    assert stats.counters.rejected == 1


async def test_backoff_capped_at_max(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions(spawn_s=0.0)
    sessions.fail_spawns = True
    async with supervised(sessions, recovery_max_backoff_s=3.0, recovery_attempts=4) as sup:
        await trio.sleep(20)
        assert sessions.spawn_times[:6] == [0, 1, 3, 6, 9, 12]
        assert sup.statistics().status == "offline"


async def test_queued_requests_fail_fast_when_going_offline(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions(spawn_s=0.0)
    sessions.fail_spawns = True
    outcomes: list[str] = []
    async with supervised(sessions, query_timeout_s=600) as supervisor:

        async def ask() -> None:
            try:
                await supervisor.query("queued")
            except SessionUnavailable:
                outcomes.append(f"503 at {trio.current_time():g}")

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask)
    assert outcomes == ["503 at 31"] * 3


async def test_requests_queue_during_restart(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions(spawn_s=1.0)
    results: list[str] = []
    async with supervised(sessions, session_max_requests=1) as supervisor:
        await supervisor.query("first")  # its CLI's one request: recycled right after it

        async def ask(i: int) -> None:
            results.append((await supervisor.query(f"q{i}")).text)

        await trio.sleep(0.1)
        assert supervisor.statistics().status == "restarting"
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(ask, i)
                await trio.lowlevel.checkpoint()
        stats = supervisor.statistics()
    assert sorted(results) == [f"echo: q{i}" for i in range(4)]
    assert stats.counters.rejected == 0 and stats.counters.total_errors == 0


async def test_timeout_interrupts_and_keeps_session(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, query_timeout_s=30) as supervisor:
        await wait_status(supervisor, "healthy")
        start = trio.current_time()
        with pytest.raises(QueryTimeout):
            await supervisor.query("hang")
        assert trio.current_time() - start == pytest.approx(30)
        assert (await supervisor.query("after")).text == "echo: after"
        stats = supervisor.statistics()
    assert sessions.sessions[0].interrupts == 1
    assert len(sessions.sessions) == 1  # the interrupt was answered: no restart
    assert stats.counters.timeouts == 1
    assert stats.counters.restart_count == 0


async def test_timeout_with_unanswered_interrupt_restarts(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, query_timeout_s=30, interrupt_grace_s=5) as supervisor:
        await wait_status(supervisor, "healthy")
        with pytest.raises(QueryTimeout):
            await supervisor.query("hang-hard")
        assert (await supervisor.query("after")).text == "echo: after"
        stats = supervisor.statistics()
    assert len(sessions.sessions) == 2
    assert stats.counters.timeouts == 1
    assert stats.counters.timeout_restarts == 1
    assert "[RESTART] Starting: timeout:" in caplog.text


async def test_crash_mid_turn_fails_request_then_recovers(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        with pytest.raises(SessionCrashed):
            await supervisor.query("crash")
        assert (await supervisor.query("after")).text == "echo: after"
        stats = supervisor.statistics()
    assert stats.counters.crash_restarts == 1
    assert stats.counters.total_errors == 1 and stats.counters.successes == 1


async def test_exit_while_idle_respawns_before_next_request(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        await supervisor.query("one")
        await trio.sleep(1)
        sessions.current.die()
        await trio.sleep(0.01)
        assert not supervisor.statistics().invoker_connected
        assert (await supervisor.query("two")).text == "echo: two"
        stats = supervisor.statistics()
    assert len(sessions.sessions) == 2
    assert stats.counters.crash_restarts == 1
    assert stats.counters.total_errors == 0


async def test_empty_answer_is_retried_once(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        result = await supervisor.query("empty-once")
        assert result.text == "echo: empty-once"
        with pytest.raises(EmptyResponse):
            await supervisor.query("empty")
        stats = supervisor.statistics()
    assert stats.counters.empty_retries == 2
    assert caplog.text.count("[WARN] Empty response, retrying...") == 2
    assert "[ERROR] Query failed after retry: empty response" in caplog.text


async def test_cli_error_results(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        with pytest.raises(CliError, match="Not logged in"):
            await supervisor.query("error:Not logged in · Please run /login")
        with pytest.raises(ContextLengthExceeded):
            await supervisor.query("error:Prompt is too long")
        assert (await supervisor.query("fine")).text == "echo: fine"


async def test_queue_full_is_rejected(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    outcomes: list[str] = []
    async with supervised(sessions, max_queue=2) as supervisor:
        await wait_status(supervisor, "healthy")

        async def ask(i: int) -> None:
            try:
                outcomes.append((await supervisor.query(f"slow=1 #{i}")).text)
            except QueueFull:
                outcomes.append("429")

        async with trio.open_nursery() as nursery:
            for i in range(5):  # one runs, two wait, two are turned away
                nursery.start_soon(ask, i)
                await trio.lowlevel.checkpoint()
        stats = supervisor.statistics()
    assert outcomes.count("429") == 2
    assert stats.counters.rejected == 2
    assert stats.counters.total_requests == 5


async def test_abandoned_queued_query_never_reaches_cli(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        await wait_status(supervisor, "healthy")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.query, "slow=5 first")
            await trio.sleep(0.1)
            with trio.move_on_after(1):  # the client goes away while queued
                await supervisor.query("never sent")
            await trio.sleep(10)
        assert sessions.current.prompts == ["slow=5 first"]
        stats = supervisor.statistics()
    assert stats.counters.disconnects == 1
    assert stats.counters.total_requests == stats.counters.successes + stats.counters.total_errors


async def test_disconnect_while_running_interrupts(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        await wait_status(supervisor, "healthy")
        with trio.move_on_after(1):
            await supervisor.query("hang")
        await trio.sleep(0.1)
        assert sessions.current.interrupts == 1
        assert (await supervisor.query("next")).text == "echo: next"
        stats = supervisor.statistics()
    assert stats.counters.timeouts == 0 and stats.counters.restart_count == 0


async def test_shutdown_refuses_new_queries(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions()
    async with supervised(sessions) as supervisor:
        await supervisor.query("before")
        supervisor.begin_shutdown()
        with pytest.raises(ShuttingDown):
            await supervisor.query("after")


async def test_memory_limit_recycles_between_requests(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = FakeSessions()
    rss: dict[int, float] = {}
    async with supervised(
        sessions, rss, cli_rss_limit_mb=1024, memory_sample_interval_s=5.0
    ) as supervisor:
        await supervisor.query("one")
        rss[sessions.current.pid] = 1500.0
        await supervisor.query("two")  # measured at most every 5 s: not yet
        assert len(sessions.sessions) == 1
        await trio.sleep(5)
        assert (await supervisor.query("three")).text == "echo: three"
        stats = supervisor.statistics()
    assert len(sessions.sessions) == 2
    assert sessions.sessions[0].prompts == ["one", "two"]
    assert stats.counters.memory_restarts == 1 and stats.counters.restart_count == 1
    assert "[RESTART] Starting: memory: cli_rss_mb=1500.0 > 1024" in caplog.text


async def test_prompt_too_long_recycles_an_accumulating_session(
    clock: trio.testing.MockClock,
) -> None:
    for isolation, sessions_expected in (("none", 2), ("clear", 1)):
        sessions = FakeSessions()
        async with supervised(sessions, isolation=isolation) as supervisor:
            with pytest.raises(ContextLengthExceeded):
                await supervisor.query("error:Prompt is too long")
            assert (await supervisor.query("next")).text == "echo: next"
        assert len(sessions.sessions) == sessions_expected, isolation
