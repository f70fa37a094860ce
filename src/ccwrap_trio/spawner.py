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


class Spawner:
    def __init__(self, open_session: SessionFactory, *, standby: bool) -> None:
        self._open_session = open_session
        self._standby_enabled = standby
        self._nursery: trio.Nursery | None = None
        self._standby: Lease | None = None
        self._warming: trio.Event | None = None  # set when the standby being warmed is done
        self._held: set[Lease] = set()

    def __repr__(self) -> str:
        return f"<Spawner held={len(self._held)} standby={self._standby!r}>"

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
        return self._standby is not None and self._standby.session.alive

    def pids(self) -> list[int]:
        """Every live CLI held, the standby included."""
        return [lease.session.pid for lease in self._held if lease.session.alive]

    def standby_pid(self) -> int | None:
        return self._standby.session.pid if self.standby_ready and self._standby else None

    async def acquire(self) -> Lease:
        """A warm session: the standby if one is ready, else a new one. Raises SpawnFailed.

        A standby still warming is waited for rather than spawned beside: it is ahead.
        """
        if self._standby is None and self._warming is not None:
            await self._warming.wait()
        lease = self._take_standby()
        if lease is None:
            lease = await self._spawn()
        self.warm_standby()
        return lease

    def warm_standby(self) -> None:
        """Start warming a standby in the background, unless one is ready or on its way."""
        if self._standby_enabled and self._standby is None and self._warming is None:
            self._warming = trio.Event()
            assert self._nursery is not None
            self._nursery.start_soon(self._warm, self._warming)

    def _take_standby(self) -> Lease | None:
        lease, self._standby = self._standby, None
        if lease is not None and not lease.session.alive:
            log.warning("[WARN] Standby session died while waiting; spawning instead")
            lease.release()
            return None
        return lease

    async def _warm(self, done: trio.Event) -> None:
        try:
            self._standby = await self._spawn()
            log.info("standby session ready pid=%d", self._standby.session.pid)
        except SpawnFailed as exc:
            log.warning("[WARN] Standby spawn failed: %s", exc)
        finally:
            self._warming = None
            done.set()

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
