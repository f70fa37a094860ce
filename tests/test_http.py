"""The HTTP API over a real socket on 127.0.0.1, with the `openai` SDK and httpx as clients.

The CLI here is tests/fake_claude.py (real processes and pipes); test_e2e_real_cli.py repeats the
essentials with the real Claude Code CLI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from .conftest import running_server, wait_for, wait_for_health, write_executable


def sdk(base_url: str, **kwargs: Any) -> openai.OpenAI:
    # Close it (``with``) before the server stops: Hypercorn lets an idle keep-alive connection
    # hold a graceful shutdown open for the whole grace period.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, **kwargs)


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def test_completion_through_the_openai_sdk(make_config: Any) -> None:
    async with running_server(make_config(models=("my-model",))) as url:
        with sdk(url) as client:
            completion = await in_thread(
            client.chat.completions.create,
            model="my-model",
            messages=[{"role": "user", "content": "hello there"}],
        )
        assert completion.choices[0].message.content == "echo: hello there"
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.model == "my-model"
        assert completion.id.startswith("chatcmpl-")
        assert completion.object == "chat.completion"
        # Usage is the CLI's: input + cache read + cache creation, and output tokens.
        usage = completion.usage
        assert usage is not None
        assert usage.prompt_tokens == len("hello there") // 4 + 100
        assert usage.completion_tokens == 3
        assert usage.total_tokens == usage.prompt_tokens + 3
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 100


async def test_conversation_is_rendered_into_one_delimited_turn(
    make_config: Any, tmp_path: Path
) -> None:
    log = tmp_path / "stdin.log"
    config = make_config(env={"FAKE_CLAUDE_LOG": str(log)})
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/chat/completions", json={
            "model": "haiku",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
                {"role": "assistant", "content": "4"},
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "And 3+3?"},
            ],
            "temperature": 0.2,
            "some_future_field": {"ignored": True},
        })
    assert response.status_code == 200, response.text
    text = log.read_text()
    for block in ("<system>\\nBe brief.\\n</system>", "<user>\\nWhat is 2+2?\\n</user>",
                  "<assistant>\\n4\\n</assistant>", "<system>\\nAnswer in French.\\n</system>",
                  "<user>\\nAnd 3+3?\\n</user>"):
        assert block in text


async def test_slash_command_text_never_reaches_the_cli_as_a_command(
    make_config: Any, tmp_path: Path
) -> None:
    log = tmp_path / "stdin.log"
    async with running_server(make_config(env={"FAKE_CLAUDE_LOG": str(log)})) as url:
        with sdk(url) as client:
            completion = await in_thread(
                client.chat.completions.create,
                model="haiku", messages=[{"role": "user", "content": "/clear"}],
            )
    assert completion.choices[0].message.content.startswith("echo: The request is")
    warm_up, request, *_ = (json.loads(line) for line in log.read_text().splitlines())
    assert warm_up["message"]["content"] == "/clear"  # ccwrap-trio's own, before any request
    assert request["message"]["content"].endswith("<user>\n/clear\n</user>")


async def test_request_id_is_echoed_or_made(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        body = {"model": "haiku", "messages": [{"role": "user", "content": "hi"}]}
        given = await http.post("/v1/chat/completions", json=body,
                                headers={"X-Request-ID": "abc-123"})
        assert given.headers["x-request-id"] == "abc-123"
        made = await http.get("/health")
        assert made.headers["x-request-id"].startswith("req_")
        error = await http.get("/nowhere", headers={"X-Request-ID": "e-1"})
        assert error.headers["x-request-id"] == "e-1"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"model": "haiku"}', 400, "messages"),
        (b'{"model": "haiku", "messages": []}', 400, "messages"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "messages[0].role"),
        (b'{"messages": [{"role": "tool", "content": "x"}]}', 400, "messages[0].tool_call_id"),
        (b'{"messages": [{"role": "user", "content": 7}]}', 400, "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}', 400,
         "messages[0].content[0].type"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
         "messages[0].content[0].image_url.url"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
         b'{"url": "https://example.com/cat.png"}}]}]}', 400,
         "messages[0].content[0].image_url.url"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
         b'{"url": "data:image/png;base64,!!!"}}]}]}', 400, "messages[0].content[0].image_url.url"),
        (b'{"messages": [{"role": "user", "content": "   "}]}', 400, "messages"),
        (b'{"n": 2, "messages": [{"role": "user", "content": "x"}]}', 400, "n"),
        (b'{"logprobs": true, "messages": [{"role": "user", "content": "x"}]}', 400, "logprobs"),
        (b'{"top_logprobs": 2, "messages": [{"role": "user", "content": "x"}]}', 400,
         "top_logprobs"),
        (b'{"tools": [{"type": "function", "function": {"name": "f g"}}], '
         b'"messages": [{"role": "user", "content": "x"}]}', 400, "tools[0].function.name"),
        (b'{"stop": ["a", "b", "c", "d", "e"], "messages": [{"role": "user", "content": "x"}]}',
         400, "stop"),
        (b'{"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}', 400, "max_tokens"),
        (b'{"max_completion_tokens": "9", "messages": [{"role": "user", "content": "x"}]}', 400,
         "max_completion_tokens"),
        (b'{"temperature": "hot", "messages": [{"role": "user", "content": "x"}]}', 400,
         "temperature"),
        (b'{"stream": "yes", "messages": [{"role": "user", "content": "x"}]}', 400, "stream"),
        (b'{"response_format": {"type": "xml"}, "messages": [{"role": "user", "content": "x"}]}',
         400, "response_format.type"),
        (b'{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
         b'{"type": "nonsense"}}}, "messages": [{"role": "user", "content": "x"}]}', 400,
         "response_format.json_schema.schema"),
    ],
)
async def test_bad_requests_get_openai_errors(
    make_config: Any, body: bytes, status: int, param: str | None
) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
        assert error["message"]


async def test_sdk_raises_its_own_error_types(make_config: Any) -> None:
    async with running_server(make_config()) as url:
        with sdk(url) as client:
            with pytest.raises(openai.BadRequestError) as info:
                await in_thread(client.chat.completions.create, model="haiku", messages=[])
            assert info.value.param == "messages"  # type: ignore[attr-defined]
            with pytest.raises(openai.NotFoundError):
                await in_thread(client.embeddings.create, model="x", input="y")


async def test_unknown_route_and_wrong_method(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        missing = await http.get("/v2/whatever")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "unknown_url"
        wrong = await http.get("/v1/chat/completions")
        assert wrong.status_code == 405
        assert wrong.json()["error"]["type"] == "invalid_request_error"


async def test_models_lists_configured_model_and_aliases(make_config: Any) -> None:
    async with running_server(make_config(model="claude-custom")) as url:
        with sdk(url) as client:
            models = await in_thread(client.models.list)
        # Exactly what CCWRAP_MODELS allows: the aliases, and the known ids of "claude-*".
        assert [m.id for m in models.data] == [
            "claude-custom", "haiku", "sonnet", "opus",
            "claude-haiku-5-5", "claude-sonnet-5-5", "claude-opus-5-5",
        ]


async def test_health_schema(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        await http.post("/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "hi"}]})
        with trio.fail_after(10):  # the sampler's next sample (every 0.5 s here) sees the CLI
            while (await http.get("/health")).json()["memory"]["cli_rss_mb"] == 0:
                await trio.sleep(0.1)
        response = await http.get("/health")
        assert response.status_code == 200
        health = response.json()
    assert health["status"] == "healthy"
    assert health["invoker_connected"] is True
    assert health["active_queries"] == 0 and health["queued"] == 0
    assert set(health["context_usage"]) == {
        "tokens", "turns", "token_limit", "turn_limit", "token_pct", "turn_pct"}
    # The conversation was cleared after the answer; the CLI has served one request.
    assert health["context_usage"]["turns"] == 0
    assert health["context_usage"]["turn_pct"] == 0.0
    assert health["sessions"][0]["requests"] == 1
    assert {"total_requests", "total_errors", "restart_count", "proactive_restarts",
            "hard_restarts", "recovery_attempts", "timeouts", "empty_retries"} <= set(
        health["stats"])
    assert health["stats"]["total_requests"] == 1
    assert set(health["memory"]) == {"rss_mb", "vms_mb", "cli_rss_mb", "trend_mb_per_min"}
    # In-process: the pytest process's RSS, every client library the suite imported included
    # (the server's own bound, < 100 MB, is checked on a real server process in test_cli.py).
    assert 0 < health["memory"]["rss_mb"] < 4096
    assert health["memory"]["cli_rss_mb"] > 0
    assert health["session"]["cli_version"] == "2.1.332-fake"
    assert isinstance(health["session"]["pid"], int)
    assert health["uptime_s"] >= 0 and health["version"]


async def test_rapid_requests_restart_twice_and_answer_each_prompt(make_config: Any) -> None:
    """The operator quick reference's stress test, through the SDK: with /clear isolation the
    conversation never fills, so the restarts come from the CLI's lifetime (8 requests here)."""
    async with running_server(make_config(turn_limit=10, session_max_requests=8)) as url:
        with sdk(url) as client:
            for i in range(20):
                completion = await in_thread(
                    client.chat.completions.create,
                    model="haiku", messages=[{"role": "user", "content": f"request number {i}"}],
                )
                assert completion.choices[0].message.content == f"echo: request number {i}"
        async with httpx.AsyncClient(base_url=url) as http:
            health = (await http.get("/health")).json()
    assert health["stats"]["restart_count"] == health["stats"]["lifetime_restarts"] == 2
    assert health["stats"]["total_errors"] == 0
    assert health["context_usage"]["turns"] == 0  # cleared after the last answer
    assert health["sessions"][0]["requests"] == 4 and health["sessions"][0]["max_requests"] == 8
    # The server's own RSS bound (< 100 MB) is checked on a real server process in test_cli.py.


