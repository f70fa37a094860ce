"""The memory sampler: server RSS/VMS and the CLI process tree's RSS, into a ring buffer.

The CLI child is what grows in long-lived sessions, so it is measured with its whole process tree,
not only the Python server.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil
import trio

log = logging.getLogger(__name__)

MB = 1024 * 1024
# 120 samples: ten minutes at the default 5 s interval, enough for a trend, small to keep.
WINDOW = 120

_self = psutil.Process(os.getpid())


@dataclass(frozen=True)
class MemorySample:
    at: float  # trio clock, seconds
    rss_mb: float
    vms_mb: float
    cli_rss_mb: float  # every CLI process tree together
    cli_rss_by_pid: dict[int, float] = field(default_factory=dict)  # each CLI's tree


def server_rss_mb() -> float:
    rss: int = _self.memory_info().rss
    return rss / MB


def process_tree_rss_mb(pids: Iterable[int]) -> float:
    """Resident memory of these processes and all their descendants, in MB."""
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in tree:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue  # exited between the listing and the reading
    return total / MB


def take_sample(cli_pids: Iterable[int], at: float) -> MemorySample:
    info = _self.memory_info()
    by_pid = {pid: process_tree_rss_mb([pid]) for pid in cli_pids}
    return MemorySample(at, info.rss / MB, info.vms / MB, sum(by_pid.values()), by_pid)


def least_squares_slope(points: Iterable[tuple[float, float]]) -> float | None:
    """The least-squares slope of y over x; None with fewer than 2 distinct x."""
    points = list(points)
    n = len(points)
    if n < 2:
        return None
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def trend_mb_per_min(samples: Iterable[MemorySample]) -> float:
    """Least-squares slope of server RSS over time, in MB per minute (0 with under 2 samples)."""
    slope = least_squares_slope((s.at, s.rss_mb) for s in samples)
    return 0.0 if slope is None else slope * 60.0


class MemorySampler:
    """Samples every ``interval_s`` seconds, without drift, into a ring buffer of ``WINDOW``."""

    def __init__(
        self, interval_s: float, cli_pids: Callable[[], list[int]], window: int = WINDOW
    ) -> None:
        self._interval_s = interval_s
        self._cli_pids = cli_pids
        self.samples: deque[MemorySample] = deque(maxlen=window)

    def __repr__(self) -> str:
        return f"<MemorySampler samples={len(self.samples)} interval={self._interval_s}s>"

    @property
    def latest(self) -> MemorySample:
        if self.samples:
            return self.samples[-1]
        try:
            return take_sample(self._cli_pids(), trio.current_time())
        except OSError:
            return MemorySample(trio.current_time(), 0.0, 0.0, 0.0)  # unknown (see _sample)

    @property
    def trend_mb_per_min(self) -> float:
        return trend_mb_per_min(self.samples)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        start = trio.current_time()
        await self._sample()
        task_status.started()
        tick = 1
        while True:
            await trio.sleep_until(start + tick * self._interval_s)
            tick += 1
            await self._sample()

    async def _sample(self) -> None:
        pids = self._cli_pids()
        at = trio.current_time()
        # /proc reads are quick but blocking; keep them off the event loop.
        try:
            sample = await trio.to_thread.run_sync(take_sample, pids, at)
        except OSError as exc:
            # Out of file descriptors (EMFILE: psutil raises a bare OSError), or /proc gone:
            # a missing sample, never a reason for the server to exit.
            log.warning("[WARN] Memory sample skipped: %s", exc)
            return
        self.samples.append(sample)
