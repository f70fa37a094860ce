"""One CLI session over real pipes, against tests/fake_claude.py (real processes, real clock)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
import trio
import trio.testing

from ccwrap_trio import protocol
from ccwrap_trio.config import Config, child_environment
from ccwrap_trio.errors import SessionCrashed, SpawnFailed
from ccwrap_trio.session import LineReader, Session, open_session

from .conftest import write_executable


@asynccontextmanager
async def fake_session(
    fake_cli: Path, tmp_path: Path, start: str = "ok", startup_timeout_s: float = 10.0
) -> AsyncIterator[Session]:
    env = child_environment(
        {"PATH": os.environ["PATH"], "FAKE_CLAUDE_START": start,
         "FAKE_CLAUDE_LOG": str(tmp_path / "stdin.log")},
        forward_api_key=False,
    )
    env["FAKE_CLAUDE_START"] = start
    env["FAKE_CLAUDE_LOG"] = str(tmp_path / "stdin.log")
    command = Config(claude_bin=str(fake_cli)).cli_command()
    async with open_session(
        command, env=env, cwd=tmp_path, startup_timeout_s=startup_timeout_s
    ) as session:
        yield session


def stdin_lines(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp_path / "stdin.log").read_text().splitlines()]


async def test_ask_reads_to_result_and_tracks_usage(fake_cli: Path, tmp_path: Path) -> None:
    deltas: list[str] = []
    starts: list[protocol.MessageStart] = []

    async def on_progress(event: protocol.Progress) -> None:
        if isinstance(event, protocol.TextDelta):
            deltas.append(event.text)
        else:
            starts.append(event)

    async with fake_session(fake_cli, tmp_path) as session:
        assert session.cli_version == "2.1.332-fake"  # read from the warm-up turn's init line
        assert session.model == "claude-haiku-5-5"
        assert session.tools == () and session.mcp_servers == ()
        result = await session.ask("say three words", on_progress)
        assert result.text == "echo: say three words"
        assert "".join(deltas) == result.text and len(deltas) == 4
        assert result.usage.input_tokens == len("say three words") // 4
        assert result.usage.cache_read_input_tokens == 100
        assert session.turns == 1
        assert session.tokens == result.usage.context_tokens
        await session.clear()
        # A new conversation: no turns, no tokens (the requests served are the worker's count).
        assert session.tokens == 0 and session.turns == 0
        pid = session.pid
        assert repr(session) == f"<Session pid={pid} ready turns=0 tokens=0>"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    sent = stdin_lines(tmp_path)
    assert [m["message"]["content"] for m in sent] == [  # type: ignore[index]
        "/clear", "say three words", "/clear"
    ]


async def test_unknown_and_non_json_lines_are_skipped(
    fake_cli: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with fake_session(fake_cli, tmp_path) as session:
        result = await session.ask("FAKE:garbage hello")
        assert result.text == "echo: hello"
        assert session.alive
    assert "non-JSON line, skipped: this is not json {" in caplog.text


async def test_is_error_and_empty_results_are_returned(fake_cli: Path, tmp_path: Path) -> None:
    async with fake_session(fake_cli, tmp_path) as session:
        result = await session.ask("FAKE:error=Not_logged_in")
        assert result.is_error and result.text == "Not logged in"
        result = await session.ask("FAKE:empty")
        assert not result.is_error and result.text == ""
        assert session.alive


async def test_crash_mid_turn_raises_and_reaps(fake_cli: Path, tmp_path: Path) -> None:
    async with fake_session(fake_cli, tmp_path) as session:
        with pytest.raises(SessionCrashed, match=r"exited with code 1.*crashing mid-turn"):
            await session.ask("FAKE:crash")
        assert not session.alive
        with pytest.raises(SessionCrashed):
            await session.ask("no turn on a dead session")
    assert session.returncode == 1


async def test_hang_then_interrupt_keeps_session_usable(fake_cli: Path, tmp_path: Path) -> None:
    async with fake_session(fake_cli, tmp_path) as session:
        with trio.move_on_after(0.5):
            await session.ask("FAKE:hang")
        assert session.broken is not None  # cancelled mid-turn: out of step until drained
        with trio.fail_after(5):
            assert await session.interrupt()
        assert session.alive
        assert (await session.ask("after")).text == "echo: after"
    assert any(m["type"] == "control_request" for m in stdin_lines(tmp_path))


async def test_unanswered_interrupt_is_bounded_and_process_is_killed(
    fake_cli: Path, tmp_path: Path
) -> None:
    async with fake_session(fake_cli, tmp_path) as session:
        with trio.move_on_after(0.3):
            await session.ask("FAKE:hang-hard")
        with trio.move_on_after(0.5) as scope:
            await session.interrupt()
        assert scope.cancelled_caught and not session.alive
        pid = session.pid
    # hang-hard ignores stdin EOF too; the close escalated to a signal and reaped it.
    assert session.returncode is not None
    assert not psutil.pid_exists(pid)


async def test_exit_while_idle_is_seen(fake_cli: Path, tmp_path: Path) -> None:
    async with fake_session(fake_cli, tmp_path) as session:
        await session.ask("FAKE:exit-after bye")
        with trio.fail_after(5):
            await session.exited.wait()
        assert not session.alive
        assert session.returncode == 0


async def test_slow_start_within_timeout(fake_cli: Path, tmp_path: Path) -> None:
    async with fake_session(fake_cli, tmp_path, start="slow:0.5") as session:
        assert (await session.ask("hi")).text == "echo: hi"


@pytest.mark.parametrize(
    ("start", "match"),
    [
        ("crash", r"died at start: .*exited with code 3.*fake: cannot start"),
        ("text", r"died at start: .*code 0.*this is not the program"),
        ("silent", r"no answer within 0.5s"),
    ],
)
async def test_bad_starts_raise_spawn_failed(
    fake_cli: Path, tmp_path: Path, start: str, match: str
) -> None:
    with pytest.raises(SpawnFailed, match=match):
        async with fake_session(fake_cli, tmp_path, start=start, startup_timeout_s=0.5):
            raise AssertionError("must not start")


async def test_missing_and_non_executable_binaries(tmp_path: Path) -> None:
    with pytest.raises(SpawnFailed, match=r"cannot start.*No such file"):
        async with open_session(
            [str(tmp_path / "nope")], env={}, cwd=tmp_path, startup_timeout_s=1
        ):
            pass
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(SpawnFailed, match=r"cannot start.*Permission denied"):
        async with open_session([str(plain)], env={}, cwd=tmp_path, startup_timeout_s=1):
            pass


async def test_wrong_program_that_stays_alive(tmp_path: Path) -> None:
    program = write_executable(tmp_path / "chatty", "#!/bin/sh\necho hello there\nexec sleep 60\n")
    with pytest.raises(SpawnFailed, match=r"no answer within 0.5s.*hello there"):
        async with open_session([str(program)], env={}, cwd=tmp_path, startup_timeout_s=0.5):
            pass


async def test_line_reader_splits_and_limits() -> None:
    send, receive = trio.testing.memory_stream_pair()
    reader = LineReader(receive, max_line=16)
    await send.send_all(b'{"a":1}\n{"b"')
    assert await reader.readline() == b'{"a":1}'
    await send.send_all(b':2}\n')
    assert await reader.readline() == b'{"b":2}'
    await send.send_all(b"x" * 40)
    with pytest.raises(SessionCrashed, match="over 16 bytes"):
        await reader.readline()


def test_protocol_parses_the_real_captures() -> None:
    """Every line of the real 2.1.332 capture parses; results and deltas come out right."""
    transcript = Path(__file__).with_name("data") / "session-transcript-2.1.332.jsonl"
    results, deltas = [], []
    for line in transcript.read_text().splitlines():
        entry = json.loads(line)
        if entry["dir"] != "out":
            continue
        event = protocol.parse_line(json.dumps(entry["msg"]))
        assert not isinstance(event, protocol.NotJson)
        if isinstance(event, protocol.TurnResult):
            results.append(event)
        elif isinstance(event, protocol.TextDelta):
            deltas.append(event.text)
    assert [r.text for r in results][:3] == ["hello from fake", "", "hello from fake"]
    assert results[0].usage == protocol.Usage(481, 5, 100, 0)
    assert results[0].usage.prompt_tokens == 581
    assert results[1].local_command == "clear"
    assert results[3].interrupted and results[3].is_error
    assert deltas[:3] == ["hello", " from", " fake"]


def test_protocol_classifies_every_sample_line() -> None:
    samples = Path(__file__).with_name("data") / "message-samples-2.1.332.jsonl"
    kinds = {}
    for line in samples.read_text().splitlines():
        entry = json.loads(line)
        kinds[entry["kind"]] = protocol.parse_line(json.dumps(entry["line"]))
    assert isinstance(kinds["system/init"], protocol.Init)
    assert kinds["system/init"].cli_version == "2.1.332"
    assert kinds["system/init"].tools == ()
    error = kinds["err500:result/success"]
    assert isinstance(error, protocol.TurnResult)
    assert error.is_error and error.api_error_status == 500
    assert error.text.startswith("API Error: 500")
    assert isinstance(kinds["interrupt:control_response"], protocol.ControlResponse)
    assert isinstance(kinds["system/ui_invalidate"], protocol.Other)
    assert not any(isinstance(event, protocol.NotJson) for event in kinds.values())
