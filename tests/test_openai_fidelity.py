"""Streaming, request fields, structured outputs and auth over a real socket (fake CLI).

tests/clients/ repeats the essentials with the real CLI and unmodified real clients.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from ccwrap_trio.openai_api import AnswerLimiter
from ccwrap_trio.structured import StructuredOutput, extract_json

from .conftest import running_server, stream_until

PNG_1PX = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
        "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


def sse_events(raw: str) -> list[Any]:
    """The data payloads of an SSE body (``[DONE]`` kept as a string), comments skipped."""
    events: list[Any] = []
    for frame in raw.split("\n\n"):
        for line in frame.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "haiku", "messages": [{"role": "user", "content": text}], **extra}


# --- streaming -----------------------------------------------------------------------------


async def test_stream_sends_chunks_token_by_token(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=body(
            "one two three four", stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [p for p in pieces if p] == ["echo:", " one", " two", " three", " four"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


async def test_stream_through_the_sdk_sync_and_async(make_config: Any) -> None:
    async with running_server(make_config()) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            def sync_stream() -> list[Any]:
                return list(client.chat.completions.create(
                    model="haiku", messages=[{"role": "user", "content": "a b c"}],
                    stream=True, stream_options={"include_usage": True}))

            chunks = await trio.to_thread.run_sync(sync_stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: a b c"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

        async def async_stream() -> str:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            async with client:
                stream = await client.chat.completions.create(
                    model="haiku", messages=[{"role": "user", "content": "async one"}],
                    stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream])

        import asyncio  # the SDK's async client runs on asyncio: in a thread of its own

        assert await trio.to_thread.run_sync(asyncio.run, async_stream()) == "echo: async one"


async def test_error_before_the_stream_is_plain_http(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=body(
            "FAKE:error=Not_logged_in", stream=True))
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "Not logged in"


async def test_error_after_the_stream_started_is_an_error_chunk(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=body("FAKE:crash", stream=True))
        assert response.status_code == 200
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "cli_crashed"
        assert events[1]["choices"][0]["delta"]["content"] == "partial"
        again = await http.post("/v1/chat/completions", json=body("after the crash"))
        assert again.json()["choices"][0]["message"]["content"] == "echo: after the crash"


async def test_sdk_raises_on_an_error_chunk(make_config: Any) -> None:
    async with running_server(make_config()) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            def consume() -> None:
                for _ in client.chat.completions.create(
                    model="haiku", messages=[{"role": "user", "content": "FAKE:crash"}],
                    stream=True,
                ):
                    pass

            with pytest.raises(openai.APIError, match="exited with code 1"):
                await trio.to_thread.run_sync(consume)


async def test_keepalive_comments_while_the_cli_is_silent(make_config: Any) -> None:
    config = make_config(stream_keepalive_s=0.2)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=body(
            "FAKE:sleep=1 slow", stream=True))
    assert response.status_code == 200
    assert response.text.count(": keep-alive\n\n") >= 2
    assert sse_events(response.text)[-1] == "[DONE]"


async def test_client_disconnect_mid_stream_interrupts_and_next_request_is_served(
    make_config: Any, tmp_path: Path
) -> None:
    log = tmp_path / "stdin.log"
    config = make_config(env={"FAKE_CLAUDE_LOG": str(log)})
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        words = " ".join(f"w{i}" for i in range(100))
        await stream_until(url, body(f"FAKE:delay=0.1 {words}", stream=True), b"w2")
        with trio.fail_after(10):
            while '"control_request"' not in log.read_text():
                await trio.sleep(0.05)
        ok = await http.post("/v1/chat/completions", json=body("next one"))
        assert ok.json()["choices"][0]["message"]["content"] == "echo: next one"
        stats = (await http.get("/health")).json()["stats"]
    assert stats["disconnects"] == 1, stats
    assert stats["restart_count"] == 0  # the interrupt was answered: same session
    assert stats["total_requests"] == stats["successes"] + stats["total_errors"]


# --- stop and max_tokens --------------------------------------------------------------------


async def test_stop_sequences(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        plain = await http.post("/v1/chat/completions", json=body(
            "alpha beta STOP gamma", stop=["STOP", "never"]))
        assert plain.json()["choices"][0]["message"]["content"] == "echo: alpha beta "
        assert plain.json()["choices"][0]["finish_reason"] == "stop"
        streamed = await http.post("/v1/chat/completions", json=body(
            "alpha beta gamma delta", stop="a gam", stream=True,
            stream_options={"include_usage": True}))
        events = sse_events(streamed.text)
        text = "".join(c["choices"][0]["delta"].get("content", "")
                       for c in events[:-1] if c["choices"])
        assert text == "echo: alpha bet"  # " gam" spans two deltas: held back, never sent
        finish = [c["choices"][0]["finish_reason"] for c in events[:-1] if c["choices"]]
        assert finish[-1] == "stop"
        assert events[-2]["usage"]["prompt_tokens"] > 0


async def test_max_tokens_cuts_with_finish_reason_length(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        long_text = " ".join(["word"] * 40)
        plain = await http.post("/v1/chat/completions", json=body(long_text, max_tokens=3))
        choice = plain.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert len(choice["message"]["content"]) == 12  # 3 tokens at 4 characters each
        streamed = await http.post("/v1/chat/completions", json=body(
            long_text, max_completion_tokens=2, stream=True))
        events = sse_events(streamed.text)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1])
        assert len(text) == 8
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        after = await http.post("/v1/chat/completions", json=body("still fine"))
        assert after.json()["choices"][0]["message"]["content"] == "echo: still fine"


def test_answer_limiter_holds_back_possible_stop_starts() -> None:
    limiter = AnswerLimiter(stop=("END",))
    assert limiter.feed("abc E") == "abc "
    assert limiter.feed("N") == ""
    assert limiter.feed("X more") == "ENX more"
    assert limiter.feed(" E") == " "
    assert limiter.flush() == "E"  # the answer ended: it was not a stop sequence
    assert limiter.finish_reason is None
    limiter = AnswerLimiter(stop=("END",))
    assert limiter.feed("xxEN") == "xx" and limiter.feed("Dyy") == ""
    assert limiter.finish_reason == "stop"
    assert AnswerLimiter(max_chars=5).feed("123456789") == "12345"


# --- request fields and content parts --------------------------------------------------------


async def test_ignored_sampling_fields_are_accepted(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=body(
            "hi", temperature=1, top_p=0.5, seed=7, user="u-1", presence_penalty=0,
            frequency_penalty=0.1, n=1, logprobs=False, tools=[], parallel_tool_calls=True,
            metadata={"k": "v"}, store=False))
    assert response.status_code == 200


async def test_data_url_images_become_image_blocks(make_config: Any, tmp_path: Path) -> None:
    log = tmp_path / "stdin.log"
    async with running_server(make_config(env={"FAKE_CLAUDE_LOG": str(log)})) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_1PX}"}},
                    {"type": "text", "text": "this picture?"},
                ]}]})
    assert response.status_code == 200
    turn = json.loads(log.read_text().splitlines()[1])
    assert turn["message"]["content"] == [
        {"type": "text", "text": "What is in"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": PNG_1PX}},
        {"type": "text", "text": "this picture?"},
    ]


async def test_body_over_the_limit_is_413(make_config: Any) -> None:
    async with running_server(make_config(max_body_bytes=2048)) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post("/v1/chat/completions", json=body("x" * 5000))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


# --- structured outputs ---------------------------------------------------------------------


async def test_structured_output_that_never_validates_is_a_502(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    async with running_server(make_config(schema_repairs=2)) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post("/v1/chat/completions", json=body(
                "count", response_format={"type": "json_schema",
                                          "json_schema": {"name": "n", "schema": schema}}))
            stats = (await http.get("/health")).json()["stats"]
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "invalid_structured_output"
    assert stats["schema_repairs"] == 2 and stats["schema_failures"] == 1
    assert caplog.text.count("[WARN] Structured output invalid, repair") == 2


def test_structured_output_checks() -> None:
    schema = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}}},
        "required": ["items"],
        "$defs": {"item": {"type": "object", "properties": {"name": {"type": "string"}},
                           "required": ["name"]}},
    }
    structured = StructuredOutput(schema)
    assert structured.check('```json\n{"items": [{"name": "a"}]}\n```') == (
        '{"items": [{"name": "a"}]}', [])
    assert structured.check('Sure! {"items": []} Hope that helps.')[0] == '{"items": []}'
    content, errors = structured.check('{"items": [{"nom": "a"}]}')
    assert content is None and errors == ["at $.items[0]: 'name' is a required property"]
    assert structured.check("no json here")[1][0].startswith("the answer is not JSON")
    assert "```json-schema" in structured.repair_prompt(errors)
    assert "'name' is a required property" in structured.repair_prompt(errors)
    assert extract_json("") == (None, "the answer is empty; it must be a JSON value")
    assert StructuredOutput.from_response_format({"type": "text"}) is None
    assert StructuredOutput.from_response_format({"type": "json_object"}) == StructuredOutput(
        {"type": "object"})


# --- auth -----------------------------------------------------------------------------------


async def test_api_keys(make_config: Any, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(api_keys=("key-one-123456", "key-two-123456"))
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as http:
        missing = await http.post("/v1/chat/completions", json=body("hi"))
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = await http.get("/v1/models", headers={"Authorization": "Bearer key-one-12345X"})
        assert wrong.status_code == 401
        bearer = await http.post("/v1/chat/completions", json=body("hi"),
                                 headers={"Authorization": "Bearer key-two-123456"})
        assert bearer.status_code == 200
        x_api_key = await http.get("/v1/models", headers={"x-api-key": "key-one-123456"})
        assert x_api_key.status_code == 200
        assert (await http.get("/health")).status_code == 200  # operators poll it: open
        unknown = await http.get("/nowhere")
        assert unknown.status_code == 401  # nothing is revealed without a key
        with openai.OpenAI(base_url=f"{url}/v1", api_key="nope-nope-nope", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await trio.to_thread.run_sync(lambda: c.models.list())
    assert "key-one-123456" not in caplog.text and "key-two-123456" not in caplog.text
    assert "key-one-12345X" not in caplog.text
