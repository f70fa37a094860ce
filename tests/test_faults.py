"""The fault matrix (docs/reliability.md), over a real socket, with the fake CLI's faults.

For every fault: the affected request gets the documented status, every other accepted request
is answered, the session is consistent or replaced, /health's counters add up, and no CLI
process is left behind. tests/test_e2e_real_cli.py covers the faults the real CLI can be made to
show (API 500/529, hung or dropped API, tool_use answers).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from .conftest import running_server, wait_for, wait_for_health, write_executable


def fake_clis() -> list[psutil.Process]:
    """Live fake CLI processes started by this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("fake_claude.py" in part for part in child.cmdline()) and (
                child.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(child)
        except psutil.Error:
            continue
    return found


async def ask(http: httpx.AsyncClient, text: str, **extra: Any) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={
        "model": "haiku", "messages": [{"role": "user", "content": text}], **extra})


async def assert_consistent(http: httpx.AsyncClient) -> dict[str, Any]:
    """The next request is answered, counters add up, at most one CLI is alive."""
    ok = await ask(http, "are you still there")
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"] == "echo: are you still there"
    health = (await http.get("/health")).json()
    stats = health["stats"]
    assert stats["total_requests"] == stats["successes"] + stats["total_errors"] + stats[
        "rejected"], stats
    assert len(fake_clis()) <= 1  # never two: the old CLI is reaped before a new one starts
    return health


@pytest.mark.parametrize(
    ("prompt", "status", "code", "restarts"),
    [
        pytest.param("FAKE:crash", 502, "cli_crashed", 1, id="crash-mid-turn"),
        pytest.param("FAKE:hang-hard", 504, "query_timeout", 1, id="hang-before-first-line"),
        pytest.param("FAKE:hang", 504, "query_timeout", 0, id="hang-interruptible"),
        pytest.param("FAKE:hang-after=2 one two three", 504, "query_timeout", 0,
                     id="hang-mid-stream"),
        pytest.param("FAKE:garbage hello", 200, None, 0, id="non-json-line"),
        pytest.param("FAKE:close-stdout", 502, "cli_crashed", 1, id="stdout-closed-alive"),
        pytest.param("FAKE:error=API_Error:_500_boom", 502, "cli_error", 0, id="api-500"),
        pytest.param("FAKE:error=Not_logged_in_·_Please_run_/login", 502, "cli_error", 0,
                     id="not-logged-in"),
        pytest.param("FAKE:error=Prompt_is_too_long", 400, "context_length_exceeded", 0,
                     id="prompt-too-long"),
        pytest.param("FAKE:empty", 502, "empty_response", 0, id="empty-twice"),
    ],
)
async def test_turn_faults(
    make_config: Any, prompt: str, status: int, code: str | None, restarts: int
) -> None:
    config = make_config(query_timeout_s=2.0, interrupt_grace_s=1.0)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        response = await ask(http, prompt)
        assert response.status_code == status, response.text
        if code is not None:
            assert response.json()["error"]["code"] == code
        health = await assert_consistent(http)
    assert health["stats"]["restart_count"] == restarts
    assert fake_clis() == []  # the server stopped: its CLI was reaped


