#!/usr/bin/env python3
"""A bounded soak run against a local ccwrap-trio server.

    python scripts/soak.py --url http://127.0.0.1:8204 --requests 3000 --concurrency 4 \
        --max-seconds 600 [--json]

Sends chat completions (plain; streamed with ``include_usage``; a few bad requests that must get
400; a few ``json_object`` requests when a probe shows the backend can answer them) from
``--concurrency`` threads until ``--requests`` were sent or ``--max-seconds`` passed, whichever
comes first. Every request has a timeout (``--timeout``), so the run ends within
``--max-seconds + --timeout``. ``/health`` is read every ``--sample-every`` requests; the report
gives the statuses, p50/p99 latency, the server's RSS at start, after warm-up and at the end, the
least-squares slope of the server's RSS in MB per 1,000 requests (over the samples after the
warm-up), and whether the ``/health`` counters add up.

Only loopback servers are accepted (127.0.0.0/8, ::1, localhost). The RSS comes from
``/health`` (``memory.rss_mb``), which is refreshed every ``CCWRAP_MEMORY_SAMPLE_INTERVAL``
(5 s by default): for a meaningful slope, run the server with a short interval (0.5 s) or run
long enough for many samples. Exit status: 0 when every check passes, 1 otherwise, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from ccwrap_trio.memory import least_squares_slope

MODEL = "haiku"
# A json_object prompt a real model answers with that object. Against the echo fakes (the
# tests' fake CLI, the stand-in API) the echoed text also holds it: the sentence after it pushes
# the schema instruction past the 200 characters the fake CLI echoes.
STRUCTURED_PROMPT = (
    'Reply with exactly this JSON object: {"ok": true, "n": %d}. Do not add any other keys, '
    "text or explanation; this request is part of a soak test of the server."
)
BAD_REQUESTS: list[tuple[str, bytes]] = [
    ("malformed_json", b'{"model": "haiku", "messages": ['),
    ("empty_messages", json.dumps({"model": MODEL, "messages": []}).encode()),
    ("n_2", json.dumps({"model": MODEL, "n": 2,
                        "messages": [{"role": "user", "content": "hi"}]}).encode()),
    ("bad_response_format", json.dumps({
        "model": MODEL, "response_format": {"type": "xml"},
        "messages": [{"role": "user", "content": "hi"}]}).encode()),
]
# Per 50 requests: one bad request, one structured (when enabled), the rest alternate between
# plain and streamed.
BAD_SLOT, STRUCTURED_SLOT, CYCLE = 7, 23, 50


def check_loopback(url: str) -> str:
    """The URL without a trailing slash; ValueError unless it is http(s) on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"refusing {host!r}: only 127.0.0.0/8, ::1 or localhost") from None
        if not address.is_loopback:
            raise ValueError(f"refusing {host!r}: only 127.0.0.0/8, ::1 or localhost")
    return url.rstrip("/")


def kind_of(index: int, structured: bool) -> str:
    slot = index % CYCLE
    if slot == BAD_SLOT:
        return "bad"
    if slot == STRUCTURED_SLOT and structured:
        return "structured"
    return "stream" if index % 2 else "plain"


@dataclass
class Outcome:
    index: int
    kind: str
    status: int | None  # None: no HTTP answer (exception)
    seconds: float
    problem: str | None = None  # why the answer is not what was expected


