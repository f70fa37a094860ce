"""Parsing a client's request body off the event loop, so that no body can stall it.

Parsing is client-controlled work: ``json.loads`` of a 10 MB body of small objects holds the GIL
for a stretch of 0.1-0.5 s, and validating it takes seconds of Python. Small bodies go to a
thread (the GIL is handed back every few milliseconds); big ones to a worker process
(trio-parallel), which costs the event loop only the unpickling of the parsed request. A
cancelled parse (the client went away) kills its worker.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import trio
import trio_parallel

log = logging.getLogger(__name__)

T = TypeVar("T")

# Under this, json.loads and the checks take a few milliseconds at most: a thread is cheaper
# than the round trip to a worker process.
PROCESS_THRESHOLD_BYTES = 256 * 1024


async def parse_body(parse: Callable[..., T], raw: str | bytes, **kwargs: Any) -> T:
    """``parse(raw, **kwargs)`` in a thread or, for a big body, a worker process.

    ``parse`` is a module-level function (it is pickled); its CcwrapErrors come back as raised.
    """
    call = functools.partial(parse, raw, **kwargs)
    if len(raw) < PROCESS_THRESHOLD_BYTES:
        return await trio.to_thread.run_sync(call)
    try:
        return cast(T, await trio_parallel.run_sync(call, kill_on_cancel=True))
    except trio_parallel.BrokenWorkerError as exc:
        # The worker died (out of memory, killed): parse here rather than fail the request.
        log.warning("[WARN] Body parser process failed (%s); parsing in a thread", exc)
        return await trio.to_thread.run_sync(call)
