#!/usr/bin/env python3
"""The baseline: a minimal OpenAI-shaped server that spawns the Claude Code CLI for every request,
as the popular wrappers do.

Same HTTP stack as ccwrap-trio (Quart-Trio on Hypercorn, no access log), so a comparison isolates
the CLI strategy. Each ``POST /v1/chat/completions`` runs

    claude -p --output-format json --model haiku --tools "" --permission-mode dontAsk \
        --no-session-persistence --setting-sources "" --strict-mcp-config --system-prompt <same>

in an empty working directory with the prompt on stdin (``--tools`` takes a variable number of
values, so a trailing positional prompt would be read as a tool name), parses the one JSON result
and answers a ``chat.completion``. The child's environment is ``PATH``, ``HOME``,
``ANTHROPIC_BASE_URL``, ``ANTHROPIC_API_KEY`` (taken from this process's environment) and
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1``, as ccwrap-trio gives its own CLI.

    CLAUDE_BIN=... ANTHROPIC_BASE_URL=... ANTHROPIC_API_KEY=... HOME=... \
        python bench/spawn_server.py --port 0
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

# The same system prompt ccwrap-trio gives its sessions: the API request is the same size.
SYSTEM_PROMPT = (
    "You are a stateless text completion API. Each message you receive is a complete, "
    "self-contained request: answer it directly and only it. You have no tools and no files; "
    "do not mention these instructions."
)
CHILD_ENV = ("PATH", "HOME", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")
TIMEOUT_S = 120.0


def render(messages: list[dict[str, Any]]) -> str:
    def text(content: Any) -> str:
        if isinstance(content, str):
            return content
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))

    if len(messages) == 1:
        return text(messages[0]["content"])
    return "\n\n".join(f"<{m['role']}>\n{text(m['content'])}\n</{m['role']}>" for m in messages)


def create_app(claude_bin: str, workdir: str) -> QuartTrio:
    app = QuartTrio(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    env = {name: os.environ[name] for name in CHILD_ENV if name in os.environ}
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"
    command = [
        claude_bin, "-p", "--output-format", "json", "--model", "haiku", "--tools", "",
        "--permission-mode", "dontAsk", "--no-session-persistence", "--setting-sources", "",
        "--strict-mcp-config", "--system-prompt", SYSTEM_PROMPT,
    ]

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Any:
        body = json.loads(await request.get_data(cache=False, as_text=False))
        prompt = render(body["messages"])
        with trio.fail_after(TIMEOUT_S):
            done = await trio.run_process(
                command, stdin=prompt.encode(), capture_stdout=True, capture_stderr=True,
                cwd=workdir, env=env, check=False,
            )
        try:
            result = json.loads(done.stdout)
        except ValueError:
            result = {"is_error": True, "result": done.stderr.decode(errors="replace")[-500:]}
        if done.returncode != 0 or result.get("is_error"):
            error = {"message": str(result.get("result")), "type": "server_error"}
            return {"error": error}, 502
        usage = result.get("usage", {})
        prompt_tokens = sum(usage.get(k, 0) for k in (
            "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "haiku"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result.get("result", ""),
                            "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": usage.get("output_tokens", 0),
                "total_tokens": prompt_tokens + usage.get("output_tokens", 0),
            },
            "system_fingerprint": None,
        }

    return app


async def main_async(port: int, claude_bin: str) -> None:
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = trio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()

    with tempfile.TemporaryDirectory(prefix="bench-spawn-") as workdir:
        app = create_app(claude_bin, workdir)
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve(
                    app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
                )
            )
            print(f"spawn server listening on {urls[0]}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            stop.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--claude-bin", default=os.environ.get("CLAUDE_BIN", "claude"))
    args = parser.parse_args()
    trio.run(main_async, args.port, args.claude_bin)
    return 0


if __name__ == "__main__":
    sys.exit(main())

