"""Tests for the Anthropic Messages API stand-in: over plain HTTP, then with the real Claude CLI."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio

from ccwrap_trio.standin import (
    ECHO_MAX_CHARS,
    DirectiveError,
    RecordedCall,
    Standin,
    StandinConfig,
    echo_reply,
    find_schema,
    invalid_instance,
    last_user_text,
    parse_directives,
    schema_instance,
    split_deltas,
)

REPO = Path(__file__).resolve().parents[1]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def request_body(text: str | list[dict[str, Any]], *, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "claude-haiku-5-5",
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }


@pytest.fixture
async def standin(nursery: trio.Nursery) -> Standin:
    started: Standin = await nursery.start(Standin(StandinConfig()).serve)
    return started


@pytest.fixture
async def client(standin: Standin) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=standin.url, timeout=10) as http:
        yield http


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.split("\n\n"):
        if not chunk.strip():
            continue
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def stream_events(
    client: httpx.AsyncClient, text: str
) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    response = await client.post("/v1/messages?beta=true", json=request_body(text))
    return response.status_code, parse_sse(response.text)


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_echo_collapses_whitespace_and_caps_length() -> None:
    assert echo_reply("  Say \n\t hello  ") == "echo: Say hello"
    assert echo_reply("") == "echo:"
    long = "word " * 100
    assert echo_reply(long) == "echo: " + " ".join(long.split())[:ECHO_MAX_CHARS].rstrip()


def test_split_deltas_round_trips_on_word_boundaries() -> None:
    assert split_deltas("echo: hello  big world") == ["echo:", " hello", "  big", " world"]
    assert split_deltas("") == []
    for text in ("a", " a b ", '{"a": [1, 2]}\n', "\n"):
        assert "".join(split_deltas(text)) == text


def test_directives_are_parsed_and_removed() -> None:
    found, rest = parse_directives(
        "hi [standin:latency=0.5] there [standin:delay=0.1][standin:status=529] "
        "[standin:hang][standin:drop][standin:invalid-first][standin:reply=" + b64("ok!") + "]"
    )
    assert (found.latency_s, found.delay_s, found.status) == (0.5, 0.1, 529)
    assert found.hang and found.drop and found.invalid_first
    assert found.reply == "ok!"
    assert " ".join(rest.split()) == "hi there"
    assert parse_directives("[standin:reply=]")[0].reply == ""
    # URL-safe alphabet and missing padding are accepted too.
    assert parse_directives("[standin:reply=" + b64("é?>").rstrip("=") + "]")[0].reply == "é?>"


@pytest.mark.parametrize(
    "text",
    [
        "[standin:nope]",
        "[standin:latency=abc]",
        "[standin:latency=-1]",
        "[standin:status=7]",
        "[standin:reply=%%%]",
        "[standin:latency]",
    ],
)
def test_bad_directives_raise(text: str) -> None:
    with pytest.raises(DirectiveError):
        parse_directives(text)


def test_last_user_text_skips_cli_reminders() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "old"},
            {"role": "assistant", "content": [{"type": "text", "text": "reply"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<local-command-caveat>x</local-command-caveat>"},
                    {"type": "text", "text": "the turn"},
                    {"type": "image", "source": {}},
                    {"type": "text", "text": "<system-reminder>\nnudge\n</system-reminder>"},
                ],
            },
            {"role": "system", "content": "environment"},
        ]
    }
    assert last_user_text(body) == "the turn"


SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 5},
            "score": {"type": "number", "exclusiveMinimum": 0.1, "maximum": 0.2},
            "ok": {"type": "boolean"},
            "none": {"type": "null"},
            "tag": {"enum": ["a", "b"]},
            "kind": {"const": "fixed"},
            "when": {"type": "string", "format": "date-time"},
            "code": {"type": "string", "minLength": 8, "maxLength": 8},
            "maybe": {"type": ["null", "string"]},
        },
        "required": ["id", "score", "ok", "none", "tag", "kind", "when", "code", "maybe"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 0},
    {
        "$defs": {
            "point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
        },
        "type": "object",
        "properties": {
            "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 2}
        },
        "required": ["points"],
    },
    {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    {
        "oneOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "array"},
        ]
    },
    {
        "allOf": [
            {"properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
        ]
    },
    {  # recursive: must terminate
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
        "$ref": "#/$defs/node",
    },
    {
        "definitions": {"s": {"type": "string"}},
        "type": "array",
        "prefixItems": [{"$ref": "#/definitions/s"}, {"type": "integer"}],
        "items": False,
    },
    {"type": "string", "enum": ["only"]},
    {"type": "integer", "multipleOf": 7, "minimum": 1},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_instance_validates_and_invalid_instance_does_not(schema: dict[str, Any]) -> None:
    instance = schema_instance(schema)
    jsonschema.validate(instance, schema)
    assert schema_instance(schema) == instance  # deterministic
    assert not jsonschema.Draft202012Validator(schema).is_valid(invalid_instance(schema))


def test_invalid_instance_is_missing_required_for_objects() -> None:
    assert invalid_instance(SCHEMAS[0]) == {}


def test_find_schema() -> None:
    assert find_schema("no schema here") is None
    text = 'Answer.\n```json-schema\n{"type": "integer"}\n```\nthanks'
    assert find_schema(text) == {"type": "integer"}
    with pytest.raises(ValueError):
        find_schema("```json-schema\n{nope\n```")


# ---------------------------------------------------------------------------------------------
# Over HTTP


async def test_stream_has_the_real_event_sequence(
    standin: Standin, client: httpx.AsyncClient
) -> None:
    status, events = await stream_events(client, "Say   hello\nto the world")
    assert status == 200
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    deltas = [data["delta"]["text"] for name, data in events if name == "content_block_delta"]
    assert len(deltas) == 6 and "".join(deltas) == "echo: Say hello to the world"
    assert all(data["type"] == name for name, data in events)

    [call] = standin.calls
    assert call.reply == "echo: Say hello to the world"
    assert call.path == "/v1/messages" and call.status == 200 and call.fault is None
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_fake_") and start["model"] == "claude-haiku-5-5"
    assert start["usage"] == {**call.usage, "output_tokens": 1}
    assert events[-2][1]["usage"] == {"output_tokens": 6}
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert call.usage == {
        "input_tokens": len("Say   hello\nto the world") // 4,
        "output_tokens": 6,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


async def test_non_streaming_answer(standin: Standin, client: httpx.AsyncClient) -> None:
    blocks = [{"type": "text", "text": "first"}, {"type": "text", "text": "second block"}]
    response = await client.post("/v1/messages", json=request_body(blocks, stream=False))
    assert response.status_code == 200
    message = response.json()
    assert message["content"] == [{"type": "text", "text": "echo: second block"}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"] == standin.calls[0].usage
    assert message["usage"]["input_tokens"] == len("firstsecond block") // 4
    assert standin.calls[0].stream is False


async def test_reply_directive(standin: Standin, client: httpx.AsyncClient) -> None:
    _, events = await stream_events(client, f"x [standin:reply={b64('exact  reply')}]")
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == (
        "exact  reply"
    )
    _, events = await stream_events(client, "x [standin:reply=]")
    assert not [n for n, _ in events if n == "content_block_delta"]
    assert events[-2][1]["usage"] == {"output_tokens": 0}
    assert [c.reply for c in standin.calls] == ["exact  reply", ""]


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (500, "api_error"),
        (529, "overloaded_error"),
        (400, "invalid_request_error"),
        (503, "api_error"),
        (429, "rate_limit_error"),
    ],
)
async def test_status_directive(
    standin: Standin, client: httpx.AsyncClient, code: int, kind: str
) -> None:
    response = await client.post("/v1/messages", json=request_body(f"[standin:status={code}] hi"))
    assert response.status_code == code
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert str(code) in body["error"]["message"]
    assert standin.calls[0].status == code and standin.calls[0].fault == "status"


async def test_unknown_directive_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/messages", json=request_body("[standin:typo] hi"))
    assert response.status_code == 400
    assert "typo" in response.json()["error"]["message"]


async def test_latency_and_delay(standin: Standin, client: httpx.AsyncClient) -> None:
    start = trio.current_time()
    await stream_events(client, "one two three four [standin:latency=0.2] [standin:delay=0.05]")
    assert trio.current_time() - start >= 0.2 + 3 * 0.05
    assert standin.calls[0].reply == "echo: one two three four"


async def test_process_wide_latency(nursery: trio.Nursery) -> None:
    slow: Standin = await nursery.start(Standin(StandinConfig(latency_s=0.2)).serve)
    async with httpx.AsyncClient(base_url=slow.url) as http:
        start = trio.current_time()
        await http.post("/v1/messages", json=request_body("hi"))
        assert trio.current_time() - start >= 0.2
        start = trio.current_time()
        await http.post("/v1/messages", json=request_body("hi [standin:latency=0]"))
        assert trio.current_time() - start < 0.2


async def test_drop_closes_after_message_start(standin: Standin, client: httpx.AsyncClient) -> None:
    seen: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/v1/messages", json=request_body("[standin:drop]")) as r:
            async for line in r.aiter_lines():
                seen.append(line)
    assert seen[0] == "event: message_start"
    assert not any("content_block" in line for line in seen)
    assert standin.calls[0].fault == "drop"


async def test_hang_answers_nothing_until_the_client_leaves(
    standin: Standin, client: httpx.AsyncClient
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/v1/messages", json=request_body("[standin:hang]"), timeout=0.3)
    await standin.wait_for_calls(1)
    assert standin.calls[0].fault == "hang"
    # The server is still fine for others.
    _, events = await stream_events(client, "after")
    assert standin.calls[1].reply == "echo: after"
    assert events[-1][0] == "message_stop"


async def test_concurrent_requests_each_get_their_own_answer(
    standin: Standin, client: httpx.AsyncClient
) -> None:
    replies: dict[int, str] = {}

    async def one(i: int) -> None:
        async with httpx.AsyncClient(base_url=standin.url) as own:
            body = request_body(f"request {i} [standin:latency=0.3]", stream=False)
            replies[i] = (await own.post("/v1/messages", json=body)).json()["content"][0]["text"]

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
    assert trio.current_time() - start < 1.5  # in parallel, not 6 x 0.3 s one after another
    assert replies == {i: f"echo: request {i}" for i in range(6)}


async def test_schema_reply_and_invalid_first(standin: Standin, client: httpx.AsyncClient) -> None:
    schema = SCHEMAS[4]
    fence = f"Give me points.\n```json-schema\n{json.dumps(schema)}\n```"
    response = await client.post("/v1/messages", json=request_body(fence, stream=False))
    jsonschema.validate(json.loads(response.json()["content"][0]["text"]), schema)

    first = request_body(fence + " [standin:invalid-first]", stream=False)
    text = (await client.post("/v1/messages", json=first)).json()["content"][0]["text"]
    assert not jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))
    repair = dict(first)
    repair["messages"] = [
        *first["messages"],
        {"role": "assistant", "content": text},
        {"role": "user", "content": fence + " Fix it. [standin:invalid-first]"},
    ]
    text = (await client.post("/v1/messages", json=repair)).json()["content"][0]["text"]
    jsonschema.validate(json.loads(text), schema)


async def test_other_endpoints_are_harmless(standin: Standin, client: httpx.AsyncClient) -> None:
    assert (await client.head("/")).status_code == 200
    assert (await client.head("/api/hello")).status_code == 200
    assert (await client.get("/api/oauth/profile")).json() == {}
    counted = await client.post("/v1/messages/count_tokens", json=request_body("12345678"))
    assert counted.json() == {"input_tokens": 2}
    missing = await client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["type"] == "error"
    bad = await client.post("/v1/messages", content=b"not json")
    assert bad.status_code == 400
    assert standin.calls == []  # only real message calls are recorded
    assert [r.method for r in standin.requests] == ["HEAD", "HEAD", "GET", "POST", "GET", "POST"]


async def test_cancel_with_open_connections_stops_cleanly() -> None:
    # -W error turns any unclosed-socket or unawaited-coroutine warning into a failure.
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            started: Standin = await nursery.start(Standin().serve)
            async with httpx.AsyncClient(base_url=started.url) as http:
                body = request_body("[standin:hang]")
                nursery.start_soon(partial(http.post, "/v1/messages", json=body))
                await started.wait_for_calls(1)
                nursery.cancel_scope.cancel()


async def test_command_line_serves_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-m", "ccwrap_trio.standin", "--port", "0", "--latency", "0"],
                stdout=subprocess.PIPE,
                env=env,
                check=False,
            )
        )
        assert proc.stdout is not None
        with trio.fail_after(10):
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        prefix = "standin listening on http://127.0.0.1:"
        assert line.decode().startswith(prefix)
        async with httpx.AsyncClient(base_url=line.decode().split()[-1]) as http:
            response = await http.post("/v1/messages", json=request_body("cli", stream=False))
        assert response.json()["content"][0]["text"] == "echo: cli"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0


# ---------------------------------------------------------------------------------------------
# With the real Claude Code CLI


def claude_bin() -> str | None:
    """The pinned real CLI: CCWRAP_TEST_CLAUDE_BIN, else the repo's .tools install, else PATH."""
    for candidate in (
        os.environ.get("CCWRAP_TEST_CLAUDE_BIN"),
        str(REPO / ".tools/claude/node_modules/.bin/claude"),
        shutil.which("claude"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


TURN_TIMEOUT_S = 20

CLI_ARGS = [
    "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
    "--include-partial-messages", "--system-prompt", "You are a test.", "--model", "haiku",
    "--tools", "", "--permission-mode", "dontAsk", "--no-session-persistence",
    "--setting-sources", "", "--strict-mcp-config",
]  # fmt: skip


class CliSession:
    """One persistent ``claude -p`` stream-json process; ``turn`` sends a line, reads to result."""

    def __init__(self, proc: trio.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.buffer = b""

    async def readline(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data = await self.stdout.receive_some(65536)
            if not data:
                raise EOFError("the CLI closed its stdout")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    async def turn(self, text: str) -> list[dict[str, Any]]:
        """Send one user turn and return every output line up to and including its result."""
        line = {"type": "user", "message": {"role": "user", "content": text}}
        await self.stdin.send_all((json.dumps(line) + "\n").encode())
        lines = []
        with trio.fail_after(TURN_TIMEOUT_S):
            while True:
                lines.append(await self.readline())
                if lines[-1].get("type") == "result":
                    return lines


@asynccontextmanager
async def cli_session(
    standin: Standin, tmp_path: Path, **extra_env: str
) -> AsyncIterator[CliSession]:
    claude = claude_bin()
    if claude is None:
        pytest.fail("the real Claude Code CLI is not installed: run `make install` (or .ci/run)")
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ANTHROPIC_BASE_URL": standin.url,
        "ANTHROPIC_API_KEY": "sk-standin-test",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "1",
        **extra_env,
    }
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [claude, *CLI_ARGS],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                check=False,
            )
        )
        session = CliSession(proc)
        try:
            yield session
        finally:
            # stdin EOF makes an idle CLI exit; a stuck one is killed by cancelling run_process.
            await session.stdin.aclose()
            with trio.move_on_after(5):
                await proc.wait()
            nursery.cancel_scope.cancel()


def result_of(lines: list[dict[str, Any]]) -> dict[str, Any]:
    assert lines[-1]["type"] == "result"
    return lines[-1]


def text_deltas(lines: list[dict[str, Any]]) -> list[str]:
    return [
        line["event"]["delta"]["text"]
        for line in lines
        if line.get("type") == "stream_event"
        and line["event"].get("type") == "content_block_delta"
        and line["event"]["delta"].get("type") == "text_delta"
    ]


def summed_usage(calls: list[RecordedCall]) -> dict[str, int]:
    keys = (
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    )
    return {key: sum(call.usage[key] for call in calls) for key in keys}


@pytest.fixture
async def cached_standin(nursery: trio.Nursery) -> Standin:
    started: Standin = await nursery.start(
        Standin(StandinConfig(cache_read_input_tokens=100)).serve
    )
    return started


@pytest.mark.real_cli
async def test_cli_turn_echo_usage_and_streaming(cached_standin: Standin, tmp_path: Path) -> None:
    standin = cached_standin
    async with cli_session(standin, tmp_path) as cli:
        lines = await cli.turn("Say  hello\nfrom the test")
        result = result_of(lines)
        assert result["is_error"] is False and result["subtype"] == "success"
        assert result["result"] == "echo: Say hello from the test"
        [call] = standin.calls
        assert call.reply == result["result"]
        assert {k: result["usage"][k] for k in call.usage} == call.usage
        assert call.usage["cache_read_input_tokens"] == 100
        # Deltas reach the client one by one, as sent.
        assert text_deltas(lines) == ["echo:", " Say", " hello", " from", " the", " test"]
        [assistant] = [line for line in lines if line["type"] == "assistant"]
        assert assistant["message"]["id"].startswith("msg_fake_")
        # The CLI sends only the messages call: no HEAD, no count_tokens, no title request.
        assert [(r.method, r.target) for r in standin.requests] == [
            ("POST", "/v1/messages?beta=true")
        ]
        # A second turn in the same conversation carries the first.
        result = result_of(await cli.turn("and again"))
        assert result["result"] == "echo: and again"
        assert "echo: Say hello from the test" in json.dumps(standin.calls[1].body)
        assert {k: result["usage"][k] for k in call.usage} == standin.calls[1].usage


@pytest.mark.real_cli
async def test_cli_clear_makes_no_call_and_isolates(standin: Standin, tmp_path: Path) -> None:
    async with cli_session(standin, tmp_path) as cli:
        assert result_of(await cli.turn("secret-token-one"))["result"] == "echo: secret-token-one"
        cleared = await cli.turn("/clear")
        assert result_of(cleared)["result"] == "" and result_of(cleared)["num_turns"] == 0
        assert any(line["type"] == "conversation_reset" for line in cleared)
        assert len(standin.calls) == 1
        result = result_of(await cli.turn("second request"))
        assert result["result"] == "echo: second request"
        assert len(standin.calls) == 2
        assert "secret-token-one" not in json.dumps(standin.calls[1].body)


@pytest.mark.real_cli
async def test_cli_api_errors(standin: Standin, tmp_path: Path) -> None:
    async with cli_session(standin, tmp_path) as cli:
        lines = await cli.turn("boom [standin:status=500]")
        result = result_of(lines)
        assert result["is_error"] is True and result["api_error_status"] == 500
        assert result["result"].startswith("API Error: 500 standin: injected HTTP 500")
        # CLAUDE_CODE_MAX_RETRIES=1: one retry, announced by system/api_retry.
        assert len(standin.calls) == 2
        assert [line.get("subtype") for line in lines].count("api_retry") == 1
        # The process stays usable.
        assert result_of(await cli.turn("fine"))["result"] == "echo: fine"

        before = len(standin.calls)
        result = result_of(await cli.turn("busy [standin:status=529]"))
        assert result["is_error"] is True and result["api_error_status"] == 529
        assert len(standin.calls) - before == 2

        # A 400 is retried too, the last time without the "display" field of "thinking".
        before = len(standin.calls)
        result = result_of(await cli.turn("bad [standin:status=400]"))
        assert result["is_error"] is True and result["api_error_status"] == 400
        assert len(standin.calls) - before == 3


@pytest.mark.real_cli
async def test_cli_empty_reply(standin: Standin, tmp_path: Path) -> None:
    async with cli_session(standin, tmp_path) as cli:
        result = result_of(await cli.turn("say nothing [standin:reply=]"))
        assert result["is_error"] is False and result["result"] == ""
        # The CLI re-asks once with a "<system-reminder>" nudge; both answers were empty and
        # the turn's usage is the sum of both calls.
        assert [c.reply for c in standin.calls] == ["", ""]
        assert {k: result["usage"][k] for k in standin.calls[0].usage} == summed_usage(
            standin.calls
        )


@pytest.mark.real_cli
async def test_cli_schema_invalid_first_then_repair(standin: Standin, tmp_path: Path) -> None:
    schema = SCHEMAS[1]
    fence = f"```json-schema\n{json.dumps(schema)}\n```"
    async with cli_session(standin, tmp_path) as cli:
        first = result_of(await cli.turn(f"Answer as JSON. [standin:invalid-first]\n{fence}"))
        assert not jsonschema.Draft202012Validator(schema).is_valid(json.loads(first["result"]))
        repair = result_of(await cli.turn(f"Not valid; fix it. [standin:invalid-first]\n{fence}"))
        jsonschema.validate(json.loads(repair["result"]), schema)


@pytest.mark.real_cli
async def test_cli_drop_and_hang(standin: Standin, tmp_path: Path) -> None:
    async with cli_session(standin, tmp_path, API_TIMEOUT_MS="1000") as cli:
        result = result_of(await cli.turn("cut [standin:drop]"))
        assert result["is_error"] is True
        assert "ECONNRESET" in result["result"] or "Connection" in result["result"]
        # Two streamed attempts, then the CLI's non-streaming fallback.
        assert [c.stream for c in standin.calls] == [True, True, False]

        before = len(standin.calls)
        result = result_of(await cli.turn("stuck [standin:hang]"))
        assert result["is_error"] is True and "timed out" in result["result"]
        assert [c.fault for c in standin.calls[before:]] == ["hang", "hang"]
        assert result_of(await cli.turn("alive"))["result"] == "echo: alive"
