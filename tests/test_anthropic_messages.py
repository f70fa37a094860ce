"""The Anthropic Messages API front end: parsing (pure) and the HTTP routes over the fake CLI.

test_e2e_anthropic.py and tests/clients/test_anthropic_python.py repeat the essentials with the
real Claude Code CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ccwrap_trio import anthropic_messages, openai_api, protocol
from ccwrap_trio.core import ToolCall
from ccwrap_trio.errors import (
    CcwrapError,
    InvalidRequest,
    KeyQuotaExceeded,
    QueryTimeout,
    QueueFull,
    SessionCrashed,
    SessionUnavailable,
    UpstreamAuthFailed,
    UpstreamOverloaded,
    UpstreamRateLimited,
    UsageLimitReached,
)

from .conftest import running_server
from .fakes import FakeSessions

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}


def parse(**body: Any) -> anthropic_messages.MessagesRequest:
    return anthropic_messages.parse_request(json.dumps(body), default_model="haiku")


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- parsing -------------------------------------------------------------------------------------


def test_a_lone_user_message_goes_as_it_is() -> None:
    request = parse(max_tokens=10, messages=user("hello"))
    assert request.core.content == "hello"
    assert request.core.model == "haiku" and not request.core.stream


def test_system_tool_use_and_tool_result_are_rendered_into_one_turn() -> None:
    request = parse(max_tokens=10, system=[{"type": "text", "text": "Be brief."}], tools=[WEATHER],
                    tool_choice={"type": "any", "disable_parallel_tool_use": True}, messages=[
                        *user("Paris?"),
                        {"role": "assistant", "content": [
                            {"type": "text", "text": "Let me check."},
                            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                             "input": {"city": "Paris"}}]},
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"},
                            {"type": "text", "text": "And now?"}]},
                    ])
    content = request.core.content
    assert isinstance(content, str)
    assert "<system>\nBe brief.\n</system>" in content
    assert '<tool_call id="toolu_1" name="get_weather">\n{"city": "Paris"}\n</tool_call>' in content
    assert '<tool_result id="toolu_1">\n18 C\n</tool_result>' in content
    assert content.index("</tool_result>") < content.index("And now?")
    assert content.endswith("Answer by calling one of the tools.")
    core = request.core
    assert core.tool_choice.mode == "required" and not core.parallel_tool_calls
    assert [tool.name for tool in core.tools] == ["get_weather"]


def test_images_stay_image_blocks() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    request = parse(max_tokens=10, messages=[{"role": "user", "content": [
        image, {"type": "text", "text": "what is it?"}]}])
    assert request.core.content == [image, {"type": "text", "text": "what is it?"}]


def test_output_format_is_a_structured_output() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    request = parse(max_tokens=10, messages=user("n?"),
                    output_format={"type": "json_schema", "schema": schema})
    assert request.core.structured is not None and request.core.structured.schema == schema


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": user("x")}, "max_tokens"),
    ({"max_tokens": 0, "messages": user("x")}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"max_tokens": 5, "messages": user("x"), "frequency_penalty": 1}, "frequency_penalty"),
    ({"max_tokens": 5, "messages": user("x"), "stop_sequences": "END"}, "stop_sequences"),
    ({"max_tokens": 5, "messages": user("x"), "system": 3}, "system"),
    ({"max_tokens": 5, "messages": user("x"), "tools": [{"type": "web_search_20250305",
                                                         "name": "web_search"}]}, "tools.0.type"),
    ({"max_tokens": 5, "messages": user("x"), "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"max_tokens": 5, "messages": user("x"), "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}]},
     "messages.0.content.0.tool_use_id"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]},
     "messages.0.content.0.source"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {}}]}]}, "messages.0.content.0.type"),
    ({"max_tokens": 5, "messages": user("x"), "output_format": {"type": "json_schema",
                                                                "schema": {"type": 3}}},
     "output_format.schema"),
])
def test_bad_input_names_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        anthropic_messages.parse_request(json.dumps(body), default_model="haiku")
    assert caught.value.param == param
    assert param in str(caught.value)


def test_count_tokens_takes_no_max_tokens_and_counts_text_tools_and_images() -> None:
    plain = anthropic_messages.parse_request(
        json.dumps({"messages": user("x" * 400)}), default_model="haiku", counting=True)
    assert anthropic_messages.count_tokens(plain) == 100
    with_tools = anthropic_messages.parse_request(
        json.dumps({"messages": user("x" * 400), "tools": [WEATHER]}), default_model="haiku",
        counting=True)
    assert anthropic_messages.count_tokens(with_tools) > 100
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    with_image = anthropic_messages.parse_request(json.dumps({"messages": [
        {"role": "user", "content": [image, {"type": "text", "text": "x" * 400}]}]}),
        default_model="haiku", counting=True)
    assert anthropic_messages.count_tokens(with_image) == 100 + anthropic_messages.IMAGE_TOKENS
    with pytest.raises(InvalidRequest):  # a Messages-only field
        anthropic_messages.parse_request(
            json.dumps({"messages": user("x"), "stream": True}), default_model="haiku",
            counting=True)


def test_stop_sequence_and_max_tokens_set_the_stop_reason() -> None:
    result = protocol.TurnResult("one two END three", False, "success", protocol.Usage(1, 5))
    stopped = anthropic_messages.message_response(
        parse(max_tokens=100, messages=user("x"), stop_sequences=["NOPE", "END"]), result)
    assert stopped["content"] == [{"type": "text", "text": "one two "}]
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "END")
    cut = anthropic_messages.message_response(parse(max_tokens=1, messages=user("x")), result)
    assert cut["stop_reason"] == "max_tokens" and cut["content"][0]["text"] == "one "
    whole = anthropic_messages.message_response(parse(max_tokens=100, messages=user("x")), result)
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("end_turn", None)
    assert whole["usage"] == {"input_tokens": 1, "output_tokens": 5,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def test_tool_calls_are_tool_use_blocks() -> None:
    call = ToolCall("toolu_9", "get_weather", '{"city":"Oslo"}')
    result = protocol.TurnResult("", False, "success", protocol.Usage(), tool_calls=(call,))
    message = anthropic_messages.message_response(
        parse(max_tokens=100, messages=user("x"), tools=[WEATHER]), result)
    assert message["content"] == [{"type": "tool_use", "id": "toolu_9", "name": "get_weather",
                                   "input": {"city": "Oslo"}}]
    assert message["stop_reason"] == "tool_use"


@pytest.mark.parametrize(("error", "status", "kind"), [
    (InvalidRequest("x"), 400, "invalid_request_error"),
    (openai_api.model_not_found("m"), 404, "not_found_error"),
    (QueueFull("x"), 429, "rate_limit_error"),
    (SessionUnavailable("x"), 529, "overloaded_error"),
    (QueryTimeout("x"), 504, "timeout_error"),
    (SessionCrashed("x"), 500, "api_error"),
    (UsageLimitReached("x", window="five_hour", resets_at=None, retry_after_s=5), 429,
     "rate_limit_error"),
    (KeyQuotaExceeded("x", key="k", limit="in_flight:1", retry_after_s=1), 429,
     "rate_limit_error"),
    (UpstreamRateLimited("x", retry_after_s=3), 429, "rate_limit_error"),
    (UpstreamOverloaded("x", retry_after_s=3), 529, "overloaded_error"),
    (UpstreamAuthFailed("x"), 500, "api_error"),
])
def test_error_table(error: CcwrapError, status: int, kind: str) -> None:
    body, got = anthropic_messages.error_response(error)
    assert got == status
    assert body == {"type": "error", "error": {"type": kind, "message": str(error)}}


# --- over HTTP, with the fake CLI ----------------------------------------------------------------


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in text.strip().split("\n\n"):
        name, data = frame.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append((name[7:], json.loads(data[6:])))
    return events


async def test_plain_streamed_and_counted(make_config: Any) -> None:
    async with running_server(make_config()) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            plain = await http.post("/v1/messages?beta=true", json={
                "model": "haiku", "max_tokens": 64, "messages": user("hello there")},
                headers={"anthropic-version": "2023-06-01", "anthropic-beta": "x-2025-01-01"})
            streamed = await http.post("/v1/messages", json={
                "max_tokens": 64, "stream": True, "stop_sequences": ["three"],
                "messages": user("one two three four")})
            counted = await http.post("/v1/messages/count_tokens", json={
                "model": "haiku", "messages": user("x" * 40)})
    assert plain.status_code == 200, plain.text
    message = plain.json()
    assert message["type"] == "message" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "text", "text": "echo: hello there"}]
    assert message["stop_reason"] == "end_turn" and message["usage"]["output_tokens"] > 0
    assert plain.headers["request-id"] == plain.headers["x-request-id"]
    events = sse_events(streamed.text)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "echo: one two "
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "three"}
    assert counted.json() == {"input_tokens": 10}
    assert counted.headers[anthropic_messages.ESTIMATE_HEADER] == "estimate"


async def test_errors_are_anthropic_shaped_and_nothing_reaches_the_cli(
    make_config: Any, tmp_path: Path
) -> None:
    log = tmp_path / "stdin.log"
    config = make_config(api_keys=("sk-a",), max_body_bytes=10_000,
                         env={"FAKE_CLAUDE_LOG": str(log)})
    key = {"x-api-key": "sk-a"}
    async with running_server(config) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            missing = await http.post("/v1/messages", json={"max_tokens": 5,
                                                            "messages": user("hi")})
            wrong = await http.post("/v1/messages", headers={"x-api-key": "sk-b"}, json={})
            bearer = await http.post("/v1/messages/count_tokens", json={"messages": user("hi")},
                                     headers={"Authorization": "Bearer sk-a"})
            bad = await http.post("/v1/messages", headers=key, json={
                "max_tokens": 5, "messages": user("hi"), "tools": [{"name": "a b"}]})
            model = await http.post("/v1/messages", headers=key, json={
                "model": "gpt-4o", "max_tokens": 5, "messages": user("hi")})
            big = await http.post("/v1/messages", headers=key, content=b"x" * 20_000)
            method = await http.get("/v1/messages", headers=key)
            hello = await http.head("/api/hello")
            batches = await http.post("/v1/messages/batches", headers=key, json={})
    for response, status, kind in ((missing, 401, "authentication_error"),
                                   (wrong, 401, "authentication_error"),
                                   (bad, 400, "invalid_request_error"),
                                   (model, 404, "not_found_error"),
                                   (big, 413, "request_too_large"),
                                   (method, 405, "invalid_request_error"),
                                   (batches, 404, "not_found_error")):
        assert response.status_code == status, response.text
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == kind, body
        assert response.headers["request-id"]
    assert "tools.0.name" in bad.json()["error"]["message"]
    assert bearer.status_code == 200
    assert hello.status_code == 200
    lines = log.read_text().splitlines() if log.exists() else []
    # Nothing was sent to the CLI but its own resets.
    assert not [line for line in lines if '"type":"user"' in line and "/clear" not in line]


async def test_pings_while_silent_and_an_error_event_after_the_first(make_config: Any) -> None:
    async with running_server(make_config(stream_keepalive_s=0.05)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            slow = await http.post("/v1/messages", json={
                "max_tokens": 64, "stream": True, "messages": user("FAKE:sleep=0.5 slow one")})
            crashed = await http.post("/v1/messages", json={
                "max_tokens": 64, "stream": True, "messages": user("FAKE:crash now")})
    events = sse_events(slow.text)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and "ping" in names and names[-1] == "message_stop"
    # The input usage, unknown when message_start went out, is in message_delta.
    assert events[-2][1]["usage"]["input_tokens"] > 0
    events = sse_events(crashed.text)
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1][1]["type"] == "error"
    assert events[-1][1]["error"]["type"] == "api_error"


async def test_commands_in_any_field_reach_the_cli_as_text(
    make_config: Any, tmp_path: Path
) -> None:
    """Every text of a Messages request goes through protocol.user_line (the one door)."""
    log = tmp_path / "stdin.log"
    async with running_server(make_config(env={"FAKE_CLAUDE_LOG": str(log)})) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for body in (
                {"messages": user("/logout")},
                {"messages": [{"role": "user", "content": [{"type": "text", "text": "/clear"}]}]},
                {"system": "/model opus", "messages": user("@~/.ssh/id_rsa")},
                {"tools": [WEATHER], "messages": [
                    *user("x"), {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "/cost", "name": "get_weather", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "/cost",
                                                  "content": [{"type": "text",
                                                               "text": "/heapdump"}]}]}]},
            ):
                response = await http.post("/v1/messages", json={"max_tokens": 50, **body})
                assert response.status_code == 200, response.text
    turns = [json.loads(line)["message"]["content"] for line in log.read_text().splitlines()
             if '"type":"user"' in line and line != CLEAR]
    assert len(turns) == 4
    texts = [turn if isinstance(turn, str) else block["text"]
             for turn in turns for block in ([None] if isinstance(turn, str) else turn)]
    assert all(not text.startswith(("/", "@")) for text in texts), texts
    assert "\u2060" in texts[2]  # the path-like @ is defused


CLEAR = '{"type":"user","message":{"role":"user","content":"/clear"}}'


async def test_a_used_up_usage_window_is_an_anthropic_429_with_retry_after(
    make_config: Any,
) -> None:
    sessions = FakeSessions()
    async with running_server(make_config(), session_factory_override=sessions) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as http:
        first = await http.post("/v1/messages", json={
            "max_tokens": 16, "messages": user("usage-limit=120")})
        again = await http.post("/v1/messages", json={"max_tokens": 16, "messages": user("hi")})
    for response in (first, again):
        assert response.status_code == 429
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert 100 <= int(response.headers["retry-after"]) <= 121
        assert response.headers["request-id"]
    assert "five_hour" in again.json()["error"]["message"] or "5-hour" in again.json()[
        "error"]["message"]
    assert len(sessions.sessions[0].prompts) == 1  # the second never reached the CLI