async def test_line_over_one_mebibyte_is_read_whole(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await ask(http, "FAKE:big=3000000")
        assert response.status_code == 200
        assert len(response.json()["choices"][0]["message"]["content"]) == 3_000_000
        await assert_consistent(http)


async def test_hang_mid_stream_ends_the_stream_with_an_error(make_config: Any) -> None:
    config = make_config(query_timeout_s=2.0)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        response = await ask(http, "FAKE:hang-after=2 one two three", stream=True)
        assert response.status_code == 200
        frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        assert json.loads(frames[-2])["error"]["code"] == "query_timeout"
        assert "".join(json.loads(f)["choices"][0]["delta"].get("content", "")
                       for f in frames[1:-2]) == "echo: one"
        await assert_consistent(http)


async def test_exit_while_idle_is_respawned_before_the_next_request(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await ask(http, "FAKE:exit-after goodbye")).status_code == 200
        with trio.fail_after(10):  # the exit is seen while idle, and the CLI respawned
            while (await http.get("/health")).json()["stats"]["crash_restarts"] < 1:
                await trio.sleep(0.05)
        health = await assert_consistent(http)  # answered, not failed
    assert health["stats"]["crash_restarts"] == 1
    assert health["stats"]["total_errors"] == 0


async def test_sigkill_of_the_cli_is_detected_and_respawned(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        with trio.fail_after(10):
            while (health := (await http.get("/health")).json())["status"] != "healthy":
                await trio.sleep(0.05)
        victim = health["session"]["pid"]
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(10):
            while (await http.get("/health")).json()["session"]["pid"] in (victim, None):
                await trio.sleep(0.05)
        health = await assert_consistent(http)
    assert health["stats"]["crash_restarts"] == 1
    assert health["stats"]["total_errors"] == 0


@pytest.mark.parametrize(
    ("start", "detail"),
    [
        ("crash", "died at start"),
        ("text", "died at start"),
    ],
)
async def test_cli_that_fails_at_start_goes_offline(
    make_config: Any, start: str, detail: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(env={"FAKE_CLAUDE_START": start}, recovery_attempts=1,
                         recovery_max_backoff_s=0.2)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        await wait_for(lambda: "[RECOVERY] Offline" in caplog.text)
        response = await ask(http, "anyone?")
        assert response.status_code == 503
        stats = (await http.get("/health")).json()["stats"]
    assert f"[RESTART] FAILED: {detail}" in caplog.text
    assert stats["rejected"] == 1 and stats["total_requests"] == 1
    assert fake_clis() == []


async def test_binary_not_executable(
    make_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = tmp_path / "not-executable"
    binary.write_text("#!/bin/sh\n")
    config = make_config(claude_bin=str(binary), recovery_attempts=1, recovery_max_backoff_s=0.2)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        await wait_for(lambda: "[RECOVERY] Offline" in caplog.text)
        assert (await ask(http, "x")).status_code == 503
    assert "Permission denied" in caplog.text


async def test_cli_memory_limit_recycles_the_session(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The fake CLI is a ~10 MB Python process: a 1 MB limit recycles it between requests.
    config = make_config(cli_rss_limit_mb=1, memory_sample_interval_s=0.01)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        for i in range(3):
            assert (await ask(http, f"r{i}")).status_code == 200
        health = await assert_consistent(http)
    assert health["stats"]["memory_restarts"] >= 3
    assert "[RESTART] Starting: memory: cli_rss_mb=" in caplog.text


async def test_disconnect_while_queued_and_while_running(
    make_config: Any, tmp_path: Path
) -> None:
    log = tmp_path / "stdin.log"
    config = make_config(env={"FAKE_CLAUDE_LOG": str(log)})
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, http, "FAKE:sleep=2 first")
            await wait_for_health(http, lambda h: h["active_queries"] == 1)
            async with trio.open_nursery() as waiting:  # queued behind the first, then it leaves
                waiting.start_soon(ask, http, "queued and abandoned")
                await wait_for_health(http, lambda h: h["queued"] == 1)
                waiting.cancel_scope.cancel()
            async with trio.open_nursery() as running:  # running (hangs), then the client leaves
                running.start_soon(ask, http, "FAKE:hang running and abandoned")
                await wait_for(lambda: "running and abandoned" in log.read_text())
                running.cancel_scope.cancel()
        await wait_for(lambda: '"control_request"' in log.read_text())
        health = await assert_consistent(http)
    assert "queued and abandoned" not in log.read_text()  # never reached the CLI
    assert health["stats"]["disconnects"] == 2
    assert health["stats"]["restart_count"] == 0


async def test_200_clients_against_a_queue_of_64(make_config: Any) -> None:
    config = make_config(max_queue=64, query_timeout_s=60)
    limits = httpx.Limits(max_connections=250)
    async with running_server(config) as url, httpx.AsyncClient(
        base_url=url, timeout=60, limits=limits
    ) as http:
        await ask(http, "warm")
        statuses: list[int] = []
        waits: list[int] = []

        async def one(i: int) -> None:
            response = await ask(http, f"FAKE:sleep=0.05 client {i}")
            statuses.append(response.status_code)
            if response.status_code == 429:
                waits.append(int(response.headers["retry-after"]))
            else:
                assert response.json()["choices"][0]["message"]["content"] == f"echo: client {i}"

        with trio.fail_after(60):  # none hangs
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
        health = await assert_consistent(http)
    assert len(statuses) == 200
    assert set(statuses) <= {200, 429}
    # Retry-After follows the backlog and spreads the rejected over the drain (was 1 for all).
    assert min(waits) >= 1 and len(set(waits)) > 1
    # Clients arrive faster than turns end: at least 64 waiting + 1 running get through, and the
    # queue, once full, turns the rest away at once.
    assert statuses.count(200) >= 65
    assert statuses.count(429) >= 100
    stats = health["stats"]
    assert stats["rejected"] == statuses.count(429)
    assert stats["successes"] == statuses.count(200) + 2


async def test_binary_appears_after_offline(
    make_config: Any, fake_cli: Path, tmp_path: Path
) -> None:
    binary = tmp_path / "later" / "claude"
    config = make_config(claude_bin=str(binary), recovery_attempts=1, recovery_max_backoff_s=0.2)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        with trio.fail_after(10):
            while (await http.get("/health")).json()["status"] != "offline":
                await trio.sleep(0.05)
        binary.parent.mkdir()
        write_executable(binary, fake_cli.read_text())
        with trio.fail_after(10):
            while (await http.get("/health")).json()["status"] != "healthy":
                await trio.sleep(0.05)
        await assert_consistent(http)


async def test_prompts_answers_and_keys_stay_out_of_the_logs(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    secret = "the-launch-code-is-7731"
    config = make_config(api_keys=("sk-server-key-123",))
    async with running_server(config) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": "Bearer sk-server-key-123"}
    ) as http:
        assert (await ask(http, secret)).status_code == 200
        assert (await ask(http, secret, stream=True)).status_code == 200
        bad = await http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-key-999"})
        assert bad.status_code == 401
    assert "[DONE]" in caplog.text
    for leaked in (secret, "sk-server-key-123", "sk-wrong-key-999"):
        assert leaked not in caplog.text


async def test_log_prompts_switch(make_config: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with running_server(make_config(log_prompts=True)) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await ask(http, "debug me please")).status_code == 200
    assert "[PROMPT] request_id=" in caplog.text and "debug me please" in caplog.text
    assert "[ANSWER] request_id=" in caplog.text and "echo: debug me please" in caplog.text
