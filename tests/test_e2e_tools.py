"""End to end: OpenAI function calling and per-request models over the REAL Claude Code CLI.

The stand-in answers ``tool_use`` when the request offers the tool named by ``[standin:call=...]``
(PROTOCOL.md, "Client-defined tools"): one API call per request, the calls denied with interrupt
by ccwrap-trio's own MCP server, nothing ever run on the host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import real_stack

pytestmark = pytest.mark.real_cli

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
STOCK = {
    "type": "function",
    "function": {
        "name": "lookup-stock",
        "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}},
                       "required": ["ticker"]},
    },
}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def post(http: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await http.post("/v1/chat/completions", json=body)


def tool_names(call: Any) -> list[str]:
    return [tool["name"] for tool in call.body.get("tools", [])]


async def test_a_tool_call_its_result_and_a_plain_request_after(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _config):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            called = await post(http, messages=user("Weather in Paris? [standin:call=get_weather]"),
                                tools=[WEATHER])
            assert called.status_code == 200, called.text
            choice = called.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls"
            assert choice["message"]["content"] == "Let me check."
            [call] = choice["message"]["tool_calls"]
            assert call["type"] == "function" and call["function"]["name"] == "get_weather"
            assert "city" in json.loads(call["function"]["arguments"])
            # The round trip: the client ran the tool and sends its result back.
            answered = await post(http, tools=[WEATHER], messages=[
                *user("Weather in Paris?"),
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"},
            ])
            assert answered.status_code == 200, answered.text
            assert answered.json()["choices"][0]["finish_reason"] == "stop"
            plain = await post(http, messages=user("plain now [standin:call=get_weather]"))
            assert plain.json()["choices"][0]["message"]["content"].startswith("echo:")
            health = (await http.get("/health")).json()
    first, second, third = standin.calls
    assert tool_names(first) == ["mcp__oa__get_weather"]
    assert "18 C and sunny" in json.dumps(second.body["messages"])
    assert call["id"] in json.dumps(second.body["messages"])
    assert tool_names(third) == []  # no tool leaks into the next request
    assert health["stats"]["restart_count"] == 0
    assert not list(tmp_path.rglob("pwned"))


async def test_parallel_calls_stream_and_tool_choice(tmp_path: Path) -> None:
    async with real_stack(tmp_path, turn_limit=100) as (url, standin, _):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            both = await post(http, tools=[WEATHER, STOCK],
                              messages=user("[standin:call=get_weather,lookup-stock]"))
            calls = both.json()["choices"][0]["message"]["tool_calls"]
            assert [c["function"]["name"] for c in calls] == ["get_weather", "lookup-stock"]
            one = await post(http, tools=[WEATHER, STOCK], parallel_tool_calls=False,
                             messages=user("[standin:call=get_weather,lookup-stock]"))
            assert len(one.json()["choices"][0]["message"]["tool_calls"]) == 1
            hidden = await post(http, tools=[WEATHER], tool_choice="none",
                                messages=user("[standin:call=get_weather]"))
            assert hidden.json()["choices"][0]["finish_reason"] == "stop"
            required = await post(http, tools=[WEATHER], tool_choice="required",
                                  messages=user("no call here"))
            assert required.status_code == 502
            assert required.json()["error"]["code"] == "invalid_tool_call"
            named = await post(
                http, tools=[WEATHER, STOCK],
                tool_choice={"type": "function", "function": {"name": "lookup-stock"}},
                messages=user("[standin:call=lookup-stock]"))
            assert named.json()["choices"][0]["message"]["tool_calls"][0]["function"][
                "name"] == "lookup-stock"
            async with http.stream("POST", "/v1/chat/completions", json={
                "stream": True, "tools": [WEATHER, STOCK],
                "messages": user("[standin:call=get_weather,lookup-stock]"),
            }) as streamed:
                chunks = [json.loads(line[6:]) async for line in streamed.aiter_lines()
                          if line.startswith("data: {")]
            # Streamed text where a call is demanded cannot be repaired: one error chunk.
            async with http.stream("POST", "/v1/chat/completions", json={
                "stream": True, "tools": [WEATHER], "tool_choice": "required",
                "messages": user("no call here either"),
            }) as refused:
                ends = [line async for line in refused.aiter_lines() if line.startswith("data: ")]
    assert "Answer by calling the tool `lookup-stock`." in json.dumps(standin.calls[6].body)
    assert tool_names(standin.calls[2]) == []  # tool_choice none: the tools are not offered
    assert len(standin.calls) == 6 + 2 + 1  # required: the answer and two repairs
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [call for d in deltas for call in d.get("tool_calls", [])]
    starts = [p for p in pieces if "id" in p]
    assert [p["function"]["name"] for p in starts] == ["get_weather", "lookup-stock"]
    for index in (0, 1):
        fragments = [p["function"]["arguments"] for p in pieces if p["index"] == index]
        assert fragments[0] == "" and len(fragments) >= 3  # name first, then the pieces
        json.loads("".join(fragments))
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert {c["model"] for c in chunks} == {"claude-haiku-5-5"}  # the model that answered
    assert json.loads(ends[-2][6:])["error"]["code"] == "invalid_tool_call"
    assert ends[-1] == "data: [DONE]"


async def test_invalid_arguments_are_repaired(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            fixed = await post(http, tools=[WEATHER],
                               messages=user("[standin:call=get_weather] [standin:invalid-first]"))
    assert fixed.status_code == 200, fixed.text
    arguments = fixed.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert isinstance(json.loads(arguments)["city"], str)
    assert len(standin.calls) == 2
    assert "does not fit the tools" in json.dumps(standin.calls[1].body["messages"])


async def test_the_requested_model_is_the_model_used(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            opus = await post(http, model="opus", messages=user("which model?"))
            again = await post(http, model="opus", messages=user("still?"))
            health = (await http.get("/health")).json()
            back = await post(http, messages=user("default again"))
            missing = await post(http, model="gpt-4o", messages=user("nope"))
            listed = (await http.get("/v1/models")).json()
            one = await http.get("/v1/models/claude-opus-5-5")
            unknown = await http.get("/v1/models/gpt-4o")
    assert opus.json()["model"] == again.json()["model"] == "claude-opus-5-5"
    assert [c.body["model"] for c in standin.calls] == [
        "claude-opus-5-5", "claude-opus-5-5", "claude-haiku-5-5"]
    assert back.json()["model"] == "claude-haiku-5-5"
    assert health["sessions"][0]["model"] == "claude-opus-5-5"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert missing.json()["error"]["param"] == "model"
    assert {m["id"] for m in listed["data"]} == {
        "haiku", "sonnet", "opus", "claude-haiku-5-5", "claude-sonnet-5-5", "claude-opus-5-5"}
    assert one.status_code == 200 and unknown.status_code == 404
