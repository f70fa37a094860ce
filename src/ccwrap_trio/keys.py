"""Client API keys: names, the key ring the app authenticates against, usage and limits per key.

``CCWRAP_API_KEYS`` (and the lines of ``CCWRAP_API_KEYS_FILE``) hold ``name:key`` entries or
plain keys; a plain key is named ``key-<8 hex digits of its SHA-256>``, so the name identifies
it in logs, metrics and /health without revealing it. Keys themselves are never logged, echoed
or exposed: ``ApiKey``'s repr leaves the secret out, and only names leave this module.

``KeyAccounts`` counts, per key name, requests by outcome (the same outcomes as the totals, so
they add up) and tokens, and enforces ``CCWRAP_KEY_LIMITS``: at most N requests in flight, at
most M tokens per rolling window, answered with ``KeyQuotaExceeded`` (429) and a Retry-After.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import signal
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .errors import ConfigError, KeyQuotaExceeded
from .protocol import Usage

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 8
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_TOKEN_WINDOW_S = 3600.0
ANY_KEY = "*"  # a CCWRAP_KEY_LIMITS entry for every key without one of its own


@dataclass(frozen=True)
class ApiKey:
    """One client key: its name (shown everywhere) and the secret (shown nowhere)."""

    name: str
    secret: str = field(repr=False)


def derived_name(secret: str) -> str:
    """The name of a key given without one: from a hash, never from the key's characters."""
    return f"key-{hashlib.sha256(secret.encode()).hexdigest()[:8]}"


def parse_keys(entries: Iterable[str], *, min_chars: int = MIN_KEY_CHARS) -> tuple[ApiKey, ...]:
    """``name:key`` entries or plain keys; raises ValueError that never quotes a secret."""
    keys: list[ApiKey] = []
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, secret = entry.partition(":")
        if not sep or not NAME.match(name):
            # No name (or something that is not one: a key may hold ':' itself).
            name, secret = derived_name(entry), entry
        if len(secret) < min_chars:
            raise ValueError(f"the key named {name!r} is shorter than {min_chars} characters")
        if any(key.name == name for key in keys):
            raise ValueError(f"two keys are named {name!r}")
        keys.append(ApiKey(name, secret))
    return tuple(keys)


def read_key_file(path: Path) -> tuple[ApiKey, ...]:
    """The keys of a key file: one entry per line, ``#`` comments. Raises ConfigError."""
    try:
        return parse_keys(path.read_text().splitlines())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"CCWRAP_API_KEYS_FILE {str(path)!r}: {exc}") from None


class KeyRing:
    """The keys clients may send: those of ``CCWRAP_API_KEYS`` and of the key file.

    The file is read at start and again on SIGHUP (``run``); the new set replaces the old in
    one assignment, so requests in flight are untouched and none is dropped.
    """

    def __init__(self, entries: Iterable[str] = (), file: Path | None = None) -> None:
        # CCWRAP_API_KEYS was checked by Config.load; a Config built in code is taken as it is.
        self._fixed = parse_keys(entries, min_chars=1)
        self._file = file
        self._keys = self._fixed + (read_key_file(file) if file is not None else ())

    def __repr__(self) -> str:
        return f"<KeyRing names={self.names()!r}>"

    @property
    def enabled(self) -> bool:
        """Whether clients must send a key (a configured key file counts, even empty)."""
        return bool(self._keys) or self._file is not None

    def names(self) -> list[str]:
        return [key.name for key in self._keys]

    def match(self, given: str) -> ApiKey | None:
        """The key ``given`` is, or None; compares with every key, always, in constant time."""
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(given.encode(), key.secret.encode()):
                found = key
        return found

    def appears_in(self, text: str) -> bool:
        """Whether ``text`` holds a key, or is a piece of one (8 characters or more)."""
        given = text.encode()
        return any(
            key.secret.encode() in given or (len(given) >= 8 and given in key.secret.encode())
            for key in self._keys
        )

    def reload(self) -> None:
        """Read the key file again; on an error keep the keys there are (and say so)."""
        if self._file is None:
            return
        try:
            loaded = read_key_file(self._file)
        except ConfigError as exc:
            log.error("[ERROR] Keys not reloaded, the old ones stay: %s", exc)
            return
        self._keys = self._fixed + loaded
        log.info("[KEYS] Reloaded %d keys: %s", len(self._keys), ", ".join(self.names()))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload the key file on every SIGHUP (only with a key file); ready once listening."""
        if self._file is None:
            task_status.started()
            return
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                self.reload()


@dataclass(frozen=True)
class KeyLimit:
    """One key's limits: requests in flight, tokens (prompt + completion) per rolling window."""

    max_in_flight: int | None = None
    max_tokens: int | None = None
    window_s: float = DEFAULT_TOKEN_WINDOW_S


