"""The session pool (CCWRAP_SESSIONS) and the hot standby (CCWRAP_STANDBY)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
import trio.testing

from ccwrap_trio.config import Config
from ccwrap_trio.core import CoreRequest
from ccwrap_trio.errors import SessionCrashed
from ccwrap_trio.supervisor import Supervisor

from .conftest import real_stack, running_server
from .fakes import TURN_S, FakeSessions, fake_rss

CONFIG = Config(turn_limit=10, query_timeout_s=60.0, standby=True)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@asynccontextmanager
async def supervised(fake: FakeSessions, **overrides: Any) -> AsyncIterator[Supervisor]:
    config = dataclasses.replace(CONFIG, **overrides)
    supervisor = Supervisor(
        config, fake, sessions=config.sessions, rss_probe=fake_rss({})
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        yield supervisor
        nursery.cancel_scope.cancel()


async def timed_query(supervisor: Supervisor, text: str) -> float:
    start = trio.current_time()
    await supervisor.query(text)
    return trio.current_time() - start


async def test_standby_takes_over_a_planned_restart_without_a_spawn(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions(spawn_s=1.0)
    async with supervised(sessions, session_max_requests=1) as supervisor:
        await trio.sleep(5)  # the first session and the standby are warm
        assert len(sessions.sessions) == 2
        latencies = []
        for i in range(6):
            latencies.append(await timed_query(supervisor, f"q{i}"))
            await trio.sleep(2)  # requests a little apart: time to warm the next standby
        stats = supervisor.statistics()
    # One request per CLI: every request lands on a warm standby.
    assert stats.counters.lifetime_restarts == 6
    assert max(latencies) == pytest.approx(TURN_S)  # never a 1 s spawn on a request's path


async def test_back_to_back_restarts_wait_for_the_warming_standby(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions(spawn_s=1.0)
    async with supervised(sessions, session_max_requests=1) as supervisor:
        await trio.sleep(5)
        for i in range(4):
            await supervisor.query(f"q{i}")
    # Each restart took the standby (warm, or still warming: waited for), never spawning a
    # second CLI beside it: the first session, then one new standby per acquisition.
    assert len(sessions.spawn_times) == 1 + 4
    assert all(b - a >= 1.0 for a, b in zip(sessions.spawn_times[1:], sessions.spawn_times[2:],
                                            strict=False))


async def test_without_standby_a_restart_costs_a_spawn(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions(spawn_s=1.0)
    async with supervised(sessions, session_max_requests=1, standby=False) as sup:
        await trio.sleep(5)
        assert len(sessions.sessions) == 1
        await timed_query(sup, "first")
        assert await timed_query(sup, "second") == pytest.approx(1.0 + TURN_S)


async def test_crash_uses_the_standby_when_ready(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions(spawn_s=1.0)
    async with supervised(sessions) as supervisor:
        await trio.sleep(5)
        with pytest.raises(SessionCrashed):
            await supervisor.query("crash")
        assert await timed_query(supervisor, "after it") == pytest.approx(TURN_S)
        stats = supervisor.statistics()
    assert stats.counters.crash_restarts == 1


async def test_dead_standby_is_replaced_not_used(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions(spawn_s=1.0)
    async with supervised(sessions, session_max_requests=1) as supervisor:
        await trio.sleep(5)
        sessions.sessions[1].die()  # the standby dies while waiting
        await supervisor.query("one")  # restart after this one: the standby is dead
        assert (await supervisor.query("two")).text == "echo: two"
    assert sessions.sessions[1].prompts == []


async def test_pool_runs_queries_side_by_side(clock: trio.testing.MockClock) -> None:
    sessions = FakeSessions(spawn_s=0.5)
    async with supervised(sessions, sessions=3, standby=False) as supervisor:
        await trio.sleep(2)
        stats = supervisor.statistics()
        assert [w.status for w in stats.sessions] == ["healthy"] * 3
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(supervisor.query, f"slow=2 #{i}")
        assert trio.current_time() - start == pytest.approx(2 + TURN_S)
    assert sorted(len(s.prompts) for s in sessions.sessions) == [1, 1, 1]


async def test_a_crash_in_one_session_does_not_disturb_the_others(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions(spawn_s=0.5)
    results: list[str] = []
    async with supervised(sessions, sessions=2, standby=False) as supervisor:
        await trio.sleep(2)

        async def slow() -> None:
            results.append((await supervisor.query("slow=3 long one")).text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            await trio.sleep(0.5)
            with pytest.raises(SessionCrashed):
                await supervisor.query("crash")
            results.append((await supervisor.query("after")).text)
        stats = supervisor.statistics()
    assert sorted(results) == ["echo: after", "echo: slow=3 long one"]
    assert stats.counters.crash_restarts == 1 and stats.counters.total_errors == 1


async def test_health_lists_the_pool_and_the_standby(make_config: Any) -> None:
    config = make_config(sessions=2, standby=True)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        with trio.fail_after(20):
            while True:
                health = (await http.get("/health")).json()
                if all(s["connected"] for s in health["sessions"]) and health["standby"]["pid"]:
                    break
                await trio.sleep(0.05)
        pids = {s["pid"] for s in health["sessions"]} | {health["standby"]["pid"]}
        assert len(pids) == 3
        assert health["invoker_connected"] is True
        assert {"pid", "status", "tokens", "turns", "uptime_s", "cli_rss_mb"} <= set(
            health["sessions"][0])
        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(lambda i=i: http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"FAKE:sleep=1 in parallel {i}"}]}))
        elapsed = time.monotonic() - start
        assert elapsed < 1.9  # two sessions: side by side, not one after the other
        children = {c.pid for c in psutil.Process().children(recursive=True)}
        assert pids <= children


async def test_real_cli_standby_swap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with real_stack(tmp_path, standby=True, session_max_requests=1) as (
        url, standin, _,
    ):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            with trio.fail_after(60):
                while not (await http.get("/health")).json()["standby"]["pid"]:
                    await trio.sleep(0.05)
            for i in range(4):
                response = await http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"swap {i}"}]})
                assert response.json()["choices"][0]["message"]["content"] == f"echo: swap {i}"
            health = (await http.get("/health")).json()
    assert health["stats"]["lifetime_restarts"] >= 3
    assert "standby session ready" in caplog.text
    assert len(standin.calls) == 4


async def ask_on(supervisor: Supervisor, model: str, text: str) -> None:
    await supervisor.query(text, request=CoreRequest(text, model))


async def test_a_request_goes_to_an_idle_session_already_on_its_model(
    clock: trio.testing.MockClock,
) -> None:
    """Issue 11: a pool prefers a free session on the requested model to a set_model switch."""
    sessions = FakeSessions()
    async with supervised(sessions, sessions=2, standby=False) as supervisor:
        await trio.sleep(5)  # both sessions are warm, on the default model
        # Sessions take turns at the channel: a run of one model would alternate them.
        for i, model in enumerate("hoohhohooh"):
            await ask_on(supervisor, {"h": "claude-haiku-5-5", "o": "claude-opus-5-5"}[model],
                         f"q{i}{model}")
        models = sorted(s.model for s in sessions.sessions)
        stats = supervisor.statistics()
    # One switch, the first opus request's; after that each model has its session.
    assert sum(s.model_switches for s in sessions.sessions) == 1
    assert models == ["claude-haiku-5-5", "claude-opus-5-5"]
    assert stats.counters.successes == 10 and stats.queued == 0
    for session in sessions.sessions:  # each session served one model's requests
        assert {p[-1] for p in session.prompts} == {session.model[7]}


async def test_with_no_idle_session_on_the_model_the_request_switches_one(
    clock: trio.testing.MockClock,
) -> None:
    sessions = FakeSessions()
    async with supervised(sessions, sessions=2, standby=False) as supervisor:
        await trio.sleep(5)
        async with trio.open_nursery() as nursery:
            # Both sessions busy on haiku: the opus request cannot wait for a free opus one.
            nursery.start_soon(ask_on, supervisor, "claude-haiku-5-5", "slow=2 a")
            nursery.start_soon(ask_on, supervisor, "claude-haiku-5-5", "slow=2 b")
            await trio.sleep(1)
            await ask_on(supervisor, "claude-opus-5-5", "c")
        assert supervisor.statistics().counters.successes == 3
    assert sum(s.model_switches for s in sessions.sessions) == 1