async def test_hung_turn_gets_504_while_health_stays_fast(make_config: Any) -> None:
    config = make_config(query_timeout_s=2.0, interrupt_grace_s=1.0)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        results: dict[str, Any] = {}

        async def hung() -> None:
            start = time.monotonic()
            results["hung"] = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "FAKE:hang-hard"}]})
            results["elapsed"] = time.monotonic() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hung)
            await wait_for_health(http, lambda h: h["active_queries"] == 1)
            start = time.monotonic()
            health = await http.get("/health")
            health_latency = time.monotonic() - start
            assert health.json()["active_queries"] == 1
        assert results["hung"].status_code == 504
        assert results["hung"].json()["error"]["code"] == "query_timeout"
        assert results["elapsed"] < 2.0 + 5
        # A sanity bound, not a benchmark (shared machine): /health never waits on the turn.
        assert health_latency < 1.0
        after = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "after the hang"}]})
        assert after.status_code == 200
        assert after.json()["choices"][0]["message"]["content"] == "echo: after the hang"
        stats = (await http.get("/health")).json()["stats"]
    assert stats["timeouts"] == 1
    assert stats["restart_count"] == 1  # the interrupt went unanswered: replaced


async def test_cli_failures_map_to_502(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        error = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "FAKE:error=Not_logged_in_·_run_/login"}]})
        assert error.status_code == 502
        assert "Not logged in" in error.json()["error"]["message"]
        crash = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "FAKE:crash"}]})
        assert crash.status_code == 502
        assert crash.json()["error"]["code"] == "cli_crashed"
        too_long = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "FAKE:error=Prompt_is_too_long"}]})
        assert too_long.status_code == 400
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        ok = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "still serving"}]})
        assert ok.status_code == 200
        stats = (await http.get("/health")).json()["stats"]
    assert stats["total_requests"] == 4
    assert stats["total_errors"] == 3
    assert stats["restart_count"] == 1


