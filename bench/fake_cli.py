#!/usr/bin/env python3
"""An *instant* fake Claude Code CLI for the overhead and memory benchmarks.

It answers each stream-json ``user`` line at once with the lines the real CLI 2.1.332 writes for a
turn (captured in ``fake_cli_lines.json``: init, status, the partial-message stream events, the
assistant line, the result), with the text replaced by ``echo: <prompt>``, one text delta per word.
``/clear`` gets the captured ``conversation_reset`` ... ``result`` lines. Everything a turn writes
goes out in one ``write``: no API, no model, no waiting, so what a request costs on top of this
is ccwrap-trio's own overhead.

It accepts (and ignores) every command-line flag the server passes.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

LINES = json.loads(Path(__file__).with_name("fake_cli_lines.json").read_text())


def dumps(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


CLEAR = b"".join(dumps(m) for m in LINES["clear"])


def text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


def turn(text: str) -> bytes:
    reply = "echo: " + " ".join(text.split())[:200]
    words = reply.split(" ")
    out: list[bytes] = []
    delta_done = False
    for message in LINES["turn"]:
        event = message.get("event", {}) if message["type"] == "stream_event" else {}
        if event.get("type") == "content_block_delta":
            if delta_done:
                continue  # the captured turn has three deltas: replaced by one per word
            delta_done = True
            for i, word in enumerate(words):
                line = copy.deepcopy(message)
                line["event"]["delta"]["text"] = word if i == 0 else " " + word
                out.append(dumps(line))
            continue
        if message["type"] == "assistant":
            message = copy.deepcopy(message)
            message["message"]["content"][0]["text"] = reply
        elif message["type"] == "result":
            message = dict(message, result=reply)
        out.append(dumps(message))
    return b"".join(out)


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        line = stdin.readline()
        if not line:
            return 0
        try:
            message = json.loads(line)
        except ValueError:
            continue
        kind = message.get("type")
        if kind == "control_request":
            stdout.write(dumps({"type": "control_response", "response": {
                "subtype": "success", "request_id": message.get("request_id")}}))
        elif kind == "user":
            text = text_of(message.get("message", {}).get("content"))
            stdout.write(CLEAR if text.strip() == "/clear" else turn(text))
        else:
            continue
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
