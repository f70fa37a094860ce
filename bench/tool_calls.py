#!/usr/bin/env python3
"""p50 of a tool-call request against a plain one, over the real CLI and the instant stand-in.

    CCWRAP_CLAUDE_BIN=.tools/claude/node_modules/.bin/claude \
        .venv/bin/python bench/tool_calls.py [BLOCKS]

Four kinds of request, in blocks of BLOCK consecutive requests per kind, the blocks alternating
between kinds (what is measured depends on the previous request; load drift hits all alike), the
first request of each block not counted: plain; a tool call with an unchanged tool list; a tool
call whose tool list differs from the previous request's (a tools/list_changed push each time); a
plain request whose model differs from the previous one's (a set_model each time).
Target: a tool call within 1.3x of a plain request when the tool list is unchanged.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from ccwrap_trio.config import Config, child_environment
from ccwrap_trio.server import serve
from ccwrap_trio.standin import Standin, StandinConfig


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


KINDS: dict[str, Callable[[int], dict[str, Any]]] = {
    "plain": lambda i: {"messages": user(f"plain {i}")},
    "tool call, same tools": lambda i: {
        "tools": [tool("a")], "messages": user(f"[standin:call=a] {i}")},
    "tool call, new tool list": lambda i: {
        "tools": [tool("b" if i % 2 else "c")], "messages": user(f"[standin:call=b,c] {i}")},
    "model switch": lambda i: {"model": "opus" if i % 2 else "sonnet", "messages": user(f"m {i}")},
}


BLOCK = 10


async def main(blocks: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="ccwrap-bench-tools-"))
    async with trio.open_nursery() as nursery:
        standin: Standin = await nursery.start(Standin(StandinConfig()).serve)
        environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(home),
                   "ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": "sk-bench"}
        config = Config(port=0, standby=False, turn_limit=100_000, token_limit=10**9,
                        claude_bin=os.environ.get("CCWRAP_CLAUDE_BIN", "claude"),
                        forward_api_key=True,
                        child_env=child_environment(environ, forward_api_key=True))
        shutdown = trio.Event()
        urls = await nursery.start(lambda task_status: serve(
            config, shutdown=shutdown, task_status=task_status))
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        async with httpx.AsyncClient(base_url=urls[0], timeout=60) as http:
            for _ in range(blocks):
                for kind, body in KINDS.items():
                    for i in range(BLOCK + 1):  # the first one changes state: not counted
                        start = time.perf_counter()
                        response = await http.post("/v1/chat/completions", json=body(i))
                        elapsed = time.perf_counter() - start
                        response.raise_for_status()
                        if i:
                            times[kind].append(elapsed)
        shutdown.set()
        nursery.cancel_scope.cancel()
    plain = statistics.median(times["plain"])
    for kind, samples in times.items():
        p50 = statistics.median(samples)
        print(f"{kind:26s} p50 {p50 * 1000:6.1f} ms  {p50 / plain:4.2f}x plain  (n={len(samples)})")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 3)
