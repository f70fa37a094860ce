"""Statistics: the counters, histograms and recent events that /health, /metrics and /status
render. Plain data; the supervisor updates it, ``Supervisor.statistics()`` snapshots it.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from .keys import KeyStatistics
from .limits import LimitsSnapshot

# Seconds: from a fast warm turn (~50 ms) to the default query timeout (300 s).
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# How many recent restarts and request outcomes are kept for the status page.
RECENT = 100
# Service times (a query taken to its session ready for the next) behind the queue's Retry-After.
SERVICE_SAMPLES = 50
# The service time assumed before any query finished: a warm turn is ~0.1 s, a real answer
# a few seconds.
DEFAULT_SERVICE_S = 1.0


@dataclass
class Counters:
    """Monotonic counts, shared by the front door and every worker."""

    total_requests: int = 0
    successes: int = 0
    total_errors: int = 0
    rejected: int = 0
    restart_count: int = 0
    proactive_restarts: int = 0
    hard_restarts: int = 0
    crash_restarts: int = 0
    timeout_restarts: int = 0
    memory_restarts: int = 0
    lifetime_restarts: int = 0
    age_restarts: int = 0
    recovery_attempts: int = 0
    timeouts: int = 0
    empty_retries: int = 0
    disconnects: int = 0
    schema_repairs: int = 0
    schema_failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0



@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics): counts[i] = observations <= bucket i."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.total, self.count)


@dataclass(frozen=True)
class RestartEvent:
    at: float  # unix time
    kind: str
    detail: str


@dataclass(frozen=True)
class RequestOutcome:
    at: float  # unix time the request ended
    request_id: str
    outcome: str  # success, error, disconnect, rejected
    error: str | None  # the error class name when not a success
    duration_s: float


@dataclass
class Activity:
    """Recent history, bounded: what the status page draws."""

    durations: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    restarts: deque[RestartEvent] = field(default_factory=lambda: deque(maxlen=RECENT))
    requests: deque[RequestOutcome] = field(default_factory=lambda: deque(maxlen=RECENT))
    service: deque[float] = field(default_factory=lambda: deque(maxlen=SERVICE_SAMPLES))

    def served(self, duration_s: float) -> None:
        """A worker finished a query and is ready for the next, ``duration_s`` after taking it."""
        self.service.append(duration_s)

    def median_service_s(self) -> float:
        return statistics.median(self.service) if self.service else DEFAULT_SERVICE_S

    def restarted(self, kind: str, detail: str) -> None:
        self.restarts.append(RestartEvent(time.time(), kind, detail))

    def finished(
        self, request_id: str, outcome: str, error: str | None, duration_s: float
    ) -> None:
        self.requests.append(RequestOutcome(time.time(), request_id, outcome, error, duration_s))
        self.durations.observe(duration_s)


@dataclass(frozen=True)
class WorkerStatistics:
    status: str
    connected: bool
    busy: bool
    pid: int | None
    tokens: int
    turns: int
    uptime_s: float
    model: str
    cli_version: str
    requests: int = 0  # served by this session's CLI since it was spawned
    max_requests: int = 0  # when its CLI is recycled (CCWRAP_SESSION_MAX_REQUESTS, staggered)
    idle: bool = False  # waiting for a query: free to take one now (not in /clear or a restart)


@dataclass(frozen=True)
class Statistics:
    """A frozen snapshot of the supervisor: /health renders it and computes nothing."""

    status: str
    invoker_connected: bool
    active_queries: int
    queued: int
    tokens: int
    turns: int
    token_limit: int
    turn_limit: int
    counters: Counters
    sessions: tuple[WorkerStatistics, ...]
    durations: Histogram
    ttft: Histogram
    restarts: tuple[RestartEvent, ...]
    requests: tuple[RequestOutcome, ...]
    limits: LimitsSnapshot | None = None  # the API's usage windows, the login's health
    keys: tuple[KeyStatistics, ...] = ()  # usage per client key name

    @property
    def token_pct(self) -> float:
        return round(100.0 * self.tokens / self.token_limit, 1)

    @property
    def turn_pct(self) -> float:
        return round(100.0 * self.turns / self.turn_limit, 1)
