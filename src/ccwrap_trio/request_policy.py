"""One request's policy on a leased session: what happens between taking a query and replying.

``RequestRunner.run`` gives the session the request's tools and model, asks, retries an empty
answer once, repairs a structured output or tool calls that do not validate (repair turns in the
same conversation), and interrupts the turn when the client gives up. It replies exactly once.
The session's life (spawn, restart, recovery) is ``supervisor.SessionWorker``'s.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import suppress
from dataclasses import dataclass

import trio

from . import protocol, tool_policy
from .config import Config
from .core import CoreRequest
from .errors import (
    CcwrapError,
    ContextLengthExceeded,
    EmptyResponse,
    InternalError,
    InvalidStructuredOutput,
    InvalidToolCall,
    QueryTimeout,
    SessionCrashed,
    SessionLostBeforeTurn,
)
from .limits import UpstreamState
from .query import Query
from .session import OnProgress, SessionLike
from .stats import Counters
from .structured import StructuredOutput

log = logging.getLogger(__name__)

# How long after a query's deadline the worker ends its turn if the client has not (it may be
# blocked sending to a client that does not read).
DEADLINE_BACKSTOP_S = 1.0


@dataclass(frozen=True)
class Restart:
    """Why a session is being replaced: proactive, hard, memory, crash or timeout."""

    kind: str
    detail: str


def reply(query: Query, item: protocol.TurnResult | CcwrapError) -> None:
    """Send a query its outcome; the client may be gone (answered already, or needs nothing)."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        query.reply.send_nowait(item)


async def clear_within(session: SessionLike, timeout_s: float) -> None:
    """``/clear`` within ``timeout_s``; a CLI that misses it is out of step (broken).

    Raises QueryTimeout (the session is then not ``alive``) or SessionCrashed.
    """
    try:
        with trio.fail_after(timeout_s):
            await session.clear()
    except trio.TooSlowError as exc:
        log.error("[ERROR] /clear not answered within %gs; the session will be replaced",
                  timeout_s)
        raise QueryTimeout(
            f"the CLI did not answer /clear within {timeout_s:g}s (CCWRAP_CLEAR_TIMEOUT)"
        ) from exc


