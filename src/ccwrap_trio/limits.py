"""What the Anthropic API says about its own limits, as the CLI reports it, and what it means
for the next request.

A Claude subscription has usage windows (5-hour, weekly): each turn's ``rate_limit_event``
reports them (PROTOCOL.md, "Usage limits and 429s"). Once a window is ``rejected``, every turn
until its reset would fail the same way, so ``UpstreamState.blocking`` answers queued and new
requests at once, without a CLI turn; the first request after the reset tries again. A failed
turn's API status becomes an error that keeps its meaning (``classify``): a usage limit or an API
key's 429 is a 429, an overloaded API a 503, a refused login a 502 that says to log in again.

Pure policy and plain state: no I/O but the log. Epoch seconds come from ``clock``, so tests
can move time.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import protocol
from .errors import (
    CliError,
    ContextLengthExceeded,
    UpstreamAuthFailed,
    UpstreamOverloaded,
    UpstreamRateLimited,
    UsageLimitReached,
)

log = logging.getLogger(__name__)

# The CLI's window names, as people say them.
WINDOW_NAMES = {
    "five_hour": "5-hour",
    "seven_day": "weekly",
    "seven_day_opus": "weekly Opus",
    "seven_day_sonnet": "weekly Sonnet",
    "seven_day_overage_included": "weekly",
    "overage": "extra-usage",
}
# Retry-After when the API gave no hint: a 429's and a 529's (the CLI's first backoff is ~0.6 s).
DEFAULT_RATE_LIMIT_RETRY_S = 5.0
DEFAULT_OVERLOAD_RETRY_S = 5.0
# A usage limit the CLI reported without a reset time: ask clients to come back in a while.
UNKNOWN_RESET_RETRY_S = 60.0
# "retry after 12 seconds", "try again in 12s": the API's hint when it is only in the text.
_RETRY_TEXT = re.compile(r"(?:retry|try again)[^0-9]{0,20}(\d+(?:\.\d+)?)\s*(?:s\b|sec)", re.I)


@dataclass(frozen=True)
class Window:
    """One usage window as last reported: status, utilization (0..1), reset (epoch s)."""

    name: str
    status: str
    utilization: float | None
    resets_at: int | None
    reset_known: bool = True  # False: the CLI gave no reset time; resets_at is our guess

    def rejected(self, now: float) -> bool:
        """Used up now: rejected and its reset still ahead (or not known)."""
        return self.status == "rejected" and (self.resets_at is None or now < self.resets_at)


@dataclass(frozen=True)
class LimitsSnapshot:
    """The windows, whether requests are refused now, and a refused login, for /health."""

    windows: tuple[Window, ...]
    limited: bool
    limited_until: int | None
    login_error: str | None
    now: float


def window_name(window: str) -> str:
    return WINDOW_NAMES.get(window, window.replace("_", " "))


class UpstreamState:
    """The API's limits and the login's health, shared by the front door and every worker."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, Window] = {}
        self._warned: set[tuple[str, int | None]] = set()  # one [WARN] per window and reset
        # Set when the API refused the login (401/403); cleared by the next turn that works.
        self.login_error: str | None = None

    def __repr__(self) -> str:
        return f"<UpstreamState windows={list(self._windows.values())!r}>"

    def observe(self, result: protocol.TurnResult) -> None:
        """Take in what a finished turn says about the limits and the login."""
        for event in result.rate_limits:
            self._observe(event)
        if not result.is_error:
            self.login_error = None

    def _observe(self, event: protocol.RateLimit) -> None:
        windows = list(event.windows) or [protocol.RateLimitWindow(
            event.window, event.status, event.utilization, event.resets_at)]
        for reported in windows:
            resets_at = reported.resets_at if reported.resets_at is not None else (
                event.resets_at if reported.name == event.window else None)
            window = Window(reported.name, reported.status, reported.utilization, resets_at)
            if window.status == "rejected" and resets_at is None:
                # Never blocked for good on a missing time: a request tries again in a while.
                window = Window(window.name, window.status, window.utilization,
                                math.ceil(self._clock() + UNKNOWN_RESET_RETRY_S), False)
            before = self._windows.get(window.name)
            self._windows[window.name] = window
            key = (window.name, window.resets_at)
            if window.status == "allowed_warning" and key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "[WARN] Usage limit near: the %s window is at %s; it resets at %s",
                    window_name(window.name), _percent(window.utilization),
                    _when(window.resets_at),
                    extra={"window": window.name, "utilization": window.utilization,
                           "resets_at": window.resets_at},
                )
            elif window.status == "rejected" and (before is None or before != window):
                log.error(
                    "[LIMIT] Usage limit reached: the %s window is used up until %s; requests "
                    "are answered 429 until then",
                    window_name(window.name), _when(window.resets_at),
                    extra={"window": window.name, "resets_at": window.resets_at},
                )

    def blocking(self) -> UsageLimitReached | None:
        """The 429 every request gets now, or None when a request may try the API."""
        now = self._clock()
        used_up = [w for w in self._windows.values() if w.rejected(now)]
        if not used_up:
            return None
        # Service comes back when the last used-up window resets.
        window = max(used_up, key=lambda w: math.inf if w.resets_at is None else w.resets_at)
        return usage_limit_error(window.name, window.resets_at if window.reset_known else None,
                                 now, retry_after_s=None if window.reset_known or
                                 window.resets_at is None else window.resets_at - now)

    def snapshot(self) -> LimitsSnapshot:
        now = self._clock()
        windows = tuple(self._windows.values())
        used_up = [w for w in windows if w.rejected(now)]
        until = max((w.resets_at for w in used_up if w.resets_at is not None), default=None)
        return LimitsSnapshot(windows, bool(used_up), until, self.login_error, now)

    def classify(self, result: protocol.TurnResult) -> CliError | UsageLimitReached:
        """The error a failed turn means, its API status kept (429, 529, 401/403...)."""
        message = result.text or f"CLI turn failed ({result.subtype})"
        status = result.api_error_status
        if "prompt is too long" in message.lower():
            return ContextLengthExceeded(message, api_error_status=status)
        if result.api_error == "usage_limit_reached":
            blocked = self.blocking()
            if blocked is not None:
                return blocked
            # Reported without a rate_limit_event: the window is unknown.
            window = next((e.window for e in result.rate_limits), "unknown")
            return usage_limit_error(window, None, self._clock())
        if status == 429:
            return UpstreamRateLimited(
                f"The Anthropic API is rate limiting this server's API key: {message}",
                retry_after_s=_retry_hint(result, DEFAULT_RATE_LIMIT_RETRY_S),
            )
        if status == 529:
            return UpstreamOverloaded(
                f"The Anthropic API is overloaded: {message}",
                retry_after_s=_retry_hint(result, DEFAULT_OVERLOAD_RETRY_S),
            )
        if status in (401, 403):
            self.login_error = (
                f"the Anthropic API refused the CLI's login ({status}): log in again on the "
                "server (`claude /login`, or renew CLAUDE_CODE_OAUTH_TOKEN / ANTHROPIC_API_KEY)"
            )
            log.error("[ERROR] Login refused: %s", message)
            return UpstreamAuthFailed(
                f"The server's Claude login was refused ({status}); the operator must log in "
                f"again. {message}",
                api_error_status=status,
            )
        return CliError(message, api_error_status=status)


