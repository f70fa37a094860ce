"""Prometheus metrics: a collector that renders the same snapshot /health renders.

Nothing here counts on its own except ``ccwrap_http_requests_total`` (HTTP routes and statuses
are the app's, not the supervisor's). Everything else is read from ``Supervisor.statistics()``
and the memory sampler at scrape time, so /metrics and /health can never disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .config import Config
from .memory import MB, MemorySampler
from .stats import Histogram, Statistics
from .supervisor import Supervisor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RESTART_REASONS = ("proactive", "hard", "memory", "crash", "timeout", "lifetime", "age")
# API route -> the endpoint label of ccwrap_endpoint_requests_total (one name per dialect).
ENDPOINTS = {
    "/v1/chat/completions": "chat_completions", "/chat/completions": "chat_completions",
    "/v1/responses": "responses", "/responses": "responses",
    "/v1/messages": "messages",
}


class HttpRequests:
    """Responses by route template and status, counted by the app's after-request hook."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        # Every endpoint is listed from the start: a dashboard sees 0, not a missing series.
        self.endpoints: Counter[str] = Counter(dict.fromkeys(ENDPOINTS.values(), 0))

    def count(self, route: str, status: int) -> None:
        self.counts[(route, str(status))] += 1

    def count_endpoint(self, endpoint: str) -> None:
        self.endpoints[endpoint] += 1