class RequestRunner:
    """Runs the queries of one worker, one at a time, each on the session it is given."""

    def __init__(
        self, config: Config, counters: Counters, upstream: UpstreamState | None = None
    ) -> None:
        self._config = config
        self._counters = counters
        # The API's usage windows and the login's health, as turns report them.
        self._upstream = upstream or UpstreamState()
        self.active: Query | None = None  # the query being run
        # Set when a turn shows the session cannot go on (its context is full, /clear froze).
        self.recycle: Restart | None = None
        # A query whose CLI was gone before its turn (SessionLostBeforeTurn): for the next one.
        self.lost: Query | None = None

    async def run(self, session: SessionLike, query: Query) -> bool:
        """Run one query and reply to it; False if it never reached the CLI.

        Leaves the session usable, or not ``alive``.
        """
        if query.abandoned:
            return False  # its client is gone: it never reaches the CLI
        if (blocked := self._upstream.blocking()) is not None:
            # The usage window is used up: the turn would fail the same way. Not spent.
            reply(query, blocked)
            return False
        session.requests += 1
        self.active = query
        on_progress = self._progress(query)
        try:
            # The client's side times the query out at its deadline, but only while it waits
            # for events: one blocked sending to a client that does not read never looks.
            # The worker keeps its own deadline, a little later, so no turn outlives the query.
            query.scope.deadline = min(query.scope.deadline, query.deadline + DEADLINE_BACKSTOP_S)
            with query.scope:
                if self._config.log_prompts:
                    log.info("[PROMPT] request_id=%s %.4000s", query.request_id, query.content)
                await self._prepare(session, query)
                result = await self._ask(session, query, on_progress)
                if query.request is not None and query.request.tools:
                    result = await self._validate_tools(session, query, query.request, result)
                if query.structured is not None and not result.tool_calls:
                    result = await self._validate(session, query, query.structured, result)
                if self._config.log_prompts:
                    log.info("[ANSWER] request_id=%s %.4000s", query.request_id, result.text)
                reply(query, result)
                self._log_done(session, query)
            if query.scope.cancelled_caught:
                if query.abandoned is None:
                    query.abandoned = "timeout"
                    reply(query, QueryTimeout(
                        f"no answer within {self._config.query_timeout_s:g}s "
                        "(CCWRAP_QUERY_TIMEOUT)"
                    ))
                await self._abort_turn(session, query)
        except SessionLostBeforeTurn as exc:
            if query.progressed or query.replayed:
                reply(query, exc)
            else:
                # Nothing of it ran or reached the client: the next session serves it (once).
                query.replayed = True
                query.scope = trio.CancelScope()  # a scope serves one run; abandon() cancels it
                self.lost = query
                log.warning("[WARN] CLI gone before the turn (%s); the next session serves "
                            "request_id=%s", exc, query.request_id)
        except CcwrapError as exc:
            if isinstance(exc, ContextLengthExceeded) and self._config.isolation == "none":
                # The accumulated conversation is full: only a new session helps.
                self.recycle = Restart("hard", "prompt is too long")
            reply(query, exc)
        except Exception:
            # A bug must cost this one request, never the worker (and with it the server).
            log.exception("[ERROR] Unexpected error request_id=%s", query.request_id)
            reply(query, InternalError("the server had an error processing your request"))
        finally:
            self.active = None
        return True

    async def _prepare(self, session: SessionLike, query: Query) -> None:
        """Give the session the query's tools and model; each only when it differs."""
        request = query.request
        tools = request.tools if request is not None and request.offers_tools else ()
        try:
            with trio.fail_after(self._config.control_timeout_s):
                # Always: a plain request after a tool request must offer no tool.
                await session.use_tools(tools)
                if request is not None and request.model:
                    await session.use_model(request.model)
        except trio.TooSlowError as exc:
            # Left mid-exchange: the session is out of step and will be replaced.
            raise SessionCrashed(
                f"the CLI did not answer a control request within "
                f"{self._config.control_timeout_s:g}s (CCWRAP_CONTROL_TIMEOUT)"
            ) from exc

    async def _validate_tools(
        self,
        session: SessionLike,
        query: Query,
        request: CoreRequest,
        result: protocol.TurnResult,
    ) -> protocol.TurnResult:
        """Check the calls against the tools and tool_choice; repair turns like _validate."""
        usage = result.usage
        repairs = self._config.schema_repairs
        for attempt in range(repairs + 1):
            # Off the event loop: the argument schemas are client input.
            verdict = await trio.to_thread.run_sync(tool_policy.check, request, result)
            result = verdict.result
            if not verdict.errors:
                return dataclasses.replace(result, usage=usage)
            if attempt == repairs or query.stream or self._conversation_full(session):
                # A streamed answer was sent as it came: it cannot be taken back and repaired.
                break
            self._counters.schema_repairs += 1
            # Paths and keywords only: the arguments are model output.
            log.warning(
                "[WARN] Tool call invalid, repair %d/%d: %s request_id=%s",
                attempt + 1, repairs, "; ".join(verdict.log_errors)[:300], query.request_id,
            )
            result = await session.ask(tool_policy.repair_prompt(request, verdict.errors))
            self._check(result)
            usage = usage + result.usage
        self._counters.schema_failures += 1
        done = attempt
        summary = "; ".join(verdict.log_errors)[:300]
        log.error(
            "[ERROR] Tool call invalid after %d repairs: %s request_id=%s",
            done, summary, query.request_id,
        )
        raise InvalidToolCall(
            f"the model's answer did not fit the request's tools after {done} repair turns: "
            f"{'; '.join(verdict.errors)[:500]}",
            log_text=f"the answer did not fit the tools after {done} repair turns: {summary}",
        )

    def _conversation_full(self, session: SessionLike) -> bool:
        """No room for another repair turn: the conversation is at a context limit. The
        request fails with what it has; between requests the session is then cleared or
        replaced (``SessionWorker._restart_needed``)."""
        config = self._config
        full = session.turns >= config.turn_limit or session.tokens >= config.token_limit
        if full:
            log.warning("[WARN] Conversation full (turns=%d/%d, tokens=%d/%d): no more repairs",
                        session.turns, config.turn_limit, session.tokens, config.token_limit)
        return full

    async def _ask(
        self, session: SessionLike, query: Query, on_progress: OnProgress | None
    ) -> protocol.TurnResult:
        result = await session.ask(query.content, on_progress)
        self._check(result)
        if result.text.strip() or result.tool_calls:
            return result
        self._counters.empty_retries += 1
        log.warning("[WARN] Empty response, retrying... request_id=%s", query.request_id)
        try:
            if self._config.isolation == "clear":
                try:
                    await clear_within(session, self._config.clear_timeout_s)
                except QueryTimeout as exc:
                    self.recycle = Restart("timeout", str(exc))
                    raise SessionCrashed(str(exc)) from exc
            result = await session.ask(query.content, on_progress)
            self._check(result)
        except CcwrapError as exc:
            log.error("[ERROR] Query failed after retry: %s", exc)
            raise
        if not result.text.strip() and not result.tool_calls:
            log.error("[ERROR] Query failed after retry: empty response")
            raise EmptyResponse("the CLI answered with no text, twice")
        return result

    async def _validate(
        self,
        session: SessionLike,
        query: Query,
        structured: StructuredOutput,
        result: protocol.TurnResult,
    ) -> protocol.TurnResult:
        """Check the answer against the schema; repair turns in the same conversation."""
        usage = result.usage
        repairs = self._config.schema_repairs
        for attempt in range(repairs + 1):
            # Off the event loop: the schema and (through the prompt) the answer are client input.
            verdict = await trio.to_thread.run_sync(structured.verify, result.text)
            if verdict.content is not None:
                return dataclasses.replace(result, text=verdict.content, usage=usage)
            if attempt == repairs or not verdict.repairable or self._conversation_full(session):
                break
            self._counters.schema_repairs += 1
            # Paths and keywords only: the values are model output (CCWRAP_LOG_PROMPTS logs those).
            log.warning(
                "[WARN] Structured output invalid, repair %d/%d: %s request_id=%s",
                attempt + 1, repairs, "; ".join(verdict.log_errors)[:300], query.request_id,
            )
            # No /clear before it: the model must see its own invalid answer.
            result = await session.ask(structured.repair_prompt(verdict.errors))
            self._check(result)
            usage = usage + result.usage
        self._counters.schema_failures += 1
        summary = "; ".join(verdict.log_errors)[:300]
        log.error(
            "[ERROR] Structured output invalid after %d repairs: %s request_id=%s",
            attempt, summary, query.request_id,
        )
        raise InvalidStructuredOutput(
            f"the answer did not validate against the requested schema after {attempt} "
            f"repair turns: {'; '.join(verdict.errors)[:500]}",
            log_text=f"the answer did not validate after {attempt} repair turns: {summary}",
        )

    def _check(self, result: protocol.TurnResult) -> None:
        self._upstream.observe(result)
        if result.is_error:
            # The API status keeps its meaning: usage limit, 429, 529, login refused...
            raise self._upstream.classify(result)

    async def _abort_turn(self, session: SessionLike, query: Query) -> None:
        """The client gave up mid-turn: interrupt the CLI and drain, or give the session up."""
        if query.abandoned == "timeout":
            self._counters.timeouts += 1
        if session.broken is None or session.exited.is_set():
            return
        with trio.move_on_after(self._config.interrupt_grace_s, shield=True):
            if await session.interrupt():
                log.warning(
                    "[WARN] Turn interrupted (%s) request_id=%s", query.abandoned, query.request_id
                )
                return
        log.error(
            "[ERROR] Interrupt not answered within %gs (%s); the session will be replaced",
            self._config.interrupt_grace_s, query.abandoned,
        )

    def _progress(self, query: Query) -> OnProgress:
        # Structured answers are checked before anything is sent, so they never stream.
        forward = query.stream and query.structured is None

        async def on_progress(progress: protocol.Progress) -> None:
            if query.first_token_at is None and isinstance(progress, protocol.TextDelta):
                query.first_token_at = trio.current_time()
            if forward:
                query.progressed = True
                # Unbounded channel: a slow client never blocks the session's reader.
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    query.reply.send_nowait(progress)

        return on_progress

    def _log_done(self, session: SessionLike, query: Query) -> None:
        config = self._config
        duration_s = trio.current_time() - query.arrived_at
        log.info(
            "[DONE] %.1fs | ctx=%d/%d (%.1f%%) | turns=%d/%d | request_id=%s",
            duration_s,
            session.tokens, config.token_limit, 100.0 * session.tokens / config.token_limit,
            session.turns, config.turn_limit, query.request_id,
            extra={
                "request_id": query.request_id, "duration_s": round(duration_s, 3),
                "ctx_tokens": session.tokens, "token_limit": config.token_limit,
                "turns": session.turns, "turn_limit": config.turn_limit, "pid": session.pid,
            },
        )
