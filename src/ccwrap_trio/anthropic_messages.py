"""The Anthropic Messages API front end: ``/v1/messages`` and ``/v1/messages/count_tokens``.

Pure functions, no I/O, except ``message_stream`` (an async generator over a ``QueryHandle``).
A Messages request is validated and rendered into the same single user turn and dialect-free
``CoreRequest`` as Chat Completions (``openai_api.render_prompt``); the result and the events are
rendered back as Anthropic ``message`` objects and SSE events. Errors have Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``, from one table (``ERRORS``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from . import protocol, tool_policy
from .core import (
    MAX_TOOLS,
    TOOL_NAME,
    CoreRequest,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
)
from .errors import (
    CcwrapError,
    CliError,
    ContextLengthExceeded,
    EmptyResponse,
    InternalError,
    InvalidRequest,
    InvalidStructuredOutput,
    InvalidToolCall,
    KeyQuotaExceeded,
    ModelNotFound,
    QueryTimeout,
    QueueFull,
    SessionCrashed,
    SessionUnavailable,
    UpstreamAuthFailed,
    UpstreamOverloaded,
    UpstreamRateLimited,
    UsageLimitReached,
)
from .openai_api import (
    CHARS_PER_TOKEN,
    IMAGE_MEDIA_TYPES,
    AnswerLimiter,
    Content,
    Part,
    estimate_tokens,
    render_prompt,
)
from .structured import StructuredOutput
from .supervisor import QueryHandle

PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
# Accepted for compatibility (the Claude Code CLI and the SDKs send them); the CLI has no such
# knob, so they have no effect.
NO_EFFECT = frozenset({
    "metadata", "temperature", "top_p", "top_k", "thinking", "service_tier",
    "context_management", "betas", "container", "mcp_servers", "inference_geo", "speed",
    "effort", "output_config", "diagnostics",
})
FIELDS = frozenset({"model", "messages", "system", "max_tokens", "stop_sequences", "stream",
                    "tools", "tool_choice", "output_format"}) | NO_EFFECT
COUNT_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice",
                          "output_format"}) | NO_EFFECT
# An image's tokens as the API counts them are (width * height) / 750, at most ~1,600 after
# its resizing; the CLI cannot tell the dimensions, so count_tokens takes the cap.
IMAGE_TOKENS = 1600
# Every count_tokens answer says how it was made: the CLI has no counting endpoint of its own.
ESTIMATE_HEADER = "x-ccwrap-token-count"


@dataclass(frozen=True)
class MessagesRequest:
    """What ccwrap-trio needs of a validated Messages request."""

    core: CoreRequest
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def limiter(self) -> AnswerLimiter:
        """A fresh limiter for ``stop_sequences`` and ``max_tokens``."""
        max_chars = None if self.max_tokens is None else self.max_tokens * CHARS_PER_TOKEN
        return AnswerLimiter(self.stop, max_chars)


def parse_request(
    body: bytes | str, *, default_model: str, counting: bool = False
) -> MessagesRequest:
    """Validate a Messages (or count_tokens) body; raise InvalidRequest naming the field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    allowed = COUNT_FIELDS if counting else FIELDS
    for name in data:
        if name not in allowed:
            raise InvalidRequest(f"{name}: Extra inputs are not permitted", param=name)
    model = data.get("model")
    if model is None:
        model = default_model
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required (a non-empty string)", param="model")
    max_tokens = None
    if not counting:
        max_tokens = data.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidRequest("max_tokens: Field required (a positive integer)",
                                 param="max_tokens")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream: Input should be a valid boolean", param="stream")
    stop = _stop_sequences(data.get("stop_sequences"))
    tools = _tools(data.get("tools"))
    choice, parallel = _tool_choice(data.get("tool_choice"), tools)
    structured = _output_format(data.get("output_format"))

    turns: list[tuple[str, list[Part]]] = []
    system = _system(data.get("system"))
    if system:
        turns.append(("system", [system]))
    turns += _messages(data.get("messages"))
    content: Content = render_prompt(turns)
    if structured is not None:
        content = _append_text(content, structured.instruction())
    core = CoreRequest(content=content, model=model, tools=tools, tool_choice=choice,
                       parallel_tool_calls=parallel, structured=structured, stream=stream)
    if (wanted := tool_policy.instruction(core)) is not None:
        content = _append_text(content, wanted)
        core = CoreRequest(content=content, model=model, tools=tools, tool_choice=choice,
                           parallel_tool_calls=parallel, structured=structured, stream=stream)
    return MessagesRequest(core=core, max_tokens=max_tokens, stop=stop)


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise InvalidRequest("stop_sequences: Input should be a list of non-empty strings",
                             param="stop_sequences")
    return tuple(value)


