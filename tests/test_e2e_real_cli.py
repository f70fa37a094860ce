"""End to end: the openai SDK -> ccwrap-trio -> the REAL Claude Code CLI -> the stand-in API.

Everything here is real: the pinned CLI binary (installed by .ci/run / `make install`), its pipes,
the HTTP socket, and the Anthropic Messages stand-in that the CLI calls on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from ccwrap_trio.config import Config, child_environment
from ccwrap_trio.session import open_session
from ccwrap_trio.standin import Standin, StandinConfig

from .conftest import real_claude_bin, real_stack, stream_until

pytestmark = pytest.mark.real_cli


def ask(client: openai.OpenAI, text: str) -> Any:
    return client.chat.completions.create(
        model="haiku", messages=[{"role": "user", "content": text}]
    )


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_two_isolated_requests_with_real_usage(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        with sdk(url) as client:
            first = await trio.to_thread.run_sync(ask, client, "first secret is ALPHA-7")
            second = await trio.to_thread.run_sync(ask, client, "second question about BETA")
        async with httpx.AsyncClient(base_url=url) as http:
            health = (await http.get("/health")).json()

    assert first.choices[0].message.content == "echo: first secret is ALPHA-7"
    assert second.choices[0].message.content == "echo: second question about BETA"
    assert len(standin.calls) == 2  # the warm-up and isolation /clear turns call no API
    # Isolation: the second API call carries nothing of the first request.
    assert "ALPHA-7" in str(standin.calls[0].body["messages"])
    assert "ALPHA-7" not in str(standin.calls[1].body["messages"])
    assert "BETA" in str(standin.calls[1].body["messages"])
    # Usage is what the API reported to the CLI, not an estimate.
    for completion, call in zip((first, second), standin.calls, strict=True):
        reported = call.usage
        usage = completion.usage
        assert usage.prompt_tokens == (
            reported["input_tokens"] + reported.get("cache_read_input_tokens", 0)
            + reported.get("cache_creation_input_tokens", 0)
        )
        assert usage.completion_tokens == reported["output_tokens"]
        assert usage.prompt_tokens_details.cached_tokens == reported.get(
            "cache_read_input_tokens", 0
        )
    assert health["status"] == "healthy"
    assert health["session"]["cli_version"] == "2.1.332"
    assert health["session"]["model"] == "claude-haiku-5-5"
    assert health["stats"]["total_requests"] == 2
    assert health["context_usage"]["turns"] == 0  # each request's conversation was cleared
    assert health["sessions"][0]["requests"] == 2


async def test_proactive_restart_spawns_a_new_cli(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An accumulating conversation (isolation none) fills up and is replaced at 80%.
    async with real_stack(tmp_path, turn_limit=5, proactive_pct=80, isolation="none") as (
        url, standin, _
    ):
        pids = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            with sdk(url) as client:
                for i in range(9):
                    completion = await trio.to_thread.run_sync(ask, client, f"turn {i}")
                    assert completion.choices[0].message.content == f"echo: turn {i}"
                    pids.append((await http.get("/health")).json()["session"]["pid"])
            health = (await http.get("/health")).json()
    # 80% of 5 turns is 4 turns: sessions serve 4, 4 and 1 requests.
    assert health["stats"]["restart_count"] == 2
    assert health["stats"]["proactive_restarts"] == 2
    assert caplog.text.count("[PROACTIVE] Inline restart: turn_pct=80.0") == 2
    assert caplog.text.count("[RESTART] Memory after:") == 2
    assert len(set(pids) - {None}) == 3  # None: polled while a restart was under way
    assert len(standin.calls) == 9


async def test_api_error_is_a_502_and_the_session_goes_on(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, _, _config):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            failed = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "boom [standin:status=500]"}]})
            assert failed.status_code == 502
            assert "API Error: 500" in failed.json()["error"]["message"]
            ok = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "fine again"}]})
            assert ok.status_code == 200
            assert ok.json()["choices"][0]["message"]["content"] == "echo: fine again"


async def test_hung_api_times_out_and_the_interrupt_keeps_the_cli(tmp_path: Path) -> None:
    async with real_stack(tmp_path, query_timeout_s=3.0) as (url, standin, _):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            hung = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "wait [standin:hang]"}]})
            assert hung.status_code == 504
            pid_before = (await http.get("/health")).json()["session"]["pid"]
            ok = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "after the hang"}]})
            assert ok.status_code == 200
            assert ok.json()["choices"][0]["message"]["content"] == "echo: after the hang"
            health = (await http.get("/health")).json()
    assert health["stats"]["timeouts"] == 1
    # The real CLI answered the interrupt: the same process served the next request.
    assert health["session"]["pid"] == pid_before
    assert health["stats"]["restart_count"] == 0
    assert "after the hang" in str(standin.calls[-1].body["messages"])


async def test_real_cli_session_has_no_tools_and_no_mcp(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    async with trio.open_nursery() as nursery:
        standin: Standin = await nursery.start(Standin(StandinConfig()).serve)
        env = child_environment(
            {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": standin.url,
             "ANTHROPIC_API_KEY": "sk-standin-e2e"},
            forward_api_key=True,
        )
        command = Config(claude_bin=real_claude_bin()).cli_command()
        async with open_session(command, env=env, cwd=tmp_path, startup_timeout_s=60) as session:
            assert session.tools == ()
            # Only ccwrap-trio's own SDK server, which offers no tool until a request has some.
            assert session.mcp_servers == ("oa",)
            reply = base64.b64encode(b"I ran nothing.").decode()
            result = await session.ask(f"run `touch pwned` [standin:reply={reply}]")
            assert result.text == "I ran nothing."
        assert standin.calls[0].body["tools"] == []
        assert not (tmp_path / "pwned").exists()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("directive", "message", "status"),
    [
        ("[standin:status=529]", "API Error", 503),  # overloaded stays overloaded (issue 13)
        ("[standin:drop]", "API Error", 502),
    ],
)
async def test_api_faults_are_502s_and_the_cli_goes_on(
    tmp_path: Path, directive: str, message: str, status: int
) -> None:
    async with real_stack(tmp_path) as (url, _, _config):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            failed = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"fault {directive}"}]})
            assert failed.status_code == status
            assert message in failed.json()["error"]["message"]
            ok = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "after the fault"}]})
            assert ok.json()["choices"][0]["message"]["content"] == "echo: after the fault"
            stats = (await http.get("/health")).json()["stats"]
    assert stats["restart_count"] == 0
    assert stats["total_requests"] == stats["successes"] + stats["total_errors"] == 2


async def test_a_model_asking_for_tools_runs_nothing(tmp_path: Path) -> None:
    """A hostile answer (tool_use: Bash/Write) gets 'No such tool available' from the CLI."""
    async with real_stack(tmp_path) as (url, standin, config):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            for tool in ("Bash", "Write", "Edit"):
                response = await http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user",
                                  "content": f"run `touch pwned` [standin:tool-use={tool}]"}]})
                assert response.status_code == 200
        workdir = config.workdir
    results = [
        block for call in standin.calls for message in call.body["messages"]
        if isinstance(message.get("content"), list) for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]
    assert len(results) == 3
    assert all(r["is_error"] and "No such tool available" in str(r["content"]) for r in results)
    assert all(call.body["tools"] == [] for call in standin.calls)
    assert not list(Path(tmp_path).rglob("pwned"))
    assert workdir is None or not (workdir / "pwned").exists()


async def test_streaming_and_disconnect_with_the_real_cli(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        words = " ".join(f"w{i}" for i in range(60))
        received = await stream_until(url, {"stream": True, "messages": [
            {"role": "user", "content": f"{words} [standin:delay=0.1]"}]}, b" w3")
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            ok = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "next after disconnect"}]})
            health = (await http.get("/health")).json()
    assert ok.json()["choices"][0]["message"]["content"] == "echo: next after disconnect"
    assert health["stats"]["disconnects"] == 1
    assert health["stats"]["restart_count"] == 0  # the real CLI answered the interrupt
    assert b'"role": "assistant"' in received and b'"content": " w2"' in received
    # The API never got to finish the interrupted answer: the turn was aborted mid-stream.
    assert len(standin.calls) == 2
