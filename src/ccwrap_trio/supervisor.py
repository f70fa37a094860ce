"""The restart supervisor: the query channel, and the workers that serve on CLI sessions.

``Supervisor.submit`` is the front door: it puts a ``Query`` (carrying its own reply channel) into
a bounded memory channel and returns a ``QueryHandle`` to read the reply from. ``SessionWorker``s
(``CCWRAP_SESSIONS`` of them) are the only receivers: each serves on one leased CLI session at a
time and, between two queries, decides whether that session must be replaced (thresholds, memory,
crash, undrained interrupt). Restart is a loop, never recursion; recovery state is plain data.
What happens to one query on a session is ``request_policy.RequestRunner``'s.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from . import protocol
from .config import Config
from .core import Content, CoreRequest
from .errors import (
    CcwrapError,
    QueryTimeout,
    QueueFull,
    SessionCrashed,
    SessionUnavailable,
    ShuttingDown,
    SpawnFailed,
)
from .keys import KeyAccounts
from .limits import UpstreamState
from .memory import process_tree_rss_mb, server_rss_mb
from .query import Query, QueryHandle, Reply
from .request_policy import RequestRunner, Restart, clear_within, reply
from .session import SessionFactory, SessionLike
from .spawner import Spawner
from .stats import Activity, Counters, Statistics, WorkerStatistics
from .structured import StructuredOutput

# Re-exported: the front door's types, for the front ends and the tests.
__all__ = ["Query", "QueryHandle", "SessionFactory", "SessionLike", "SessionWorker", "Supervisor"]

log = logging.getLogger(__name__)

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
        upstream: UpstreamState | None = None,
        *,
        first_max_requests: int | None = None,
    ) -> None:
        self._config = config
        self._spawner = spawner
        self._receive = receive
        self._counters = counters
        self._activity = activity
        # How big a CLI process tree is, in MB (psutil; tests give a fake).
        self._rss_probe = rss_probe or _cli_rss_mb
        self._rss_checked_at = -math.inf
        self._runner = RequestRunner(config, counters, upstream)  # one request's policy
        # Requests the current session's CLI may serve. The pool's first sessions get staggered
        # budgets (Supervisor), so that they do not all reach the limit at once.
        self._max_requests = first_max_requests or config.session_max_requests
        self.status = "starting"
        self.session: SessionLike | None = None
        # The pool's workers (Supervisor): a query for another model goes to an idle one on it.
        self.peers: list[SessionWorker] = [self]
        self.waiting = False  # idle, waiting for a query: it may be handed one
        self._handed: deque[Query] = deque()  # queries handed over by peers, served first
        self._handed_wakeup = trio.Event()

    def __repr__(self) -> str:
        return f"<SessionWorker {self.status} session={self.session!r}>"

    @property
    def active(self) -> Query | None:
        """The query being run, if any."""
        return self._runner.active

    @property
    def held(self) -> int:
        """Queries handed to this worker by its peers and not yet taken."""
        return len(self._handed)

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
            requests=session.requests if session is not None else 0,
            max_requests=self._max_requests,
            idle=self.waiting,
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
                        reply(pending, SessionUnavailable("no CLI session: recovery failed"))
                        pending = None
                    self._fail_queued()
                continue
            failures = 0
            session = self.session = lease.session
            if restart is not None:
                self._max_requests = self._config.session_max_requests
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
        elif restart.kind == "lifetime":
            counters.lifetime_restarts += 1
        elif restart.kind == "age":
            counters.age_restarts += 1
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
        while self._handed:
            reply(self._handed.popleft(), SessionUnavailable("no CLI session: recovery failed"))
        while True:
            try:
                query = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            reply(query, SessionUnavailable("no CLI session: recovery failed"))

    async def _serve(
        self, session: SessionLike, pending: Query | None
    ) -> tuple[Restart, Query | None]:
        """Answer queries on ``session`` until it must be replaced; say why."""
        needs_clear = False
        served_at = 0.0  # when the query whose /clear is due was taken
        while True:
            # The /clear first: it empties the conversation, so only an accumulating one
            # (isolation none) or the process's own lifetime can call for a new CLI.
            if needs_clear:
                try:
                    await clear_within(session, self._config.clear_timeout_s)
                except SessionCrashed as exc:
                    return Restart("crash", str(exc)), pending
                except QueryTimeout as exc:
                    return Restart("timeout", str(exc)), pending
                needs_clear = False
                self._activity.served(trio.current_time() - served_at)
            if (restart := await self._restart_needed(session)) is not None:
                return restart, pending
            query: Query | None
            if pending is not None:
                query, pending = pending, None
            elif self._handed:
                query = self._handed.popleft()
            else:
                # Idle sessions are looked at again every sample interval (memory grows idle too).
                # A query received as that deadline expires is kept in ``got``, never dropped.
                got: list[Query] = []
                with trio.move_on_after(self._config.memory_sample_interval_s):
                    await self._next_query(session, got)
                if got and self._hand_off(session, got[0]):
                    continue
                if got:
                    query = got[0]
                elif session.exited.is_set():
                    return Restart("crash", f"exited while idle: {session.describe_exit()}"), None
                else:
                    continue
            if not session.alive:
                # It died before this query reached it: respawn and serve the query there.
                return Restart("crash", session.describe_exit()), query
            taken_at = trio.current_time()
            self._spawner.request_started()
            try:
                ran = await self._runner.run(session, query)
            finally:
                self._spawner.request_ended()
            needs_clear = ran and self._config.isolation == "clear"
            if ran:
                # The query's service time runs until the session is ready for the next one.
                served_at = taken_at
                if not needs_clear:
                    self._activity.served(trio.current_time() - served_at)
            if not session.alive:
                kind = "timeout" if query.abandoned == "timeout" else "crash"
                lost, self._runner.lost = self._runner.lost, None  # served by the next session
                return Restart(kind, session.broken or session.describe_exit()), lost

    async def _restart_needed(self, session: SessionLike) -> Restart | None:
        config = self._config
        if self._runner.recycle is not None:
            restart, self._runner.recycle = self._runner.recycle, None
            return restart
        turn_pct = round(100.0 * session.turns / config.turn_limit, 1)
        token_pct = round(100.0 * session.tokens / config.token_limit, 1)
        name, pct = ("turn_pct", turn_pct) if turn_pct >= token_pct else ("token_pct", token_pct)
        if pct >= 100.0:
            return Restart("hard", f"{name}={pct:.1f}")
        if pct >= config.proactive_pct:
            log.info("[PROACTIVE] Inline restart: %s=%.1f", name, pct, extra={name: pct})
            return Restart("proactive", f"{name}={pct:.1f}")
        # The process's lifetime, its own policy: a session that has served nothing is as small
        # and fresh as a new one would be, so it is never recycled.
        if not session.requests:
            return None
        if session.requests >= self._max_requests:
            return Restart("lifetime", f"requests={session.requests}")
        now = trio.current_time()
        if (age_s := now - session.started_at) >= config.session_max_age_s:
            return Restart("age", f"age={age_s:.0f}s")
        # Long-lived CLIs leak; measured at most once a sample interval, between requests.
        if now - self._rss_checked_at >= config.memory_sample_interval_s:
            self._rss_checked_at = now
            rss_mb = await self._probe_rss(session.pid)
            if rss_mb > config.cli_rss_limit_mb:
                return Restart("memory", f"cli_rss_mb={rss_mb:.1f} > {config.cli_rss_limit_mb}")
        return None

    async def _next_query(self, session: SessionLike, got: list[Query]) -> None:
        """Wait for the next query and put it in ``got``; return early if the session dies or a
        peer hands this worker a query (it is in ``_handed`` then).

        The query lands in ``got`` with no checkpoint after ``receive``: a cancellation at any
        later point (the idle tick, the nursery's exit) cannot take it away from the caller.
        """
        if self._handed_wakeup.is_set():
            self._handed_wakeup = trio.Event()
        async with trio.open_nursery() as nursery:

            async def cancel_on(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_on, session.exited)
            nursery.start_soon(cancel_on, self._handed_wakeup)
            self.waiting = True
            try:
                got.append(await self._receive.receive())
            finally:
                self.waiting = False
                nursery.cancel_scope.cancel()

    def _hand_off(self, session: SessionLike, query: Query) -> bool:
        """Give ``query`` to an idle peer already on its model, instead of switching this
        session's model; False if there is none (or no switch is needed).

        No checkpoint from the check to the handover: the peer is still idle when it gets it.
        """
        model = query.request.model if query.request is not None else ""
        if not model or session.on_model(model):
            return False
        for peer in self.peers:
            other = peer.session
            if (peer is not self and peer.waiting and peer.status == "healthy"
                    and other is not None and other.alive and other.on_model(model)):
                peer._handed.append(query)
                peer.waiting = False  # it has work now: the next query looks elsewhere
                peer._handed_wakeup.set()
                log.debug("query %s handed to the session on %s", query.request_id, model)
                return True
        return False

    async def _probe_rss(self, pid: int) -> float:
        # Out of file descriptors, psutil raises a plain OSError (EMFILE): unknown, not fatal.
        try:
            return await self._rss_probe(pid)
        except OSError as exc:
            log.warning("[WARN] CLI memory not measured: %s", exc)
            return 0.0

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
        # The API's usage windows and the login's health; usage and limits per client key.
        self.upstream = UpstreamState()
        self.keys = KeyAccounts(config.key_limits)
        self.spawner = Spawner(
            open_session, standby=config.standby, spares=config.standby_spares
        )
        budget = config.session_max_requests
        self.workers = [
            SessionWorker(
                config, self.spawner, self._receive, self.counters, self.activity, rss_probe,
                self.upstream,
                # Worker k's first CLI retires after (1 - k/2N) of the budget: spread out.
                first_max_requests=max(1, budget - index * budget // (2 * sessions)),
            )
            for index in range(sessions)
        ]
        for worker in self.workers:
            worker.peers = self.workers
        self._shutting_down = False
        # Where the queue's Retry-After promises the next freed slot (see _queue_retry_after).
        self._promised_at = -math.inf

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
            queued=self._send.statistics().current_buffer_used + sum(
                worker.held for worker in self.workers),
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
            limits=self.upstream.snapshot(),
            keys=self.keys.statistics(trio.current_time()),
        )

    def _slot_wait_s(self) -> float:
        """How long one queue slot takes to free: the recent median service time per session."""
        return self.activity.median_service_s() / len(self.workers)

    def _queue_retry_after(self, now: float) -> float:
        """Retry-After for a full queue: when a slot should be free for this client.

        The backlog (waiting and running requests) times the recent median service time over
        the sessions, at least 1 s. Requests already told to come back count in the backlog,
        so a burst of rejections is spread over the time the queue takes to drain instead of
        returning all at once to a queue that is full again.
        """
        backlog = self._send.statistics().current_buffer_used + sum(
            worker.active is not None for worker in self.workers)
        slot_s = self._slot_wait_s()
        drained_at = now + backlog * slot_s
        self._promised_at = max(self._promised_at, drained_at) + slot_s
        return max(1.0, self._promised_at - now)

    def submit(
        self,
        content: Content,
        *,
        request_id: str | None = None,
        stream: bool = False,
        structured: StructuredOutput | None = None,
        request: CoreRequest | None = None,
        key: str | None = None,
    ) -> QueryHandle:
        """Put a query in the queue at once, or raise QueueFull / SessionUnavailable /
        UsageLimitReached / KeyQuotaExceeded.

        ``key`` is the client key's name (never the key): usage and limits are counted per
        name. The caller reads its events from the returned handle and closes it (``with``);
        the request counts as exactly one success, error or rejection, in the totals and for
        its key.
        """
        counters = self.counters
        counters.total_requests += 1
        request_id = request_id or uuid.uuid4().hex
        account = self.keys.account(key) if key is not None else None
        try:
            if self._shutting_down:
                raise ShuttingDown("the server is shutting down")
            if all(worker.status == "offline" for worker in self.workers):
                raise SessionUnavailable(
                    "no CLI session: recovery failed; retrying in the background"
                )
            if (blocked := self.upstream.blocking()) is not None:
                raise blocked  # no CLI turn: it would fail the same way until the reset
            now = trio.current_time()
            if account is not None:
                account.admit(now, slot_wait_s=self._slot_wait_s())
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
                raise QueueFull(
                    f"{self._config.max_queue} requests are already waiting",
                    retry_after_s=self._queue_retry_after(now),
                ) from None
        except CcwrapError as exc:
            counters.rejected += 1
            if account is not None:
                account.rejected += 1
            self.activity.finished(request_id, "rejected", type(exc).__name__, 0.0)
            raise
        if account is not None:
            account.in_flight += 1
        return QueryHandle(
            query, reply_receive, counters, self.activity, self._config.query_timeout_s,
            account,
        )

    async def query(
        self,
        content: Content,
        *,
        request_id: str | None = None,
        structured: StructuredOutput | None = None,
        request: CoreRequest | None = None,
        key: str | None = None,
    ) -> protocol.TurnResult:
        """Answer one request through a session (no streaming): its final result.

        Raises QueueFull, SessionUnavailable/ShuttingDown, QueryTimeout, or the turn's CcwrapError.
        """
        with self.submit(
            content, request_id=request_id, structured=structured, request=request, key=key
        ) as handle:
            while True:
                event = await handle.next_event()
                if isinstance(event, protocol.TurnResult):
                    return event


