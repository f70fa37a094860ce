"""The HTTP routes (Quart-Trio), kept thin: translation is in ``openai_api``, policy in
``supervisor``.

Every error leaves here in OpenAI's shape; ``ERRORS`` is the one place that maps ccwrap-trio's
errors to statuses.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import __version__, openai_api
from .config import Config
from .errors import (
    CcwrapError,
    CliError,
    ContextLengthExceeded,
    EmptyResponse,
    InvalidRequest,
    QueryTimeout,
    QueueFull,
    SessionCrashed,
    SessionUnavailable,
)
from .memory import MemorySampler
from .supervisor import Supervisor

log = logging.getLogger(__name__)

# Error class -> (HTTP status, OpenAI error type, code). Checked in order: subclasses first.
ERRORS: tuple[tuple[type[CcwrapError], int, str, str | None], ...] = (
    (InvalidRequest, 400, "invalid_request_error", None),
    (ContextLengthExceeded, 400, "invalid_request_error", "context_length_exceeded"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (SessionUnavailable, 503, "service_unavailable", "session_unavailable"),
    (QueryTimeout, 504, "timeout", "query_timeout"),
    (EmptyResponse, 502, "api_error", "empty_response"),
    (CliError, 502, "api_error", "cli_error"),
    (SessionCrashed, 502, "api_error", "cli_crashed"),
)
# Seconds a client is told to wait before retrying a 429 or 503.
RETRY_AFTER_S = {429: 1, 503: 5}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def create_app(config: Config, supervisor: Supervisor, sampler: MemorySampler) -> QuartTrio:
    """The Quart-Trio app; the supervisor and sampler run beside it in the server's nursery."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 10 * 1024 * 1024
    # Quart cuts sending a response after 60 s by default; the query timeout governs instead.
    app.config["RESPONSE_TIMEOUT"] = None
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep documented field order
    started_at = trio.current_time()

    @app.before_request
    async def assign_request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        request.request_id = given if _REQUEST_ID.match(given) else f"req_{uuid.uuid4().hex}"  # type: ignore[attr-defined]

    @app.after_request
    async def echo_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = getattr(request, "request_id", "")
        return response

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions() -> Any:
        chat = openai_api.parse_chat_request(
            await request.get_data(cache=False, as_text=False), default_model=config.model
        )
        result = await supervisor.query(chat.prompt, request_id=request.request_id)  # type: ignore[attr-defined]
        return openai_api.completion_response(
            model=chat.model, text=result.text, usage=result.usage
        )

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> Any:
        return openai_api.models_response(config.model)

    @app.get("/health")
    async def health() -> Any:
        body = health_body(config, supervisor, sampler, started_at)
        status = 200 if body["status"] in ("healthy", "restarting") else 503
        return body, status

    @app.errorhandler(CcwrapError)
    async def ccwrap_error(error: CcwrapError) -> Any:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Any:
        status = error.code or 500
        kind = {404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error"}.get(status, "invalid_request_error")
        message = {
            404: f"Unknown request URL: {request.method} {request.path}.",
            405: f"Method {request.method} is not allowed for {request.path}.",
            413: "The request body is larger than the server accepts.",
        }.get(status, error.description or error.name)
        code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        return openai_api.error_body(message, type=kind, code=code), status

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Any:
        log.exception("[ERROR] Unhandled error request_id=%s", getattr(request, "request_id", ""))
        return openai_api.error_body(
            "The server had an error while processing your request.", type="server_error"
        ), 500

    return app


def error_response(error: CcwrapError) -> tuple[dict[str, Any], int, dict[str, str]]:
    for cls, status, kind, code in ERRORS:
        if isinstance(error, cls):
            param = error.param if isinstance(error, InvalidRequest) else None
            if isinstance(error, InvalidRequest) and error.code is not None:
                code = error.code
            headers = {"Retry-After": str(RETRY_AFTER_S[status])} if status in RETRY_AFTER_S else {}
            if status >= 500:
                log.warning("request failed with %d: %s", status, error)
            body = openai_api.error_body(str(error), type=kind, param=param, code=code)
            return body, status, headers
    raise error


def health_body(
    config: Config, supervisor: Supervisor, sampler: MemorySampler, started_at: float
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
        "stats": {
            "total_requests": counters.total_requests,
            "successes": counters.successes,
            "total_errors": counters.total_errors,
            "rejected": counters.rejected,
            "restart_count": counters.restart_count,
            "proactive_restarts": counters.proactive_restarts,
            "hard_restarts": counters.hard_restarts,
            "crash_restarts": counters.crash_restarts,
            "timeout_restarts": counters.timeout_restarts,
            "recovery_attempts": counters.recovery_attempts,
            "timeouts": counters.timeouts,
            "empty_retries": counters.empty_retries,
            "disconnects": counters.disconnects,
        },
        "memory": {
            "rss_mb": round(memory.rss_mb, 1),
            "vms_mb": round(memory.vms_mb, 1),
            "cli_rss_mb": round(memory.cli_rss_mb, 1),
            "trend_mb_per_min": round(sampler.trend_mb_per_min, 2),
        },
        "session": {
            "pid": first.pid if first else None,
            "uptime_s": round(first.uptime_s, 1) if first else 0.0,
            "model": first.model if first else "",
            "cli_version": first.cli_version if first else "",
        },
        "uptime_s": round(trio.current_time() - started_at, 1),
        "version": __version__,
        "time": int(time.time()),
    }
