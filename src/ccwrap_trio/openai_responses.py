"""The OpenAI Responses API (``POST /v1/responses``): a front end of the dialect-free core.

``parse_request`` validates a Responses body and translates it into a ``CoreRequest`` (one user
turn rendered like a Chat Completions conversation, the same tools, tool_choice and structured
output); ``response_object`` and ``response_stream`` render the core's result and events back as
a ``response`` object or as the typed SSE events the ``openai`` SDK and the Agents SDK consume.
Errors keep OpenAI's shape (``openai_api.error_response``): the Responses API uses the same one.
Nothing here is stored: every request stands alone, so ``previous_response_id`` is refused.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from . import openai_api, openai_tools, protocol, tool_policy
from .core import CoreRequest, Tool, ToolCall, ToolCallDelta, ToolCallStart, ToolChoice
from .errors import CcwrapError, InvalidRequest
from .openai_api import SSE_KEEPALIVE, AnswerLimiter, Part, boolean_field, integer_field
from .structured import StructuredOutput
from .supervisor import QueryHandle

# Fields that need state or features ccwrap-trio does not have: a 400 naming them, never ignored.
UNSUPPORTED = {
    "previous_response_id": "responses are not stored; send the whole conversation in 'input'",
    "conversation": "conversations are not stored; send the whole conversation in 'input'",
    "background": "background responses are not supported",
    "prompt": "stored prompt templates are not supported",
    "top_logprobs": "the CLI reports no log probabilities",
    "context_management": "server-side context management is not supported",
}
# Accepted for compatibility; the CLI has no such knob, so they have no effect.
NUMBER_FIELDS = ("temperature", "top_p")
STRING_FIELDS = ("user", "safety_identifier", "prompt_cache_key", "service_tier", "truncation",
                 "prompt_cache_retention")
# Roles of input messages and the Chat Completions role each is rendered as.
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "developer"}
TEXT_PARTS = ("input_text", "output_text", "text")


@dataclass(frozen=True)
class ResponsesRequest:
    """What ccwrap-trio needs of a validated Responses request, and what it echoes back."""

    model: str
    content: openai_api.Content
    stream: bool = False
    max_output_tokens: int | None = None
    structured: StructuredOutput | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response repeats

    @property
    def core(self) -> CoreRequest:
        """The request as the core sees it (no Responses field names)."""
        return CoreRequest(
            content=self.content, model=self.model, tools=self.tools,
            tool_choice=self.tool_choice, parallel_tool_calls=self.parallel_tool_calls,
            structured=self.structured, stream=self.stream,
        )

    @property
    def max_chars(self) -> int | None:
        if self.max_output_tokens is None:
            return None
        return self.max_output_tokens * openai_api.CHARS_PER_TOKEN


def parse_request(body: bytes | str, *, default_model: str) -> ResponsesRequest:
    """Validate a Responses body; raise InvalidRequest naming the offending param."""
    data, model = openai_api.json_body_and_model(body, default_model)
    for name, why in UNSUPPORTED.items():
        if data.get(name) not in (None, False, "", [], {}):
            raise InvalidRequest(f"'{name}': {why}.", param=name, code="unsupported")
    _check_accepted_fields(data)
    stream = boolean_field(data, "stream")
    tools = _tools(data.get("tools"))
    choice = _tool_choice(data.get("tool_choice"), tools)
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean.",
                             param="parallel_tool_calls")
    structured, text_config = _text_format(data.get("text"))
    max_output_tokens = _max_output_tokens(data)

    turns: list[tuple[str, list[Part]]] = []
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("'instructions' must be a string.", param="instructions")
        if instructions.strip():
            turns.append(("system", [instructions]))
    turns += _input_turns(data.get("input"))
    if not any(isinstance(part, dict) or part.strip() for role, parts in turns
               if role != "system" for part in parts):
        raise InvalidRequest("'input' is empty.", param="input")
    content = openai_api.render_prompt(turns)
    if structured is not None:
        content = openai_api.append_text(content, structured.instruction())
    core = CoreRequest(content, model, tools, choice, parallel is not False)
    if (wanted := tool_policy.instruction(core)) is not None:
        content = openai_api.append_text(content, wanted)
    echo = {
        "instructions": instructions,
        "max_output_tokens": max_output_tokens,
        "metadata": data.get("metadata") or {},
        "parallel_tool_calls": parallel is not False,
        "store": data.get("store") is not False,
        "temperature": data.get("temperature"),
        "text": {"format": text_config},
        "tool_choice": data.get("tool_choice") or "auto",
        "tools": data.get("tools") or [],
        "top_p": data.get("top_p"),
        "truncation": data.get("truncation") or "disabled",
        "user": data.get("user"),
    }
    return ResponsesRequest(
        model=model, content=content, stream=stream, max_output_tokens=max_output_tokens,
        structured=structured, tools=tools, tool_choice=choice,
        parallel_tool_calls=parallel is not False, echo=echo,
    )


def _check_accepted_fields(data: dict[str, Any]) -> None:
    for name in NUMBER_FIELDS:
        value = data.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise InvalidRequest(f"'{name}' must be a number.", param=name)
    for name in STRING_FIELDS:
        if data.get(name) is not None and not isinstance(data.get(name), str):
            raise InvalidRequest(f"'{name}' must be a string.", param=name)
    boolean_field(data, "store")
    metadata = data.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and len(metadata) <= 16
        and all(isinstance(value, str) for value in metadata.values())
    ):
        raise InvalidRequest("'metadata' must be an object of at most 16 string values.",
                             param="metadata")
    include = data.get("include")
    if include is not None and not (
        isinstance(include, list) and all(isinstance(item, str) for item in include)
    ):
        raise InvalidRequest("'include' must be an array of strings.", param="include")
    for name in ("reasoning", "stream_options"):
        if data.get(name) is not None and not isinstance(data.get(name), dict):
            raise InvalidRequest(f"'{name}' must be an object.", param=name)
    integer_field(data, "max_tool_calls")


def _max_output_tokens(data: dict[str, Any]) -> int | None:
    value = integer_field(data, "max_output_tokens")
    if value is not None and value < 1:
        raise InvalidRequest("'max_output_tokens' must be a positive integer.",
                             param="max_output_tokens")
    return value


def _tools(value: Any) -> tuple[Tool, ...]:
    """The flat Responses ``tools`` (``{"type": "function", "name", ...}``); built-ins refused."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("'tools' must be an array.", param="tools")
    wrapped = []
    for index, item in enumerate(value):
        here = f"tools[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise InvalidRequest(f"'{here}' must be an object with a 'type'.", param=here)
        if item["type"] != "function":
            raise InvalidRequest(
                f"'{here}.type' {item['type']!r} is not supported: only 'function' tools, which "
                "the client runs itself (no built-in tools run on this server).",
                param=f"{here}.type", code="unsupported",
            )
        strict = item.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest(f"'{here}.strict' must be a boolean.", param=f"{here}.strict")
        function = {key: item[key] for key in ("name", "description", "parameters") if key in item}
        if function.get("description") is None:
            function.pop("description", None)
        wrapped.append({"type": "function", "function": function})
    try:
        return openai_tools.parse_tools({"tools": wrapped}).tools
    except InvalidRequest as exc:
        # Chat Completions nests the function: its params say tools[i].function.name.
        raise InvalidRequest(str(exc).replace(".function", ""),
                             param=(exc.param or "tools").replace(".function", "")) from None