async def test_missing_binary_goes_offline_then_heals(
    make_config: Any, fake_cli: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = tmp_path / "bin" / "claude"
    config = make_config(
        claude_bin=str(binary), recovery_attempts=2, recovery_max_backoff_s=0.5
    )
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        await wait_for(lambda: "[RECOVERY] Attempt 1/2" in caplog.text)
        assert (await http.get("/health")).json()["status"] == "restarting"
        await wait_for(lambda: "[RECOVERY] Offline" in caplog.text)
        health = await http.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "offline"
        assert health.json()["invoker_connected"] is False
        refused = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        assert refused.json()["error"]["type"] == "service_unavailable"
        # The binary appears: the server heals by itself.
        binary.parent.mkdir()
        write_executable(binary, fake_cli.read_text())
        with trio.fail_after(10):
            while (await http.get("/health")).json()["status"] != "healthy":
                await trio.sleep(0.1)
        ok = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "healed"}]})
        assert ok.status_code == 200
    assert "[RESTART] FAILED: cannot start" in caplog.text
    assert "[RECOVERY] Attempt 2/2 in 0.5s..." in caplog.text


async def test_queue_full_gets_429_with_retry_after(make_config: Any) -> None:
    config = make_config(max_queue=1)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        statuses: list[int] = []

        async def ask(text: str) -> None:
            response = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": text}]})
            statuses.append(response.status_code)
            if response.status_code == 429:
                # No query has finished yet: 1 s assumed per query. One running and one
                # queued ahead, then this client's own slot: 3 s, never the old flat 1.
                assert response.headers["retry-after"] == "3"
                assert response.headers["retry-after-ms"] == "3000"
                assert response.json()["error"]["type"] == "rate_limit_error"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "FAKE:sleep=3 first")
            await wait_for_health(http, lambda h: h["active_queries"] == 1)
            nursery.start_soon(ask, "second waits")
            await wait_for_health(http, lambda h: h["queued"] == 1)
            nursery.start_soon(ask, "third is refused")
    assert sorted(statuses) == [200, 200, 429]


async def test_sdk_sees_429_as_rate_limit_error(make_config: Any) -> None:
    async with running_server(make_config(max_queue=1)) as url:
        client = sdk(url)
        errors: list[Exception] = []

        async def ask(text: str) -> None:
            try:
                await in_thread(client.chat.completions.create, model="haiku",
                                messages=[{"role": "user", "content": text}])
            except openai.RateLimitError as exc:
                errors.append(exc)

        async with httpx.AsyncClient(base_url=url) as http, trio.open_nursery() as nursery:
            nursery.start_soon(ask, "FAKE:sleep=3 first")
            await wait_for_health(http, lambda h: h["active_queries"] == 1)
            nursery.start_soon(ask, "second waits")
            await wait_for_health(http, lambda h: h["queued"] == 1)
            nursery.start_soon(ask, "third is refused")
        client.close()
    assert len(errors) == 1


def test_env_is_not_leaked_to_the_child(make_config: Any) -> None:
    config = make_config(
        env={"AWS_SECRET_ACCESS_KEY": "x", "ANTHROPIC_BASE_URL": "http://127.0.0.1:1"}
    )
    assert "AWS_SECRET_ACCESS_KEY" not in config.child_env
    assert config.child_env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:1"
    assert config.child_env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
