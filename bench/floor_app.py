#!/usr/bin/env python3
"""The overhead floor: a bare Quart-Trio endpoint on the same Hypercorn as ccwrap-trio.

One route, ``POST /v1/chat/completions``: it reads the body, parses the JSON (as any endpoint
must), and returns a canned ``chat.completion`` of the same shape ccwrap-trio returns. Hypercorn is
configured as ccwrap-trio configures it (no access log). Prints ``floor listening on URL`` once
bound; stops on SIGINT/SIGTERM.

    python bench/floor_app.py --port 0
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import uuid
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio


def create_app() -> QuartTrio:
    app = QuartTrio(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Any:
        body = json.loads(await request.get_data(cache=False, as_text=False))
        prompt = body["messages"][-1]["content"]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "haiku"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": f"echo: {prompt}", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": 711, "completion_tokens": 5, "total_tokens": 716,
                "prompt_tokens_details": {"cached_tokens": 100},
            },
            "system_fingerprint": None,
        }

    return app


async def main_async(port: int) -> None:
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = trio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: serve(
                create_app(), config, shutdown_trigger=shutdown_trigger, task_status=task_status
            )
        )
        print(f"floor listening on {urls[0]}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        stop.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    trio.run(main_async, parser.parse_args().port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
