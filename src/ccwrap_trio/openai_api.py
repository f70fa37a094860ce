"""OpenAI chat-completions translation: request validation, prompt rendering, response shapes.

Pure functions, no I/O. The CLI session keeps one fixed system prompt and takes one user turn per
request, so an OpenAI conversation (system/developer/user/assistant messages) is rendered into a
single, clearly delimited user turn.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import openai_tools, tool_policy
from .core import CoreRequest, ToolCall
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
from .protocol import Usage
from .structured import QUOTE_CHARS, StructuredOutput

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# The CLI's model aliases (PROTOCOL.md); listed by /v1/models beside the configured model.
CLI_MODEL_ALIASES = ("haiku", "sonnet", "opus")
# What the pinned CLI (2.1.332) sends for its aliases: listed when a CCWRAP_MODELS pattern allows.
KNOWN_MODEL_IDS = ("claude-haiku-5-5", "claude-sonnet-5-5", "claude-opus-5-5")
# The CLI has no per-turn output cap: max_tokens is enforced on the answer at this many characters
# per token (the usual estimate for English text).
CHARS_PER_TOKEN = 4
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_DATA_URL = re.compile(
    r"^data:(?P<type>[\w/+.-]+)(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.S
)

# Fields that need a feature ccwrap-trio does not have: rejected, never silently ignored.
UNSUPPORTED = {
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}
# Accepted for compatibility; the CLI has no such knob, so they have no effect.
NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")

Content = str | list[dict[str, Any]]
# Echoed in every chunk of a stream: bounded so a request cannot amplify itself.
MAX_MODEL_CHARS = 256


@dataclass(frozen=True)
class ChatRequest:
    """What ccwrap-trio needs of a validated chat-completions request."""

    model: str
    content: Content  # the one user turn for the CLI: text, or text and image blocks
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None
    structured: StructuredOutput | None = None
    tools: openai_tools.ToolsSpec = field(default_factory=openai_tools.ToolsSpec)

    @property
    def core(self) -> CoreRequest:
        """The request as the core sees it (no OpenAI field names)."""
        return CoreRequest(
            content=self.content, model=self.model, tools=self.tools.tools,
            tool_choice=self.tools.choice, parallel_tool_calls=self.tools.parallel,
            structured=self.structured, stream=self.stream,
        )

    @property
    def max_chars(self) -> int | None:
        return None if self.max_tokens is None else self.max_tokens * CHARS_PER_TOKEN


def json_body_and_model(body: bytes | str, default_model: str) -> tuple[dict[str, Any], str]:
    """An OpenAI request body as a JSON object, and its ``model`` (the default when absent).

    Shared by Chat Completions and Responses; raises InvalidRequest naming the field.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting: recursion
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    model = data.get("model") if data.get("model") is not None else default_model
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    if len(model) > MAX_MODEL_CHARS:
        # Every response and every SSE chunk echoes it: a long name multiplies the output.
        raise InvalidRequest(
            f"'model' is longer than {MAX_MODEL_CHARS} characters.", param="model"
        )
    return data, model


def parse_chat_request(body: bytes | str, *, default_model: str) -> ChatRequest:
    """Validate a chat-completions body; raise InvalidRequest naming the offending param."""
    data, model = json_body_and_model(body, default_model)
    for name, why in UNSUPPORTED.items():
        if data.get(name) not in (None, [], {}):
            raise InvalidRequest(f"'{name}': {why}.", param=name, code="unsupported")
    _check_accepted_fields(data)
    tools = openai_tools.parse_tools(data)
    stream = boolean_field(data, "stream")
    stream_options = data.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    include_usage = bool(stream_options and stream_options.get("include_usage"))
    structured = StructuredOutput.from_response_format(data.get("response_format"))

    messages = data.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array of message objects.", param="messages")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    call_ids: set[str] = set()
    turns = [_message(index, message, call_ids) for index, message in enumerate(messages)]
    if not any(isinstance(part, dict) or part.strip() for _, parts in turns for part in parts):
        raise InvalidRequest("Every message in 'messages' is empty.", param="messages")
    content = render_prompt(turns)
    if structured is not None:
        content = append_text(content, structured.instruction())
    core = CoreRequest(content, model, tools.tools, tools.choice, tools.parallel)
    if (wanted := tool_policy.instruction(core)) is not None:
        content = append_text(content, wanted)
    return ChatRequest(
        model=model,
        content=content,
        stream=stream,
        include_usage=include_usage,
        stop=_stop(data.get("stop")),
        max_tokens=_max_tokens(data),
        structured=structured,
        tools=tools,
    )


