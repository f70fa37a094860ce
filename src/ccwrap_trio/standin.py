"""An offline stand-in for the Anthropic Messages API that the real Claude Code CLI can talk to.

Point the CLI at it with ``ANTHROPIC_BASE_URL=http://127.0.0.1:PORT`` (and any
``ANTHROPIC_API_KEY``): every ``POST /v1/messages`` gets a deterministic answer tied to the
prompt, streamed as the real API's server-sent events, so end-to-end tests can run without a
Claude login or a network, and can check that each request got its own answer.

The answer to a request is ``echo: <last user text>`` (whitespace collapsed, at most 200
characters of it), unless the last user text holds a fenced JSON Schema (```` ```json-schema ````
... ```` ``` ````), in which case it is a JSON instance that validates against that schema.
Directives in the last user text pick a fault or a reply per request; they are removed from the
echo (see ``DIRECTIVE_HELP``).

It is a small h11 server on Trio rather than an ASGI app because faults such as "drop the
connection after ``message_start``" or "never answer" need control of the socket itself.

Run it standalone with ``python -m ccwrap_trio.standin --port 8765``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import importlib
import json
import logging
import math
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeGuard

import h11
import trio

logger = logging.getLogger(__name__)

DIRECTIVE_HELP = """\
Directives, written anywhere in the last user text block of a request:
  [standin:latency=SECONDS]  sleep before answering (overrides the process-wide latency)
  [standin:delay=SECONDS]    sleep between text deltas
  [standin:status=CODE]      answer HTTP CODE with an Anthropic error body
                             (400 invalid_request_error, 529 overloaded_error, else api_error...)
  [standin:retry-after=SECONDS] with status=CODE: send a retry-after header, as the API does
  [standin:hang]             read the request, never answer, wait for the client to go away
  [standin:drop]             close the connection right after the message_start event
  [standin:drop-mid-once]    the first call with this text closes the connection after half
                             of its text deltas; the client's retry gets the whole answer
  [standin:malformed-once]   the first call with this text sends a malformed SSE event after
                             half of its text deltas, then closes; the retry gets it all
  [standin:retry-differs]    with a *-once fault: the retry answers a different text
  [standin:tool-use=NAME]    answer with a tool_use block calling tool NAME (input: a command
                             that would create the file "pwned"), as a hostile model would
  [standin:call=NAME[,NAME]] when the request offers the tool NAME (or mcp__<server>__NAME):
                             "Let me check." and one tool_use block per NAME (several: parallel
                             calls), input made to fit the tool's input_schema and streamed as
                             input_json_delta pieces; read from any user text of the
                             conversation; with invalid-first the first turn's input is invalid
  [standin:reply=BASE64]     reply with exactly this text (base64 of UTF-8; empty: empty reply)
  [standin:invalid-first]    with a ```json-schema block: the first request of a conversation
                             (no assistant message yet) gets JSON that does NOT validate
"""

ECHO_PREFIX = "echo:"
TOOL_CALL_TEXT = "Let me check."
ECHO_MAX_CHARS = 200

# What a [standin:tool-use=NAME] answer asks the tool to do: each would leave a file behind.
TOOL_USE_INPUT = {
    "command": "touch pwned",
    "file_path": "pwned",
    "content": "pwned",
    "description": "create a file",
}
_DIRECTIVE_RE = re.compile(r"\[standin:([A-Za-z][A-Za-z0-9_-]*)(?:=([^\]]*))?\]")
_SCHEMA_FENCE_RE = re.compile(r"```json-schema[^\S\r\n]*\r?\n(.*?)```", re.DOTALL)
_WORD_RE = re.compile(r"\s*\S+")

# Error "type" the real API uses for each status; anything else is an api_error.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

# Paths the CLI (or its SDK) may probe besides the messages endpoint: answer 200 ``{}`` so the
# CLI neither crashes nor waits; everything else unknown gets a 404 error body.
_HARMLESS_PREFIXES = ("/api/", "/v1/oauth", "/v1/metrics", "/v1/organizations", "/v1/models")


@dataclass
class StandinConfig:
    """How a ``Standin`` listens and answers.

    ``latency_s`` is the process-wide delay before every answer (a ``[standin:latency=]``
    directive overrides it per request), ``delay_s`` the default pause between text deltas, and
    ``cache_read_input_tokens`` the fixed value reported in every usage block.
    """

    host: str = "127.0.0.1"
    port: int = 0
    latency_s: float = 0.0
    delay_s: float = 0.0
    cache_read_input_tokens: int = 0


# The subscription windows the real API reports (``anthropic-ratelimit-unified-<abbr>-*``).
UNIFIED_WINDOWS = {"five_hour": "5h", "seven_day": "7d"}


@dataclass
class UnifiedLimit:
    """A subscription's usage window, sent as the ``anthropic-ratelimit-unified-*`` headers.

    Set ``Standin.unified`` to one to answer as the API does for a Claude subscription (an OAuth
    login): ``utilization`` 1.0 is a used-up window, answered 429 until ``resets_at`` (epoch
    seconds), after which the window is fresh again (utilization 0); 0.9 and up is a warning.
    """

    window: str = "five_hour"
    utilization: float = 0.0
    resets_at: float = 0.0

    def status(self, now: float) -> str:
        if now >= self.resets_at:
            self.utilization = 0.0  # the window rolled over
        if self.utilization >= 1.0:
            return "rejected"
        return "allowed_warning" if self.utilization >= 0.9 else "allowed"

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        status = self.status(now)
        abbr = UNIFIED_WINDOWS[self.window]
        reset = str(int(self.resets_at)).encode()
        prefix = b"anthropic-ratelimit-unified-"
        return [
            (prefix + b"status", status.encode()),
            (prefix + b"reset", reset),
            (prefix + b"representative-claim", self.window.encode()),
            (prefix + b"overage-status", b"rejected"),
            (prefix + b"overage-disabled-reason", b"org_level_disabled"),
            (prefix + abbr.encode() + b"-utilization", f"{self.utilization:g}".encode()),
            (prefix + abbr.encode() + b"-reset", reset),
            (prefix + abbr.encode() + b"-status", status.encode()),
            *([(prefix + abbr.encode() + b"-surpassed-threshold", b"0.9")]
              if status == "allowed_warning" else []),
        ]


@dataclass
class RecordedCall:
    """One ``/v1/messages`` call: what came in and what went out.

    ``usage`` is the usage the stand-in reported (empty when it answered with an error), ``reply``
    the full text it sent (or would have sent, for ``hang``/``drop``), ``status`` the HTTP status
    and ``fault`` the directive-chosen fault (``"status"``, ``"hang"``, ``"drop"``, ``"drop-mid"``,
    ``"malformed"``) or ``None``.
    """

    path: str
    body: dict[str, Any]
    usage: dict[str, int]
    reply: str
    status: int = 200
    fault: str | None = None
    stream: bool = True


@dataclass
class SeenRequest:
    """Any HTTP request the stand-in received, in arrival order."""

    method: str
    target: str


class DirectiveError(ValueError):
    """A ``[standin:...]`` directive that is unknown or has a bad value."""


@dataclass
class Directives:
    """The controls parsed out of a request's last user text."""

    latency_s: float | None = None
    delay_s: float | None = None
    status: int | None = None
    retry_after_s: float | None = None
    hang: bool = False
    drop: bool = False
    reply: str | None = None
    invalid_first: bool = False
    tool_use: str | None = None
    calls: tuple[str, ...] = ()
    drop_mid_once: bool = False
    malformed_once: bool = False
    retry_differs: bool = False


def parse_directives(text: str) -> tuple[Directives, str]:
    """Return the directives found in ``text`` and the text with them removed.

    Raises ``DirectiveError`` for an unknown directive or a bad value, so a typo in a test shows
    up as a 400 instead of silently doing nothing.
    """
    found = Directives()
    for match in _DIRECTIVE_RE.finditer(text):
        name, value = match.group(1).lower(), match.group(2)
        try:
            if name in ("latency", "delay"):
                seconds = float(_require(name, value))
                if not math.isfinite(seconds) or seconds < 0:
                    raise DirectiveError(f"[standin:{name}] needs seconds >= 0, got {value!r}")
                setattr(found, f"{name}_s", seconds)
            elif name == "status":
                code = int(_require(name, value))
                if not 100 <= code <= 599:
                    raise DirectiveError(f"[standin:status] needs an HTTP status, got {value!r}")
                found.status = code
            elif name == "retry-after":
                seconds = float(_require(name, value))
                if not math.isfinite(seconds) or seconds < 0:
                    raise DirectiveError(f"[standin:retry-after] needs seconds >= 0, got {value!r}")
                found.retry_after_s = seconds
            elif name == "tool-use":
                found.tool_use = _require(name, value).strip()
            elif name == "call":
                found.calls = tuple(n.strip() for n in _require(name, value).split(",")
                                    if n.strip())
            elif name in (
                "hang", "drop", "invalid-first", "drop-mid-once", "malformed-once",
                "retry-differs",
            ):
                setattr(found, name.replace("-", "_"), True)
            elif name == "reply":
                raw = _require(name, value).strip()
                # Accept both alphabets and missing padding: tests build these by hand.
                raw = raw.replace("-", "+").replace("_", "/")
                raw += "=" * (-len(raw) % 4)
                found.reply = base64.b64decode(raw, validate=True).decode("utf-8")
            else:
                raise DirectiveError(f"unknown directive [standin:{name}]")
        except (ValueError, binascii.Error) as exc:  # UnicodeDecodeError is a ValueError
            if isinstance(exc, DirectiveError):
                raise
            raise DirectiveError(f"bad value in {match.group(0)!r}: {exc}") from exc
    return found, _DIRECTIVE_RE.sub(" ", text)


def _has_tool_result(body: dict[str, Any]) -> bool:
    """True once the conversation carries the CLI's answer to a tool_use: ask only once."""
    return any(
        isinstance(block, dict) and block.get("type") == "tool_result"
        for message in _messages(body)
        if isinstance(message.get("content"), list)
        for block in message["content"]
    )


def requested_calls(body: dict[str, Any]) -> tuple[str, ...]:
    """The tool names of the conversation's ``[standin:call=...]`` directives, in order.

    A directive is answered once: one followed by a tool result in the rendered conversation
    (ccwrap-trio renders a client's history into one turn, results as ``<tool_result ...>``) has
    had its call, so an agent's loop gets a text answer next, as from a real model.
    """
    names: list[str] = []
    for message in _messages(body):
        if message.get("role") == "user":
            for text in _block_texts(message.get("content")):
                for match in _DIRECTIVE_RE.finditer(text):
                    if match.group(1).lower() != "call" or not match.group(2):
                        continue
                    if "<tool_result" in text[match.end():]:
                        continue
                    names += [n.strip() for n in match.group(2).split(",") if n.strip()]
    return tuple(names)


def offered_tool(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The request's tool called ``name``, or ``mcp__<server>__name``; None if not offered."""
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and isinstance(tool.get("name"), str) and (
            tool["name"] == name or tool["name"].endswith(f"__{name}")
        ):
            return tool
    return None


def _require(name: str, value: str | None) -> str:
    if value is None:
        raise DirectiveError(f"[standin:{name}=...] needs a value")
    return value


# --------------------------------------------------------------------------------------------
# Reading a request


def _block_texts(content: Any) -> list[str]:
    """The text blocks of one message's content (a string or a list of content blocks)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            block["text"]
            for block in content
            if isinstance(block, dict)
            and block.get("type") == "text"
            and isinstance(block.get("text"), str)
        ]
    return []


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def last_user_text(body: dict[str, Any]) -> str:
    """The last text block of the last user message of a Messages API request body.

    Blocks the CLI adds on its own (``<system-reminder>...``, e.g. the "previous response had no
    visible output" nudge it appends after an empty answer) are skipped: the turn's own text is
    what decides the answer. Earlier blocks of the same message are not looked at, because after
    a failed turn the CLI appends the next turn's text to the failed turn's message.
    """
    for message in reversed(_messages(body)):
        if message.get("role") != "user":
            continue
        texts = [t for t in _block_texts(message.get("content")) if not _is_cli_note(t)]
        if texts:
            return texts[-1]
    return ""


def _is_cli_note(text: str) -> bool:
    return text.lstrip().startswith("<system-reminder>")


def input_tokens_for(body: dict[str, Any]) -> int:
    """Deterministic stand-in token count: all characters of all message text // 4, at least 1."""
    chars = sum(len(t) for m in _messages(body) for t in _block_texts(m.get("content")))
    return max(1, chars // 4)


def is_first_turn(body: dict[str, Any]) -> bool:
    """True when the request carries no assistant message yet (the first turn of a conversation)."""
    return not any(m.get("role") == "assistant" for m in _messages(body))


def echo_reply(text: str) -> str:
    """``echo: <text>``, whitespace collapsed, the echoed text cut to ``ECHO_MAX_CHARS``."""
    collapsed = " ".join(text.split())[:ECHO_MAX_CHARS].rstrip()
    return f"{ECHO_PREFIX} {collapsed}" if collapsed else ECHO_PREFIX


def split_deltas(reply: str) -> list[str]:
    """Cut a reply on word boundaries into the pieces sent as ``text_delta`` events.

    Each piece is one word with the whitespace before it, so joining the pieces gives the reply
    back exactly; trailing whitespace rides on the last piece.
    """
    pieces = _WORD_RE.findall(reply)
    tail = reply[sum(len(p) for p in pieces) :]
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces = [tail]
    return pieces


# --------------------------------------------------------------------------------------------
# JSON Schema instances


def find_schema(text: str) -> dict[str, Any] | bool | None:
    """The JSON Schema in the first ```` ```json-schema ```` fence of ``text``, if any.

    Raises ``ValueError`` when the fence holds no valid JSON schema.
    """
    match = _SCHEMA_FENCE_RE.search(text)
    if match is None:
        return None
    schema = json.loads(match.group(1))
    if not isinstance(schema, dict | bool):
        raise ValueError("a JSON Schema must be an object or a boolean")
    return schema


_MAX_DEPTH = 32
_OPTIONAL_DEPTH = 4  # below this depth only required properties and minimal arrays: stops recursion

_FORMAT_EXAMPLES = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "hostname": "example.com",
}


def schema_instance(schema: dict[str, Any] | bool) -> Any:
    """A deterministic JSON value that validates against ``schema``.

    Supports ``type`` (one or a list: the first non-null is used), ``enum``, ``const``,
    ``properties``/``required``, ``items``/``prefixItems``/``minItems``/``maxItems``, string length
    and format, numeric bounds, local ``$ref`` (``$defs``/``definitions``), ``allOf`` (merged) and
    ``anyOf``/``oneOf`` (the first branch).
    """
    return _Generator(schema).instance(schema, 0, 0)


def invalid_instance(schema: dict[str, Any] | bool) -> Any:
    """A JSON value that does NOT validate against ``schema`` (``{}`` when fields are required).

    Checked with ``jsonschema`` when it is installed; without it a type mismatch is assumed to be
    enough.
    """
    valid = schema_instance(schema)
    candidates: list[Any] = [{}, [], "not valid", -1, None, False]
    # Put a value of the wrong shape first: an object answer where an object is expected is the
    # realistic mistake ("missing required"), a wrong type is the fallback.
    candidates.sort(key=lambda c: 0 if isinstance(c, dict) else 1)
    try:
        # Imported by name: jsonschema is a test dependency and ships no type stubs.
        jsonschema = importlib.import_module("jsonschema")
    except ImportError:
        for candidate in candidates:
            if type(candidate) is not type(valid):
                return candidate
        return None
    validator = jsonschema.validators.validator_for(schema)(schema)
    for candidate in candidates:
        if not validator.is_valid(candidate):
            return candidate
    # Nothing is invalid (e.g. the empty schema): answer what is valid rather than crash.
    return valid


class _Generator:
    def __init__(self, root: dict[str, Any] | bool) -> None:
        self.root = root

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}  # remote refs are out of scope: accept anything
        node: Any = self.root
        for part in ref[1:].lstrip("/").split("/") if ref[1:] else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def flatten(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        """Fold ``$ref``, ``allOf`` and the first ``anyOf``/``oneOf`` branch into one schema."""
        merged = dict(schema)
        if depth > _MAX_DEPTH:
            return merged
        if "$ref" in merged:
            target = self.resolve(merged.pop("$ref"))
            if isinstance(target, dict):
                merged = _merge(self.flatten(target, depth + 1), merged)
        for key in ("allOf", "anyOf", "oneOf"):
            branches = merged.pop(key, None)
            if not isinstance(branches, list) or not branches:
                continue
            chosen = branches if key == "allOf" else branches[:1]
            for branch in chosen:
                if isinstance(branch, dict):
                    merged = _merge(merged, self.flatten(branch, depth + 1))
        return merged

    def instance(self, schema: Any, depth: int, variant: int) -> Any:
        if not isinstance(schema, dict) or depth > _MAX_DEPTH:
            return None
        schema = self.flatten(schema, depth)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][variant % len(schema["enum"])]
        kind = _pick_type(schema)
        if kind == "object":
            return self.object_instance(schema, depth)
        if kind == "array":
            return self.array_instance(schema, depth)
        if kind == "string":
            return _string_instance(schema, variant)
        if kind in ("integer", "number"):
            return _number_instance(schema, kind, variant)
        if kind == "boolean":
            return variant % 2 == 0
        return None

    def object_instance(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = [r for r in schema.get("required", []) if isinstance(r, str)]
        names = list(properties) if depth < _OPTIONAL_DEPTH else []
        names += [r for r in required if r not in names]
        extra = schema.get("additionalProperties", {})
        return {name: self.instance(properties.get(name, extra), depth + 1, 0) for name in names}

    def array_instance(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        items = schema.get("items", {})
        if isinstance(items, list):  # draft 4-2019 tuple form
            prefix, items = items, schema.get("additionalItems", {})
        wanted = 1 if depth < _OPTIONAL_DEPTH else 0
        count = max(int(schema.get("minItems", 0)), len(prefix), wanted)
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        # The variant keeps items distinct, which uniqueItems needs.
        return [
            self.instance(prefix[i] if i < len(prefix) else items, depth + 1, i)
            for i in range(count)
        ]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **extra}
    if isinstance(base.get("properties"), dict) and isinstance(extra.get("properties"), dict):
        merged["properties"] = {**base["properties"], **extra["properties"]}
    if isinstance(base.get("required"), list) and isinstance(extra.get("required"), list):
        merged["required"] = list(dict.fromkeys([*base["required"], *extra["required"]]))
    return merged


def _pick_type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        concrete = [k for k in kind if k != "null"]
        return concrete[0] if concrete else "null"
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _string_instance(schema: dict[str, Any], variant: int) -> str:
    fmt = schema.get("format")
    value = _FORMAT_EXAMPLES.get(fmt, "text") if isinstance(fmt, str) else "text"
    if variant:
        value = f"{value}{variant}"
    min_len, max_len = schema.get("minLength", 0), schema.get("maxLength")
    if len(value) < min_len:
        value += "x" * (min_len - len(value))
    if isinstance(max_len, int) and len(value) > max_len:
        value = value[:max_len]
    return value


def _number_instance(schema: dict[str, Any], kind: str, variant: int) -> int | float:
    lo, lo_open = _bound(schema, "minimum", "exclusiveMinimum", -math.inf, max)
    hi, hi_open = _bound(schema, "maximum", "exclusiveMaximum", math.inf, min)

    def fits(value: float) -> bool:
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        return above and below

    step = schema.get("multipleOf")
    step = step if isinstance(step, int) and not isinstance(step, bool) and step > 0 else 1
    # Integers first (they are numbers too): the variant, then those next to each bound.
    for edge in (variant, lo, hi):
        if not math.isfinite(edge):
            continue
        for candidate in (math.ceil(edge / step) * step, math.floor(edge / step) * step):
            for value in (candidate, candidate + step, candidate - step):
                if fits(value):
                    return int(value)
    if kind == "number" and math.isfinite(lo) and math.isfinite(hi):
        return (lo + hi) / 2  # a range with no integer in it, e.g. 0.1 < x <= 0.2
    return variant  # unsatisfiable as written: answer something rather than fail


def _bound(
    schema: dict[str, Any],
    inclusive: str,
    exclusive: str,
    unbounded: float,
    tighter: Callable[[float, float], float],
) -> tuple[float, bool]:
    """The effective bound and whether it is exclusive (draft 6+ numbers or draft 4 booleans)."""
    value = schema.get(inclusive)
    bound = float(value) if _is_number(value) else unbounded
    open_ = schema.get(exclusive) is True and _is_number(value)  # draft 4 style
    ex = schema.get(exclusive)
    if _is_number(ex) and tighter(float(ex), bound) == float(ex):
        bound, open_ = float(ex), True
    return bound, open_


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Planning an answer


@dataclass
class _Plan:
    """Everything decided about one /v1/messages answer before a byte is sent."""

    call: RecordedCall
    latency_s: float
    delay_s: float
    error_message: str = ""
    retry_after_s: float | None = None  # [standin:retry-after] with a status fault
    message_id: str = ""
    request_id: str = ""
    model: str = "claude-standin"
    deltas: list[str] = field(default_factory=list)
    tool_use: str | None = None  # answer with a tool_use block calling this tool
    # [standin:call]: (tool name as offered, input) per tool_use block, after a short text
    calls: list[tuple[str, Any]] = field(default_factory=list)


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class _ClientGone(Exception):
    """The connection is no longer usable (client left, or we dropped it on purpose)."""


# --------------------------------------------------------------------------------------------
# The server


class Standin:
    """A fake Anthropic Messages API server for offline tests and demos.

    ``calls`` lists every ``/v1/messages`` call in order (appended when the request arrives,
    so a test can see a hung call), ``requests`` every HTTP request of any kind, and ``url`` is
    ``http://HOST:PORT`` once ``serve`` has bound. ``unified``, when set, is the subscription
    window every answer reports (and enforces): see ``UnifiedLimit``.
    """

    def __init__(self, config: StandinConfig | None = None) -> None:
        self.config = config or StandinConfig()
        self.calls: list[RecordedCall] = []
        self.requests: list[SeenRequest] = []
        self.port: int = 0
        self.url: str = ""
        self._seq = 0
        self._changed = trio.Event()
        self._faulted_once: set[str] = set()  # texts whose *-once fault has been played
        self.unified: UnifiedLimit | None = None

    async def serve(
        self, *, task_status: trio.TaskStatus[Standin] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report ``self`` through ``task_status.started``, then serve until cancelled.

        Use as ``standin = await nursery.start(Standin(config).serve)``; port 0 binds a free
        port, reported in ``standin.port`` and ``standin.url``.
        """
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        # One address only, so that with port 0 there is exactly one port to report.
        for extra in listeners[1:]:
            await extra.aclose()
        listener = listeners[0]
        self.port = listener.socket.getsockname()[1]
        host = self.config.host
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        task_status.started(self)
        await trio.serve_listeners(self._handle_connection, [listener])

    async def wait_for_calls(self, count: int) -> list[RecordedCall]:
        """Wait until at least ``count`` ``/v1/messages`` calls have arrived; return them all."""
        while len(self.calls) < count:
            await self._changed.wait()
        return self.calls

    # -- one connection ------------------------------------------------------------------------

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(stream, conn)
                if request is None:
                    return
                await self._respond(stream, conn, request, body)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except h11.RemoteProtocolError as exc:
            logger.debug("standin: bad HTTP from client: %s", exc)
        except Exception:
            # One broken connection must not take the whole server (and the test) down.
            logger.exception("standin: connection handler failed")
        finally:
            await stream.aclose()

    async def _next_event(self, stream: trio.SocketStream, conn: h11.Connection) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            conn.receive_data(await stream.receive_some(65536))

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes]:
        event = await self._next_event(stream, conn)
        if not isinstance(event, h11.Request):
            return None, b""  # ConnectionClosed between requests: a normal keep-alive end
        chunks: list[bytes] = []
        while True:
            part = await self._next_event(stream, conn)
            if isinstance(part, h11.Data):
                chunks.append(bytes(part.data))
            elif isinstance(part, h11.EndOfMessage):
                return event, b"".join(chunks)
            else:
                raise _ClientGone

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, raw: bytes
    ) -> None:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        self.requests.append(SeenRequest(method, target))
        logger.info("standin: %s %s", method, target)

        if method == "POST" and path in ("/v1/messages", "/v1/messages/count_tokens"):
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
            except ValueError as exc:
                await self._send_json(stream, conn, 400, _error_body(400, f"standin: {exc}"))
                return
            if path == "/v1/messages":
                await self._messages(stream, conn, path, body)
            else:
                await self._send_json(stream, conn, 200, {"input_tokens": input_tokens_for(body)})
        elif method == "HEAD":
            await self._send(stream, conn, 200, b"", "application/json")
        elif path == "/" or path.startswith(_HARMLESS_PREFIXES):
            await self._send_json(stream, conn, 200, {})
        else:
            await self._send_json(stream, conn, 404, _error_body(404, f"standin: no route {path}"))

    # -- /v1/messages --------------------------------------------------------------------------

    def _plan(self, path: str, body: dict[str, Any]) -> _Plan:
        self._seq += 1
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        stream = bool(body.get("stream"))
        plan = _Plan(
            call=RecordedCall(path=path, body=body, usage={}, reply="", stream=stream),
            latency_s=self.config.latency_s,
            delay_s=self.config.delay_s,
            message_id=f"msg_fake_{self._seq:04d}{digest[:16]}",
            request_id=f"req_fake_{self._seq:04d}{digest[16:28]}",
        )
        if isinstance(body.get("model"), str):
            plan.model = body["model"]
        call = plan.call
        try:
            directives, text = parse_directives(last_user_text(body))
            schema = find_schema(text)
        except ValueError as exc:  # DirectiveError, or a bad json-schema fence
            call.status, call.fault, plan.error_message = 400, "status", f"standin: {exc}"
            return plan
        if directives.latency_s is not None:
            plan.latency_s = directives.latency_s
        if directives.delay_s is not None:
            plan.delay_s = directives.delay_s
        if directives.status is not None and directives.status != 200:
            call.status, call.fault = directives.status, "status"
            plan.error_message = f"standin: injected HTTP {directives.status}"
            plan.retry_after_s = directives.retry_after_s
            return plan
        if self.unified is not None and self.unified.status(time.time()) == "rejected":
            call.status, call.fault = 429, "usage-limit"
            plan.error_message = "This request would exceed your account's rate limit."
            return plan

        offered = [t for t in map(lambda n: offered_tool(body, n), requested_calls(body)) if t]
        if directives.tool_use is not None and not _has_tool_result(body):
            plan.tool_use = directives.tool_use
            call.reply = json.dumps(TOOL_USE_INPUT)
        elif offered:
            wrong = directives.invalid_first and is_first_turn(body)
            for tool in offered:
                schema = tool.get("input_schema", {"type": "object"})
                plan.calls.append(
                    (tool["name"], invalid_instance(schema) if wrong else schema_instance(schema))
                )
            call.reply = TOOL_CALL_TEXT
        elif directives.reply is not None:
            call.reply = directives.reply
        elif schema is not None:
            wrong = directives.invalid_first and is_first_turn(body)
            call.reply = json.dumps(invalid_instance(schema) if wrong else schema_instance(schema))
        else:
            call.reply = echo_reply(_SCHEMA_FENCE_RE.sub(" ", text))
        plan.deltas = split_deltas(call.reply)
        call.usage = {
            "input_tokens": input_tokens_for(body),
            "output_tokens": len(call.reply.split()),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.config.cache_read_input_tokens,
        }
        call.fault = "hang" if directives.hang else "drop" if directives.drop else None
        if directives.drop_mid_once or directives.malformed_once:
            key = last_user_text(body)  # directives included: each fault plays once
            if key not in self._faulted_once:
                self._faulted_once.add(key)
                call.fault = "drop-mid" if directives.drop_mid_once else "malformed"
            elif directives.retry_differs:
                call.reply = "a different answer on the retry"
                plan.deltas = split_deltas(call.reply)
        return plan

    async def _messages(
        self, stream: trio.SocketStream, conn: h11.Connection, path: str, body: dict[str, Any]
    ) -> None:
        plan = self._plan(path, body)
        call = plan.call
        tools = body.get("tools")
        logger.info("standin: model=%s tools=%s", body.get("model"), [
            t.get("name") for t in (tools if isinstance(tools, list) else []) if isinstance(t, dict)
        ])
        self.calls.append(call)
        self._changed.set()
        self._changed = trio.Event()

        if call.fault == "hang":
            await _wait_until_closed(stream)
            raise _ClientGone
        if plan.latency_s > 0:
            await trio.sleep(plan.latency_s)
        if call.status != 200:
            # As the real API: worth retrying for overload and server errors, not for 4xx.
            retry = b"true" if call.status >= 500 or call.status in (408, 409, 429) else b"false"
            extra = self._unified_headers()
            if plan.retry_after_s is not None:
                extra.append((b"retry-after", f"{plan.retry_after_s:g}".encode()))
            await self._send_json(
                stream,
                conn,
                call.status,
                _error_body(call.status, plan.error_message),
                [(b"request-id", plan.request_id.encode()), (b"x-should-retry", retry), *extra],
            )
            return
        if not call.stream:
            if call.fault == "drop":
                raise _ClientGone
            await self._send_json(
                stream,
                conn,
                200,
                self._full_message(plan),
                [(b"request-id", plan.request_id.encode()), *self._unified_headers()],
            )
            return

        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"request-id", plan.request_id.encode()),
            *self._unified_headers(),
        ]
        await stream.send_all(conn.send(_response(200, headers)))
        deltas_sent = 0
        for chunk in self._events(plan):
            await stream.send_all(conn.send(h11.Data(data=chunk)))
            if call.fault == "drop":
                raise _ClientGone  # after message_start: the connection closes mid-stream
            if chunk.startswith(b"event: content_block_delta"):
                deltas_sent += 1
                if call.fault in ("drop-mid", "malformed") and deltas_sent * 2 >= len(
                    plan.deltas
                ):
                    if call.fault == "malformed":
                        bad = b'event: content_block_delta\ndata: {"type": "content_blo\n\n'
                        await stream.send_all(conn.send(h11.Data(data=bad)))
                    raise _ClientGone  # half the text is out: the connection closes
            if chunk.startswith(b"event: content_block_delta") and plan.delay_s > 0:
                await trio.sleep(plan.delay_s)
        await stream.send_all(conn.send(h11.EndOfMessage()))

    def _unified_headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.unified is None else self.unified.headers(time.time())

    def _start_usage(self, plan: _Plan) -> dict[str, int]:
        # As the real API: message_start carries the input side and a placeholder output count.
        return {**plan.call.usage, "output_tokens": 1}

    def _events(self, plan: _Plan) -> Iterator[bytes]:
        usage = plan.call.usage
        message: dict[str, Any] = {
            "id": plan.message_id,
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._start_usage(plan),
        }
        yield _sse("message_start", {"type": "message_start", "message": message})
        if plan.tool_use is not None:
            yield from self._tool_use_events(plan)
            return
        if plan.calls:
            yield from self._call_events(plan)
            return
        yield _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        yield _sse("ping", {"type": "ping"})
        for piece in plan.deltas:
            yield _sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        yield _sse("message_stop", {"type": "message_stop"})

    def _tool_use_events(self, plan: _Plan) -> Iterator[bytes]:
        block: dict[str, Any] = {"type": "tool_use", "id": f"toolu_{plan.message_id[-16:]}",
                 "name": plan.tool_use, "input": {}}
        yield _sse("content_block_start",
                   {"type": "content_block_start", "index": 0, "content_block": block})
        yield _sse("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": json.dumps(TOOL_USE_INPUT)},
        })
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": plan.call.usage["output_tokens"]},
        })
        yield _sse("message_stop", {"type": "message_stop"})

    def _call_events(self, plan: _Plan) -> Iterator[bytes]:
        """Text, then one tool_use block per call, streamed as the Messages API does."""
        yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        text_delta = {"type": "text_delta", "text": plan.call.reply}
        yield _sse("content_block_delta",
                   {"type": "content_block_delta", "index": 0, "delta": text_delta})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        for index, (name, arguments) in enumerate(plan.calls, start=1):
            block = {"type": "tool_use", "id": f"toolu_{plan.message_id[-12:]}{index:04d}",
                     "name": name, "input": {}}
            yield _sse("content_block_start",
                       {"type": "content_block_start", "index": index, "content_block": block})
            text = json.dumps(arguments)
            middle = len(text) // 2
            for piece in (text[:middle], text[middle:]):  # partial JSON, as the API sends it
                yield _sse("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece},
                })
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        yield _sse("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": plan.call.usage["output_tokens"]},
        })
        yield _sse("message_stop", {"type": "message_stop"})

    def _full_message(self, plan: _Plan) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": plan.call.reply}]
        content += [
            {"type": "tool_use", "id": f"toolu_{plan.message_id[-12:]}{index:04d}", "name": name,
             "input": arguments}
            for index, (name, arguments) in enumerate(plan.calls, start=1)
        ]
        return {
            "id": plan.message_id,
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": content,
            "stop_reason": "tool_use" if plan.calls else "end_turn",
            "stop_sequence": None,
            "usage": plan.call.usage,
        }

    # -- plain responses -----------------------------------------------------------------------

    async def _send_json(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        status: int,
        payload: dict[str, Any],
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        await self._send(
            stream, conn, status, json.dumps(payload).encode(), "application/json", headers
        )

    async def _send(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        status: int,
        data: bytes,
        content_type: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        all_headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(data)).encode()),
            *headers,
        ]
        await stream.send_all(conn.send(_response(status, all_headers)))
        if data and conn.our_state is h11.SEND_BODY:  # HEAD answers carry no body
            await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


