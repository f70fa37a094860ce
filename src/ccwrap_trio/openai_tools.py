"""Chat Completions function calling: ``tools``/``functions`` in, ``tool_calls`` out.

Pure functions, no I/O: the OpenAI side of ``core.Tool``, ``core.ToolChoice`` and
``core.ToolCall``. Every bad field is an ``InvalidRequest`` naming it (``param``), raised before
anything reaches the CLI. Tools never run on the server: the client runs them and sends results
back as ``tool`` messages, which are rendered into the next turn like any other message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .core import MAX_TOOLS, TOOL_NAME, Tool, ToolCall, ToolChoice
from .errors import InvalidRequest
from .structured import StructuredOutput


@dataclass(frozen=True)
class ToolsSpec:
    """The function-calling part of one request."""

    tools: tuple[Tool, ...] = ()
    choice: ToolChoice = field(default_factory=ToolChoice)
    parallel: bool = True
    legacy: bool = False  # sent as functions/function_call: answered as function_call


def parse_tools(data: dict[str, Any]) -> ToolsSpec:
    """Read ``tools``, ``tool_choice``, ``parallel_tool_calls`` or legacy ``functions``."""
    tools_value, functions_value = data.get("tools"), data.get("functions")
    if tools_value is not None and functions_value is not None:
        raise InvalidRequest("Send 'tools' or the legacy 'functions', not both.", param="functions")
    legacy = functions_value is not None
    if legacy:
        if data.get("tool_choice") is not None:
            raise InvalidRequest("'tool_choice' goes with 'tools'; with 'functions' send "
                                 "'function_call'.", param="tool_choice")
        tools = _tool_list(functions_value, "functions", wrapped=False)
        choice = _choice(data.get("function_call"), tools, "function_call", legacy=True)
    else:
        if data.get("function_call") is not None:
            raise InvalidRequest("'function_call' goes with the legacy 'functions'; with "
                                 "'tools' send 'tool_choice'.", param="function_call")
        tools = _tool_list(tools_value, "tools", wrapped=True)
        choice = _choice(data.get("tool_choice"), tools, "tool_choice", legacy=False)
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean.",
                             param="parallel_tool_calls")
    return ToolsSpec(tools, choice, parallel is not False and not legacy, legacy)


def _tool_list(value: Any, param: str, *, wrapped: bool) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be an array.", param=param)
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(f"'{param}' holds {len(value)} tools; at most {MAX_TOOLS} are "
                             "allowed.", param=param)
    tools: list[Tool] = []
    for index, item in enumerate(value):
        here = f"{param}[{index}]"
        if wrapped:
            if not isinstance(item, dict) or item.get("type") != "function":
                raise InvalidRequest(f"'{here}.type' must be 'function'.", param=f"{here}.type")
            item, here = item.get("function"), f"{here}.function"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{here}' must be an object.", param=here)
        name = item.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidRequest(
                f"'{here}.name' must be 1 to 64 letters, digits, '_' or '-'; got {name!r}.",
                param=f"{here}.name",
            )
        if any(tool.name == name for tool in tools):
            raise InvalidRequest(f"'{here}.name': the tool name {name!r} is used twice.",
                                 param=f"{here}.name")
        description = item.get("description", "")
        if not isinstance(description, str):
            raise InvalidRequest(f"'{here}.description' must be a string.",
                                 param=f"{here}.description")
        parameters = item.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        tools.append(Tool(name, description, _schema(parameters, f"{here}.parameters")))
    return tuple(tools)


def _schema(schema: Any, param: str) -> dict[str, Any]:
    """A tool's parameters, checked as structured outputs check a schema (same limits)."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}' must be a JSON Schema object.", param=param)
    try:
        StructuredOutput.from_response_format(
            {"type": "json_schema", "json_schema": {"name": "parameters", "schema": schema}}
        )
    except InvalidRequest as exc:
        message = str(exc).replace("response_format.json_schema.schema", param)
        raise InvalidRequest(message, param=param) from None
    return schema


def _choice(value: Any, tools: tuple[Tool, ...], param: str, *, legacy: bool) -> ToolChoice:
    if value is None:
        return ToolChoice("auto")
    if value in ("auto", "none") or (value == "required" and not legacy):
        if value != "none" and not tools and value != "auto":
            raise InvalidRequest(f"'{param}' is {value!r}, but no tools are given.", param=param)
        return ToolChoice(str(value))
    if isinstance(value, dict):
        name = value.get("name") if legacy else (
            value.get("function", {}).get("name")
            if value.get("type") == "function" and isinstance(value.get("function"), dict)
            else None
        )
        if isinstance(name, str):
            if not any(tool.name == name for tool in tools):
                raise InvalidRequest(f"'{param}' names the function {name!r}, which is not "
                                     "among the tools.", param=param)
            return ToolChoice("function", name)
    accepted = "'auto', 'none', or {\"name\": ...}" if legacy else (
        "'auto', 'none', 'required', or {\"type\": \"function\", \"function\": {\"name\": ...}}"
    )
    raise InvalidRequest(f"'{param}' must be {accepted}.", param=param)


def assistant_calls(param: str, message: dict[str, Any]) -> tuple[list[str], list[str]]:
    """An assistant message's ``tool_calls``/``function_call`` as text parts, and their ids."""
    calls = message.get("tool_calls")
    parts: list[str] = []
    ids: list[str] = []
    if calls is not None:
        if not isinstance(calls, list):
            raise InvalidRequest(f"'{param}.tool_calls' must be an array.",
                                 param=f"{param}.tool_calls")
        for index, call in enumerate(calls):
            here = f"{param}.tool_calls[{index}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(call, dict) or not isinstance(call.get("id"), str) or not (
                isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments", ""), str)
            ):
                raise InvalidRequest(
                    f"'{here}' must be an object with 'id' and 'function' ('name', 'arguments').",
                    param=here,
                )
            ids.append(call["id"])
            parts.append(call_text(call["id"], function["name"], function.get("arguments", "")))
    legacy = message.get("function_call")
    if legacy is not None:
        if not isinstance(legacy, dict) or not isinstance(legacy.get("name"), str):
            raise InvalidRequest(f"'{param}.function_call' must be an object with a 'name'.",
                                 param=f"{param}.function_call")
        parts.append(call_text(None, legacy["name"], str(legacy.get("arguments", ""))))
    return parts, ids


def call_text(call_id: str | None, name: str, arguments: str) -> str:
    # Ids, names and arguments are client text like any other: neutralized with the whole turn
    # (protocol.user_line).
    label = f' id="{call_id}"' if call_id is not None else ""
    return f'\n<tool_call{label} name="{name}">\n{arguments}\n</tool_call>'


def result_tag(param: str, message: dict[str, Any], role: str, known_ids: set[str]) -> str:
    """The opening tag of a ``tool`` (or ``function``) result message; checks its call id."""
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in known_ids:
            raise InvalidRequest(
                f"'{param}.tool_call_id' {call_id!r} matches no tool call of an earlier "
                "assistant message.",
                param=f"{param}.tool_call_id",
            )
        return f'tool_result id="{call_id}"'
    name = message.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"'{param}.name' must name the function this result is for.",
                             param=f"{param}.name")
    return f'tool_result name="{name}"'


def tool_calls_object(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """``message.tool_calls``: arguments as the JSON text the model wrote."""
    return [
        {"id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls
    ]


def function_call_object(call: ToolCall) -> dict[str, Any]:
    """The legacy ``message.function_call``."""
    return {"name": call.name, "arguments": call.arguments}
