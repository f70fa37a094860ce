"""An in-memory session for policy tests on trio's mock clock (no processes, no pipes).

The prompt picks the behaviour: ``hang`` (interruptible), ``hang-hard`` (the interrupt is never
answered), ``crash``, ``empty``, ``empty-once``, ``error:MESSAGE``, ``tokens=N``, ``slow=S``;
anything else is answered ``echo: <prompt>`` after ``TURN_S`` seconds. ``hang-clear`` in a prompt
makes the session's next ``/clear`` never answer (a frozen CLI). ``usage-limit=S`` answers as the
CLI does when the 5-hour window is used up, resetting S wall-clock seconds from now.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ccwrap_trio import protocol
from ccwrap_trio.core import Content
from ccwrap_trio.errors import SessionCrashed, SpawnFailed
from ccwrap_trio.session import OnProgress

TURN_S = 0.05
_pids = itertools.count(1000)


class FakeSession:
    def __init__(self) -> None:
        self.pid = next(_pids)
        self.turns = 0
        self.tokens = 0
        self.requests = 0
        self.model = "claude-haiku-5-5"
        self.cli_version = "fake"
        self.started_at = trio.current_time()
        self.exited = trio.Event()
        self.broken: str | None = None
        self.prompts: list[str] = []
        self.clears = 0
        self.interrupts = 0
        self.model_switches = 0
        self.hang_clear = False
        self._hard_hang = False
        self._seen: set[str] = set()

    @property
    def alive(self) -> bool:
        return self.broken is None and not self.exited.is_set()

    def describe_exit(self) -> str:
        return "fake exited"

    def die(self) -> None:
        self.exited.set()

    async def ask(
        self, content: Content, on_progress: OnProgress | None = None
    ) -> protocol.TurnResult:
        assert self.alive, "a turn was sent to a dead or broken session"
        prompt = content if isinstance(content, str) else str(content)
        self.prompts.append(prompt)
        self._hard_hang = "hang-hard" in prompt
        self.hang_clear = self.hang_clear or "hang-clear" in prompt
        try:
            if "hang" in prompt.replace("hang-clear", ""):
                await trio.sleep_forever()
            if match := re.search(r"slow=([\d.]+)", prompt):
                await trio.sleep(float(match.group(1)))
            await trio.sleep(TURN_S)
        except BaseException:
            self.broken = "cancelled mid-turn"  # as the real session: out of step until drained
            raise
        if "crash" in prompt:
            self.die()
            raise SessionCrashed("fake crashed mid-turn")
        self.turns += 1
        text = f"echo: {prompt}"
        if ("empty-once" in prompt and prompt not in self._seen) or "empty" in prompt.replace(
            "empty-once", ""
        ):
            text = ""
        self._seen.add(prompt)
        if prompt.startswith("error:"):
            return protocol.TurnResult(prompt[6:], True, "success", protocol.Usage())
        if match := re.search(r"usage-limit=([\d.]+)", prompt):
            resets_at = int(time.time() + float(match.group(1)))
            window = protocol.RateLimitWindow("five_hour", "rejected", 1.0, resets_at)
            return protocol.TurnResult(
                "You've hit your 5-hour limit", True, "success", protocol.Usage(),
                api_error_status=429, api_error="usage_limit_reached",
                rate_limits=(protocol.RateLimit("rejected", "five_hour", resets_at, None,
                                                (window,)),))
        match = re.search(r"tokens=(\d+)", prompt)
        tokens = int(match.group(1)) if match else 10
        self.tokens = tokens
        if on_progress is not None:
            await on_progress(protocol.TextDelta(text))
        return protocol.TurnResult(text, False, "success", protocol.Usage(input_tokens=tokens))

    async def clear(self) -> None:
        assert self.alive
        if self.hang_clear:
            try:
                await trio.sleep_forever()
            except BaseException:
                self.broken = "cancelled mid-clear"
                raise
        self.clears += 1
        self.tokens = 0
        self.turns = 0

    async def use_tools(self, tools: tuple[Any, ...]) -> None:
        self.tools_set = tools

    async def use_model(self, model: str) -> None:
        if model != self.model:
            self.model_switches += 1
        self.model = model

    def on_model(self, model: str) -> bool:
        return model == self.model

    async def interrupt(self) -> bool:
        self.interrupts += 1
        if self._hard_hang:
            await trio.sleep_forever()
        self.broken = None
        return True


class FakeSessions:
    """The factory a worker gets: it counts spawns and can be told to fail them."""

    def __init__(self, spawn_s: float = 0.5) -> None:
        self.spawn_s = spawn_s
        self.fail_spawns: bool | int = False  # True: always; an int: that many more times
        self.sessions: list[FakeSession] = []
        self.spawn_times: list[float] = []
        self.closed: list[FakeSession] = []
        self.on_spawn: Callable[[FakeSession], None] | None = None

    @property
    def current(self) -> FakeSession:
        return self.sessions[-1]

    def _should_fail(self) -> bool:
        if self.fail_spawns is True:
            return True
        if isinstance(self.fail_spawns, int) and self.fail_spawns > 0:
            self.fail_spawns -= 1
            return True
        return False

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[FakeSession]:
        self.spawn_times.append(trio.current_time())
        await trio.sleep(self.spawn_s)
        if self._should_fail():
            raise SpawnFailed("fake spawn failure")
        session = FakeSession()
        self.sessions.append(session)
        try:
            yield session
        finally:
            session.die()
            self.closed.append(session)


def fake_rss(rss: dict[int, float]) -> Callable[[int], Awaitable[float]]:
    """A CLI memory probe reading ``rss`` by pid (200 MB when absent), without a thread: threads
    are invisible to trio's mock clock."""

    async def probe(pid: int) -> float:
        return rss.get(pid, 200.0)

    return probe
