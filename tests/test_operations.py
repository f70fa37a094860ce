"""Operations: probes, Prometheus metrics, JSON logs, and the Hypercorn command deployment."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ccwrap_trio.logs import JsonFormatter

from .conftest import ROOT, running_server, wait_for_health
from .test_hardening_http import stream_never_read_is_cut


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_liveness_and_readiness(make_config: Any, fake_cli: Path) -> None:
    config = make_config(api_keys=("sk-probe-test-1",), max_queue=1)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        with trio.fail_after(10):
            while (await http.get("/health")).json()["status"] != "healthy":
                await trio.sleep(0.05)
        live = await http.get("/health/live")
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        ready = await http.get("/health/ready")
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")
        headers = {"Authorization": "Bearer sk-probe-test-1"}
        async with trio.open_nursery() as nursery:  # one running, one waiting: the queue is full
            for text, running in (("FAKE:sleep=3 a", (1, 0)), ("b", (1, 1))):
                nursery.start_soon(lambda t=text: http.post(
                    "/v1/chat/completions", headers=headers,
                    json={"messages": [{"role": "user", "content": t}]}))
                await wait_for_health(
                    http, lambda h, r=running: (h["active_queries"], h["queued"]) == r)
            full = await http.get("/health/ready")
            assert full.status_code == 503 and full.json()["reasons"] == ["the queue is full"]
    # Not connected: a missing CLI keeps the server unready while it stays alive.
    config = make_config(claude_bin="/nonexistent/claude", recovery_attempts=1,
                         recovery_max_backoff_s=0.2)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/health/live")).status_code == 200
        unready = await http.get("/health/ready")
        assert unready.status_code == 503
        assert unready.json()["reasons"][0].startswith("no CLI session connected")


async def test_metrics_render_the_health_snapshot(make_config: Any) -> None:
    async with running_server(make_config()) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            for text in ("one", "two", "FAKE:error=boom", "three"):
                await http.post("/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": text}]})
            await http.post("/v1/chat/completions", json={"messages": []})
            response = await http.get("/metrics")
            health = (await http.get("/health")).json()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = metric_values(response.text)
    stats = health["stats"]
    assert values[("ccwrap_requests_total", (("outcome", "success"),))] == stats["successes"] == 3
    assert values[("ccwrap_requests_total", (("outcome", "error"),))] == stats["total_errors"]
    for reason in ("proactive", "hard", "memory", "crash", "timeout", "lifetime", "age"):
        assert values[("ccwrap_restarts_total", (("reason", reason),))] == stats[
            f"{reason}_restarts"] == 0
    # The conversation is cleared after each answer; the CLI's lifetime counts the requests.
    assert values[("ccwrap_context_turns", ())] == health["context_usage"]["turns"] == 0
    assert values[("ccwrap_session_requests", (("session", "0"),))] == health["sessions"][0][
        "requests"] == 4
    assert values[("ccwrap_session_max_requests", (("session", "0"),))] == 1000
    assert values[("ccwrap_context_turn_limit", ())] == 10
    assert values[("ccwrap_session_up", ())] == 1
    assert values[("ccwrap_queue_depth", ())] == health["queued"]
    assert values[("ccwrap_tokens_total", (("kind", "completion"),))] == stats[
        "completion_tokens"] > 0
    assert values[("ccwrap_request_duration_seconds_count", ())] == 4
    assert values[("ccwrap_time_to_first_token_seconds_count", ())] == 3
    assert values[("ccwrap_server_resident_memory_bytes", ())] > 10 * 1024 * 1024
    assert values[("ccwrap_http_requests_total",
                   (("route", "/v1/chat/completions"), ("status", "200")))] == 3
    assert values[("ccwrap_http_requests_total",
                   (("route", "/v1/chat/completions"), ("status", "400")))] == 1
    assert values[("ccwrap_http_requests_total",
                   (("route", "/v1/chat/completions"), ("status", "502")))] == 1
    assert ("ccwrap_info", (("version", health["version"]),)) in values


def test_json_log_lines_carry_marker_request_id_and_numbers() -> None:
    record = logging.LogRecord(
        "ccwrap_trio.supervisor", logging.INFO, __file__, 1,
        "[DONE] %.1fs | ctx=%d/%d (%.1f%%) | turns=%d/%d | request_id=%s",
        (2.3, 12345, 150000, 8.2, 3, 10, "req_abc"), None,
    )
    record.duration_s, record.ctx_tokens, record.turns = 2.3, 12345, 3
    line = json.loads(JsonFormatter().format(record))
    assert line["marker"] == "DONE"
    assert line["request_id"] == "req_abc"
    assert line["event"].startswith("2.3s | ctx=12345/150000")
    assert (line["duration_s"], line["ctx_tokens"], line["turns"]) == (2.3, 12345, 3)
    assert line["level"] == "info" and line["ts"].endswith("+00:00")


async def serve_command(
    argv: list[str], env: dict[str, str], pattern: bytes
) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process(
        argv, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, cwd=str(ROOT),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: cleanup reaches Hypercorn's workers
    )
    assert process.stderr is not None
    log = b""
    with trio.fail_after(30):
        while not (match := re.search(pattern, log)):
            chunk = await process.stderr.receive_some(4096)
            assert chunk, log.decode()
            log += chunk
    return process, match.group(1).decode()


def kill_group(process: trio.Process) -> None:
    """Leave nothing behind: the server, Hypercorn's workers and any CLI they started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def read_rest(process: trio.Process) -> str:
    assert process.stderr is not None
    out = b""
    with trio.fail_after(30):
        while chunk := await process.stderr.receive_some(65536):
            out += chunk
    return out.decode()


