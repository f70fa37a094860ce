"""The CLI's stream-json lines, in and out: pure functions, no I/O.

Built against PROTOCOL.md and the captures of Claude Code 2.1.332. Output lines this module does not
know are reported as ``Other`` and skipped by the session: new CLI versions add line types freely.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .core import ToolCall, ToolCallDelta, ToolCallStart
from .expansions import neutralize


@dataclass(frozen=True)
class Usage:
    """Token counts of one turn, as the CLI's ``result`` line reports them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """What OpenAI calls prompt tokens: every input token, cached or not."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    @property
    def context_tokens(self) -> int:
        """The conversation's size after this turn: everything sent plus the answer."""
        return self.prompt_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    @classmethod
    def from_json(cls, data: Any) -> Usage:
        if not isinstance(data, dict):
            return cls()
        return cls(**{name: _count(data.get(name)) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TurnResult:
    """The end of one turn: the CLI's ``result`` line."""

    text: str
    is_error: bool
    subtype: str
    usage: Usage
    terminal_reason: str | None = None
    api_error_status: int | None = None
    local_command: str | None = None
    duration_ms: int = 0
    stop_reason: str | None = None
    # Filled by the session from the turn's stream: the calls the model made, the model used,
    # and the text streamed before them (a turn stopped for tools has no "result" text).
    tool_calls: tuple[ToolCall, ...] = ()
    model: str = ""
    # Why the API refused the turn, as the CLI names it ("usage_limit_reached"), and, filled by
    # the session, the turn's rate-limit reports and the CLI's last retry delay (from the API's
    # retry-after, or its own backoff).
    api_error: str | None = None
    rate_limits: tuple[RateLimit, ...] = ()
    retry_delay_ms: int | None = None

    @property
    def interrupted(self) -> bool:
        return self.terminal_reason == "aborted_streaming"


@dataclass(frozen=True)
class RateLimitWindow:
    """One subscription window (``five_hour``, ``seven_day``...) in a ``rate_limit_event``."""

    name: str
    status: str  # allowed, allowed_warning, rejected
    utilization: float | None = None  # 0..1
    resets_at: int | None = None  # epoch seconds


@dataclass(frozen=True)
class RateLimit:
    """``rate_limit_event``: the subscription's usage as the API's unified headers reported it.

    ``status`` is the request's (``allowed``, ``allowed_warning``, ``rejected``), ``window`` the
    window that decided it; ``windows`` every window the event described.
    """

    status: str
    window: str
    resets_at: int | None
    utilization: float | None
    windows: tuple[RateLimitWindow, ...] = ()


@dataclass(frozen=True)
class ApiRetry:
    """``system/api_retry``: the CLI retries a failed API call after ``retry_delay_ms``."""

    attempt: int
    retry_delay_ms: int
    error_status: int | None


@dataclass(frozen=True)
class Init:
    """``system/init``, sent at the start of every turn: what the session really is."""

    session_id: str
    model: str
    cli_version: str
    tools: tuple[str, ...]
    mcp_servers: tuple[str, ...]


@dataclass(frozen=True)
class TextDelta:
    """A piece of answer text from a partial-message stream event."""

    text: str


@dataclass(frozen=True)
class MessageStart:
    """The API's ``message_start`` event: the prompt's token counts, before any text."""

    usage: Usage
    model: str = ""  # the model that answers this API call


@dataclass(frozen=True)
class ToolUseStart:
    """A ``tool_use`` content block begins (``content_block_start``): the CLI's tool name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolInputDelta:
    """A piece of a tool call's input JSON (``input_json_delta``), as the API streams it."""

    index: int
    partial_json: str


@dataclass(frozen=True)
class MessageDelta:
    """The API's ``message_delta`` event: the message's stop reason is known."""

    stop_reason: str | None


@dataclass(frozen=True)
class MessageStop:
    """The API's ``message_stop`` event: the API call's stream is complete."""


@dataclass(frozen=True)
class ControlRequest:
    """A ``control_request`` from the CLI (``mcp_message``, ``can_use_tool``...)."""

    request_id: str
    subtype: str
    request: dict[str, Any]


@dataclass(frozen=True)
class ControlResponse:
    """The CLI's answer to one of our control requests."""

    request_id: str
    subtype: str
    response: dict[str, Any]


@dataclass(frozen=True)
class Other:
    """Any line this module has no use for (status, retries, replays, unknown types)."""

    type: str


@dataclass(frozen=True)
class NotJson:
    """A line that is not a JSON object: logged and skipped, never fatal by itself."""

    raw: str


Event = (
    TurnResult | Init | TextDelta | MessageStart | ToolUseStart | ToolInputDelta | MessageDelta
    | MessageStop | ControlRequest | ControlResponse | RateLimit | ApiRetry | Other | NotJson
)
# What a turn reports while it runs, for streaming (tool calls in the client's names).
Progress = TextDelta | MessageStart | ToolCallStart | ToolCallDelta


def parse_line(raw: bytes | str) -> Event:
    """Classify one line of the CLI's stdout."""
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return NotJson(text.rstrip("\r\n"))
    if not isinstance(message, dict):
        return NotJson(str(raw)[:200])
    kind = message.get("type")
    if kind == "result":
        return _result(message)
    if kind == "stream_event":
        event = message.get("event")
        if isinstance(event, dict) and event.get("type") == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                return TextDelta(str(delta.get("text", "")))
            if isinstance(delta, dict) and delta.get("type") == "input_json_delta":
                return ToolInputDelta(_count(event.get("index")),
                                      str(delta.get("partial_json", "")))
        if isinstance(event, dict) and event.get("type") == "content_block_start":
            block = event.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                return ToolUseStart(_count(event.get("index")), str(block.get("id", "")),
                                    str(block.get("name", "")))
        if isinstance(event, dict) and event.get("type") == "message_delta":
            delta = event.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            return MessageDelta(reason if isinstance(reason, str) else None)
        if isinstance(event, dict) and event.get("type") == "message_stop":
            return MessageStop()
        if isinstance(event, dict) and event.get("type") == "message_start":
            started = event.get("message")
            started = started if isinstance(started, dict) else {}
            return MessageStart(Usage.from_json(started.get("usage")),
                                str(started.get("model") or ""))
        return Other("stream_event")
    if kind == "control_request":
        request = message.get("request")
        request = request if isinstance(request, dict) else {}
        return ControlRequest(str(message.get("request_id", "")),
                              str(request.get("subtype", "")), request)
    if kind == "control_response":
        response = message.get("response")
        response = response if isinstance(response, dict) else {}
        inner = response.get("response")
        return ControlResponse(str(response.get("request_id", "")),
                               str(response.get("subtype", "")),
                               inner if isinstance(inner, dict) else {})
    if kind == "rate_limit_event":
        return _rate_limit(message.get("rate_limit_info"))
    if kind == "system" and message.get("subtype") == "api_retry":
        status = message.get("error_status")
        return ApiRetry(_count(message.get("attempt")), _count(message.get("retry_delay_ms")),
                        status if isinstance(status, int) else None)
    if kind == "system" and message.get("subtype") == "init":
        return Init(
            session_id=str(message.get("session_id", "")),
            model=str(message.get("model", "")),
            cli_version=str(message.get("claude_code_version", "")),
            tools=tuple(_names(message.get("tools"))),
            mcp_servers=tuple(_names(message.get("mcp_servers"))),
        )
    return Other(str(kind))


def user_line(content: str | list[dict[str, Any]]) -> bytes:
    """One user turn: ``content`` is a string or Messages API content blocks.

    Every text is neutralized here, the one door all turns pass, so that nothing a client (or
    a model's answer quoted in a repair turn) writes can run a command or read a file.
    """
    return _user_message(_neutral(content))


def _neutral(content: Any) -> Any:
    """Every text in ``content`` neutralized: a string, text blocks, and blocks nested in them."""
    if isinstance(content, str):
        return neutralize(content)
    if isinstance(content, list):
        return [_neutral(block) for block in content]
    if isinstance(content, dict):
        if content.get("type") == "text" and isinstance(content.get("text"), str):
            return content | {"text": neutralize(content["text"])}
        if "content" in content:  # tool_result blocks carry text of their own
            return content | {"content": _neutral(content["content"])}
    return content


def _user_message(content: str | list[dict[str, Any]]) -> bytes:
    return _line({"type": "user", "message": {"role": "user", "content": content}})


def interrupt_line(request_id: str) -> bytes:
    """The control request that aborts the running turn; the process stays usable."""
    return _line(
        {"type": "control_request", "request_id": request_id, "request": {"subtype": "interrupt"}}
    )


def control_request_line(request_id: str, request: dict[str, Any]) -> bytes:
    """A control request of ours (``set_model``, an ``mcp_message``...)."""
    return _line({"type": "control_request", "request_id": request_id, "request": request})


def control_response_line(request_id: str, response: dict[str, Any]) -> bytes:
    """Our answer to one of the CLI's control requests."""
    return _line({"type": "control_response",
                  "response": {"subtype": "success", "request_id": request_id,
                               "response": response}})


def control_error_line(request_id: str, message: str) -> bytes:
    """A refusal of one of the CLI's control requests."""
    return _line({"type": "control_response",
                  "response": {"subtype": "error", "request_id": request_id, "error": message}})


def _result(message: dict[str, Any]) -> TurnResult:
    status = message.get("api_error_status")
    local = message.get("local_command")
    api_error = message.get("api_error")
    text = message.get("result")
    if not isinstance(text, str):
        # An interrupted turn has no "result"; its "errors" say what happened.
        errors = message.get("errors")
        text = "; ".join(map(str, errors)) if isinstance(errors, list) and message.get(
            "is_error"
        ) else ""
    return TurnResult(
        text=text,
        is_error=bool(message.get("is_error")),
        subtype=str(message.get("subtype", "")),
        usage=Usage.from_json(message.get("usage")),
        terminal_reason=message.get("terminal_reason") if isinstance(
            message.get("terminal_reason"), str
        ) else None,
        api_error_status=status if isinstance(status, int) else None,
        local_command=local if isinstance(local, str) else None,
        duration_ms=_count(message.get("duration_ms")),
        stop_reason=message.get("stop_reason") if isinstance(
            message.get("stop_reason"), str
        ) else None,
        api_error=api_error if isinstance(api_error, str) else None,
    )


def _rate_limit(info: Any) -> RateLimit:
    info = info if isinstance(info, dict) else {}
    windows = info.get("unifiedWindows")
    parsed = tuple(
        RateLimitWindow(str(name), _status(data.get("status"), info), _fraction(
            data.get("utilization")), _epoch(data.get("resetsAt")))
        for name, data in (windows.items() if isinstance(windows, dict) else ())
        if isinstance(data, dict)
    )
    window = str(info.get("rateLimitType") or (parsed[0].name if parsed else "unknown"))
    return RateLimit(
        status=_status(info.get("status"), {}),
        window=window,
        resets_at=_epoch(info.get("resetsAt")),
        utilization=_fraction(info.get("utilization")),
        windows=parsed,
    )


def _status(value: Any, info: dict[str, Any]) -> str:
    # A window without its own status shares the request's.
    if value in ("allowed", "allowed_warning", "rejected"):
        return str(value)
    fallback = info.get("status")
    return str(fallback) if fallback in ("allowed", "allowed_warning", "rejected") else "allowed"


def _fraction(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf:
        return float(value)
    return None


def _epoch(value: Any) -> int | None:
    # JSON numbers can be huge (1e400 parses as inf): only a real time is one.
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**40:
        return int(value)
    return None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _names(items: Any) -> list[str]:
    if not isinstance(items, list):
        return []
    return [str(item.get("name", item)) if isinstance(item, dict) else str(item) for item in items]


def _line(message: dict[str, Any]) -> bytes:
    # ensure_ascii keeps every line pure ASCII: no byte of a prompt can end the line early.
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


# Resets the conversation in-process with no API call; answered by a result with num_turns 0.
CLEAR_LINE = _user_message("/clear")  # the one slash command ccwrap-trio sends itself
