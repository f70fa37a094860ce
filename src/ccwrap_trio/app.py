"""The HTTP routes (Quart-Trio), kept thin: translation is in ``openai_api`` and ``streaming``,
policy in ``supervisor``. Every error leaves here in OpenAI's shape (``openai_api.ERRORS``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import __version__, anthropic_messages, metrics, openai_api, openai_responses
from .config import Config
from .errors import CcwrapError
from .keys import KeyRing, KeyStatistics
from .limits import LimitsSnapshot
from .memory import MemorySampler
from .offload import parse_body
from .streaming import completion_stream
from .supervisor import QueryHandle, Supervisor

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Open without an API key: operators, orchestrators and scrapers poll them. They show counters,
# memory and request ids, never prompts or answers.
OPEN_PATHS = frozenset(
    {"/health", "/health/live", "/health/ready", "/metrics", "/status", "/status/history",
     "/api/hello"}
)
STATUS_PAGE = Path(__file__).with_name("static") / "status.html"
# A body left unread can hang a keep-alive connection: routes that read theirs, and the statuses
# answered before the body is read (auth, routing, size).
BODY_ROUTES = frozenset(
    {"/v1/chat/completions", "/chat/completions", "/v1/responses", "/responses"}
) | anthropic_messages.PATHS
UNREAD_BODY_STATUSES = frozenset({401, 404, 405, 413})


def create_app(
    config: Config, supervisor: Supervisor, sampler: MemorySampler, keys: KeyRing | None = None
) -> QuartTrio:
    """The Quart-Trio app; the supervisor and sampler run beside it in the server's nursery.

    ``keys`` is the key ring clients authenticate against (default: built from ``config``);
    the server shares its own so that a SIGHUP reload reaches the app.
    """
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    # Quart cuts sending a response after 60 s by default; the query timeout governs instead.
    app.config["RESPONSE_TIMEOUT"] = None
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep documented field order
    started_at = time.time()  # wall clock: the app may be built before Trio runs (Hypercorn)
    keyring = keys if keys is not None else KeyRing(config.api_keys, config.api_keys_file)
    http_requests = metrics.HttpRequests()
    registry = metrics.registry_for(config, supervisor, sampler, http_requests)

    @app.before_request
    async def identify_and_authenticate() -> Any:
        given = request.headers.get("X-Request-ID", "")
        # An id that carries a key would publish it (/status/history is open, logs keep it).
        usable = _REQUEST_ID.match(given) and not keyring.appears_in(given)
        g.request_id = given if usable else f"req_{uuid.uuid4().hex}"
        g.key_name = None  # the client key's name, once authenticated (never the key)
        if keyring.enabled and request.path not in OPEN_PATHS:
            return _authenticate(keyring)
        return None

    @app.after_request
    async def echo_request_id_and_count(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if anthropic_messages.owns(request.path):
            response.headers["request-id"] = g.get("request_id", "")
        rule = request.url_rule
        http_requests.count(rule.rule if rule is not None else "unmatched", response.status_code)
        if rule is not None and rule.rule in metrics.ENDPOINTS:
            http_requests.count_endpoint(metrics.ENDPOINTS[rule.rule])
        body_read = rule is not None and rule.rule in BODY_ROUTES
        if _has_body() and (response.status_code in UNREAD_BODY_STATUSES or not body_read):
            # Answered without reading the body: the connection cannot be reused safely.
            response.headers["Connection"] = "close"
        return response

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions() -> Any:
        raw = await request.get_data(cache=False, as_text=False)
        chat = await parse_body(openai_api.parse_chat_request, raw, default_model=config.model)
        if not config.model_allowed(chat.model):
            raise openai_api.model_not_found(chat.model)
        if chat.stream:
            handle = supervisor.submit(chat.content, request_id=g.request_id, stream=True,
                                       structured=chat.structured, request=chat.core,
                                       key=g.key_name)
            return await _streaming_response(chat, handle, config.stream_keepalive_s)
        result = await supervisor.query(
            chat.content, request_id=g.request_id, structured=chat.structured, request=chat.core,
            key=g.key_name,
        )
        text, finish_reason = openai_api.limit_answer(result.text, chat)
        return openai_api.completion_response(
            model=result.model or chat.model, text=text, usage=result.usage,
            finish_reason=finish_reason, tool_calls=result.tool_calls,
            legacy_functions=chat.tools.legacy,
        )

    @app.post("/v1/responses")
    @app.post("/responses")
    async def responses() -> Any:
        raw = await request.get_data(cache=False, as_text=False)
        req = await parse_body(openai_responses.parse_request, raw, default_model=config.model)
        if not config.model_allowed(req.model):
            raise openai_api.model_not_found(req.model)
        if req.stream:
            handle = supervisor.submit(req.content, request_id=g.request_id, stream=True,
                                       structured=req.structured, request=req.core,
                                       key=g.key_name)
            frames = openai_responses.response_stream(
                req, handle, keepalive_s=config.stream_keepalive_s
            )
            return await _event_stream(frames)
        result = await supervisor.query(
            req.content, request_id=g.request_id, structured=req.structured, request=req.core,
            key=g.key_name,
        )
        return openai_responses.response_object(req, result)

    # The Anthropic Messages API (anthropic_messages); ?beta=true and the anthropic-version and
    # anthropic-beta headers are accepted and change nothing.
    @app.post("/v1/messages")
    async def messages() -> Any:
        raw = await request.get_data(cache=False, as_text=False)
        parsed = await parse_body(anthropic_messages.parse_request, raw, default_model=config.model)
        core = parsed.core
        if not config.model_allowed(core.model):
            raise openai_api.model_not_found(core.model)
        if core.stream:
            handle = supervisor.submit(core.content, request_id=g.request_id, stream=True,
                                       structured=core.structured, request=core,
                                       key=g.key_name)
            frames = anthropic_messages.message_stream(
                parsed, handle, keepalive_s=config.stream_keepalive_s
            )
            return await _event_stream(frames)
        result = await supervisor.query(
            core.content, request_id=g.request_id, structured=core.structured, request=core,
            key=g.key_name,
        )
        return anthropic_messages.message_response(parsed, result)

    @app.route("/api/hello", methods=["GET", "HEAD"])
    async def hello() -> Any:
        # The Claude Code CLI's connectivity probe of its ANTHROPIC_BASE_URL.
        return {"message": "hello"}

    @app.post("/v1/messages/count_tokens")
    async def count_tokens() -> Any:
        raw = await request.get_data(cache=False, as_text=False)
        parsed = await parse_body(anthropic_messages.parse_request, raw,
                                  default_model=config.model, counting=True)
        if not config.model_allowed(parsed.core.model):
            raise openai_api.model_not_found(parsed.core.model)
        tokens = anthropic_messages.count_tokens(parsed)
        return {"input_tokens": tokens}, 200, {anthropic_messages.ESTIMATE_HEADER: "estimate"}

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> Any:
        return openai_api.models_response(config.model, config.models)

    @app.get("/v1/models/<model>")
    @app.get("/models/<model>")
    async def model(model: str) -> Any:
        if not config.model_allowed(model):
            raise openai_api.model_not_found(model)
        return openai_api.model_object(model)

    @app.get("/health")
    async def health() -> Any:
        body = health_body(supervisor, sampler, started_at)
        status = 200 if body["status"] in ("healthy", "restarting") else 503
        return body, status

    @app.get("/health/live")
    async def live() -> Any:
        # Answering at all is the proof: the event loop runs.
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready() -> Any:
        stats = supervisor.statistics()
        reasons = []
        if not stats.invoker_connected:
            reasons.append(f"no CLI session connected ({stats.status})")
        if stats.queued >= config.max_queue:
            reasons.append("the queue is full")
        if supervisor.shutting_down:
            reasons.append("shutting down")
        limits = stats.limits
        if limits is not None and limits.limited:
            blocked = supervisor.upstream.blocking()
            reasons.append(f"usage limit: {blocked}" if blocked else "usage limit reached")
        if limits is not None and limits.login_error:
            reasons.append(limits.login_error)
        body = {"status": "not ready" if reasons else "ready", "reasons": reasons}
        return body, 503 if reasons else 200

    @app.get("/metrics")
    async def prometheus_metrics() -> Any:
        return Response(metrics.render(registry), content_type=metrics.CONTENT_TYPE)

    @app.get("/status")
    async def status_page() -> Any:
        response = Response(
            await trio.Path(STATUS_PAGE).read_bytes(), content_type="text/html; charset=utf-8"
        )
        response.headers["Cache-Control"] = "no-cache"
        # The browser itself enforces "self-contained": nothing may load from elsewhere.
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src data:"
        )
        return response

    @app.get("/status/history")
    async def status_history() -> Any:
        return history_body(config, supervisor, sampler)

    @app.errorhandler(CcwrapError)
    async def ccwrap_error(error: CcwrapError) -> Any:
        body, status, headers = openai_api.error_response(error)
        if anthropic_messages.owns(request.path):
            body, status = anthropic_messages.error_response(error)
        if status >= 500:
            log.warning("request failed with %d: %s request_id=%s", status, error.log_text(),
                        g.get("request_id", ""))
        return body, status, headers

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Any:
        status = error.code or 500
        message = {
            404: f"Unknown request URL: {request.method} {request.path}.",
            405: f"Method {request.method} is not allowed for {request.path}.",
            413: f"The request body is larger than {config.max_body_bytes} bytes "
            "(CCWRAP_MAX_BODY_BYTES).",
        }.get(status, error.description or error.name)
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        if anthropic_messages.owns(request.path):
            kind = anthropic_messages.HTTP_ERRORS.get(status, "invalid_request_error")
            return anthropic_messages.error_body(message, type=kind), status
        return openai_api.error_body(message, type=kind, code=code), status

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Any:
        log.exception("[ERROR] Unhandled error request_id=%s", g.get("request_id", ""))
        if anthropic_messages.owns(request.path):
            return anthropic_messages.error_body(
                "The server had an error while processing your request.", type="api_error"
            ), 500
        return openai_api.error_body(
            "The server had an error while processing your request.", type="server_error"
        ), 500

    return app


def _has_body() -> bool:
    length = request.headers.get("Content-Length", "0")
    return "chunked" in request.headers.get("Transfer-Encoding", "") or length not in ("", "0")


def _authenticate(keyring: KeyRing) -> Any:
    """None when the request carries a configured key (its name goes to ``g``), else the 401."""
    # "Bearer", any whitespace, the key (RFC 9110 allows tabs and runs of spaces).
    scheme, token = [*request.headers.get("Authorization", "").split(None, 1), "", ""][:2]
    given = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
    if not given and scheme.lower() == "basic":
        return openai_api.error_body(
            "Basic authentication is not supported. Send the API key as "
            "'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            type="invalid_request_error", code="invalid_api_key",
        ), 401
    if given:
        # Compared with every key, always: the time taken says nothing about which one is close.
        key = keyring.match(given)
        if key is not None:
            g.key_name = key.name
            return None
        message = "Incorrect API key provided."
        if anthropic_messages.owns(request.path):
            return anthropic_messages.error_body("invalid x-api-key",
                                                 type="authentication_error"), 401
    else:
        message = (
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
            "or 'x-api-key: <key>'."
        )
        if anthropic_messages.owns(request.path):
            return anthropic_messages.error_body(message, type="authentication_error"), 401
    return openai_api.error_body(message, type="invalid_request_error", code="invalid_api_key"), 401


async def _streaming_response(
    chat: openai_api.ChatRequest, handle: QueryHandle, keepalive_s: float
) -> Response:
    return await _event_stream(completion_stream(chat, handle, keepalive_s=keepalive_s))


async def _event_stream(frames: AsyncIterator[bytes]) -> Response:
    """An SSE response whose body is ``frames``, started here (its first frame awaited)."""
    # Started here: a failure before the first frame is still a plain HTTP error.
    first = await frames.__anext__()
    response = Response(_prepend(first, frames), content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass frames through as they come
    return response


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        yield first
        async for frame in rest:
            yield frame
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def history_body(
    config: Config, supervisor: Supervisor, sampler: MemorySampler
) -> dict[str, Any]:
    """Recent history for the status page: memory samples, restarts, request outcomes."""
    stats = supervisor.statistics()
    # Samples carry trio-clock times; the page wants wall-clock times.
    offset = time.time() - trio.current_time()
    return {
        "memory": [
            {"t": round(s.at + offset, 3), "rss_mb": round(s.rss_mb, 1),
             "cli_rss_mb": round(s.cli_rss_mb, 1)}
            for s in sampler.samples
        ],
        "restarts": [{"t": r.at, "kind": r.kind, "detail": r.detail} for r in stats.restarts],
        "requests": [
            {"t": r.at, "request_id": r.request_id, "outcome": r.outcome, "error": r.error,
             "duration_s": round(r.duration_s, 3)}
            for r in stats.requests
        ],
        "keys": keys_body(stats.keys),
        "usage_limits": limits_body(stats.limits),
        "limits": {
            "token_limit": config.token_limit,
            "turn_limit": config.turn_limit,
            "max_queue": config.max_queue,
            "cli_rss_limit_mb": config.cli_rss_limit_mb,
            "proactive_pct": config.proactive_pct,
        },
    }


def health_body(
    supervisor: Supervisor, sampler: MemorySampler, started_at: float
) -> dict[str, Any]:
    """The /health document: a rendering of the supervisor's and sampler's snapshots."""
    stats = supervisor.statistics()
    counters = stats.counters
    memory = sampler.latest
    first = next((s for s in stats.sessions if s.pid is not None), None)
    return {
        "status": stats.status,
        "invoker_connected": stats.invoker_connected,
        "active_queries": stats.active_queries,
        "queued": stats.queued,
        "context_usage": {
            "tokens": stats.tokens,
            "turns": stats.turns,
            "token_limit": stats.token_limit,
            "turn_limit": stats.turn_limit,
            "token_pct": stats.token_pct,
            "turn_pct": stats.turn_pct,
        },
        "stats": dict(vars(counters)),
        "memory": {
            "rss_mb": round(memory.rss_mb, 1),
            "vms_mb": round(memory.vms_mb, 1),
            "cli_rss_mb": round(memory.cli_rss_mb, 1),
            "trend_mb_per_min": round(sampler.trend_mb_per_min, 2),
        },
        "sessions": [
            dataclasses.asdict(session)
            | {"cli_rss_mb": round(memory.cli_rss_by_pid.get(session.pid or -1, 0.0), 1)}
            for session in stats.sessions
        ],
        "standby": {"enabled": supervisor.spawner.standby_enabled,
                    "pid": supervisor.spawner.standby_pid()},
        "session": {
            "pid": first.pid if first else None,
            "uptime_s": round(first.uptime_s, 1) if first else 0.0,
            "model": first.model if first else "",
            "cli_version": first.cli_version if first else "",
        },
        "limits": limits_body(stats.limits),
        "keys": keys_body(stats.keys),
        "uptime_s": round(time.time() - started_at, 1),
        "version": __version__,
        "time": int(time.time()),
    }


def limits_body(limits: LimitsSnapshot | None) -> dict[str, Any]:
    """The API's usage windows as /health shows them; ``limited`` while requests get 429."""
    if limits is None:
        return {"limited": False, "limited_until": None, "login_ok": True, "windows": {}}
    return {
        "limited": limits.limited,
        "limited_until": limits.limited_until,
        "login_ok": limits.login_error is None,
        "windows": {
            window.name: {
                # A used-up window whose reset has passed is "reset" until a turn reports it.
                "status": "reset" if window.status == "rejected" and not window.rejected(
                    limits.now) else window.status,
                "utilization": window.utilization,
                "resets_at": window.resets_at,
            }
            for window in limits.windows
        },
    }


def keys_body(keys: tuple[KeyStatistics, ...]) -> dict[str, Any]:
    """Usage per client key, by name (keys themselves never leave the key ring)."""
    return {
        key.name: {
            "requests": {"success": key.successes, "error": key.errors,
                         "rejected": key.rejected},
            "in_flight": key.in_flight,
            "tokens": {"prompt": key.prompt_tokens, "completion": key.completion_tokens,
                       "cached": key.cached_tokens},
            "window_tokens": key.window_tokens,
            "limit": None if key.limit is None else dataclasses.asdict(key.limit),
        }
        for key in keys
    }
