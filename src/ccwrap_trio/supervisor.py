"""The restart supervisor: the query channel, the workers that serve on CLI sessions, the policy.

``Supervisor.submit`` is the front door: it puts a ``Query`` (carrying its own reply channel) into
a bounded memory channel and returns a ``QueryHandle`` to read the reply from. ``SessionWorker``s
(``CCWRAP_SESSIONS`` of them) are the only receivers: each serves on one leased CLI session at a
time and, between two queries, decides whether that session must be replaced (thresholds, memory,
crash, undrained interrupt). Restart is a loop, never recursion; recovery state is plain data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from . import protocol, tool_policy
from .config import Config
from .core import CoreRequest, ToolCallDelta, ToolCallStart
from .errors import (
    CcwrapError,
    CliError,
    ContextLengthExceeded,
    EmptyResponse,
    InternalError,
    InvalidStructuredOutput,
    InvalidToolCall,
    QueryTimeout,
    QueueFull,
    SessionCrashed,
    SessionUnavailable,
    ShuttingDown,
    SpawnFailed,
)
from .memory import process_tree_rss_mb, server_rss_mb
from .spawner import Spawner
from .stats import Activity, Counters, Statistics, WorkerStatistics
from .structured import StructuredOutput

log = logging.getLogger(__name__)

Content = str | list[dict[str, Any]]
OnProgress = Callable[[protocol.Progress], Awaitable[None]]
# What a worker sends back on a query's reply channel: progress, then one result or error.
Reply = (
    protocol.TextDelta | protocol.MessageStart | ToolCallStart | ToolCallDelta
    | protocol.TurnResult | CcwrapError
)


class SessionLike(Protocol):
    """What a worker needs of a session; ``session.Session`` and the tests' fakes provide it."""

    turns: int
    tokens: int
    model: str
    cli_version: str
    started_at: float
    exited: trio.Event

    @property
    def pid(self) -> int: ...

    @property
    def alive(self) -> bool: ...

    @property
    def broken(self) -> str | None: ...

    def describe_exit(self) -> str: ...

    async def ask(
        self, content: Content, on_progress: OnProgress | None = None
    ) -> protocol.TurnResult: ...

    async def clear(self) -> None: ...

    async def interrupt(self) -> bool: ...

    async def use_tools(self, tools: tuple[Any, ...]) -> None: ...

    async def use_model(self, model: str) -> None: ...


SessionFactory = Callable[[], AbstractAsyncContextManager[SessionLike, bool | None]]
# How long after a query's deadline the worker ends its turn if the client has not (it may be
# blocked sending to a client that does not read).
DEADLINE_BACKSTOP_S = 1.0
RssProbe = Callable[[int], Awaitable[float]]


async def _cli_rss_mb(pid: int) -> float:
    # psutil walks /proc: milliseconds on a busy host, so off the event loop.
    return await trio.to_thread.run_sync(process_tree_rss_mb, [pid])


def _server_rss_mb() -> float:
    # Out of file descriptors (EMFILE) /proc cannot be read: a log line loses a number, that is all.
    try:
        return server_rss_mb()
    except OSError:
        return math.nan


@dataclass(eq=False)
class Query:
    """One request on its way to a session, with the channel its reply comes back on."""

    content: Content
    request_id: str
    arrived_at: float
    deadline: float
    reply: trio.MemorySendChannel[Reply]
    stream: bool = False
    structured: StructuredOutput | None = None
    # The dialect-free request (tools, tool_choice, model); None: plain text on the default model.
    request: CoreRequest | None = None
    first_token_at: float | None = None  # when the first text arrived (time to first token)
    # Cancelled when the client gives up (timeout, disconnect): the worker interrupts the turn.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    abandoned: str | None = None

    def abandon(self, why: str) -> None:
        self.abandoned = why
        self.scope.cancel()


@dataclass(frozen=True)
class Restart:
    """Why a session is being replaced: proactive, hard, memory, crash or timeout."""

    kind: str
    detail: str


