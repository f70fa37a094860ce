"""Function calling and per-request models below the real CLI: the pure parts and the fake CLI.

The real CLI end to end is in test_e2e_tools.py; here: name mapping, the MCP answers, the tool-use
stream of the 2.1.332 captures, the checks on calls, bad input (4xx naming ``param``, nothing
sent to the CLI) and "push only what changed" over the fake CLI's pipes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ccwrap_trio import openai_api, protocol, tool_policy, toolbridge
from ccwrap_trio.config import Config
from ccwrap_trio.core import CoreRequest, Tool, ToolCall, ToolCallDelta, ToolCallStart, ToolChoice
from ccwrap_trio.expansions import could_expand
from ccwrap_trio.session import _TurnState

from .conftest import running_server, wait_for_health

CAPTURES = Path("/work/shared/claude-cli")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def capture(name: str) -> list[dict[str, Any]]:
    path = CAPTURES / name
    if not path.exists():
        path = Path(__file__).with_name("data") / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["a", "get_weather", "lookup-stock", "A-1_b", "x" * 64, "_-_"])
def test_every_openai_name_maps_to_the_cli_and_back_exactly(name: str) -> None:
    assert toolbridge.client_name(toolbridge.cli_name(name)) == name
    assert toolbridge.cli_name(name) == f"mcp__oa__{name}"


def test_the_mcp_server_answers_as_the_capture_shows(caplog: pytest.LogCaptureFixture) -> None:
    tools = (Tool("get_weather", "Get the weather", {"type": "object"}),)
    init = toolbridge.mcp_reply({"method": "initialize", "jsonrpc": "2.0", "id": 0}, tools)
    assert init == {"jsonrpc": "2.0", "id": 0, "result": {
        "protocolVersion": "2025-11-25", "capabilities": {"tools": {"listChanged": True}},
        "serverInfo": {"name": "oa", "version": "1.0.0"}}}
    listed = toolbridge.mcp_reply({"method": "tools/list", "jsonrpc": "2.0", "id": 1}, tools)
    assert listed["result"]["tools"] == [
        {"name": "get_weather", "description": "Get the weather", "inputSchema": {"type": "object"}}
    ]
    assert toolbridge.mcp_reply({"jsonrpc": "2.0", "method": "notifications/initialized"},
                                tools) == {"jsonrpc": "2.0", "result": {}}
    with caplog.at_level(logging.ERROR):
        called = toolbridge.mcp_reply(
            {"method": "tools/call", "jsonrpc": "2.0", "id": 2, "params": {"name": "x"}}, tools)
    assert "error" in called and "result" not in called
    assert any("BUG" in r.message and r.levelno == logging.ERROR for r in caplog.records)


def test_the_captured_tool_turn_becomes_calls_and_events() -> None:
    # (The parallel capture records the failure of denying at once: aborted_streaming, one
    # call lost. test_e2e_tools.py's parallel test fails the same way if the denial is not held.)
    lines = [entry["msg"] for entry in capture("tool-calls-2.1.332.jsonl") if entry["dir"] == "out"]
    state = _TurnState()
    progress: list[Any] = []
    result = None
    for message in lines:
        event = protocol.parse_line(json.dumps(message))
        if isinstance(event, protocol.TurnResult):
            result = state.finish(event)
            break
        if (item := state.progress(event)) is not None:
            progress.append(item)
    assert result is not None and not result.is_error
    assert result.terminal_reason == "aborted_tools" and result.text == "Let me check."
    assert result.model == "claude-haiku-5-5"
    [call] = result.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris",
                                                                         "unit": "c"}
    starts = [p for p in progress if isinstance(p, ToolCallStart)]
    deltas = [p.arguments for p in progress if isinstance(p, ToolCallDelta)]
    assert starts == [ToolCallStart(0, call.id, "get_weather")]
    assert len(deltas) == 2 and "".join(deltas) == call.arguments


def test_calls_survive_a_denial_the_cli_read_as_a_streaming_abort() -> None:
    """Seen on 2.1.332 (denied between message_delta and message_stop): aborted_streaming."""
    state = _TurnState()
    for event in (protocol.ToolUseStart(1, "toolu_1", "mcp__oa__get_weather"),
                  protocol.ToolInputDelta(1, '{"city": "Paris"}'),
                  protocol.MessageDelta("tool_use")):
        state.progress(event)
        if isinstance(event, protocol.MessageDelta):
            state.stop_reason = event.stop_reason
    aborted = protocol.TurnResult("[ede_diagnostic]", True, "error_during_execution",
                                  protocol.Usage(), terminal_reason="aborted_streaming")
    assert state.finish(aborted).tool_calls == (GOOD_1,)
    state.stop_reason = None  # an abort before the API call was complete stays an error
    assert state.finish(aborted).is_error


def test_a_tools_call_turn_asks_permission_and_is_classified() -> None:
    lines = [entry["msg"] for entry in capture("tool-calls-2.1.332.jsonl")]
    events = [protocol.parse_line(json.dumps(message)) for message in lines]
    asks = [e for e in events if isinstance(e, protocol.ControlRequest)
            and e.subtype == "can_use_tool"]
    assert asks and asks[0].request["tool_name"] == "mcp__oa__get_weather"
    assert any(isinstance(e, protocol.MessageDelta) and e.stop_reason == "tool_use"
               for e in events)


def request(mode: str = "auto", name: str | None = None, parallel: bool = True) -> CoreRequest:
    tool = Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]})
    return CoreRequest("q", "haiku", (tool, Tool("other")), ToolChoice(mode, name), parallel)


def answer(*calls: ToolCall, text: str = "") -> protocol.TurnResult:
    return protocol.TurnResult(text, False, "success", protocol.Usage(), tool_calls=calls)


GOOD = ToolCall("t1", "get_weather", '{"city": "Paris"}')
GOOD_1 = ToolCall("toolu_1", "get_weather", '{"city": "Paris"}')


@pytest.mark.parametrize(
    ("core", "result", "error"),
    [
        (request(), answer(GOOD), None),
        (request(), answer(text="just text"), None),
        (request(), answer(ToolCall("t1", "get_weather", '{"town": 1}')), "'city' is a required"),
        (request(), answer(ToolCall("t1", "get_weather", "{not json")), "not JSON"),
        (request(), answer(ToolCall("t1", "nope", "{}")), "no tool named 'nope'"),
        (request("required"), answer(text="text"), "a tool call is required"),
        (request("function", "other"), answer(GOOD), "must call the tool 'other'"),
    ],
)
def test_calls_are_checked_against_tools_and_tool_choice(
    core: CoreRequest, result: protocol.TurnResult, error: str | None
) -> None:
    errors = tool_policy.check(core, result).errors
    if error is None:
        assert errors == []
    else:
        assert any(error in e for e in errors), errors
        assert tool_policy.repair_prompt(core, errors).startswith("Your previous answer")


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    second = ToolCall("t2", "other", "{}")
    verdict = tool_policy.check(request(parallel=False), answer(GOOD, second))
    kept, errors = verdict.result, verdict.errors
    assert kept.tool_calls == (GOOD,) and errors == []


def test_the_model_allow_list() -> None:
    config = Config()
    assert all(config.model_allowed(m) for m in ("haiku", "sonnet", "opus", "claude-opus-5-5"))
    assert not any(config.model_allowed(m) for m in ("gpt-4o", "Haiku", "opus-x", ""))
    narrow = Config(model="sonnet", models=("claude-haiku-5-5",))
    assert narrow.model_allowed("sonnet") and narrow.model_allowed("claude-haiku-5-5")
    assert not narrow.model_allowed("haiku")


def chat(**body: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **body}


def tools_of(count: int) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f"f{i}"}} for i in range(count)]


BAD_INPUT = [
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": 5}}}}}]),
     400, "tools[0].function.parameters"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "$ref": "https://example.com/s.json"}}}]), 400, "tools[0].function.parameters"),
    (chat(tools=[WEATHER, WEATHER]), 400, "tools[1].function.name"),
    (chat(tools=tools_of(129)), 400, "tools"),
    (chat(tools=[{"type": "function", "function": {"name": "has space"}}]),
     400, "tools[0].function.name"),
    (chat(tools=[{"type": "retrieval"}]), 400, "tools[0].type"),
    (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     400, "tool_choice"),
    (chat(tool_choice="required"), 400, "tool_choice"),
    (chat(tools=[WEATHER], tool_choice="sometimes"), 400, "tool_choice"),
    (chat(functions=[{"name": "f"}], function_call={"name": "g"}), 400, "function_call"),
    (chat(tools=[WEATHER], functions=[{"name": "f"}]), 400, "functions"),
    (chat(tools=[WEATHER], parallel_tool_calls="yes"), 400, "parallel_tool_calls"),
    ({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "18 C"},
    ]}, 400, "messages[2].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": 1}]}]},
     400, "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "function", "content": "x"}]}, 400, "messages[0].name"),
    (chat(model="gpt-4o"), 404, "model"),
]


async def test_bad_input_is_a_4xx_naming_the_field_and_never_reaches_the_cli(
    make_config: Any, tmp_path: Path
) -> None:
    log = tmp_path / "stdin.log"
    async with running_server(make_config(env={"FAKE_CLAUDE_LOG": str(log)})) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            with trio.fail_after(20):  # the session is up: its warm-up turn is in the log
                while (await http.get("/health")).json()["status"] != "healthy":
                    await trio.sleep(0.05)
            before = log.read_text()
            for body, status, param in BAD_INPUT:
                response = await http.post("/v1/chat/completions", json=body)
                assert response.status_code == status, (param, response.text)
                error = response.json()["error"]
                assert error["param"] == param, (error, body)
                assert set(error) == {"message", "type", "param", "code"}
            health = (await http.get("/health")).json()
            unknown = await http.get("/v1/models/gpt-4o")
    assert log.read_text() == before  # nothing was sent to the CLI
    assert health["stats"]["restart_count"] == 0
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


async def test_tools_and_model_are_pushed_only_when_they_change(
    make_config: Any, tmp_path: Path
) -> None:
    log = tmp_path / "stdin.log"
    async with running_server(
        make_config(env={"FAKE_CLAUDE_LOG": str(log)}, turn_limit=100)
    ) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for body in (chat(tools=[WEATHER]), chat(tools=[WEATHER]), chat(),
                         chat(model="opus"), chat(model="opus"), chat(model="haiku")):
                response = await http.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
            health = (await http.get("/health")).json()
    sent = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    controls = [m["request"] for m in sent if m.get("type") == "control_request"]
    pushes = [c for c in controls if c.get("subtype") == "mcp_message"]
    models = [c["model"] for c in controls if c.get("subtype") == "set_model"]
    assert len(pushes) == 2  # the tool, then no tool for the plain request; not the repeat
    assert models == ["opus", "haiku"]
    assert health["sessions"][0]["model"] == "claude-haiku-5-5"  # what the fake reports


def test_history_with_calls_and_results_is_rendered_into_one_turn() -> None:
    body = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "/clear 18 C"},
    ]}
    chat = openai_api.parse_chat_request(json.dumps(body), default_model="haiku")
    assert isinstance(chat.content, str)
    assert ('<assistant>\nLet me check.\n<tool_call id="call_1" name="get_weather">\n'
            '{"city": "Paris"}\n</tool_call>\n</assistant>') in chat.content
    # A result is client text: inside the turn, never at its start, and neutralized with it.
    assert '<tool_result id="call_1">\n/clear 18 C\n</tool_result>' in chat.content
    assert not could_expand(json.loads(protocol.user_line(chat.content))["message"]["content"])
    assert chat.core.tools[0].name == "get_weather" and chat.core.tool_choice.mode == "auto"


def test_legacy_functions_are_answered_with_function_call() -> None:
    body = {"functions": [{"name": "f"}], "function_call": {"name": "f"},
            "messages": [{"role": "user", "content": "x"}]}
    chat = openai_api.parse_chat_request(json.dumps(body), default_model="haiku")
    assert chat.tools.legacy and chat.core.tool_choice == ToolChoice("function", "f")
    assert not chat.core.parallel_tool_calls
    response = openai_api.completion_response(
        model="m", text="", usage=protocol.Usage(), tool_calls=(ToolCall("t", "f", "{}"),),
        legacy_functions=True)
    choice = response["choices"][0]
    assert choice["finish_reason"] == "function_call" and choice["message"]["content"] is None
    assert choice["message"]["function_call"] == {"name": "f", "arguments": "{}"}


async def test_a_pool_serves_each_model_on_a_session_already_on_it(
    make_config: Any, tmp_path: Path
) -> None:
    """Issue 11: with two sessions, a run of requests over two models costs one switch."""
    log = tmp_path / "stdin.log"
    async with running_server(
        make_config(env={"FAKE_CLAUDE_LOG": str(log)}, turn_limit=100, sessions=2)
    ) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await wait_for_health(http, lambda h: all(
                s["status"] == "healthy" for s in h["sessions"]) and len(h["sessions"]) == 2)
            for model in ("haiku", "opus", "opus", "haiku", "haiku", "opus", "haiku", "opus"):
                # Both free (the last one's /clear done): a client that does not hurry.
                await wait_for_health(http, lambda h: all(s["idle"] for s in h["sessions"]))
                response = await http.post("/v1/chat/completions", json=chat(model=model))
                assert response.status_code == 200, response.text
            health = (await http.get("/health")).json()
    sent = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    models = [m["request"]["model"] for m in sent if m.get("type") == "control_request"
              and m["request"].get("subtype") == "set_model"]
    assert models == ["opus"]
    assert sorted(s["model"] for s in health["sessions"]) == ["claude-haiku-5-5", "claude-opus-5-5"]