def _system(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for index, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(
                block.get("text"), str
            ):
                raise InvalidRequest(f"system.{index}: Input should be a text block",
                                     param=f"system.{index}")
            texts.append(block["text"])
        return "\n".join(texts)
    raise InvalidRequest("system: Input should be a string or a list of text blocks",
                         param="system")


def _messages(value: Any) -> list[tuple[str, list[Part]]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages: Input should be a non-empty list of messages",
                             param="messages")
    turns: list[tuple[str, list[Part]]] = []
    call_ids: set[str] = set()
    for index, message in enumerate(value):
        here = f"messages.{index}"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{here}: Input should be an object", param=here)
        role = message.get("role")
        # "system" messages mid-conversation: the Claude Code CLI sends them (per-turn control).
        if role not in ("user", "assistant", "system"):
            raise InvalidRequest(f"{here}.role: Input should be 'user', 'assistant' or 'system'",
                                 param=f"{here}.role")
        content = message.get("content")
        if isinstance(content, str):
            turns.append((role, [content]))
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"{here}.content: Input should be a string or a list of "
                                 "content blocks", param=f"{here}.content")
        parts: list[Part] = []
        for number, block in enumerate(content):
            where = f"{here}.content.{number}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_result":
                if role != "user":
                    raise InvalidRequest(f"{where}: tool_result blocks belong in user "
                                         "messages", param=where)
                if parts:
                    turns.append((role, parts))
                    parts = []
                turns.append(_tool_result(where, block, call_ids))
                continue
            parts += _block(where, block, role, call_ids)
        if parts:
            turns.append((role, parts))
    if not any(isinstance(part, dict) or part.strip() for _, parts in turns for part in parts):
        raise InvalidRequest("messages: every message is empty", param="messages")
    return turns


def _block(where: str, block: Any, role: str, call_ids: set[str]) -> list[Part]:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise InvalidRequest(f"{where}.text: Input should be a string", param=f"{where}.text")
        return [block["text"]]
    if kind == "image" and role != "assistant":
        return [_image(where, block.get("source"))]
    if kind == "tool_use" and role == "assistant":
        call_id, name = block.get("id"), block.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(
            block.get("input"), dict
        ):
            raise InvalidRequest(f"{where}: tool_use blocks need 'id', 'name' and an object "
                                 "'input'", param=where)
        call_ids.add(call_id)
        # Ids, names and input are client text: neutralized with the turn (protocol.user_line).
        arguments = json.dumps(block["input"], ensure_ascii=False)
        return [f'\n<tool_call id="{call_id}" name="{name}">\n{arguments}\n</tool_call>']
    if kind in ("thinking", "redacted_thinking") and role == "assistant":
        return []  # the model's own earlier reasoning: not part of the conversation's text
    raise InvalidRequest(
        f"{where}.type: {kind!r} is not supported here; 'text', 'image' (base64, user), "
        "'tool_use' (assistant) and 'tool_result' (user) blocks are",
        param=f"{where}.type",
    )


