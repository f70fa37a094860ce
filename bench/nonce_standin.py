#!/usr/bin/env python3
"""The stand-in API (``ccwrap_trio.standin``) with one addition for the isolation check:
every answer also says which *other* request nonces the model was shown.

The peers benchmark (bench/peers.py) puts a fresh nonce (``nonce-<8 hex>``) in each request.
A system that isolates requests sends the API a conversation holding only that request's
nonce; one that keeps a conversation across requests sends earlier prompts too. This stand-in
answers ``echo: <last user text> | saw N other nonces: a b c`` where N counts the distinct nonces
anywhere in the conversation (messages, not the system prompt) other than the last user text's,
so the client sees a leak in the answer itself, as a real model could repeat it.
Everything else (latency, directives, SSE framing) is the stand-in's own.

    python bench/nonce_standin.py --port 0 [--latency S]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from typing import Any

import trio

from ccwrap_trio import standin

NONCE_RE = re.compile(r"nonce-[0-9a-f]{8}")
SAW_RE = re.compile(r"\| saw (\d+) other nonces")
SHOWN = 3  # nonces listed in the answer (the count is what the benchmark reads)


def other_nonces(body: dict[str, Any]) -> list[str]:
    """Distinct nonces in the request's messages, in order, except the last user text's."""
    own = set(NONCE_RE.findall(standin.last_user_text(body)))
    seen: list[str] = []
    for nonce in NONCE_RE.findall(json.dumps(body.get("messages", []))):
        if nonce not in own and nonce not in seen:
            seen.append(nonce)
    return seen


class NonceStandin(standin.Standin):
    """``Standin`` whose echo answers end with the other nonces the conversation holds."""

    def _plan(self, path: str, body: dict[str, Any]) -> Any:
        plan = super()._plan(path, body)
        call = plan.call
        # Only plain echo answers (not errors, schema instances, tool calls) get the suffix.
        if call.status == 200 and call.reply.startswith(standin.ECHO_PREFIX) and not plan.tool_use:
            others = other_nonces(body)
            call.reply += f" | saw {len(others)} other nonces: " + " ".join(others[:SHOWN])
            plan.deltas = standin.split_deltas(call.reply)
            call.usage["output_tokens"] = len(call.reply.split())
        return plan


async def _run(config: standin.StandinConfig) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            server: NonceStandin = await nursery.start(NonceStandin(config).serve)
            print(f"standin listening on {server.url}", flush=True)
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    trio.run(_run, standin.StandinConfig(host="127.0.0.1", port=args.port,
                                         latency_s=args.latency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
