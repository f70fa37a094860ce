"""OpenAI chat-completions translation: request validation, prompt rendering, response shapes.

Pure functions, no I/O. The CLI session keeps one fixed system prompt and takes one user turn per
request, so an OpenAI conversation (system/developer/user/assistant messages) is rendered into a
single, clearly delimited user turn.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .protocol import Usage

ROLES = ("system", "developer", "user", "assistant")
# The CLI's model aliases (PROTOCOL.md); listed by /v1/models beside the configured model.
CLI_MODEL_ALIASES = ("haiku", "sonnet", "opus")


@dataclass(frozen=True)
class ChatRequest:
    """What ccwrap-trio needs of a validated chat-completions request."""

    model: str
    prompt: str


def parse_chat_request(body: bytes | str, *, default_model: str) -> ChatRequest:
    """Validate a chat-completions body; raise InvalidRequest naming the offending param."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")

    model = data.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    if data.get("stream") not in (None, False):
        raise InvalidRequest(
            "Streaming ('stream': true) is not supported yet.", param="stream", code="unsupported"
        )
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array of message objects.", param="messages")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    turns = [_message(index, message) for index, message in enumerate(messages)]
    if not any(text.strip() for _, text in turns):
        raise InvalidRequest("Every message in 'messages' is empty.", param="messages")
    return ChatRequest(model=model, prompt=render_prompt(turns))


def _message(index: int, message: Any) -> tuple[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{param}' must be an object.", param=param)
    role = message.get("role")
    if role in ("tool", "function"):
        raise InvalidRequest(
            f"'{param}.role' {role!r} needs function calling, which is not supported.",
            param=f"{param}.role",
            code="unsupported",
        )
    if role not in ROLES:
        raise InvalidRequest(
            f"'{param}.role' must be one of {', '.join(ROLES)}; got {role!r}.",
            param=f"{param}.role",
        )
    return role, _content(param, message.get("content"), role)


def _content(param: str, content: Any, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise InvalidRequest(
            f"'{param}.content' must be a string or an array of content parts.",
            param=f"{param}.content",
        )
    texts = []
    for index, part in enumerate(content):
        part_param = f"{param}.content[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(
                f"'{part_param}' must be an object with a 'type'.", param=part_param
            )
        if part["type"] != "text":
            raise InvalidRequest(
                f"'{part_param}.type' {part['type']!r} is not supported; only 'text' parts are.",
                param=f"{part_param}.type",
                code="unsupported",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(
                f"'{part_param}.text' must be a string.", param=f"{part_param}.text"
            )
        texts.append(text)
    return "\n".join(texts)


def render_prompt(turns: list[tuple[str, str]]) -> str:
    """One user turn for the CLI from an OpenAI conversation.

    A lone user message goes as it is, so the model sees exactly what the client wrote. Anything
    more is delimited by role. Text that starts with "/" is never sent bare: the CLI would take it
    for a slash command (``/clear``...).
    """
    if len(turns) == 1 and turns[0][0] == "user" and not turns[0][1].lstrip().startswith("/"):
        return turns[0][1]
    parts = [
        "The request is the conversation below, one block per message, oldest first. "
        "Follow the <system> instructions and write the next assistant message: reply with its "
        "text only, without any tags."
    ]
    for role, text in turns:
        tag = "system" if role in ("system", "developer") else role
        parts.append(f"<{tag}>\n{text}\n</{tag}>")
    return "\n\n".join(parts)


def completion_response(
    *, model: str, text: str, usage: Usage, finish_reason: str = "stop"
) -> dict[str, Any]:
    """A ``chat.completion`` object as OpenAI returns it, with the CLI's real token counts."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_object(usage),
        "system_fingerprint": None,
    }


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def models_response(configured_model: str) -> dict[str, Any]:
    names = dict.fromkeys((configured_model, *CLI_MODEL_ALIASES))
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "anthropic"}
            for name in names
        ],
    }


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
