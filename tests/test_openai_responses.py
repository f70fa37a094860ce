"""openai_responses: a Responses body to a CoreRequest, and the core's answer back, pure."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from ccwrap_trio import openai_responses, protocol
from ccwrap_trio.core import ToolCall
from ccwrap_trio.errors import InvalidRequest

from .conftest import real_stack, running_server


def parse(body: dict[str, Any]) -> openai_responses.ResponsesRequest:
    return openai_responses.parse_request(json.dumps(body), default_model="haiku")


def test_a_string_input_goes_as_it_is() -> None:
    req = parse({"input": "Hello"})
    assert req.content == "Hello" and req.model == "haiku" and not req.stream
    assert req.core.content == "Hello" and not req.core.tools


def test_instructions_and_items_render_as_one_delimited_turn() -> None:
    req = parse({"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
    ], "tools": [{"type": "function", "name": "get_weather"}]})
    assert isinstance(req.content, str)
    assert "<system>\nBe brief.\n</system>" in req.content
    assert '<tool_call id="call_1" name="get_weather">' in req.content
    assert '<tool_result id="call_1">\n18 C\n</tool_result>' in req.content
    assert [tool.name for tool in req.core.tools] == ["get_weather"]


def test_text_format_json_schema_is_the_structured_output() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    req = parse({"input": "n?", "text": {"format": {"type": "json_schema", "name": "N",
                                                    "schema": schema, "strict": True}}})
    assert req.structured is not None and req.structured.schema == schema
    assert "```json-schema" in str(req.content)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
     "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "X",
                                        "schema": {"type": "nonsense"}}}},
     "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"role": {}, "content": "x"}]}, "input[0].role"),  # was a 500 (unhashable)
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}]},
     "input[0].content[0].image_url"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
     "input[0].call_id"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": "   "}, "input"),
    ({"input": []}, "input"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata"),
])
def test_bad_fields_are_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    assert caught.value.param == param, str(caught.value)


def test_response_object_has_a_message_then_the_calls() -> None:
    req = parse({"input": "x", "metadata": {"k": "v"}})
    result = protocol.TurnResult(
        text="Let me check.", is_error=False, subtype="success",
        usage=protocol.Usage(input_tokens=3, output_tokens=5, cache_read_input_tokens=7),
        tool_calls=(ToolCall("call_9", "get_weather", '{"city": "Paris"}'),),
        model="claude-haiku-5-5",
    )
    body = openai_responses.response_object(req, result)
    assert body["status"] == "completed" and body["model"] == "claude-haiku-5-5"
    assert body["metadata"] == {"k": "v"} and body["store"] is True
    message, call = body["output"]
    assert message["content"][0] == {"type": "output_text", "text": "Let me check.",
                                     "annotations": [], "logprobs": []}
    assert (call["type"], call["call_id"], call["name"]) == ("function_call", "call_9",
                                                             "get_weather")
    assert body["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 7},
                             "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": 15}


def test_max_output_tokens_makes_an_incomplete_response() -> None:
    req = parse({"input": "x", "max_output_tokens": 2})
    result = protocol.TurnResult(text="a" * 20, is_error=False, subtype="success",
                                 usage=protocol.Usage())
    body = openai_responses.response_object(req, result)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["text"] == "a" * 8


def stream_events(raw: str) -> list[dict[str, Any]]:
    events = []
    for frame in raw.split("\n\n"):
        if frame and not frame.startswith(":"):
            name, data = frame.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert name == f"event: {event['type']}"
            events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


@pytest.mark.parametrize(("text", "overrides", "last", "code"), [
    ("FAKE:crash", {}, "response.failed", "cli_crashed"),
    ("a b c d FAKE:hang-after=2", {"query_timeout_s": 2.0}, "response.failed", "query_timeout"),
    ("one two three four five six", {}, "response.incomplete", None),
])
async def test_a_stream_always_ends_with_one_ending_event(
    make_config: Any, text: str, overrides: dict[str, Any], last: str, code: str | None
) -> None:
    body = {"input": text, "stream": True, "max_output_tokens": 3 if code is None else 100}
    async with running_server(make_config(**overrides)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            response = await http.post("/v1/responses", json=body)
    assert response.status_code == 200
    events = stream_events(response.text)
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == last
    assert sum(k in ("response.completed", "response.incomplete", "response.failed")
               for k in kinds) == 1
    final = events[-1]["response"]
    if code is not None:
        assert final["status"] == "failed" and final["error"]["code"] == code
        # the text sent before the failure is closed properly
        assert kinds.index("response.output_text.done") < len(kinds) - 1
    else:
        assert final["incomplete_details"] == {"reason": "max_output_tokens"}
        assert final["output"][0]["content"][0]["text"] == "echo: one tw"  # 3 tokens


async def test_a_failure_before_the_first_event_is_a_plain_http_error(make_config: Any) -> None:
    async with running_server(make_config()) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            response = await http.post("/v1/responses",
                                       json={"input": "FAKE:error=boom", "stream": True})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "cli_error"


@pytest.mark.real_cli
async def test_a_stream_without_parallel_calls_announces_only_the_first(tmp_path: Any) -> None:
    body = {"input": "[standin:call=get_weather,lookup_stock]", "stream": True,
            "parallel_tool_calls": False, "model": "haiku",
            "tools": [{"type": "function", "name": name, "parameters": {
                "type": "object", "properties": {"q": {"type": "string"}}}}
                for name in ("get_weather", "lookup_stock")]}
    async with real_stack(tmp_path) as (url, _standin, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            response = await http.post("/v1/responses", json=body)
    events = stream_events(response.text)
    added = [e["item"]["name"] for e in events if e["type"] == "response.output_item.added"
             and e["item"]["type"] == "function_call"]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert added == ["get_weather"]
    assert [i["name"] for i in final["output"] if i["type"] == "function_call"] == ["get_weather"]


def test_a_model_name_over_256_characters_is_a_400_here_too() -> None:
    """The Responses stream echoes ``model`` in every event: the same cap as Chat Completions."""
    with pytest.raises(InvalidRequest) as raised:
        openai_responses.parse_request(
            json.dumps({"model": "claude-" + "m" * 250, "input": "hi"}), default_model="haiku")
    assert raised.value.param == "model"
    assert openai_responses.parse_request(
        json.dumps({"model": "claude-" + "m" * 249, "input": "hi"}), default_model="haiku")