def _tool_choice(value: Any, tools: tuple[Tool, ...]) -> ToolChoice:
    if value is None or value == "auto":
        return ToolChoice("auto")
    if value in ("none", "required"):
        if value == "required" and not tools:
            raise InvalidRequest("'tool_choice' is 'required', but no tools are given.",
                                 param="tool_choice")
        return ToolChoice(value)
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if not isinstance(name, str) or all(tool.name != name for tool in tools):
            raise InvalidRequest(f"'tool_choice.name' {name!r} is not among the tools.",
                                 param="tool_choice.name")
        return ToolChoice("function", name)
    raise InvalidRequest(
        "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
        "\"name\": ...}; built-in tools and 'allowed_tools' are not supported.",
        param="tool_choice",
    )


def _text_format(value: Any) -> tuple[StructuredOutput | None, dict[str, Any]]:
    """``text.format`` read by Chat Completions' ``response_format`` rules (same checks)."""
    if value is None:
        return None, {"type": "text"}
    if not isinstance(value, dict):
        raise InvalidRequest("'text' must be an object.", param="text")
    verbosity = value.get("verbosity")
    if verbosity is not None and verbosity not in ("low", "medium", "high"):
        raise InvalidRequest("'text.verbosity' must be 'low', 'medium' or 'high'.",
                             param="text.verbosity")
    fmt = value.get("format")
    if fmt is None:
        return None, {"type": "text"}
    if not isinstance(fmt, dict):
        raise InvalidRequest("'text.format' must be an object with a 'type'.", param="text.format")
    response_format: dict[str, Any] = {"type": fmt.get("type")}
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise InvalidRequest("'text.format.name' must be a non-empty string.",
                                 param="text.format.name")
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest("'text.format.schema' must be a JSON Schema object.",
                                 param="text.format.schema")
        strict = fmt.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest("'text.format.strict' must be a boolean.",
                                 param="text.format.strict")
        response_format["json_schema"] = {"name": fmt["name"], "schema": fmt["schema"]}
    try:
        structured = StructuredOutput.from_response_format(response_format)
    except InvalidRequest as exc:
        def rename(text: str) -> str:
            return text.replace("response_format.json_schema", "text.format").replace(
                "response_format", "text.format")
        raise InvalidRequest(rename(str(exc)), param=rename(exc.param or "text.format")) from None
    return structured, fmt