class SessionWorker:
    """Serves on one leased CLI session at a time: queries, restarts, recovery."""

    def __init__(
        self,
        config: Config,
        spawner: Spawner,
        receive: trio.MemoryReceiveChannel[Query],
        counters: Counters,
        activity: Activity,
        rss_probe: RssProbe | None = None,
    ) -> None:
        self._config = config
        self._spawner = spawner
        self._receive = receive
        self._counters = counters
        self._activity = activity
        # How big a CLI process tree is, in MB (psutil; tests give a fake).
        self._rss_probe = rss_probe or _cli_rss_mb
        self._rss_checked_at = -math.inf
        # Set when a turn shows the session cannot go on (its context is full).
        self._recycle: Restart | None = None
        self.status = "starting"
        self.session: SessionLike | None = None
        self.active: Query | None = None

    def __repr__(self) -> str:
        return f"<SessionWorker {self.status} session={self.session!r}>"

    def statistics(self) -> WorkerStatistics:
        session = self.session
        connected = session is not None and session.alive and self.status == "healthy"
        return WorkerStatistics(
            status=self.status,
            connected=connected,
            busy=self.active is not None,
            pid=session.pid if session is not None else None,
            tokens=session.tokens if session is not None else 0,
            turns=session.turns if session is not None else 0,
            uptime_s=trio.current_time() - session.started_at if session is not None else 0.0,
            model=session.model if session is not None else "",
            cli_version=session.cli_version if session is not None else "",
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Spawn, serve until the session must go, replace it; back off while spawns fail."""
        task_status.started()
        failures = 0  # consecutive failed spawns
        pending: Query | None = None  # a query whose session died before it could run
        restart: Restart | None = None
        memory_before = 0.0
        while True:
            if failures:
                await self._back_off(failures)
            try:
                lease = await self._spawner.acquire()
            except SpawnFailed as exc:
                failures += 1
                log.error("[RESTART] FAILED: %s", exc)
                if failures <= self._config.recovery_attempts:
                    self.status = "restarting"
                elif self.status != "offline":
                    self.status = "offline"
                    # Nobody may wait for a session that is not coming: answer all that waits.
                    if pending is not None:
                        self._reply(pending, SessionUnavailable("no CLI session: recovery failed"))
                        pending = None
                    self._fail_queued()
                continue
            failures = 0
            session = self.session = lease.session
            self.status = "healthy"
            try:
                if restart is not None:
                    after = _server_rss_mb()
                    log.info(
                        "[RESTART] Memory after: %.1f MB (delta: %+.1f MB) pid=%d",
                        after, after - memory_before, session.pid,
                        extra={"rss_mb": round(after, 1), "pid": session.pid,
                               "delta_mb": round(after - memory_before, 1)},
                    )
                restart, pending = await self._serve(session, pending)
                self.status = "restarting"
                memory_before = _server_rss_mb()
                self._count_restart(restart)
                cli_mb = await self._probe_rss(session.pid)
                log.info(
                    "[RESTART] Memory before: %.1f MB (cli %.1f MB)", memory_before, cli_mb,
                    extra={"rss_mb": round(memory_before, 1), "cli_rss_mb": round(cli_mb, 1)},
                )
            finally:
                self.session = None
                if self._spawner.standby_ready:
                    lease.release()  # the standby takes over at once; the old CLI ends aside
                else:
                    await lease.close()  # one CLI at a time: end it before spawning the next

    def _count_restart(self, restart: Restart) -> None:
        counters = self._counters
        counters.restart_count += 1
        if restart.kind == "proactive":
            counters.proactive_restarts += 1
        elif restart.kind == "hard":
            counters.hard_restarts += 1
        elif restart.kind == "crash":
            counters.crash_restarts += 1
        elif restart.kind == "timeout":
            counters.timeout_restarts += 1
        elif restart.kind == "memory":
            counters.memory_restarts += 1
        self._activity.restarted(restart.kind, restart.detail)
        log.warning(
            "[RESTART] Starting: %s: %s", restart.kind, restart.detail,
            extra={"kind": restart.kind, "restart_count": counters.restart_count},
        )

    async def _back_off(self, failures: int) -> None:
        """Wait before spawn attempt ``failures``: 1, 2, 4... s, capped; offline after N tries."""
        attempts = self._config.recovery_attempts
        cap = self._config.recovery_max_backoff_s
        self._counters.recovery_attempts += 1
        if failures <= attempts:
            delay = min(2.0 ** (failures - 1), cap)
            log.warning(
                "[RECOVERY] Attempt %d/%d in %gs...", failures, attempts, delay,
                extra={"attempt": failures, "attempts": attempts, "delay_s": delay},
            )
        else:
            delay = cap
            log.warning(
                "[RECOVERY] Offline: attempt %d in %gs...", failures, delay,
                extra={"attempt": failures, "delay_s": delay},
            )
        await trio.sleep(delay)

    def _fail_queued(self) -> None:
        while True:
            try:
                query = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._reply(query, SessionUnavailable("no CLI session: recovery failed"))

    async def _serve(
        self, session: SessionLike, pending: Query | None
    ) -> tuple[Restart, Query | None]:
        """Answer queries on ``session`` until it must be replaced; say why."""
        needs_clear = False
        while True:
            if (restart := await self._restart_needed(session)) is not None:
                return restart, pending
            if needs_clear:
                try:
                    await self._clear(session)
                except SessionCrashed as exc:
                    return Restart("crash", str(exc)), pending
                except QueryTimeout as exc:
                    return Restart("timeout", str(exc)), pending
                needs_clear = False
            query: Query | None
            if pending is not None:
                query, pending = pending, None
            else:
                # Idle sessions are looked at again every sample interval (memory grows idle too).
                # A query received as that deadline expires is kept in ``got``, never dropped.
                got: list[Query] = []
                with trio.move_on_after(self._config.memory_sample_interval_s):
                    await self._next_query(session, got)
                if got:
                    query = got[0]
                elif session.exited.is_set():
                    return Restart("crash", f"exited while idle: {session.describe_exit()}"), None
                else:
                    continue
            if not session.alive:
                # It died before this query reached it: respawn and serve the query there.
                return Restart("crash", session.describe_exit()), query
            ran = await self._run(session, query)
            needs_clear = ran and self._config.isolation == "clear"
            if not session.alive:
                kind = "timeout" if query.abandoned == "timeout" else "crash"
                return Restart(kind, session.broken or session.describe_exit()), None

    async def _restart_needed(self, session: SessionLike) -> Restart | None:
        config = self._config
        if self._recycle is not None:
            restart, self._recycle = self._recycle, None
            return restart
        turn_pct = round(100.0 * session.turns / config.turn_limit, 1)
        token_pct = round(100.0 * session.tokens / config.token_limit, 1)
        name, pct = ("turn_pct", turn_pct) if turn_pct >= token_pct else ("token_pct", token_pct)
        if pct >= 100.0:
            return Restart("hard", f"{name}={pct:.1f}")
        if pct >= config.proactive_pct:
            log.info("[PROACTIVE] Inline restart: %s=%.1f", name, pct, extra={name: pct})
            return Restart("proactive", f"{name}={pct:.1f}")
        # Long-lived CLIs leak; measured at most once a sample interval, between requests.
        # A session that has served nothing is as small as a new one would be: not recycled.
        now = trio.current_time()
        if session.turns and now - self._rss_checked_at >= config.memory_sample_interval_s:
            self._rss_checked_at = now
            rss_mb = await self._probe_rss(session.pid)
            if rss_mb > config.cli_rss_limit_mb:
                return Restart("memory", f"cli_rss_mb={rss_mb:.1f} > {config.cli_rss_limit_mb}")
        return None

    async def _next_query(self, session: SessionLike, got: list[Query]) -> None:
        """Wait for the next query and put it in ``got``; return early if the session dies.

        The query lands in ``got`` with no checkpoint after ``receive``: a cancellation at any
        later point (the idle tick, the nursery's exit) cannot take it away from the caller.
        """
        async with trio.open_nursery() as nursery:

            async def cancel_on_exit() -> None:
                await session.exited.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_on_exit)
            try:
                got.append(await self._receive.receive())
            finally:
                nursery.cancel_scope.cancel()

    async def _clear(self, session: SessionLike) -> None:
        """``/clear`` within ``clear_timeout_s``; a CLI that misses it is out of step (broken).

        Raises QueryTimeout (the session is then not ``alive``) or SessionCrashed.
        """
        timeout_s = self._config.clear_timeout_s
        try:
            with trio.fail_after(timeout_s):
                await session.clear()
        except trio.TooSlowError as exc:
            log.error("[ERROR] /clear not answered within %gs; the session will be replaced",
                      timeout_s)
            raise QueryTimeout(
                f"the CLI did not answer /clear within {timeout_s:g}s (CCWRAP_CLEAR_TIMEOUT)"
            ) from exc

    async def _probe_rss(self, pid: int) -> float:
        # Out of file descriptors, psutil raises a plain OSError (EMFILE): unknown, not fatal.
        try:
            return await self._rss_probe(pid)
        except OSError as exc:
            log.warning("[WARN] CLI memory not measured: %s", exc)
            return 0.0

    async def _run(self, session: SessionLike, query: Query) -> bool:
        """Run one query and reply to it; False if it never reached the CLI.

        Leaves the session usable, or not ``alive``.
        """
        if query.abandoned:
            return False  # its client is gone: it never reaches the CLI
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
                self._reply(query, result)
                self._log_done(session, query)
            if query.scope.cancelled_caught:
                if query.abandoned is None:
                    query.abandoned = "timeout"
                    self._reply(query, QueryTimeout(
                        f"no answer within {self._config.query_timeout_s:g}s "
                        "(CCWRAP_QUERY_TIMEOUT)"
                    ))
                await self._abort_turn(session, query)
        except CcwrapError as exc:
            if isinstance(exc, ContextLengthExceeded) and self._config.isolation == "none":
                # The accumulated conversation is full: only a new session helps.
                self._recycle = Restart("hard", "prompt is too long")
            self._reply(query, exc)
        except Exception:
            # A bug must cost this one request, never the worker (and with it the server).
            log.exception("[ERROR] Unexpected error request_id=%s", query.request_id)
            self._reply(query, InternalError("the server had an error processing your request"))
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
            result, errors = tool_policy.check(request, result)
            if not errors:
                return dataclasses.replace(result, usage=usage)
            if attempt == repairs or query.stream:
                # A streamed answer was sent as it came: it cannot be taken back and repaired.
                break
            self._counters.schema_repairs += 1
            log.warning(
                "[WARN] Tool call invalid, repair %d/%d: %s request_id=%s",
                attempt + 1, repairs, "; ".join(errors)[:300], query.request_id,
            )
            result = await session.ask(tool_policy.repair_prompt(request, errors))
            self._check(result)
            usage = usage + result.usage
        self._counters.schema_failures += 1
        log.error(
            "[ERROR] Tool call invalid after %d repairs: %s request_id=%s",
            0 if query.stream else repairs, "; ".join(errors)[:300], query.request_id,
        )
        raise InvalidToolCall(
            f"the model's answer did not fit the request's tools after "
            f"{0 if query.stream else repairs} repair turns: {'; '.join(errors)[:500]}"
        )

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
                    await self._clear(session)
                except QueryTimeout as exc:
                    self._recycle = Restart("timeout", str(exc))
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
            if attempt == repairs or not verdict.repairable:
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
        if not result.is_error:
            return
        message = result.text or f"CLI turn failed ({result.subtype})"
        if "prompt is too long" in message.lower():
            raise ContextLengthExceeded(message, api_error_status=result.api_error_status)
        raise CliError(message, api_error_status=result.api_error_status)

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
                # Unbounded channel: a slow client never blocks the session's reader.
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    query.reply.send_nowait(progress)

        return on_progress

    def _reply(self, query: Query, item: protocol.TurnResult | CcwrapError) -> None:
        # The client may be gone: it was answered already (timeout) or needs nothing.
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            query.reply.send_nowait(item)

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


class Supervisor:
    """The front door (``query``) and the owner of the query channel and its workers."""

    def __init__(
        self,
        config: Config,
        open_session: SessionFactory,
        *,
        sessions: int = 1,
        rss_probe: RssProbe | None = None,
    ) -> None:
        self._config = config
        self._send, self._receive = trio.open_memory_channel[Query](config.max_queue)
        self.counters = Counters()
        self.activity = Activity()
        self.spawner = Spawner(open_session, standby=config.standby)
        self.workers = [
            SessionWorker(
                config, self.spawner, self._receive, self.counters, self.activity, rss_probe
            )
            for _ in range(sessions)
        ]
        self._shutting_down = False

    def __repr__(self) -> str:
        stats = self.statistics()
        return f"<Supervisor {stats.status} queued={stats.queued} workers={self.workers!r}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled; ready (queries accepted) once they are started."""
        async with self._receive, trio.open_nursery() as nursery:
            await nursery.start(self.spawner.run)
            for worker in self.workers:
                await nursery.start(worker.run)
            task_status.started()

    def begin_shutdown(self) -> None:
        """Refuse new queries (503); those already accepted are still answered."""
        self._shutting_down = True

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def cli_pids(self) -> list[int]:
        """Every live CLI: the workers' sessions and the standby."""
        return self.spawner.pids()

    def statistics(self) -> Statistics:
        workers = [worker.statistics() for worker in self.workers]
        statuses = {w.status for w in workers}
        if "healthy" in statuses:
            status = "healthy"
        elif "restarting" in statuses:
            status = "restarting"
        elif "starting" in statuses:
            status = "starting"
        else:
            status = "offline"
        fullest = max(workers, key=lambda w: max(w.tokens / self._config.token_limit,
                                                 w.turns / self._config.turn_limit))
        return Statistics(
            status=status,
            invoker_connected=any(w.connected for w in workers),
            active_queries=sum(w.busy for w in workers),
            queued=self._send.statistics().current_buffer_used,
            tokens=fullest.tokens,
            turns=fullest.turns,
            token_limit=self._config.token_limit,
            turn_limit=self._config.turn_limit,
            counters=Counters(**vars(self.counters)),
            sessions=tuple(workers),
            durations=self.activity.durations.copy(),
            ttft=self.activity.ttft.copy(),
            restarts=tuple(self.activity.restarts),
            requests=tuple(self.activity.requests),
        )

    def submit(
        self,
        content: Content,
        *,
        request_id: str | None = None,
        stream: bool = False,
        structured: StructuredOutput | None = None,
        request: CoreRequest | None = None,
    ) -> QueryHandle:
        """Put a query in the queue at once, or raise QueueFull / SessionUnavailable.

        The caller reads its events from the returned handle and closes it (``with``); the
        request counts as exactly one success, error or rejection.
        """
        counters = self.counters
        counters.total_requests += 1
        request_id = request_id or uuid.uuid4().hex
        try:
            if self._shutting_down:
                raise ShuttingDown("the server is shutting down")
            if all(worker.status == "offline" for worker in self.workers):
                raise SessionUnavailable(
                    "no CLI session: recovery failed; retrying in the background"
                )
            now = trio.current_time()
            reply_send, reply_receive = trio.open_memory_channel[Reply](math.inf)
            query = Query(
                content=content,
                request_id=request_id,
                arrived_at=now,
                deadline=now + self._config.query_timeout_s,
                reply=reply_send,
                stream=stream,
                structured=structured,
                request=request,
            )
            try:
                self._send.send_nowait(query)
            except trio.WouldBlock:
                raise QueueFull(f"{self._config.max_queue} requests are already waiting") from None
        except CcwrapError as exc:
            counters.rejected += 1
            self.activity.finished(request_id, "rejected", type(exc).__name__, 0.0)
            raise
        return QueryHandle(
            query, reply_receive, counters, self.activity, self._config.query_timeout_s
        )

    async def query(
        self,
        content: Content,
        *,
        request_id: str | None = None,
        structured: StructuredOutput | None = None,
        request: CoreRequest | None = None,
    ) -> protocol.TurnResult:
        """Answer one request through a session (no streaming): its final result.

        Raises QueueFull, SessionUnavailable/ShuttingDown, QueryTimeout, or the turn's CcwrapError.
        """
        with self.submit(
            content, request_id=request_id, structured=structured, request=request
        ) as handle:
            while True:
                event = await handle.next_event()
                if isinstance(event, protocol.TurnResult):
                    return event


class QueryHandle:
    """A submitted query as its caller sees it: progress events, then one result or error.

    Closing it without an outcome abandons the query (the client went away): the worker then skips
    it, or interrupts its turn. Each handle is counted once: success, error or disconnect.
    """

    def __init__(
        self,
        query: Query,
        replies: trio.MemoryReceiveChannel[Reply],
        counters: Counters,
        activity: Activity,
        timeout_s: float,
    ) -> None:
        self._query = query
        self._replies = replies
        self._counters = counters
        self._activity = activity
        self._timeout_s = timeout_s
        self._outcome: str | None = None

    def __enter__(self) -> QueryHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<QueryHandle {self._query.request_id} outcome={self._outcome}>"

    @property
    def request_id(self) -> str:
        return self._query.request_id

    async def next_event(
        self,
        *,
        patience: float | None = None,
        check: Callable[[protocol.TurnResult], CcwrapError | None] | None = None,
    ) -> protocol.Progress | protocol.TurnResult | None:
        """The next event; None when ``patience`` seconds pass without one (keep-alive time).

        ``check`` vets the final result before it counts as a success (a stream whose text
        cannot be reconciled with it is an error). Raises QueryTimeout at the query's deadline,
        the worker's CcwrapError, or ``check``'s.
        """
        query = self._query
        wait_until = query.deadline
        if patience is not None:
            wait_until = min(wait_until, trio.current_time() + patience)
        item: Reply | None = None
        with trio.move_on_at(wait_until):
            item = await self._replies.receive()
        if item is None:
            if trio.current_time() < query.deadline:
                return None
            query.abandon("timeout")
            self._finish("error", "QueryTimeout")
            raise QueryTimeout(f"no answer within {self._timeout_s:g}s (CCWRAP_QUERY_TIMEOUT)")
        if isinstance(item, CcwrapError):
            self._finish("error", type(item).__name__)
            raise item
        if isinstance(item, protocol.TurnResult):
            if check is not None and (error := check(item)) is not None:
                self._finish("error", type(error).__name__)
                raise error
            usage = item.usage
            self._counters.prompt_tokens += usage.prompt_tokens
            self._counters.completion_tokens += usage.output_tokens
            self._counters.cached_tokens += usage.cache_read_input_tokens
            self._finish("success")
        return item

    def finish_early(self) -> None:
        """The caller has all it wants (a stop sequence, max_tokens): a success; end the turn."""
        self._finish("success")
        self._query.abandon("truncated")

    def close(self) -> None:
        if self._outcome is None:
            self._finish("disconnect")
            self._query.abandon("disconnect")
        self._replies.close()

    def _finish(self, outcome: str, error: str | None = None) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        query = self._query
        now = trio.current_time()
        self._activity.finished(query.request_id, outcome, error, now - query.arrived_at)
        if query.first_token_at is not None:
            self._activity.ttft.observe(query.first_token_at - query.arrived_at)
        counters = self._counters
        if outcome == "success":
            counters.successes += 1
        else:
            counters.total_errors += 1
            if outcome == "disconnect":
                counters.disconnects += 1