class SnapshotCollector(Collector):
    def __init__(
        self,
        config: Config,
        supervisor: Supervisor,
        sampler: MemorySampler,
        http: HttpRequests,
    ) -> None:
        self._config = config
        self._supervisor = supervisor
        self._sampler = sampler
        self._http = http

    def collect(self) -> Iterator[Metric]:
        stats = self._supervisor.statistics()
        counters = stats.counters
        memory = self._sampler.latest

        http = CounterMetricFamily(
            "ccwrap_http_requests", "HTTP responses by route and status.",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(self._http.counts.items()):
            http.add_metric([route, status], count)
        yield http

        endpoints = CounterMetricFamily(
            "ccwrap_endpoint_requests", "API requests by endpoint (dialect), any status.",
            labels=["endpoint"],
        )
        for endpoint, count in sorted(self._http.endpoints.items()):
            endpoints.add_metric([endpoint], count)
        yield endpoints

        outcomes = CounterMetricFamily(
            "ccwrap_requests", "Completion requests by outcome.", labels=["outcome"]
        )
        outcomes.add_metric(["success"], counters.successes)
        outcomes.add_metric(["error"], counters.total_errors)
        outcomes.add_metric(["rejected"], counters.rejected)
        yield outcomes

        yield _histogram(
            "ccwrap_request_duration_seconds",
            "Time from a completion request's arrival to its end.", stats.durations,
        )
        yield _histogram(
            "ccwrap_time_to_first_token_seconds",
            "Time from a completion request's arrival to the first text from the CLI.",
            stats.ttft,
        )

        restarts = CounterMetricFamily(
            "ccwrap_restarts", "CLI session restarts by reason.", labels=["reason"]
        )
        for reason in RESTART_REASONS:
            restarts.add_metric([reason], getattr(counters, f"{reason}_restarts"))
        yield restarts

        for name, help_text, value in (
            ("ccwrap_recovery_attempts", "Spawn attempts after a failed spawn.",
             counters.recovery_attempts),
            ("ccwrap_timeouts", "Requests that hit the query timeout.", counters.timeouts),
            ("ccwrap_disconnects", "Requests whose client went away first.",
             counters.disconnects),
            ("ccwrap_empty_retries", "Empty answers retried.", counters.empty_retries),
            ("ccwrap_schema_repairs", "Repair turns for structured outputs.",
             counters.schema_repairs),
            ("ccwrap_schema_failures", "Structured outputs that never validated.",
             counters.schema_failures),
        ):
            yield CounterMetricFamily(name, help_text, value=value)

        tokens = CounterMetricFamily(
            "ccwrap_tokens", "Tokens of answered requests, as the CLI reported them.",
            labels=["kind"],
        )
        tokens.add_metric(["prompt"], counters.prompt_tokens)
        tokens.add_metric(["completion"], counters.completion_tokens)
        tokens.add_metric(["cached"], counters.cached_tokens)
        yield tokens

        gauges: tuple[tuple[str, str, float], ...] = (
            ("ccwrap_queue_depth", "Requests waiting for a session.", stats.queued),
            ("ccwrap_active_queries", "Requests running on a session.", stats.active_queries),
            ("ccwrap_context_tokens", "Context tokens of the fullest session.", stats.tokens),
            ("ccwrap_context_turns", "Turns of the fullest session.", stats.turns),
            ("ccwrap_context_token_limit", "CCWRAP_TOKEN_LIMIT.", stats.token_limit),
            ("ccwrap_context_turn_limit", "CCWRAP_TURN_LIMIT.", stats.turn_limit),
            ("ccwrap_queue_limit", "CCWRAP_MAX_QUEUE.", self._config.max_queue),
            ("ccwrap_session_up", "1 while a CLI session is connected.",
             int(stats.invoker_connected)),
            ("ccwrap_sessions", "Configured CLI sessions (CCWRAP_SESSIONS).",
             len(stats.sessions)),
            ("ccwrap_server_resident_memory_bytes", "Resident memory of the server.",
             memory.rss_mb * MB),
            ("ccwrap_server_virtual_memory_bytes", "Virtual memory of the server.",
             memory.vms_mb * MB),
            ("ccwrap_cli_resident_memory_bytes", "Resident memory of the CLI process trees.",
             memory.cli_rss_mb * MB),
            ("ccwrap_memory_trend_bytes_per_second",
             "Least-squares slope of the server's resident memory over the sampler window.",
             self._sampler.trend_mb_per_min * MB / 60),
        )
        for name, help_text, reading in gauges:
            yield GaugeMetricFamily(name, help_text, value=reading)

        # Each session's CLI lifetime: what it served, when it retires, how old it is.
        lifetime = (
            ("ccwrap_session_requests", "Requests served by the session's current CLI.",
             "requests"),
            ("ccwrap_session_max_requests",
             "Requests after which the session's CLI is recycled (CCWRAP_SESSION_MAX_REQUESTS).",
             "max_requests"),
            ("ccwrap_session_age_seconds", "Seconds since the session's current CLI was spawned.",
             "uptime_s"),
        )
        for name, help_text, field in lifetime:
            family = GaugeMetricFamily(name, help_text, labels=["session"])
            for index, worker in enumerate(stats.sessions):
                family.add_metric([str(index)], getattr(worker, field))
            yield family
        yield GaugeMetricFamily(
            "ccwrap_session_max_age_seconds", "CCWRAP_SESSION_MAX_AGE.",
            value=self._config.session_max_age_s,
        )
        yield from _limits(stats)
        yield from _keys(stats)

        yield InfoMetricFamily("ccwrap", "ccwrap-trio version.", value={"version": __version__})


def _limits(stats: Statistics) -> Iterator[Metric]:
    """The subscription's usage windows (rate_limit_event) and the login's health."""
    limits = stats.limits
    utilization = GaugeMetricFamily(
        "ccwrap_usage_limit_utilization",
        "Utilization (0-1) of each subscription usage window, as the API last reported it.",
        labels=["window"],
    )
    resets = GaugeMetricFamily(
        "ccwrap_usage_limit_resets_at_seconds",
        "Unix time each subscription usage window resets.", labels=["window"],
    )
    for window in limits.windows if limits is not None else ():
        if window.utilization is not None:
            utilization.add_metric([window.name], window.utilization)
        if window.resets_at is not None:
            resets.add_metric([window.name], window.resets_at)
    yield utilization
    yield resets
    limited = limits is not None and limits.limited
    yield GaugeMetricFamily(
        "ccwrap_usage_limited", "1 while a used-up usage window answers every request 429.",
        value=int(limited),
    )
    yield GaugeMetricFamily(
        "ccwrap_upstream_login_ok", "0 after the API refused the CLI's login (401/403).",
        value=int(limits is None or limits.login_error is None),
    )


def _keys(stats: Statistics) -> Iterator[Metric]:
    """Requests and tokens per client key name (label ``key``); they add up to the totals."""
    requests = CounterMetricFamily(
        "ccwrap_key_requests", "Completion requests by client key and outcome.",
        labels=["key", "outcome"],
    )
    tokens = CounterMetricFamily(
        "ccwrap_key_tokens", "Tokens of answered requests by client key.", labels=["key", "kind"],
    )
    in_flight = GaugeMetricFamily(
        "ccwrap_key_in_flight", "Requests in flight by client key.", labels=["key"],
    )
    for key in stats.keys:
        requests.add_metric([key.name, "success"], key.successes)
        requests.add_metric([key.name, "error"], key.errors)
        requests.add_metric([key.name, "rejected"], key.rejected)
        tokens.add_metric([key.name, "prompt"], key.prompt_tokens)
        tokens.add_metric([key.name, "completion"], key.completion_tokens)
        tokens.add_metric([key.name, "cached"], key.cached_tokens)
        in_flight.add_metric([key.name], key.in_flight)
    yield requests
    yield tokens
    yield in_flight


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(f"{bound:g}", count) for bound, count in zip(
        histogram.buckets, histogram.counts, strict=True)]
    buckets.append(("+Inf", histogram.count))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=histogram.total)


def registry_for(
    config: Config, supervisor: Supervisor, sampler: MemorySampler, http: HttpRequests
) -> CollectorRegistry:
    """A registry of this server's own (no process-global default registry: tests run many)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(config, supervisor, sampler, http))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
