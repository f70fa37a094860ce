"""The official ``openai`` npm package, from Node, against ccwrap-trio over the REAL CLI.

``tests/clients/node/client.mjs`` makes one plain and one streamed chat completion through a real
socket and prints what the SDK returned as one JSON line; this test checks it against what the
stand-in Anthropic API answered. The package is pinned by ``tests/clients/node/package-lock.json``
and installed with ``npm ci --prefix tests/clients/node``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from ccwrap_trio.standin import echo_reply, parse_directives

from ..conftest import real_stack

pytestmark = pytest.mark.real_cli

NODE_DIR = Path(__file__).resolve().parent / "node"
CLIENT = NODE_DIR / "client.mjs"
PLAIN_PROMPT = "plain hello from node"
# Must match client.mjs. The directive makes the stand-in pause between its per-word deltas, so
# the text really arrives over time; the stand-in strips it before echoing.
STREAM_PROMPT = "streamed hello from node in several words [standin:delay=0.05]"
NODE_TIMEOUT_S = 150


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the Node client test needs Node.js 20 or later")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").is_file():
        pytest.fail(
            "the openai npm package is not installed for the Node client test: "
            "run `npm ci --prefix tests/clients/node`"
        )
    return node


async def run_client(node: str, base_url: str) -> dict[str, Any]:
    with trio.fail_after(NODE_TIMEOUT_S):
        done = await trio.run_process(
            [node, str(CLIENT), base_url],
            cwd=NODE_DIR,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    stdout = done.stdout.decode(errors="replace")
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, (
        f"client.mjs exited {done.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    )
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, f"client.mjs should print one JSON line, got:\n{stdout}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


async def test_openai_node_sdk_plain_and_streamed(tmp_path: Path) -> None:
    node = node_binary()
    async with real_stack(tmp_path) as (url, standin, _):
        result = await run_client(node, f"{url}/v1")
        calls = list(standin.calls)

    assert len(calls) == 2, [call.reply for call in calls]
    plain_call, stream_call = calls

    plain = result["plain"]
    assert plain["content"] == f"echo: {PLAIN_PROMPT}"
    assert plain["finish_reason"] == "stop"
    assert plain["usage"]["prompt_tokens"] > 0
    assert plain["usage"]["completion_tokens"] == plain_call.usage["output_tokens"]
    assert plain["usage"]["total_tokens"] == (
        plain["usage"]["prompt_tokens"] + plain["usage"]["completion_tokens"]
    )

    stream = result["stream"]
    expected = echo_reply(parse_directives(STREAM_PROMPT)[1])
    assert stream_call.reply == expected
    assert stream["content"] == expected
    # The stand-in sends one text delta per word: the text must arrive in pieces, not at once.
    assert stream["chunks"] > 2, stream
    assert stream["roles"] and stream["roles"][0] == "assistant", stream
    assert stream["finish_reason"] == "stop"
    assert stream["objects"] == ["chat.completion.chunk"]
    assert stream["ids"] == 1, "every chunk of one completion carries the same id"
    usage = stream["usage"]
    assert usage is not None, "stream_options.include_usage asked for a usage chunk"
    assert stream["usage_chunk_choices"] == 0, "the usage chunk has an empty choices list"
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == stream_call.usage["output_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