async def test_json_logs_from_a_real_server(fake_cli: Path) -> None:
    process, url = await serve_command(
        [sys.executable, "-m", "ccwrap_trio", "serve"],
        {"CCWRAP_PORT": "0", "CCWRAP_CLAUDE_BIN": str(fake_cli), "CCWRAP_LOG_FORMAT": "json"},
        rb'"ccwrap-trio listening on (http://[^"\s]+)',
    )
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post(
                "/v1/chat/completions", headers={"X-Request-ID": "req-json-1"},
                json={"messages": [{"role": "user", "content": "log me"}]})
            assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        output = await read_rest(process)
        assert await process.wait() == 0
    finally:
        kill_group(process)
        await process.wait()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(lines) == len([line for line in output.splitlines() if line.strip()])
    done = [line for line in lines if line["marker"] == "DONE"]
    assert len(done) == 1
    assert done[0]["request_id"] == "req-json-1"
    assert done[0]["turns"] == 1 and isinstance(done[0]["duration_s"], float)
    assert "log me" not in output


async def test_hypercorn_command_runs_the_app_with_its_lifespan(fake_cli: Path) -> None:
    hypercorn = Path(sys.executable).with_name("hypercorn")
    process, url = await serve_command(
        [str(hypercorn), "--worker-class", "trio", "--bind", "127.0.0.1:0",
         "--graceful-timeout", "10", "ccwrap_trio.asgi:app"],
        {"CCWRAP_CLAUDE_BIN": str(fake_cli), "CCWRAP_MEMORY_SAMPLE_INTERVAL": "0.5"},
        rb"Running on (http://127\.0\.0\.1:\d+)",
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            with trio.fail_after(30):
                while (await http.get("/health")).json()["status"] != "healthy":
                    await trio.sleep(0.05)
            cli_pid = (await http.get("/health")).json()["session"]["pid"]
            # A Hypercorn worker process (a child of the command) owns the CLI.
            workers = psutil.Process(process.pid).children()
            assert psutil.Process(cli_pid).ppid() in [worker.pid for worker in workers]
            result: dict[str, httpx.Response] = {}

            async def in_flight() -> None:
                result["r"] = await http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "FAKE:sleep=3 via hypercorn"}]})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)
                await wait_for_health(http, lambda h: h["active_queries"] == 1)
                process.send_signal(signal.SIGTERM)
        output = await read_rest(process)
        code = await process.wait()
    finally:
        kill_group(process)
        await process.wait()
    assert result["r"].status_code == 200, output
    assert result["r"].json()["choices"][0]["message"]["content"] == "echo: via hypercorn"
    assert code == 0, output
    assert not psutil.pid_exists(cli_pid)


async def test_hypercorn_command_cuts_a_client_that_never_reads(fake_cli: Path) -> None:
    """CCWRAP_SEND_TIMEOUT holds under the hypercorn command too (its config has no such field)."""
    hypercorn = Path(sys.executable).with_name("hypercorn")
    process, url = await serve_command(
        [str(hypercorn), "--worker-class", "trio", "--bind", "127.0.0.1:0",
         "ccwrap_trio.asgi:app"],
        {"CCWRAP_CLAUDE_BIN": str(fake_cli), "CCWRAP_SEND_TIMEOUT": "1",
         "CCWRAP_QUERY_TIMEOUT": "20"},
        rb"Running on (http://127\.0\.0\.1:\d+)",
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await wait_for_health(http, lambda h: h["status"] == "healthy")
            await stream_never_read_is_cut(url, http)
        process.send_signal(signal.SIGTERM)
        output = await read_rest(process)
        assert await process.wait() == 0, output
    finally:
        kill_group(process)
        await process.wait()
    assert "Client read nothing for 1s; connection closed" in output


def test_asgi_module_exits_2_on_bad_config() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import ccwrap_trio.asgi"], capture_output=True, text=True,
        env={**os.environ, "CCWRAP_TURN_LIMIT": "zero"}, timeout=30,
    )
    assert out.returncode == 2
    assert "CCWRAP_TURN_LIMIT must be an integer >= 1, got 'zero'" in out.stderr


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics", "/health"])
async def test_probes_are_open_without_a_key(make_config: Any, path: str) -> None:
    async with running_server(make_config(api_keys=("sk-closed-1234",))) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get(path)).status_code in (200, 503)
            assert (await http.get("/v1/models")).status_code == 401


async def test_metrics_count_requests_per_endpoint(make_config: Any) -> None:
    async with running_server(make_config()) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            await http.post("/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "one"}]})
            for path in ("/v1/responses", "/responses"):
                await http.post(path, json={"input": "two"})
            await http.post("/v1/responses", json={"input": ""})  # a 400 counts too
            await http.get("/v1/models")  # not an endpoint of a dialect
            values = metric_values((await http.get("/metrics")).text)
    endpoint = "ccwrap_endpoint_requests_total"
    assert values[(endpoint, (("endpoint", "chat_completions"),))] == 1
    assert values[(endpoint, (("endpoint", "responses"),))] == 3
    assert values[(endpoint, (("endpoint", "messages"),))] == 0
    assert values[("ccwrap_http_requests_total",
                   (("route", "/v1/responses"), ("status", "400")))] == 1