def _check_accepted_fields(data: dict[str, Any]) -> None:
    if integer_field(data, "n") not in (None, 1):
        raise InvalidRequest("'n' must be 1: only one choice per request is supported.",
                             param="n", code="unsupported")
    if boolean_field(data, "logprobs") or data.get("top_logprobs") is not None:
        param = "logprobs" if data.get("logprobs") else "top_logprobs"
        raise InvalidRequest(f"'{param}' is not supported: the CLI reports no log probabilities.",
                             param=param, code="unsupported")
    for name in NUMBER_FIELDS:
        value = data.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise InvalidRequest(f"'{name}' must be a number.", param=name)
    integer_field(data, "seed")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string.", param="user")


def integer_field(data: dict[str, Any], name: str) -> int | None:
    """An integer field; 5.0 counts as 5, as in JSON Schema."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be an integer.", param=name)
    return value


def boolean_field(data: dict[str, Any], name: str) -> bool:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean.", param=name)
    return bool(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > 4
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise InvalidRequest(
            "'stop' must be a non-empty string or an array of up to 4 non-empty strings.",
            param="stop",
        )
    return tuple(stops)


def _max_tokens(data: dict[str, Any]) -> int | None:
    limit = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = integer_field(data, name)
        if value is None:
            continue
        if value < 1:
            raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
        limit = value if limit is None else min(limit, value)
    return limit


Part = str | dict[str, Any]  # text, or a Messages API image block


def _message(index: int, message: Any, call_ids: set[str]) -> tuple[str, list[Part]]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{param}' must be an object.", param=param)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"'{param}.role' must be one of {', '.join(ROLES)}; got {_quote(role)}.",
            param=f"{param}.role",
        )
    if role in ("tool", "function"):
        # A result the client's own tool produced: rendered as text, tagged with its call.
        tag = openai_tools.result_tag(param, message, role, call_ids)
        parts = _content(param, message.get("content"), "tool")
        return tag, parts
    parts = _content(param, message.get("content"), role)
    if role == "assistant":
        calls, ids = openai_tools.assistant_calls(param, message)
        call_ids.update(ids)
        parts += calls
    return role, parts


def _content(param: str, content: Any, role: str) -> list[Part]:
    if isinstance(content, str):
        return [content]
    if content is None and role in ("assistant", "tool"):
        return []
    if not isinstance(content, list):
        raise InvalidRequest(
            f"'{param}.content' must be a string or an array of content parts.",
            param=f"{param}.content",
        )
    parts: list[Part] = []
    for index, part in enumerate(content):
        part_param = f"{param}.content[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(
                f"'{part_param}' must be an object with a 'type'.", param=part_param
            )
        kind = part["type"]
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(
                    f"'{part_param}.text' must be a string.", param=f"{part_param}.text"
                )
            # Text parts of one message read as lines of one text.
            if parts and isinstance(parts[-1], str):
                parts[-1] += "\n" + text
            else:
                parts.append(text)
        elif kind == "image_url" and role == "user":
            parts.append(image_part(part_param, part.get("image_url")))
        else:
            raise InvalidRequest(
                f"'{part_param}.type' {_quote(kind)} is not supported here; 'text' parts are, and "
                "'image_url' parts with data: URLs in user messages.",
                param=f"{part_param}.type",
                code="unsupported",
            )
    return parts


def _quote(value: Any) -> str:
    """A client value quoted in an error message, cut short: messages never amplify input."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