def _input_turns(value: Any) -> list[tuple[str, list[Part]]]:
    """``input``: a string (one user message) or a list of message and function-call items."""
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRequest("'input' is empty.", param="input")
        return [("user", [value])]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'input' must be a string or a non-empty array of items.",
                             param="input")
    turns: list[tuple[str, list[Part]]] = []
    call_ids: set[str] = set()
    for index, item in enumerate(value):
        here = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{here}' must be an object.", param=here)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            turns.append(_message(here, item))
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            arguments = item.get("arguments", "")
            for key, got in (("call_id", call_id), ("name", name), ("arguments", arguments)):
                if not isinstance(got, str) or (key != "arguments" and not got):
                    raise InvalidRequest(f"'{here}.{key}' must be a string.",
                                         param=f"{here}.{key}")
            assert isinstance(call_id, str) and isinstance(name, str)  # for mypy: checked above
            call_ids.add(call_id)
            text = openai_tools.call_text(call_id, name, arguments)
            # Consecutive calls belong to one assistant message, as in Chat Completions.
            if turns and turns[-1][0] == "assistant":
                turns[-1][1].append(text)
            else:
                turns.append(("assistant", [text]))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in call_ids:
                raise InvalidRequest(
                    f"'{here}.call_id' {call_id!r} matches no earlier 'function_call' item.",
                    param=f"{here}.call_id",
                )
            output = item.get("output")
            if isinstance(output, list):
                parts = _parts(f"{here}.output", output, "tool")
            elif isinstance(output, str):
                parts = [output]
            else:
                raise InvalidRequest(f"'{here}.output' must be a string or an array of parts.",
                                     param=f"{here}.output")
            turns.append((f'tool_result id="{call_id}"', parts))
        elif kind == "reasoning":
            continue  # never produced here; a client replaying one loses nothing by its absence
        else:
            raise InvalidRequest(
                f"'{here}.type' {kind!r} is not supported; 'message', 'function_call' and "
                "'function_call_output' items are.",
                param=f"{here}.type", code="unsupported",
            )
    return turns


