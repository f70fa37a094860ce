"""A fake Claude Code CLI for fault injection: speaks the stream-json lines of the 2.1.332 captures.

Start-up behaviour comes from FAKE_CLAUDE_START: ``ok`` (default), ``crash``, ``text`` (prints
plain text and exits), ``silent`` (reads, never answers), ``slow:SECONDS``. Per-turn faults come
from directives in the user text: ``FAKE:hang``, ``FAKE:hang-hard`` (ignores interrupts),
``FAKE:crash``, ``FAKE:empty``, ``FAKE:empty-once``, ``FAKE:garbage``, ``FAKE:error=MESSAGE``,
``FAKE:sleep=SECONDS``, ``FAKE:delay=SECONDS`` (between deltas), ``FAKE:exit-after``,
``FAKE:tokens=N``, ``FAKE:hang-after=N`` (N deltas, then silence until interrupted),
``FAKE:big=BYTES`` (one answer line of that size), ``FAKE:stream-big=BYTES`` (an answer of that
size in 1,000-byte deltas), ``FAKE:hang-next-clear`` (the next ``/clear`` is never answered),
``FAKE:close-stdout`` (closes stdout, lives on), ``FAKE:cut-stream`` (the stream breaks off
after 3 words and the result says that was all), ``FAKE:unstreamed-retry`` (the stream breaks
off after 3 words, and the CLI's retry is not streamed: the result has the whole answer),
``FAKE:streamed-retry`` (the same, but the retry streams the answer again from the start),
``FAKE:vanish`` (exits at the turn without a word; so does the first turn after the file
FAKE_CLAUDE_VANISH_FILE appears, which it removes).
Every stdin line is appended to FAKE_CLAUDE_LOG when set. The answer is ``echo: <text>``,
streamed in one delta per word.
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time
import uuid

SESSION = str(uuid.uuid4())
VERSION = "2.1.332-fake"
seen_empty_once: set[str] = set()
hang_next_clear = False
current_model = "claude-haiku-5-5"  # set_model changes it, as init lines then report


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def init() -> None:
    emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "session_id": SESSION,
          "tools": [], "mcp_servers": [], "model": current_model,
          "permissionMode": "dontAsk", "claude_code_version": VERSION})


def usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 100, "output_tokens": output_tokens}


def message_end() -> None:
    """The API stream's last events, as the real CLI relays them: the message is complete."""
    emit({"type": "stream_event", "event": {"type": "message_delta", "delta": {
        "stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 1}}})
    emit({"type": "stream_event", "event": {"type": "message_stop"}})


def result(text: str | None, *, is_error: bool = False, subtype: str = "success",
           use: dict | None = None, terminal: str = "completed", num_turns: int = 1,
           extra: dict | None = None) -> None:
    message = {"type": "result", "subtype": subtype, "is_error": is_error,
               "num_turns": num_turns, "session_id": SESSION, "duration_ms": 5,
               "usage": use or usage(0, 0), "terminal_reason": terminal,
               "api_error_status": None, "total_cost_usd": 0}
    if text is not None:
        message["result"] = text
    message.update(extra or {})
    emit(message)


def interrupted() -> None:
    emit({"type": "user", "message": {"role": "user", "content": [
        {"type": "text", "text": "[Request interrupted by user]"}]}, "session_id": SESSION})
    result(None, is_error=True, subtype="error_during_execution", terminal="aborted_streaming",
           num_turns=2, extra={"errors": ["[ede_diagnostic] result_type=user"]})


class Stdin:
    def __init__(self) -> None:
        self.buffer = b""
        self.pushback: list[bytes] = []  # lines read early, for the main loop

    def next_line(self, timeout: float | None = None) -> bytes | None:
        """The next line; b"" at EOF; None when ``timeout`` passes first."""
        if self.pushback:
            return self.pushback.pop(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([0], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(0, 65536)
            if not chunk:
                return b""
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        log = os.environ.get("FAKE_CLAUDE_LOG")
        if log:
            with open(log, "ab") as f:
                f.write(line + b"\n")
        return line


def text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


def hang(stdin: Stdin, directives: dict[str, str]) -> bool:
    """Say nothing more; an interrupt ends the turn unless the hang is hard."""
    while True:
        line = stdin.next_line()
        if not line:
            return False
        message = json.loads(line)
        if message.get("type") == "control_request" and "hang-hard" not in directives:
            emit({"type": "control_response", "response": {
                "subtype": "success", "request_id": message["request_id"]}})
            interrupted()
            return True


def answer(stdin: Stdin, text: str) -> bool:
    """Play one turn; False when the process must exit afterwards."""
    global hang_next_clear
    if text == "/clear":
        if hang_next_clear:
            while stdin.next_line():
                pass  # frozen: reads, never answers
            return False
        emit({"type": "conversation_reset", "trigger": "clear", "session_id": SESSION})
        init()
        result("", use=usage(0, 0), num_turns=0, extra={"local_command": "clear"})
        return True
    init()
    emit({"type": "system", "subtype": "status", "status": "requesting", "session_id": SESSION})
    directives = dict(
        (m.group(1), m.group(2) or "") for m in re.finditer(r"FAKE:([a-z-]+)(?:=(\S*))?", text)
    )
    hang_next_clear = hang_next_clear or "hang-next-clear" in directives
    if "stream-big" in directives:
        size = int(directives["stream-big"])
        emit({"type": "stream_event", "event": {"type": "message_start", "message": {
            "role": "assistant", "content": [], "usage": usage(10, 1)}}})
        for _ in range(size // 1000):
            emit({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": "y" * 1000}}})
        message_end()
        result("y" * (size // 1000 * 1000), use=usage(10, size // 4))
        return True
    if "sleep" in directives:
        time.sleep(float(directives["sleep"]))
    if "hang" in directives or "hang-hard" in directives:
        return hang(stdin, directives)
    if "close-stdout" in directives:
        sys.stdout.flush()
        os.close(1)
        while stdin.next_line():
            pass  # alive, reading, but it can never answer again
        return False
    if "big" in directives:
        reply = "x" * int(directives["big"])
        result(reply, use=usage(10, len(reply) // 4))
        return True
    if "crash" in directives:
        emit({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
              "delta": {"type": "text_delta", "text": "partial"}}})
        sys.stderr.write("fake: crashing mid-turn\n")
        sys.stderr.flush()
        os._exit(1)
    if "garbage" in directives:
        sys.stdout.write("this is not json {\n")
        emit(["a", "json", "array"])  # valid JSON, not an object
        emit({"type": "brand_new_line_type", "payload": 1})
    if "error" in directives:
        emit({"type": "assistant", "message": {"model": "<synthetic>", "content": [
            {"type": "text", "text": directives["error"]}]}, "session_id": SESSION})
        result(directives["error"].replace("_", " "), is_error=True, terminal="api_error")
        return True
    reply = re.sub(r"FAKE:\S+", "", text).strip()
    reply = "echo: " + " ".join(reply.split())[:200]
    if "empty" in directives or ("empty-once" in directives and text not in seen_empty_once):
        seen_empty_once.add(text)
        reply = ""
    words = reply.split(" ") if reply else []
    input_tokens = int(directives.get("tokens") or max(1, len(text) // 4))
    if "cut-stream" in directives:
        # The API's stream breaks off after 3 words and the CLI calls the partial text the
        # answer (seen on 2.1.332 under load): no message_stop, a success result.
        partial = " ".join(words[:3])
        emit({"type": "stream_event", "event": {"type": "message_start", "message": {
            "role": "assistant", "content": [], "usage": usage(input_tokens, 1)}}})
        for i, word in enumerate(words[:3]):
            emit({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}}})
        result(partial, use=usage(input_tokens, 3))
        return True
    if "unstreamed-retry" in directives or "streamed-retry" in directives:
        # As 2.1.332 under load after a malformed event: the broken call's blocks are
        # abandoned (message_stop with abandoned_blocks), then the retry.
        emit({"type": "stream_event", "event": {"type": "message_start", "message": {
            "role": "assistant", "content": [], "usage": usage(input_tokens, 1)}}})
        for i, word in enumerate(words[:3]):
            emit({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}}})
        emit({"type": "stream_event", "event": {"type": "message_stop"},
              "abandoned_blocks": {"from_block_index": 0}})
        if "unstreamed-retry" in directives:
            emit({"type": "assistant", "message": {"content": [{"type": "text", "text": reply}]},
                  "session_id": SESSION})
            result(reply, use=usage(input_tokens, len(words)))
            return True
    emit({"type": "stream_event", "event": {"type": "message_start", "message": {
        "role": "assistant", "content": [], "usage": usage(input_tokens, 1)}}})
    for i, word in enumerate(words):
        if "hang-after" in directives and i == int(directives["hang-after"]):
            directives["hang"] = ""
            return hang(stdin, directives)
        if i and "delay" in directives:
            # Wait between deltas, but honour an interrupt as the real CLI does.
            line = stdin.next_line(timeout=float(directives["delay"]))
            if line:
                message = json.loads(line)
                if message.get("type") == "control_request":
                    emit({"type": "control_response", "response": {
                        "subtype": "success", "request_id": message["request_id"]}})
                    interrupted()
                    return True
                stdin.pushback.append(line)
        emit({"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
              "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}}})
    message_end()
    emit({"type": "assistant", "message": {"content": [{"type": "text", "text": reply}]},
          "session_id": SESSION})
    result(reply, use=usage(input_tokens, len(words)))
    return "exit-after" not in directives


def control(message: dict) -> None:
    """Answer a control request as 2.1.332 does: set_model names the model; a tools/
    list_changed notification is followed by the CLI's own tools/list request."""
    request = message.get("request") or {}
    response: dict = {"subtype": "success", "request_id": message.get("request_id")}
    if request.get("subtype") == "set_model":
        global current_model
        name = request.get("model") or current_model
        current_model = f"claude-{name}-5-5" if name in ("haiku", "sonnet", "opus") else name
        response["response"] = {"model": current_model}
    emit({"type": "control_response", "response": response})
    if (request.get("message") or {}).get("method") == "notifications/tools/list_changed":
        emit({"type": "control_request", "request_id": str(uuid.uuid4()), "request": {
            "subtype": "mcp_message", "server_name": "oa",
            "message": {"method": "tools/list", "jsonrpc": "2.0", "id": 1}}})


def main() -> int:
    start = os.environ.get("FAKE_CLAUDE_START", "ok")
    if start == "crash":
        sys.stderr.write("fake: cannot start\n")
        return 3
    if start == "text":
        print("Usage: this is not the program you are looking for")
        return 0
    if start.startswith("slow:"):
        time.sleep(float(start.split(":", 1)[1]))
    stdin = Stdin()
    while True:
        line = stdin.next_line()
        if not line:
            return 0
        if start == "silent":
            continue
        message = json.loads(line)
        if message.get("type") == "control_request":
            control(message)
            continue
        if message.get("type") != "user":
            continue
        text = text_of(message["message"]["content"])
        vanish = os.environ.get("FAKE_CLAUDE_VANISH_FILE", "")
        if "FAKE:vanish" in text or (vanish and os.path.exists(vanish)):
            # Gone without a word of the turn, as a CLI killed a moment before it was sent.
            if vanish and os.path.exists(vanish):
                os.remove(vanish)
            os._exit(137)
        if not answer(stdin, text):
            return 0


if __name__ == "__main__":
    sys.exit(main())
