"""Property-based tests for ``POST /v1/responses``, as tests/test_fuzz.py does Chat Completions.

- ``openai_responses.parse_request`` alone: any JSON, almost-valid and valid Responses bodies
  give a ``ResponsesRequest`` or an ``InvalidRequest`` naming a field, nothing else.
- A real server over tests/fake_claude.py: the HTTP answer agrees with the parser (the same 400
  and ``param``, with nothing sent to the CLI; or a ``response`` object, streamed or not, holding
  the fake's echo with ``max_output_tokens`` applied), and the CLI read exactly the rendered turn.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from ccwrap_trio import openai_responses, protocol
from ccwrap_trio.errors import InvalidRequest

from .test_fuzz import (
    HTTP,
    IMAGE_URLS,
    MODEL,
    PURE,
    REQUEST_TIMEOUT_S,
    LiveServer,
    broken_payloads,
    check_error,
    fake_answer,
    json_values,
    live_server,  # noqa: F401  (the fixture, shared)
    prompt_texts,
    schema_values,
    short_texts,
)

Verdict = openai_responses.ResponsesRequest | InvalidRequest

text_parts = st.fixed_dictionaries({"type": st.just("input_text"), "text": prompt_texts})
image_parts = st.fixed_dictionaries(
    {"type": st.just("input_image"), "image_url": st.sampled_from(IMAGE_URLS)},
    optional={"detail": st.sampled_from(["low", "high", "auto"])},
)
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant"]),
     "content": st.one_of(prompt_texts, st.lists(text_parts, min_size=1, max_size=3))},
    optional={"type": st.just("message")},
)
user_messages = st.fixed_dictionaries({
    "role": st.just("user"),
    "content": st.lists(st.one_of(text_parts, image_parts), min_size=1, max_size=3),
})
TOOL = {"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
call_pairs = st.tuples(short_texts, prompt_texts).map(lambda pair: [
    {"type": "function_call", "call_id": "call_1", "name": "get_weather",
     "arguments": json.dumps({"city": pair[0]})},
    {"type": "function_call_output", "call_id": "call_1", "output": pair[1]},
])
inputs = st.one_of(
    prompt_texts,
    st.lists(st.one_of(messages, user_messages), min_size=1, max_size=4),
    st.tuples(st.lists(messages, min_size=1, max_size=2), call_pairs).map(lambda t: t[0] + t[1]),
)
text_configs = st.one_of(
    st.none(),
    st.just({"format": {"type": "text"}}),
    st.just({"format": {"type": "json_object"}}),
    st.fixed_dictionaries({"format": st.fixed_dictionaries(
        {"type": st.just("json_schema"), "name": st.just("out"), "schema": schema_values},
        optional={"strict": st.booleans()},
    )}),
)
valid_bodies = st.fixed_dictionaries(
    {"input": inputs},
    optional={
        "model": st.just(MODEL),
        "instructions": prompt_texts,
        "stream": st.booleans(),
        "max_output_tokens": st.integers(1, 50),
        "text": text_configs,
        "temperature": st.floats(0, 2),
        "store": st.booleans(),
        "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        "tools": st.just([TOOL]),
        "tool_choice": st.sampled_from(["auto", "none"]),
        "parallel_tool_calls": st.booleans(),
    },
)
# A valid body with one field replaced by any JSON value, or one unsupported field added.
almost_valid_bodies = st.one_of(
    st.tuples(valid_bodies, st.sampled_from([
        "input", "model", "instructions", "stream", "max_output_tokens", "text", "tools",
        "tool_choice", "parallel_tool_calls", "metadata", "temperature", "include",
    ]), json_values).map(lambda t: {**t[0], t[1]: t[2]}),
    st.tuples(valid_bodies, st.sampled_from([
        {"previous_response_id": "resp_1"}, {"background": True},
        {"tools": [{"type": "web_search"}]}, {"tool_choice": {"type": "file_search"}},
        {"conversation": "conv_1"},
    ])).map(lambda t: t[0] | t[1]),
)


def payload(body: Any, ascii_only: bool) -> bytes:
    if ascii_only:
        return json.dumps(body).encode()
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


def parse(raw: bytes) -> Verdict:
    try:
        return openai_responses.parse_request(raw, default_model=MODEL)
    except InvalidRequest as exc:
        assert str(exc)
        assert exc.param is None or isinstance(exc.param, str)
        assert exc.code in (None, "invalid_json", "unsupported")
        return exc


@PURE
@given(json_values)
def test_parser_takes_any_json_value(value: Any) -> None:
    parse(json.dumps(value).encode())


@settings(PURE, max_examples=600)
@given(st.one_of(almost_valid_bodies, valid_bodies), st.booleans())
def test_parser_takes_almost_valid_bodies(body: Any, ascii_only: bool) -> None:
    parse(payload(body, ascii_only))


@PURE
@given(valid_bodies)
def test_parser_accepts_valid_bodies_unless_empty(body: Any) -> None:
    verdict = parse(json.dumps(body).encode())
    if isinstance(verdict, InvalidRequest):
        # A schema that is no valid JSON Schema, or input with no text and no image.
        assert verdict.param in ("input", "text.format.schema"), verdict
        return
    assert verdict.stream is bool(body.get("stream"))


@PURE
@given(broken_payloads())
def test_parser_takes_any_bytes(raw: bytes) -> None:
    parse(raw)


# --- a live server -------------------------------------------------------------------------


def check_response_object(body: Any, req: openai_responses.ResponsesRequest) -> str:
    """The answer's text; the shape checked as the openai SDK reads it."""
    assert re.fullmatch(r"resp_[0-9a-f]{32}", body["id"]) and body["object"] == "response"
    assert body["status"] in ("completed", "incomplete") and body["model"] == req.model
    usage = body["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert isinstance(usage["input_tokens_details"]["cached_tokens"], int)
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    [part] = item["content"]
    assert part["type"] == "output_text"
    text: str = part["text"]
    return text


def check_events(raw: str, req: openai_responses.ResponsesRequest) -> str:
    """The streamed text; the events numbered in order, one ending event, last."""
    frames = [f for f in raw.split("\n\n") if f and not f.startswith(":")]
    events = []
    for frame in frames:
        name, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert sum(k in ("response.completed", "response.incomplete", "response.failed")
               for k in kinds) == 1
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert check_response_object(events[-1]["response"], req) == text
    return text


def exchange(server: LiveServer, raw: bytes, path: str = "/v1/responses") -> httpx.Response:
    verdict = parse(raw)
    started = time.monotonic()
    try:
        response = server.client.post(path, content=raw,
                                      headers={"Content-Type": "application/json"})
        assert time.monotonic() - started < REQUEST_TIMEOUT_S
        if isinstance(verdict, InvalidRequest):
            assert response.status_code == 400, response.text[:500]
            error = check_error(response)
            if "recursion" not in str(verdict):
                assert (error["param"], error["code"]) == (verdict.param, verdict.code)
            server.stdin.check([])
            return response
        sent = json.loads(protocol.user_line(verdict.content))["message"]["content"]
        server.stdin.check([sent])
        if verdict.structured is not None and response.status_code == 502:
            assert check_error(response)["code"] == "invalid_structured_output"
            return response
        assert response.status_code == 200, response.text[:500]
        if verdict.stream:
            text = check_events(response.text, verdict)
        else:
            text = check_response_object(response.json(), verdict)
        if verdict.structured is None:
            expected, _ = openai_responses.limit_answer(fake_answer(sent), verdict)
            assert text == json.loads(json.dumps(expected))
        else:
            jsonschema.validate(json.loads(text), verdict.structured.schema)
        return response
    except BaseException:
        server.stdin.new_lines()
        raise


@settings(HTTP, max_examples=100)
@given(
    body=st.one_of(valid_bodies, valid_bodies, almost_valid_bodies),
    ascii_only=st.booleans(),
    path=st.sampled_from(["/v1/responses", "/responses"]),
)
def test_any_body_gets_a_response_or_a_4xx(
    live_server: LiveServer, body: Any, ascii_only: bool, path: str  # noqa: F811
) -> None:
    exchange(live_server, payload(body, ascii_only), path)


@settings(HTTP, max_examples=30)
@given(raw=broken_payloads())
def test_broken_bodies_are_a_400(live_server: LiveServer, raw: bytes) -> None:  # noqa: F811
    exchange(live_server, raw)