def _message(here: str, item: dict[str, Any]) -> tuple[str, list[Part]]:
    role = item.get("role")
    if not isinstance(role, str) or role not in ROLES:  # a dict or list is not hashable
        raise InvalidRequest(
            f"'{here}.role' must be one of {', '.join(ROLES)}; got {role!r}.", param=f"{here}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return ROLES[role], [content]
    if not isinstance(content, list):
        raise InvalidRequest(f"'{here}.content' must be a string or an array of parts.",
                             param=f"{here}.content")
    return ROLES[role], _parts(f"{here}.content", content, role)


def _parts(param: str, content: list[Any], role: str) -> list[Part]:
    parts: list[Part] = []
    for index, part in enumerate(content):
        here = f"{param}[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(f"'{here}' must be an object with a 'type'.", param=here)
        kind = part["type"]
        if kind in TEXT_PARTS or kind == "refusal":
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise InvalidRequest(f"'{here}.text' must be a string.", param=f"{here}.text")
            if parts and isinstance(parts[-1], str):
                parts[-1] += "\n" + text
            else:
                parts.append(text)
        elif kind == "input_image" and role in ("user", "tool"):
            if part.get("file_id") is not None:
                raise InvalidRequest(f"'{here}.file_id': files are not stored; send the image "
                                     "inline as a data: URL in 'image_url'.",
                                     param=f"{here}.file_id", code="unsupported")
            # Same checks as a Chat Completions image (data: URLs only, known media types).
            try:
                parts.append(openai_api.image_part(here, part.get("image_url")))
            except InvalidRequest as exc:
                raise InvalidRequest(str(exc).replace(".image_url.url", ".image_url"),
                                     param=f"{here}.image_url", code=exc.code) from None
        else:
            raise InvalidRequest(
                f"'{here}.type' {kind!r} is not supported here; 'input_text' parts are, and "
                "'input_image' parts with data: URLs in user messages.",
                param=f"{here}.type", code="unsupported",
            )
    return parts


def new_response_id() -> str:
    """A fresh ``resp_<32 hex>`` id (never stored, never looked up)."""
    return f"resp_{uuid.uuid4().hex}"


def usage_object(usage: protocol.Usage) -> dict[str, Any]:
    """Responses usage: input counts every prompt token, cached ones included."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cache_read_input_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
    }


def message_item(item_id: str, text: str, *, status: str = "completed") -> dict[str, Any]:
    """An assistant ``message`` output item; in progress it has no content part yet."""
    content = [text_part(text)] if status == "completed" else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": content}


def text_part(text: str) -> dict[str, Any]:
    """One ``output_text`` content part (no annotations, no log probabilities)."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call: ToolCall, *, status: str = "completed") -> dict[str, Any]:
    """A ``function_call`` output item: the client runs the call and sends its output back."""
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call.id,
            "name": call.name, "arguments": call.arguments}


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_body(
    req: ResponsesRequest, *, response_id: str, created_at: int, model: str, status: str,
    output: list[dict[str, Any]], usage: protocol.Usage | None = None,
    incomplete: str | None = None, error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``response`` object; the request's settings echoed as OpenAI echoes them."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": model,
        "output": output,
        "previous_response_id": None,
        "reasoning": None,
        "usage": usage_object(usage) if usage is not None else None,
        **req.echo,
    }


def limit_answer(text: str, req: ResponsesRequest) -> tuple[str, str | None]:
    """``max_output_tokens`` applied to a whole answer: ``(text, incomplete reason or None)``."""
    if req.structured is not None:
        return text, None  # validated JSON is never cut
    limiter = AnswerLimiter((), req.max_chars)
    text = limiter.feed(text) + limiter.flush()
    return text, "max_output_tokens" if limiter.finish_reason == "length" else None