def parse_key_limits(text: str) -> dict[str, KeyLimit]:
    """``name=in_flight:2,tokens:200000/3600; *=in_flight:8`` -> limits by key name."""
    limits: dict[str, KeyLimit] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, spec = entry.partition("=")
        name = name.strip()
        if not sep or not (name == ANY_KEY or NAME.match(name)):
            raise ValueError(entry)
        in_flight: int | None = None
        tokens: int | None = None
        window_s = DEFAULT_TOKEN_WINDOW_S
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, value = item.partition(":")
            if kind.strip() == "in_flight" and value.strip().isdigit() and int(value) > 0:
                in_flight = int(value)
            elif kind.strip() == "tokens":
                amount, _, window = value.partition("/")
                if not amount.strip().isdigit() or int(amount) <= 0:
                    raise ValueError(entry)
                tokens = int(amount)
                if window.strip():
                    window_s = float(window)
                    if not math.isfinite(window_s) or window_s <= 0:
                        raise ValueError(entry)
            else:
                raise ValueError(entry)
        limits[name] = KeyLimit(in_flight, tokens, window_s)
    return limits


@dataclass(frozen=True)
class KeyStatistics:
    """One key's usage, for /health, /metrics and the status page (its name, never the key)."""

    name: str
    successes: int
    errors: int
    rejected: int
    in_flight: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    window_tokens: int  # tokens within its rolling window (when it has a token limit)
    limit: KeyLimit | None


@dataclass
class KeyAccount:
    """The live usage of one key. Times are trio's clock."""

    name: str
    limit: KeyLimit | None
    successes: int = 0
    errors: int = 0
    rejected: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    spent: deque[tuple[float, int]] = field(default_factory=deque)  # (when, tokens)

    def admit(self, now: float, *, slot_wait_s: float) -> None:
        """Raise KeyQuotaExceeded if one more request would break this key's limits."""
        limit = self.limit
        if limit is None:
            return
        if limit.max_in_flight is not None and self.in_flight >= limit.max_in_flight:
            raise KeyQuotaExceeded(
                f"The API key {self.name!r} already has {self.in_flight} requests in flight, "
                f"its limit (CCWRAP_KEY_LIMITS).",
                key=self.name, limit="in_flight", retry_after_s=max(1.0, math.ceil(slot_wait_s)),
            )
        if limit.max_tokens is not None:
            used = self.window_tokens(now)
            if used >= limit.max_tokens:
                # Free again once enough of the oldest use leaves the window.
                over, wait_s = used - limit.max_tokens, limit.window_s
                for at, tokens in self.spent:
                    over -= tokens
                    if over < 0:
                        wait_s = at + limit.window_s - now
                        break
                raise KeyQuotaExceeded(
                    f"The API key {self.name!r} used {used} tokens in the last "
                    f"{limit.window_s:g}s, its limit is {limit.max_tokens} (CCWRAP_KEY_LIMITS).",
                    key=self.name, limit="tokens", retry_after_s=max(1.0, math.ceil(wait_s)),
                )

    def window_tokens(self, now: float) -> int:
        window_s = self.limit.window_s if self.limit is not None else DEFAULT_TOKEN_WINDOW_S
        while self.spent and self.spent[0][0] <= now - window_s:
            self.spent.popleft()
        return sum(tokens for _, tokens in self.spent)

    def used(self, usage: Usage, now: float) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.output_tokens
        self.cached_tokens += usage.cache_read_input_tokens
        if self.limit is not None and self.limit.max_tokens is not None:
            self.spent.append((now, usage.prompt_tokens + usage.output_tokens))

    def finished(self, outcome: str) -> None:
        """The request admitted earlier ended: ``success``, ``error`` or ``disconnect``."""
        self.in_flight -= 1
        if outcome == "success":
            self.successes += 1
        else:
            self.errors += 1  # as in the totals: a disconnect is an error

    def statistics(self, now: float) -> KeyStatistics:
        return KeyStatistics(
            self.name, self.successes, self.errors, self.rejected, self.in_flight,
            self.prompt_tokens, self.completion_tokens, self.cached_tokens,
            self.window_tokens(now), self.limit,
        )


class KeyAccounts:
    """Every key's account, by name; kept across key reloads (names are what is counted)."""

    def __init__(self, limits: Mapping[str, KeyLimit] | None = None) -> None:
        self._limits = dict(limits or {})
        self._accounts: dict[str, KeyAccount] = {}

    def account(self, name: str) -> KeyAccount:
        account = self._accounts.get(name)
        if account is None:
            limit = self._limits.get(name, self._limits.get(ANY_KEY))
            account = self._accounts[name] = KeyAccount(name, limit)
        return account

    def statistics(self, now: float) -> tuple[KeyStatistics, ...]:
        return tuple(account.statistics(now) for _, account in sorted(self._accounts.items()))