def usage_limit_error(
    window: str, resets_at: int | None, now: float, *, retry_after_s: float | None = None
) -> UsageLimitReached:
    """The 429 for a used-up window: names the window and its reset time."""
    name = window_name(window)
    if resets_at is None:
        wait_s = max(1.0, math.ceil(retry_after_s or UNKNOWN_RESET_RETRY_S))
        return UsageLimitReached(
            f"The Claude subscription's {name} usage limit is reached; the CLI did not say "
            f"when it resets. Retry in {wait_s:g}s.",
            window=window, resets_at=None, retry_after_s=wait_s,
        )
    wait_s = max(1.0, math.ceil(resets_at - now))
    return UsageLimitReached(
        f"The Claude subscription's {name} usage limit is reached; it resets at "
        f"{_when(resets_at)} (in {wait_s:g}s). Retry after that.",
        window=window, resets_at=resets_at, retry_after_s=wait_s,
    )


def _retry_hint(result: protocol.TurnResult, default_s: float) -> float:
    """The API's retry-after as the CLI passed it on (its api_retry delay), else the text's."""
    if result.retry_delay_ms:
        # The CLI adds a little jitter to the API's retry-after (1 s -> 1154 ms): whole seconds.
        return float(max(1, round(result.retry_delay_ms / 1000)))
    if (match := _RETRY_TEXT.search(result.text)) is not None:
        return max(1.0, math.ceil(float(match[1])))
    return default_s


def _percent(utilization: float | None) -> str:
    return "an unknown utilization" if utilization is None else f"{utilization:.0%}"


def _when(epoch: int | None) -> str:
    if epoch is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