def response_object(req: ResponsesRequest, result: protocol.TurnResult) -> dict[str, Any]:
    """The non-streamed answer: a message item (if any text), then one item per tool call."""
    text, incomplete = limit_answer(result.text, req)
    output: list[dict[str, Any]] = []
    if text or not result.tool_calls:
        output.append(message_item(_item_id("msg"), text))
    output += [call_item(_item_id("fc"), call) for call in result.tool_calls]
    return response_body(
        req, response_id=new_response_id(), created_at=int(time.time()),
        model=result.model or req.model, status="incomplete" if incomplete else "completed",
        output=output, usage=result.usage, incomplete=incomplete,
    )


def event_frame(event: dict[str, Any]) -> bytes:
    """One typed SSE event (``event:`` names it, ``data:`` carries it), as OpenAI sends them."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


class _Events:
    """Builds the stream's events: numbers them and keeps the output items as they grow."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self.response_id = new_response_id()
        self.created_at = int(time.time())
        self.model = req.model
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.text: str | None = None  # the open message item's text so far
        self.calls: dict[int, int] = {}  # core call index -> output index

    def event(self, kind: str, **fields: Any) -> bytes:
        frame = event_frame({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return frame

    def lifecycle(self, kind: str, status: str, **extra: Any) -> bytes:
        return self.event(kind, response=response_body(
            self.req, response_id=self.response_id, created_at=self.created_at,
            model=self.model, status=status, output=self.output, **extra))

    def text_delta(self, delta: str) -> list[bytes]:
        frames = []
        if self.text is None:
            self.text = ""
            item = message_item(_item_id("msg"), "", status="in_progress")
            self.output.append(item)
            frames += [
                self.event("response.output_item.added", output_index=len(self.output) - 1,
                           item=item),
                self.event("response.content_part.added", item_id=item["id"],
                           output_index=len(self.output) - 1, content_index=0,
                           part=text_part("")),
            ]
        self.text += delta
        item_id = self.output[-1]["id"]
        frames.append(self.event("response.output_text.delta", item_id=item_id,
                                 output_index=len(self.output) - 1, content_index=0,
                                 delta=delta, logprobs=[]))
        return frames

    def close_text(self) -> list[bytes]:
        if self.text is None:
            return []
        index, item = len(self.output) - 1, self.output[-1]
        part = text_part(self.text)
        item.update(status="completed", content=[part])
        self.text = None
        return [
            self.event("response.output_text.done", item_id=item["id"], output_index=index,
                       content_index=0, text=part["text"], logprobs=[]),
            self.event("response.content_part.done", item_id=item["id"], output_index=index,
                       content_index=0, part=part),
            self.event("response.output_item.done", output_index=index, item=dict(item)),
        ]

    def call_start(self, event: ToolCallStart) -> list[bytes]:
        frames = self.close_text()
        item = call_item(_item_id("fc"), ToolCall(event.id, event.name, ""), status="in_progress")
        self.output.append(item)
        self.calls[event.index] = len(self.output) - 1
        frames.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                                 item=dict(item)))
        return frames

    def call_delta(self, event: ToolCallDelta) -> bytes:
        index = self.calls[event.index]
        item = self.output[index]
        item["arguments"] += event.arguments
        return self.event("response.function_call_arguments.delta", item_id=item["id"],
                          output_index=index, delta=event.arguments)

    def finish_calls(self, calls: tuple[ToolCall, ...]) -> list[bytes]:
        """Each call's ``.done`` events, with the arguments the core settled on (after repair)."""
        frames: list[bytes] = []
        for number, call in enumerate(calls):
            index = self.calls.get(number)
            if index is None:  # a call that was not streamed (a repaired answer): whole
                item = call_item(_item_id("fc"), call, status="in_progress")
                self.output.append(item)
                index = self.calls[number] = len(self.output) - 1
                frames.append(self.event("response.output_item.added", output_index=index,
                                         item=dict(item, arguments="")))
            item = self.output[index]
            item.update(call_id=call.id, name=call.name, arguments=call.arguments,
                        status="completed")
            frames += [
                self.event("response.function_call_arguments.done", item_id=item["id"],
                           output_index=index, name=call.name, arguments=call.arguments),
                self.event("response.output_item.done", output_index=index, item=dict(item)),
            ]
        return frames


