"""The spawner: owns every CLI process, and keeps a warm standby when asked to.

Each session lives in a *holder* task of the spawner's nursery, inside its ``open_session``
block, from spawn to reaping: the process belongs to that one task. Workers *lease* sessions:
``acquire()`` hands over the standby when one is warm (no request waits for a spawn), or spawns
one; ``Lease.release()``/``close()`` ends the holder, which terminates and reaps the child.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .errors import SpawnFailed

if TYPE_CHECKING:
    from .session import SessionFactory, SessionLike

log = logging.getLogger(__name__)


class Lease:
    """One held session, until released."""

    def __init__(self, session: SessionLike) -> None:
        self.session = session
        self._retire = trio.Event()
        self._closed = trio.Event()

    def __repr__(self) -> str:
        return f"<Lease {self.session!r}{' released' if self._retire.is_set() else ''}>"

    def release(self) -> None:
        """End the session in the background (its holder terminates and reaps it)."""
        self._retire.set()

    async def close(self) -> None:
        """End the session and wait until its process is reaped."""
        self._retire.set()
        await self._closed.wait()


# A spare is warmed while no request runs, where possible: its spawn (~0.5 s of CPU on 2 cores)
# then takes nothing from a request. It waits for a quiet moment at most this long.
QUIET_WAIT_S = 2.0


class Spawner:
    def __init__(
        self, open_session: SessionFactory, *, standby: bool, spares: int = 1
    ) -> None:
        self._open_session = open_session
        self._standby_enabled = standby
        self._spares_wanted = spares if standby else 0
        self._nursery: trio.Nursery | None = None
        self._spares: list[Lease] = []  # warm, waiting to be acquired
        self._warming = 0  # spares being spawned
        self._changed = trio.Event()  # set (and replaced) when a spare is ready or failed
        self._busy = 0  # requests running on held sessions
        self._waiters = 0  # acquirers waiting for a spare: it is needed now
        self._stirred = trio.Event()  # set (and replaced) when either count changes
        self._held: set[Lease] = set()

    def __repr__(self) -> str:
        spares, warming = len(self._spares), self._warming
        return f"<Spawner held={len(self._held)} spares={spares} warming={warming}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold sessions until cancelled; cancelling ends and reaps every one of them."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def standby_enabled(self) -> bool:
        return self._standby_enabled

    @property
    def standby_ready(self) -> bool:
        return any(lease.session.alive for lease in self._spares)

    def pids(self) -> list[int]:
        """Every live CLI held, the spares included."""
        return [lease.session.pid for lease in self._held if lease.session.alive]

    def standby_pids(self) -> list[int]:
        return [lease.session.pid for lease in self._spares if lease.session.alive]

    def standby_pid(self) -> int | None:
        return next(iter(self.standby_pids()), None)

    def request_started(self) -> None:
        """A request runs on a held session: spares wait (a while) before spawning."""
        self._busy += 1
        self._stir()

    def request_ended(self) -> None:
        self._busy -= 1
        self._stir()

    def _stir(self) -> None:
        self._stirred.set()
        self._stirred = trio.Event()

    async def acquire(self) -> Lease:
        """A warm session: a spare if one is ready, else a new one. Raises SpawnFailed.

        A spare still warming is waited for rather than spawned beside: it is ahead.
        """
        while (lease := self._take_spare()) is None and self._warming:
            self._waiters += 1
            self._stir()
            try:
                await self._changed.wait()
            finally:
                self._waiters -= 1
        if lease is None:
            lease = await self._spawn()
        self.warm_standby()
        return lease

    def warm_standby(self) -> None:
        """Start warming spares in the background, up to ``CCWRAP_STANDBY_SPARES``."""
        assert self._nursery is not None
        while len(self._spares) + self._warming < self._spares_wanted:
            self._warming += 1
            self._nursery.start_soon(self._warm)

    def _take_spare(self) -> Lease | None:
        while self._spares:
            lease = self._spares.pop(0)
            if lease.session.alive:
                return lease
            log.warning("[WARN] Standby session died while waiting; spawning instead")
            lease.release()
        return None

    async def _warm(self) -> None:
        try:
            with trio.move_on_after(QUIET_WAIT_S):
                while self._busy and not self._waiters:
                    await self._stirred.wait()
            lease = await self._spawn()
            self._spares.append(lease)
            log.info("standby session ready pid=%d", lease.session.pid)
        except SpawnFailed as exc:
            log.warning("[WARN] Standby spawn failed: %s", exc)
        finally:
            self._warming -= 1
            self._changed.set()
            self._changed = trio.Event()

    async def _spawn(self) -> Lease:
        assert self._nursery is not None, "Spawner.run must be running"
        lease: Lease = await self._nursery.start(self._hold)
        return lease

    async def _hold(self, *, task_status: trio.TaskStatus[Lease]) -> None:
        lease: Lease | None = None
        try:
            async with self._open_session() as session:
                lease = Lease(session)
                self._held.add(lease)
                task_status.started(lease)
                await lease._retire.wait()
        finally:
            if lease is not None:
                self._held.discard(lease)
                lease._closed.set()