def _tool_result(where: str, block: dict[str, Any], call_ids: set[str]) -> tuple[str, list[Part]]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or call_id not in call_ids:
        raise InvalidRequest(f"{where}.tool_use_id: {call_id!r} matches no tool_use block of an "
                             "earlier assistant message", param=f"{where}.tool_use_id")
    content = block.get("content", "")
    parts: list[Part] = []
    if isinstance(content, str):
        parts = [content]
    elif isinstance(content, list):
        for number, inner in enumerate(content):
            parts += _block(f"{where}.content.{number}", inner, "user", call_ids)
    else:
        raise InvalidRequest(f"{where}.content: Input should be a string or a list of blocks",
                             param=f"{where}.content")
    if block.get("is_error") is True:
        parts.insert(0, "(the tool failed) ")
    return f'tool_result id="{call_id}"', parts


def _image(where: str, source: Any) -> dict[str, Any]:
    here = f"{where}.source"
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise InvalidRequest(f"{here}: only base64 image sources are supported (image URLs and "
                             "files are not fetched)", param=here)
    media_type, data = source.get("media_type"), source.get("data")
    if media_type not in IMAGE_MEDIA_TYPES:
        raise InvalidRequest(f"{here}.media_type: Input should be one of "
                             f"{', '.join(IMAGE_MEDIA_TYPES)}", param=f"{here}.media_type")
    try:
        base64.b64decode(data if isinstance(data, str) else b"!", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{here}.data: invalid base64 data", param=f"{here}.data") from None
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": data}}


def _tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest("tools: Input should be a list", param="tools")
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(f"tools: at most {MAX_TOOLS} tools are allowed", param="tools")
    tools: list[Tool] = []
    for index, item in enumerate(value):
        here = f"tools.{index}"
        if not isinstance(item, dict) or item.get("type", "custom") != "custom":
            kind = item.get("type") if isinstance(item, dict) else None
            raise InvalidRequest(f"{here}.type: server tools ({kind!r}) are not supported; only "
                                 "client tools with 'name' and 'input_schema' are",
                                 param=f"{here}.type")
        name = item.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidRequest(f"{here}.name: must be 1 to 64 letters, digits, '_' or '-'",
                                 param=f"{here}.name")
        if any(tool.name == name for tool in tools):
            raise InvalidRequest(f"{here}.name: tool names must be unique ({name!r})",
                                 param=f"{here}.name")
        description = item.get("description", "")
        if not isinstance(description, str):
            raise InvalidRequest(f"{here}.description: Input should be a string",
                                 param=f"{here}.description")
        schema = item.get("input_schema")
        tools.append(Tool(name, description, _schema(schema, f"{here}.input_schema")))
    return tuple(tools)


def _schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON Schema, checked as structured outputs check one (same limits and messages)."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param}: Input should be a JSON Schema object", param=param)
    _structured(schema, param)
    return schema