def _response(status: int, headers: Sequence[tuple[bytes, bytes]]) -> h11.Response:
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:  # 529 and other non-standard codes
        reason = b"Overloaded" if status == 529 else b""
    return h11.Response(status_code=status, headers=list(headers), reason=reason)


async def _wait_until_closed(stream: trio.SocketStream) -> None:
    """Read and discard until the peer closes: how ``hang`` notices the client gave up."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


# --------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ccwrap_trio.standin",
        description="Offline stand-in for the Anthropic Messages API (for the Claude Code CLI).",
        epilog=DIRECTIVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between text deltas")
    parser.add_argument("--cache-read-tokens", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    return parser.parse_args(argv)


async def _run(config: StandinConfig) -> None:
    async with trio.open_nursery() as nursery:
        # Catch SIGTERM and Ctrl-C ourselves so both end the server the same clean way.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            standin: Standin = await nursery.start(Standin(config).serve)
            print(f"standin listening on {standin.url}", flush=True)
            async for signum in signals:
                logger.info("standin: got signal %d, stopping", signum)
                break
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in until Ctrl-C or SIGTERM; print ``standin listening on URL`` once bound."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    config = StandinConfig(
        host=args.host,
        port=args.port,
        latency_s=args.latency,
        delay_s=args.delay,
        cache_read_input_tokens=args.cache_read_tokens,
    )
    trio.run(_run, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