def image_part(param: str, image_url: Any) -> dict[str, Any]:
    """A data: URL image (``image_url`` or its ``url``) as a Messages API image block."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    param = f"{param}.image_url.url"
    if not isinstance(url, str):
        raise InvalidRequest(f"'{param}' must be a string.", param=param)
    if url.startswith(("http://", "https://")):
        raise InvalidRequest(
            f"'{param}': image URLs are not fetched; send the image inline as a "
            "data:image/...;base64,... URL.",
            param=param,
            code="unsupported",
        )
    match = _DATA_URL.match(url)
    if not match or match["type"] not in IMAGE_MEDIA_TYPES:
        raise InvalidRequest(
            f"'{param}' must be a base64 data: URL of one of {', '.join(IMAGE_MEDIA_TYPES)}.",
            param=param,
        )
    data = re.sub(r"\s+", "", match["data"])
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"'{param}' holds invalid base64 data.", param=param) from None
    return {"type": "image", "source": {"type": "base64", "media_type": match["type"],
                                        "data": data}}


def render_prompt(turns: list[tuple[str, list[Part]]]) -> Content:
    """One user turn for the CLI from an OpenAI conversation.

    A lone user message goes as it is, so the model sees exactly what the client wrote. Anything
    more is delimited by role. Text that starts with "/" is never sent bare: the CLI would take it
    for a slash command (``/clear``...). Images stay where they were, as image blocks.
    """
    if len(turns) == 1 and turns[0][0] == "user":
        parts = turns[0][1]
        # The CLI reads the first text block as a slash command even after an image.
        if not any(isinstance(part, str) and part.lstrip().startswith("/") for part in parts):
            return _blocks(parts)
    parts = [
        "The request is the conversation below, one block per message, oldest first. "
        "Follow the <system> instructions and write the next assistant message: reply with its "
        "text only, without any tags."
    ]
    for role, message_parts in turns:
        tag = "system" if role in ("system", "developer") else role
        # A tool result's tag carries its call: <tool_result id="..."> ... </tool_result>.
        parts += [f"\n\n<{tag}>\n", *message_parts, f"\n</{tag.split(' ', 1)[0]}>"]
    return _blocks(parts)


def _blocks(parts: list[Part]) -> Content:
    """Plain text when there are no images; else text and image blocks, adjacent text merged."""
    if all(isinstance(part, str) for part in parts):
        return "".join(p for p in parts if isinstance(p, str))
    blocks: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, dict):
            blocks.append(part)
        elif blocks and blocks[-1]["type"] == "text":
            blocks[-1]["text"] += part
        elif part:
            blocks.append({"type": "text", "text": part})
    return blocks  # every text is neutralized on its way into the turn (protocol.user_line)


def append_text(content: Content, text: str) -> Content:
    """``content`` with ``text`` added at the end, as its own paragraph."""
    if isinstance(content, str):
        return f"{content}\n\n{text}"
    return [*content, {"type": "text", "text": f"\n\n{text}"}]


@dataclass
class AnswerLimiter:
    """Applies ``stop`` and ``max_tokens`` to an answer that arrives in pieces.

    Text that could be the start of a stop sequence is held back until it is known not to be one,
    so a streamed stop sequence never reaches the client even when split across deltas.
    """

    stop: tuple[str, ...] = ()
    max_chars: int | None = None
    finish_reason: str | None = None  # set when the answer was cut: "stop" or "length"
    stop_sequence: str | None = None  # the stop sequence that cut it
    _held: str = ""
    _sent: int = field(default=0)

    def feed(self, text: str) -> str:
        """The part of ``text`` that may be sent now ("" once the answer was cut)."""
        if self.finish_reason is not None:
            return ""
        pending = self._held + text
        cut = min((i for i in (pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stop_sequence = next(s for s in self.stop if pending.find(s) == cut)
            return self._budget(pending[:cut], reason="stop")
        hold = max((_overlap(pending, s) for s in self.stop), default=0)
        self._held = pending[len(pending) - hold :] if hold else ""
        return self._budget(pending[: len(pending) - hold])

    def flush(self) -> str:
        """At the end of the answer: what was held back was not a stop sequence after all."""
        held, self._held = self._held, ""
        return self._budget(held) if self.finish_reason is None else ""

    def _budget(self, text: str, reason: str | None = None) -> str:
        if self.max_chars is not None and self._sent + len(text) > self.max_chars:
            text = text[: self.max_chars - self._sent]
            reason = "length"
        self._sent += len(text)
        if reason is not None:
            self.finish_reason = reason
        return text


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def limit_answer(text: str, chat: ChatRequest) -> tuple[str, str]:
    """A whole answer with ``stop`` and ``max_tokens`` applied: ``(text, finish_reason)``."""
    if chat.structured is not None:
        return text, "stop"  # validated JSON is never cut
    limiter = AnswerLimiter(chat.stop, chat.max_chars)
    text = limiter.feed(text) + limiter.flush()
    return text, limiter.finish_reason or "stop"


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def completion_response(
    *, model: str, text: str, usage: Usage, finish_reason: str = "stop",
    tool_calls: tuple[ToolCall, ...] = (), legacy_functions: bool = False,
) -> dict[str, Any]:
    """A ``chat.completion`` object as OpenAI returns it, with the CLI's real token counts.

    With ``tool_calls``: ``content`` is the text before the calls (or null), and
    ``finish_reason`` is ``tool_calls`` (``function_call`` for the legacy ``functions``).
    """
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["content"] = text or None
        if legacy_functions:
            message["function_call"] = openai_tools.function_call_object(tool_calls[0])
            finish_reason = "function_call"
        else:
            message["tool_calls"] = openai_tools.tool_calls_object(tool_calls)
            finish_reason = "tool_calls"
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_object(usage),
        "system_fingerprint": None,
    }


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a stream."""
    return _chunk(completion_id, created, model) | {
        "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ],
    }