def _structured(schema: dict[str, Any], param: str) -> StructuredOutput:
    try:
        structured = StructuredOutput.from_response_format(
            {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        )
    except InvalidRequest as exc:
        message = str(exc).replace("response_format.json_schema.schema", param)
        raise InvalidRequest(message, param=param) from None
    assert structured is not None
    return structured


def _output_format(value: Any) -> StructuredOutput | None:
    """The structured-outputs ``output_format``: ``{"type": "json_schema", "schema": ...}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "json_schema":
        raise InvalidRequest("output_format.type: Input should be 'json_schema'",
                             param="output_format.type")
    schema = value.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest("output_format.schema: Input should be a JSON Schema object",
                             param="output_format.schema")
    return _structured(schema, "output_format.schema")


def _tool_choice(value: Any, tools: tuple[Tool, ...]) -> tuple[ToolChoice, bool]:
    if value is None:
        return ToolChoice("auto"), True
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequest("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'",
                             param="tool_choice.type")
    parallel = value.get("disable_parallel_tool_use") is not True
    if kind in ("any", "tool") and not tools:
        raise InvalidRequest(f"tool_choice: {kind!r} needs 'tools'", param="tool_choice")
    if kind == "tool":
        name = value.get("name")
        if not any(tool.name == name for tool in tools):
            raise InvalidRequest(f"tool_choice.name: {name!r} is not among the tools",
                                 param="tool_choice.name")
        return ToolChoice("function", str(name)), parallel
    return ToolChoice({"any": "required"}.get(str(kind), str(kind))), parallel


def _append_text(content: Content, text: str) -> Content:
    if isinstance(content, str):
        return f"{content}\n\n{text}"
    return [*content, {"type": "text", "text": f"\n\n{text}"}]


def count_tokens(request: MessagesRequest) -> int:
    """An estimate of the prompt's input tokens: the rendered turn's text and the tools.

    The CLI cannot count without a turn; the real count also includes the CLI's own system
    prompt, which the API bills to the server, not to this prompt.
    """
    core = request.core
    content = core.content
    texts = [content] if isinstance(content, str) else [
        block.get("text", "") for block in content if block.get("type") == "text"
    ]
    images = 0 if isinstance(content, str) else sum(
        1 for block in content if block.get("type") == "image"
    )
    tools = json.dumps([tool.listing() for tool in core.tools]) if core.tools else ""
    return max(1, estimate_tokens("".join(texts)) + estimate_tokens(tools) + images * IMAGE_TOKENS)


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def usage_object(usage: protocol.Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
    }


def _tool_use(call: ToolCall) -> dict[str, Any]:
    value, _ = call.parsed_arguments()  # validated by the worker: a JSON object
    return {"type": "tool_use", "id": call.id, "name": call.name,
            "input": value if isinstance(value, dict) else {}}


def stop_of(limiter: AnswerLimiter) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)`` of an answer the limiter may have cut."""
    if limiter.finish_reason == "length":
        return "max_tokens", None
    if limiter.finish_reason == "stop":
        return "stop_sequence", limiter.stop_sequence
    return "end_turn", None


def message_response(
    request: MessagesRequest, result: protocol.TurnResult
) -> dict[str, Any]:
    """A whole ``message`` with ``stop_sequences`` and ``max_tokens`` applied."""
    text = result.text
    stop_reason, stop_sequence = "end_turn", None
    if request.core.structured is None and not result.tool_calls:
        limiter = request.limiter
        cut = limiter.feed(text) + limiter.flush()
        stop_reason, stop_sequence = stop_of(limiter)
        text = cut
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    content += [_tool_use(call) for call in result.tool_calls]
    if result.tool_calls:
        stop_reason = "tool_use"
    return {
        "id": new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": result.model or request.core.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_object(result.usage),
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event in the Messages API's framing (``event:`` then ``data:``)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


PING = sse("ping", {"type": "ping"})


async def message_stream(
    request: MessagesRequest, handle: QueryHandle, *, keepalive_s: float
) -> AsyncIterator[bytes]:
    """The SSE events of one streamed message; closes ``handle`` however it ends.

    Its first event is produced only once the first event of the turn arrived (or
    ``keepalive_s`` passed), so a failure before that is still a plain HTTP error.
    """
    message_id = new_message_id()
    model = request.core.model
    limiter = request.limiter
    sent = ""
    index = -1  # the open content block, -1 for none
    text_open = False
    started = False
    prompt_usage = protocol.Usage()

    def start(event_usage: protocol.Usage) -> bytes:
        return sse("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": usage_object(event_usage)}})

    def close_block() -> bytes:
        return sse("content_block_stop", {"type": "content_block_stop", "index": index})

    def text_frames(text: str) -> list[bytes]:
        nonlocal index, text_open
        frames = []
        if not text_open:
            if index >= 0:
                frames.append(close_block())
            index += 1
            text_open = True
            frames.append(sse("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}))
        frames.append(sse("content_block_delta", {
            "type": "content_block_delta", "index": index,
            "delta": {"type": "text_delta", "text": text}}))
        return frames

    with handle:
        try:
            event = await handle.next_event(patience=keepalive_s)
            if isinstance(event, protocol.MessageStart):
                model = event.model or model
                prompt_usage = event.usage
            elif isinstance(event, protocol.TurnResult):  # structured: nothing streamed before
                model = event.model or model
                prompt_usage = dataclasses.replace(event.usage, output_tokens=0)
            started = True
            yield start(prompt_usage)
            while not isinstance(event, protocol.TurnResult):
                if event is None:
                    yield PING  # silence: keep proxies from cutting the stream
                elif isinstance(event, ToolCallStart):
                    if text := limiter.flush():
                        sent += text
                        for frame in text_frames(text):
                            yield frame
                    if index >= 0:
                        yield close_block()
                    index += 1
                    text_open = False
                    yield sse("content_block_start", {
                        "type": "content_block_start", "index": index,
                        "content_block": {"type": "tool_use", "id": event.id,
                                          "name": event.name, "input": {}}})
                elif isinstance(event, ToolCallDelta):
                    yield sse("content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": event.arguments}})
                elif isinstance(event, protocol.MessageStart):
                    prompt_usage = event.usage
                elif text := limiter.feed(event.text):
                    sent += text
                    for frame in text_frames(text):
                        yield frame
                if limiter.finish_reason is not None:
                    break
                event = await handle.next_event(patience=keepalive_s)
        except CcwrapError as exc:
            if not started:
                raise
            body, _status = error_response(exc)
            yield sse("error", body)
            return
        stop_reason, stop_sequence = "end_turn", None
        if isinstance(event, protocol.TurnResult):
            result = event
            if request.core.structured is not None and not result.tool_calls:
                for frame in text_frames(result.text):  # validated JSON: sent whole, never cut
                    yield frame
            elif text := limiter.flush():
                sent += text
                for frame in text_frames(text):
                    yield frame
            usage = result.usage
            if result.tool_calls:
                stop_reason = "tool_use"
            elif limiter.finish_reason is not None:
                stop_reason, stop_sequence = stop_of(limiter)
        else:
            # Cut by a stop sequence or max_tokens: end the turn now; estimate what was sent.
            handle.finish_early()
            usage = dataclasses.replace(prompt_usage, output_tokens=estimate_tokens(sent))
            stop_reason, stop_sequence = stop_of(limiter)
        if index >= 0:
            yield close_block()
        yield sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            # The whole usage, as the API sends it now: message_start may have gone out before
            # the turn's input usage was known (a ping first).
            "usage": usage_object(usage)})
        yield sse("message_stop", {"type": "message_stop"})