async def response_stream(
    req: ResponsesRequest, handle: QueryHandle, *, keepalive_s: float
) -> AsyncIterator[bytes]:
    """SSE events for one streamed response; closes ``handle`` however it ends.

    The first frame waits for the first event, so a failure before any output is a plain HTTP
    error; later failures end the stream with ``response.failed``. Every stream ends with one of
    ``response.completed``, ``response.incomplete`` or ``response.failed``.
    """
    events = _Events(req)
    limiter = AnswerLimiter((), req.max_chars)
    prompt_usage = protocol.Usage()
    sent = ""
    started = False
    with handle:
        try:
            event = await handle.next_event(patience=keepalive_s)
            if isinstance(event, protocol.MessageStart) and event.model:
                events.model = event.model
            started = True
            yield events.lifecycle("response.created", "in_progress")
            yield events.lifecycle("response.in_progress", "in_progress")
            while not isinstance(event, protocol.TurnResult):
                if event is None:
                    yield SSE_KEEPALIVE
                elif isinstance(event, protocol.MessageStart):
                    prompt_usage = event.usage
                elif isinstance(event, ToolCallStart):
                    if event.index > 0 and not req.parallel_tool_calls:
                        # Only the first call is kept (tool_policy.check): never announce others.
                        event = await handle.next_event(patience=keepalive_s)
                        continue
                    if text := limiter.flush():
                        sent += text
                        for frame in events.text_delta(text):
                            yield frame
                    for frame in events.call_start(event):
                        yield frame
                elif isinstance(event, ToolCallDelta):
                    if event.index in events.calls:
                        yield events.call_delta(event)
                elif text := limiter.feed(event.text):
                    sent += text
                    for frame in events.text_delta(text):
                        yield frame
                if limiter.finish_reason is not None:
                    break
                event = await handle.next_event(patience=keepalive_s)
        except CcwrapError as exc:
            if not started:
                raise
            body, _status, _headers = openai_api.error_response(exc)
            error = {"code": body["error"]["code"] or body["error"]["type"],
                     "message": body["error"]["message"]}
            for frame in events.close_text():
                yield frame
            yield events.lifecycle("response.failed", "failed", error=error)
            return
        incomplete = None
        if isinstance(event, protocol.TurnResult):
            result = event
            text = result.text if req.structured is not None and not result.tool_calls else (
                limiter.flush()
            )
            if text:
                sent += text
                for frame in events.text_delta(text):
                    yield frame
            for frame in events.close_text():
                yield frame
            for frame in events.finish_calls(result.tool_calls):
                yield frame
            usage = result.usage
        else:
            # Cut by max_output_tokens: end the turn now; its usage is what we know of it.
            handle.finish_early()
            usage = protocol.Usage(
                input_tokens=prompt_usage.input_tokens,
                cache_read_input_tokens=prompt_usage.cache_read_input_tokens,
                cache_creation_input_tokens=prompt_usage.cache_creation_input_tokens,
                output_tokens=openai_api.estimate_tokens(sent),
            )
            for frame in events.close_text():
                yield frame
            events.output = [item for item in events.output if item["type"] == "message"]
            incomplete = "max_output_tokens"
        if not events.output:
            # An empty answer is still one (empty) message, as in the non-streamed object.
            for frame in [*events.text_delta(""), *events.close_text()]:
                yield frame
        if incomplete:
            yield events.lifecycle("response.incomplete", "incomplete", usage=usage,
                                   incomplete=incomplete)
        else:
            yield events.lifecycle("response.completed", "completed", usage=usage)