def usage_chunk(completion_id: str, created: int, model: str, usage: Usage) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return _chunk(completion_id, created, model) | {"choices": [], "usage": usage_object(usage)}


def _chunk(completion_id: str, created: int, model: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event frame."""
    # ASCII with escapes: a lone surrogate in a model name or an answer cannot break the frame.
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
SSE_KEEPALIVE = b": keep-alive\n\n"


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def allowed_models(configured_model: str, allowed: tuple[str, ...]) -> list[str]:
    """Every model name requests may use that can be listed: patterns list the known ids."""
    names = [configured_model, *(name for name in allowed if not name.endswith("*"))]
    names += [
        known for known in KNOWN_MODEL_IDS
        if any(name.endswith("*") and known.startswith(name[:-1]) for name in allowed)
    ]
    return list(dict.fromkeys(names))


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "anthropic"}


def models_response(configured_model: str, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
    """``/v1/models``: exactly the models requests may name (``CCWRAP_MODELS``)."""
    return {
        "object": "list",
        "data": [model_object(name) for name in allowed_models(configured_model, allowed)],
    }


def model_not_found(model: str) -> ModelNotFound:
    return ModelNotFound(
        f"The model {model!r} does not exist or is not served here (CCWRAP_MODELS).",
        param="model",
    )


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Error class -> (HTTP status, OpenAI error type, code). Checked in order: subclasses first.
ERRORS: tuple[tuple[type[CcwrapError], int, str, str | None], ...] = (
    (InvalidRequest, 400, "invalid_request_error", None),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (ContextLengthExceeded, 400, "invalid_request_error", "context_length_exceeded"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (UsageLimitReached, 429, "rate_limit_error", "usage_limit_reached"),
    (KeyQuotaExceeded, 429, "rate_limit_error", "key_quota_exceeded"),
    (SessionUnavailable, 503, "service_unavailable", "session_unavailable"),
    (QueryTimeout, 504, "timeout", "query_timeout"),
    (EmptyResponse, 502, "api_error", "empty_response"),
    (InvalidStructuredOutput, 502, "api_error", "invalid_structured_output"),
    (InvalidToolCall, 502, "api_error", "invalid_tool_call"),
    (InternalError, 500, "server_error", None),
    (UpstreamRateLimited, 429, "rate_limit_error", "rate_limit_exceeded"),
    (UpstreamOverloaded, 503, "service_unavailable", "upstream_overloaded"),
    (UpstreamAuthFailed, 502, "api_error", "upstream_auth_failed"),
    (CliError, 502, "api_error", "cli_error"),
    (SessionCrashed, 502, "api_error", "cli_crashed"),
)
# Seconds a client is told to wait before retrying a 429 or 503, unless the error says
# (``CcwrapError.retry_after_s``: the queue's estimate, a usage window's reset, the API's own).
RETRY_AFTER_S = {429: 1, 503: 5}


def retry_after_headers(error: CcwrapError, status: int) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up) and, finer, ``retry-after-ms`` (the SDK's)."""
    if error.retry_after_s is not None:
        wait_s = max(0.0, error.retry_after_s)
        return {"Retry-After": str(max(1, math.ceil(wait_s))),
                "retry-after-ms": str(max(1000, round(wait_s * 1000)))}
    return {"Retry-After": str(RETRY_AFTER_S[status])} if status in RETRY_AFTER_S else {}


def error_response(error: CcwrapError) -> tuple[dict[str, Any], int, dict[str, str]]:
    for cls, status, kind, code in ERRORS:
        if isinstance(error, cls):
            param = error.param if isinstance(error, InvalidRequest | ModelNotFound) else None
            if isinstance(error, InvalidRequest) and error.code is not None:
                code = error.code
            headers = retry_after_headers(error, status)
            body = error_body(str(error), type=kind, param=param, code=code)
            return body, status, headers
    raise error