def error_body(message: str, *, type: str) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": type, "message": message}}


# Error class -> (HTTP status, Anthropic error type). Checked in order: subclasses first. The
# statuses are the Anthropic API's own: 529 is "overloaded" (no session can take the request).
ERRORS: tuple[tuple[type[CcwrapError], int, str], ...] = (
    (InvalidRequest, 400, "invalid_request_error"),
    (ModelNotFound, 404, "not_found_error"),
    (ContextLengthExceeded, 400, "invalid_request_error"),
    (QueueFull, 429, "rate_limit_error"),
    (UsageLimitReached, 429, "rate_limit_error"),
    (KeyQuotaExceeded, 429, "rate_limit_error"),
    (SessionUnavailable, 529, "overloaded_error"),
    (QueryTimeout, 504, "timeout_error"),
    (EmptyResponse, 500, "api_error"),
    (InvalidStructuredOutput, 500, "api_error"),
    (InvalidToolCall, 500, "api_error"),
    (InternalError, 500, "api_error"),
    (UpstreamRateLimited, 429, "rate_limit_error"),
    (UpstreamOverloaded, 529, "overloaded_error"),
    (UpstreamAuthFailed, 500, "api_error"),
    (CliError, 500, "api_error"),
    (SessionCrashed, 500, "api_error"),
)
# Statuses that come from the HTTP layer, not from an error class.
HTTP_ERRORS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error"}


def error_response(error: CcwrapError) -> tuple[dict[str, Any], int]:
    """The body and status for ``error``."""
    for cls, status, kind in ERRORS:
        if isinstance(error, cls):
            return error_body(str(error), type=kind), status
    raise error


def owns(path: str) -> bool:
    """Whether ``path`` is answered in this dialect (errors included, unknown sub-paths too)."""
    return path in PATHS or path.startswith("/v1/messages/")
