"""limits.py and the lines behind it: the captures' rate_limit_event and api_retry lines parse,
a rejected window blocks until its reset, a warning logs once, failed turns keep their meaning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ccwrap_trio import protocol
from ccwrap_trio.errors import (
    CliError,
    UpstreamAuthFailed,
    UpstreamOverloaded,
    UpstreamRateLimited,
    UsageLimitReached,
)
from ccwrap_trio.limits import UpstreamState

CAPTURES = Path("/work/shared/claude-cli")
RESETS_AT = 1796165465  # the rejected capture's resetsAt


def capture(name: str) -> list[protocol.Event]:
    path = CAPTURES / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return [protocol.parse_line(json.dumps(json.loads(line)["msg"]))
            for line in path.read_text().splitlines() if json.loads(line)["dir"] == "out"]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def turn(events: list[protocol.Event]) -> protocol.TurnResult:
    """The turn's result as the session hands it over: with its rate limits and retry delay."""
    result = next(e for e in events if isinstance(e, protocol.TurnResult))
    delays = [e.retry_delay_ms for e in events if isinstance(e, protocol.ApiRetry)]
    return protocol.TurnResult(
        **{**vars(result), "rate_limits": tuple(
            e for e in events if isinstance(e, protocol.RateLimit)),
           "retry_delay_ms": delays[-1] if delays else None})


def test_rejected_capture_parses() -> None:
    events = capture("usage-limit-rejected-2.1.332.jsonl")
    limit = next(e for e in events if isinstance(e, protocol.RateLimit))
    assert limit == protocol.RateLimit(
        status="rejected", window="five_hour", resets_at=RESETS_AT, utilization=None,
        windows=(protocol.RateLimitWindow("five_hour", "rejected", 1.0, RESETS_AT),),
    )
    result = turn(events)
    assert result.is_error and result.api_error == "usage_limit_reached"
    assert result.api_error_status == 429


def test_rejected_window_blocks_until_its_reset() -> None:
    clock = Clock(RESETS_AT - 100.4)
    state = UpstreamState(clock)
    result = turn(capture("usage-limit-rejected-2.1.332.jsonl"))
    state.observe(result)
    error = state.classify(result)
    assert isinstance(error, UsageLimitReached)
    assert error.window == "five_hour" and error.resets_at == RESETS_AT
    assert error.retry_after_s == 101
    assert "5-hour" in str(error) and "2026-12-01 22:51:05 UTC" in str(error)
    blocked = state.blocking()
    assert blocked is not None and blocked.retry_after_s == 101
    assert state.snapshot().limited and state.snapshot().limited_until == RESETS_AT
    clock.now = RESETS_AT - 0.5
    assert state.blocking() is not None and state.blocking().retry_after_s == 1  # type: ignore[union-attr]
    clock.now = RESETS_AT  # the first request after the reset tries again
    assert state.blocking() is None
    assert not state.snapshot().limited


def test_warning_logs_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    state = UpstreamState(Clock(RESETS_AT - 3600))
    result = turn(capture("usage-limit-warning-2.1.332.jsonl"))
    assert not result.is_error
    for _ in range(3):
        state.observe(result)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("[WARN] Usage limit near: the 5-hour window is at 90%")
    assert state.blocking() is None
    (window,) = state.snapshot().windows
    assert (window.status, window.utilization) == ("allowed_warning", 0.9)


def test_api_key_429_keeps_the_apis_retry_after() -> None:
    state = UpstreamState()
    result = turn(capture("api-key-429-2.1.332.jsonl"))
    error = state.classify(result)
    assert isinstance(error, UpstreamRateLimited)
    assert error.retry_after_s == 20  # retry_delay_ms 20052: the API's retry-after of 20 s
    assert state.blocking() is None  # an API key's 429 blocks nothing ahead of time


def test_retry_after_from_the_text_when_the_cli_did_not_retry() -> None:
    result = protocol.TurnResult(
        text="API Error: 429 rate limited, retry after 7 seconds", is_error=True,
        subtype="success", usage=protocol.Usage(), api_error_status=429)
    error = UpstreamState().classify(result)
    assert isinstance(error, UpstreamRateLimited) and error.retry_after_s == 7


@pytest.mark.parametrize(("status", "kind"), [
    (529, UpstreamOverloaded), (401, UpstreamAuthFailed), (403, UpstreamAuthFailed),
    (500, CliError),
])
def test_statuses_keep_their_meaning(status: int, kind: type[CliError]) -> None:
    state = UpstreamState()
    failed = protocol.TurnResult(text=f"API Error: {status} x", is_error=True, subtype="success",
                                 usage=protocol.Usage(), api_error_status=status,
                                 retry_delay_ms=1133)
    error = state.classify(failed)
    assert type(error) is kind
    if kind is UpstreamOverloaded:
        assert error.retry_after_s == 1
    assert (state.login_error is not None) == (kind is UpstreamAuthFailed)
    state.observe(protocol.TurnResult(text="ok", is_error=False, subtype="success",
                                      usage=protocol.Usage()))
    assert state.login_error is None


@pytest.mark.parametrize("line", [
    '{"type":"rate_limit_event"}',
    '{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1e400}}',
    '{"type":"rate_limit_event","rate_limit_info":{"resetsAt":NaN,"unifiedWindows":'
    '{"five_hour":{"utilization":"x","resetsAt":-1},"seven_day":[]}}}',
    '{"type":"system","subtype":"api_retry","retry_delay_ms":-5,"error_status":"x"}',
])
def test_odd_limit_lines_parse_without_raising(line: str) -> None:
    event = protocol.parse_line(line)
    assert isinstance(event, protocol.RateLimit | protocol.ApiRetry)
    if isinstance(event, protocol.RateLimit):
        state = UpstreamState(Clock(0.0))
        state.observe(protocol.TurnResult("", False, "success", protocol.Usage(),
                                          rate_limits=(event,)))
        # A rejection with no usable reset time blocks, with a Retry-After of its own.
        blocked = state.blocking()
        assert blocked is None or blocked.retry_after_s >= 1


def test_a_rejection_without_a_reset_time_blocks_only_a_while() -> None:
    clock = Clock(1000.0)
    state = UpstreamState(clock)
    event = protocol.parse_line('{"type":"rate_limit_event","rate_limit_info":'
                                '{"status":"rejected","rateLimitType":"seven_day"}}')
    assert isinstance(event, protocol.RateLimit)
    state.observe(protocol.TurnResult("", True, "success", protocol.Usage(),
                                      rate_limits=(event,)))
    blocked = state.blocking()
    assert blocked is not None and blocked.resets_at is None and blocked.retry_after_s == 60
    assert "did not say when it resets" in str(blocked) and "weekly" in str(blocked)
    clock.now += 60
    assert state.blocking() is None