def chat_body(index: int, kind: str) -> bytes:
    if kind == "bad":
        return BAD_REQUESTS[(index // CYCLE) % len(BAD_REQUESTS)][1]
    body: dict[str, Any] = {"model": MODEL}
    if kind == "structured":
        body["messages"] = [{"role": "user", "content": STRUCTURED_PROMPT % index}]
        body["response_format"] = {"type": "json_object"}
    else:
        body["messages"] = [{"role": "user", "content": f"soak request {index}: say ok"}]
    if kind == "stream":
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def check_completion(response: httpx.Response, kind: str) -> str | None:
    """None when a 200 answer has the expected shape, else what is wrong."""
    try:
        data = response.json()
        content = data["choices"][0]["message"]["content"]
        usage = data["usage"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"bad completion body: {exc!r}"
    if not isinstance(content, str) or not content:
        return "empty content"
    if not isinstance(usage, dict) or "total_tokens" not in usage:
        return "no usage"
    if kind == "structured":
        try:
            value = json.loads(content)
        except ValueError:
            return "structured content is not JSON"
        if not isinstance(value, dict):
            return "structured content is not an object"
    return None


def check_stream(lines: list[str]) -> str | None:
    """None when the SSE lines are a complete stream with a usage chunk, else what is wrong."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return "stream did not end with [DONE]"
    chunks = []
    for item in data[:-1]:
        try:
            chunks.append(json.loads(item))
        except ValueError:
            return "stream frame is not JSON"
    if any("error" in chunk for chunk in chunks):
        return f"stream carried an error: {chunks[-1].get('error')}"
    if not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks):
        return "stream had no finish_reason"
    if not (chunks and chunks[-1].get("usage") and not chunks[-1].get("choices")):
        return "stream had no usage chunk (include_usage)"
    return None


def send(client: httpx.Client, index: int, kind: str) -> Outcome:
    body = chat_body(index, kind)
    headers = {"Content-Type": "application/json", "X-Request-ID": f"soak-{index}"}
    started = time.monotonic()
    status: int | None = None
    problem: str | None = None
    try:
        if kind == "stream":
            with client.stream("POST", "/v1/chat/completions", content=body,
                               headers=headers) as response:
                status = response.status_code
                lines = list(response.iter_lines())
            if status == 200:
                problem = check_stream(lines)
        else:
            response = client.post("/v1/chat/completions", content=body, headers=headers)
            status = response.status_code
            if kind == "bad":
                if status == 400 and "error" not in response.json():
                    problem = "400 without an error object"
            elif status == 200:
                problem = check_completion(response, kind)
    except (httpx.HTTPError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    expected = 400 if kind == "bad" else 200
    if problem is None and status != expected:
        problem = f"status {status}, expected {expected}"
    return Outcome(index, kind, status, time.monotonic() - started, problem)


def get_health(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/health")
    health: dict[str, Any] = response.json()
    return health


@dataclass
class Sample:
    done: int  # requests completed when it was taken
    at: float  # seconds since the run started
    rss_mb: float
    health: dict[str, Any] = field(repr=False)


def slope_per_1000(samples: list[Sample]) -> float | None:
    """Least-squares slope of rss_mb over requests done, in MB per 1,000 requests."""
    slope = least_squares_slope((s.done, s.rss_mb) for s in samples)
    return None if slope is None else slope * 1000.0


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def in_flight(stats: dict[str, Any]) -> int:
    """``total_requests`` minus the outcomes: the requests counted but not yet answered.

    ``/health`` counts a request when it arrives and its outcome when it is answered, so the
    documented ``total_requests == successes + total_errors + rejected`` holds when nothing is in
    flight; under load the difference is the requests in flight, never negative.
    """
    return int(stats["total_requests"]) - (
        stats["successes"] + stats["total_errors"] + stats["rejected"])


def probe_structured(client: httpx.Client) -> tuple[bool, str]:
    """Whether the backend answers a json_object request (one request, not counted in the run)."""
    outcome = send(client, 0, "structured")
    if outcome.problem is None:
        return True, "probe answered 200 with a JSON object"
    return False, f"probe: {outcome.problem}"


def run(
    url: str,
    *,
    requests: int,
    concurrency: int,
    max_seconds: float,
    timeout: float,
    sample_every: int,
    warmup_fraction: float,
    structured: str,
) -> dict[str, Any]:
    """Run the soak; return the report (see ``format_table`` for what is in it)."""
    url = check_loopback(url)
    started = time.monotonic()
    deadline = started + max_seconds
    with httpx.Client(base_url=url, timeout=timeout) as client:
        first = get_health(client)
        structured_on, structured_why = {
            "on": (True, "--structured on"),
            "off": (False, "--structured off"),
        }.get(structured) or probe_structured(client)
        samples = [Sample(0, 0.0, first["memory"]["rss_mb"], first)]
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        next_index = 0
        done = 0
        stopped_by = "count"

        def take_sample(own: httpx.Client, done_now: int) -> None:
            try:
                health = get_health(own)
            except (httpx.HTTPError, ValueError):
                return
            with lock:
                samples.append(Sample(done_now, time.monotonic() - started,
                                      health["memory"]["rss_mb"], health))

        def worker() -> None:
            # One client (one keep-alive connection) per thread: nothing shared but the lock.
            with httpx.Client(base_url=url, timeout=timeout) as own:
                serve(own)

        def serve(own: httpx.Client) -> None:
            nonlocal next_index, done, stopped_by
            while True:
                with lock:
                    if next_index >= requests:
                        return
                    if time.monotonic() >= deadline:
                        stopped_by = "time"
                        return
                    index = next_index
                    next_index += 1
                outcome = send(own, index + 1, kind_of(index + 1, structured_on))
                with lock:
                    outcomes.append(outcome)
                    done += 1
                    done_now = done
                if done_now % sample_every == 0:
                    take_sample(own, done_now)

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="soak") as pool:
            futures = [pool.submit(worker) for _ in range(concurrency)]
            for future in futures:
                future.result()
        duration = time.monotonic() - started
        final_error: str | None = None
        try:
            last = get_health(client)
            samples.append(Sample(done, duration, last["memory"]["rss_mb"], last))
        except (httpx.HTTPError, ValueError) as exc:
            # A server that stopped answering: report what was seen, and fail.
            final_error = f"{type(exc).__name__}: {exc}"
            last = samples[-1].health

    warmup = int(len(outcomes) * warmup_fraction)
    after_warmup = [s for s in samples if s.done >= warmup and s.done > 0]
    statuses = Counter(str(o.status) if o.status is not None else "exception" for o in outcomes)
    kinds = Counter(o.kind for o in outcomes)
    problems = [o for o in outcomes if o.problem is not None]
    latencies = [o.seconds * 1000.0 for o in outcomes]
    # Requests that reach the supervisor: everything but the 400s (rejected while parsing).
    expected_counted = sum(1 for o in outcomes if o.kind != "bad") + (
        1 if structured not in ("on", "off") else 0)
    first_stats, last_stats = first["stats"], last["stats"]
    report: dict[str, Any] = {
        "url": url,
        "requests_planned": requests,
        "requests_sent": len(outcomes),
        "stopped_by": stopped_by,
        "duration_s": round(duration, 2),
        "requests_per_s": round(len(outcomes) / duration, 1) if duration else None,
        "concurrency": concurrency,
        "structured": structured_on,
        "structured_why": structured_why,
        "kinds": dict(sorted(kinds.items())),
        "statuses": dict(sorted(statuses.items())),
        "unexpected": len(problems),
        "problems": [
            {"index": o.index, "kind": o.kind, "status": o.status, "problem": o.problem}
            for o in problems[:20]
        ],
        "latency_ms": {
            "p50": _round(percentile(latencies, 50)),
            "p99": _round(percentile(latencies, 99)),
            "max": _round(max(latencies) if latencies else None),
        },
        "rss_mb": {
            "start": samples[0].rss_mb,
            "after_warmup": after_warmup[0].rss_mb if after_warmup else None,
            "end": samples[-1].rss_mb,
            "max": max(s.rss_mb for s in samples),
        },
        "warmup_requests": warmup,
        "samples": len(samples),
        "samples_after_warmup": len(after_warmup),
        "rss_slope_mb_per_1000": _round(slope_per_1000(after_warmup), 3),
        "health": {
            "status": last["status"],
            "final_error": final_error,  # /health did not answer after the run
            "counters_add_up": in_flight(last_stats) == 0,
            # Mid-run, at most the requests this run had in flight (if no other client).
            "in_flight_gap_max": max(in_flight(s.health["stats"]) for s in samples),
            "in_flight_gap_min": min(in_flight(s.health["stats"]) for s in samples),
            "total_requests_delta": last_stats["total_requests"] - first_stats["total_requests"],
            "expected_total_requests_delta": expected_counted,
            "successes_delta": last_stats["successes"] - first_stats["successes"],
            "errors_delta": last_stats["total_errors"] - first_stats["total_errors"],
            "rejected_delta": last_stats["rejected"] - first_stats["rejected"],
            "restart_count_delta": last_stats["restart_count"] - first_stats["restart_count"],
            "stats": last_stats,
            "memory": last["memory"],
        },
    }
    return report


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def failures(report: dict[str, Any], max_slope: float | None) -> list[str]:
    """The checks that failed (empty: the run passed)."""
    found = []
    if report["health"]["final_error"]:
        found.append(f"the server did not answer /health after the run "
                     f"({report['health']['final_error']}); figures are from the last sample")
    if report["unexpected"]:
        found.append(f"{report['unexpected']} requests did not get the expected answer")
    if not report["health"]["counters_add_up"]:
        found.append("/health counters do not add up "
                     "(total_requests != successes + total_errors + rejected)")
    if report["health"]["in_flight_gap_min"] < 0:
        found.append("/health counted more outcomes than requests in a sample")
    slope = report["rss_slope_mb_per_1000"]
    if max_slope is not None and (slope is None or slope > max_slope):
        found.append(f"RSS slope {slope} MB/1000 requests is over {max_slope}")
    return found


def format_table(report: dict[str, Any]) -> str:
    health = report["health"]
    rss = report["rss_mb"]
    rows = [
        ("url", report["url"]),
        ("requests sent", f"{report['requests_sent']} of {report['requests_planned']} "
                          f"(stopped by {report['stopped_by']})"),
        ("duration", f"{report['duration_s']} s ({report['requests_per_s']} req/s, "
                     f"concurrency {report['concurrency']})"),
        ("kinds", ", ".join(f"{k} {v}" for k, v in report["kinds"].items())),
        ("structured", f"{'on' if report['structured'] else 'off'} ({report['structured_why']})"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in report["statuses"].items())),
        ("unexpected answers", str(report["unexpected"])),
        ("latency p50 / p99 / max", " / ".join(
            f"{report['latency_ms'][k]} ms" for k in ("p50", "p99", "max"))),
        ("RSS start / warm / end", f"{rss['start']} / {rss['after_warmup']} / {rss['end']} MB "
                                   f"(max {rss['max']} MB)"),
        ("RSS slope", f"{report['rss_slope_mb_per_1000']} MB per 1,000 requests "
                      f"({report['samples_after_warmup']} samples after "
                      f"{report['warmup_requests']} warm-up requests)"),
        ("health status", health["status"] if not health["final_error"]
         else f"no answer at the end: {health['final_error']}"),
        ("counters add up", f"{health['counters_add_up']} at the end (mid-run, requests in "
                            f"flight: {health['in_flight_gap_min']} to "
                            f"{health['in_flight_gap_max']})"),
        ("total_requests delta", f"{health['total_requests_delta']} (expected "
                                 f"{health['expected_total_requests_delta']} if no other client)"),
        ("success / error / rejected", f"+{health['successes_delta']} / "
                                       f"+{health['errors_delta']} / +{health['rejected_delta']}"),
        ("restarts", f"+{health['restart_count_delta']} "
                     f"(total {health['stats']['restart_count']})"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    for problem in report["problems"]:
        lines.append(f"{'problem':<{width}}  #{problem['index']} {problem['kind']}: "
                     f"{problem['problem']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8204")
    parser.add_argument("--requests", type=int, default=3000, help="at most this many requests")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="stop sending after this long (default 600)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds one request may take (default 60)")
    parser.add_argument("--sample-every", type=int, default=25,
                        help="read /health every N requests (default 25)")
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="fraction of the requests before the slope is measured (default 0.1)")
    parser.add_argument("--structured", choices=("auto", "on", "off"), default="auto",
                        help="json_object requests: auto = if one probe request works")
    parser.add_argument("--max-slope", type=float, default=None,
                        help="fail when the RSS slope exceeds this many MB per 1,000 requests")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "sample_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_seconds <= 0 or args.timeout <= 0 or not 0 <= args.warmup < 1:
        parser.error("--max-seconds and --timeout must be > 0, --warmup in [0, 1)")
    try:
        check_loopback(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        report = run(
            args.url, requests=args.requests, concurrency=args.concurrency,
            max_seconds=args.max_seconds, timeout=args.timeout, sample_every=args.sample_every,
            warmup_fraction=args.warmup, structured=args.structured,
        )
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"soak: cannot read {args.url}/health: {exc!r}", file=sys.stderr)
        return 1
    failed = failures(report, args.max_slope)
    report["failures"] = failed
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        print("PASS" if not failed else "FAIL: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
