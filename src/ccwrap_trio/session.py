"""One Claude Code CLI child in persistent stream-json mode: spawn, ask, interrupt, close.

The child belongs to the task that enters ``open_session``: leaving that ``async with`` always
ends and reaps it (stdin closed, then SIGTERM, then SIGKILL), whatever cancelled the task.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from . import protocol, toolbridge
from .core import Content, Tool, ToolCall, ToolCallDelta, ToolCallStart
from .errors import SessionCrashed, SessionLostBeforeTurn, SpawnFailed

log = logging.getLogger(__name__)

# A line longer than this is a protocol failure, not an answer to buffer without end.
MAX_LINE_BYTES = 64 * 1024 * 1024
# Closing stdin ends an idle CLI in ~100 ms, SIGTERM in ~60 ms (PROTOCOL.md); wait a little longer.
EXIT_GRACE_S = 2.0

OnProgress = Callable[[protocol.Progress], Awaitable[None]]

_interrupt_ids = itertools.count(1)


class SessionLike(Protocol):
    """What a worker needs of a session; ``session.Session`` and the tests' fakes provide it."""

    turns: int  # of the current conversation (0 after a /clear)
    tokens: int  # the current conversation's size
    requests: int  # served since spawn
    model: str
    cli_version: str
    started_at: float
    exited: trio.Event

    @property
    def pid(self) -> int: ...

    @property
    def alive(self) -> bool: ...

    @property
    def broken(self) -> str | None: ...

    def describe_exit(self) -> str: ...

    async def ask(
        self, content: Content, on_progress: OnProgress | None = None
    ) -> protocol.TurnResult: ...

    async def clear(self) -> None: ...

    async def interrupt(self) -> bool: ...

    async def use_tools(self, tools: tuple[Any, ...]) -> None: ...

    async def use_model(self, model: str) -> None: ...

    def on_model(self, model: str) -> bool: ...


# How a worker gets a session: entering spawns and warms one, leaving ends and reaps it.
SessionFactory = Callable[[], AbstractAsyncContextManager[SessionLike, bool | None]]


class LineReader:
    """Splits a byte stream into lines; the partial tail waits for the next read."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_line: int = MAX_LINE_BYTES) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._max_line = max_line
        self._searched = 0

    async def readline(self) -> bytes | None:
        """The next line without its newline, or None at end of stream."""
        while True:
            index = self._buffer.find(b"\n", self._searched)
            if index >= 0:
                line = bytes(self._buffer[:index])
                del self._buffer[: index + 1]
                self._searched = 0
                return line
            self._searched = len(self._buffer)
            if len(self._buffer) > self._max_line:
                raise SessionCrashed(f"CLI wrote a line over {self._max_line} bytes")
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                if self._buffer:
                    line, self._buffer = bytes(self._buffer), bytearray()
                    return line
                return None
            self._buffer += chunk


class Session:
    """A live CLI process and what it has done since spawn. Made by ``open_session``."""

    def __init__(self, process: trio.Process, stderr_tail: deque[str]) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._lines = LineReader(process.stdout)
        self._stderr_tail = stderr_tail
        self._busy = False
        self.exited = trio.Event()
        self.started_at = trio.current_time()
        self.turns = 0  # of the current conversation: a /clear starts a new one
        self.tokens = 0
        self.requests = 0  # requests served since spawn (the process's lifetime)
        self.model = ""
        self.cli_version = ""
        self.tools: tuple[str, ...] = ()
        self.mcp_servers: tuple[str, ...] = ()
        # The model name last asked for (--model or set_model); ``model`` is what it resolved to.
        self.model_name = ""
        # What our MCP server answers tools/list with, and what the CLI last fetched.
        self.offered_tools: tuple[Tool, ...] = ()
        self.listed_tools: tuple[Tool, ...] = ()
        self._lists_served = 0
        self._turn_state = _TurnState()
        # Set when the protocol is out of step (a cancelled read, an undrained interrupt): the
        # owner must not send another turn, only close the session.
        self.broken: str | None = None

    def __repr__(self) -> str:
        state = "dead" if self.exited.is_set() else "busy" if self._busy else "ready"
        return f"<Session pid={self.pid} {state} turns={self.turns} tokens={self.tokens}>"

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def alive(self) -> bool:
        return self.broken is None and not self.exited.is_set()

    def describe_exit(self) -> str:
        tail = " | ".join(self._stderr_tail)
        code = self._process.returncode
        what = f"CLI exited with code {code}" if code is not None else "CLI stopped answering"
        return f"{what}; stderr: {tail}" if tail else what

    async def ask(
        self, content: str | list[dict[str, Any]], on_progress: OnProgress | None = None
    ) -> protocol.TurnResult:
        """Send one user turn and read lines until its ``result``; count it as a turn.

        Text deltas and the message start go to ``on_progress`` as they arrive.

        Raises SessionCrashed if the child dies or breaks the protocol. If cancelled, the session
        is marked broken unless the caller interrupts and drains it (``interrupt``).
        """
        result = await self._turn(protocol.user_line(content), on_progress)
        self.turns += 1
        if result.usage.context_tokens > 0:
            self.tokens = result.usage.context_tokens
        return result

    async def use_tools(self, tools: tuple[Tool, ...]) -> None:
        """Make the next turn offer exactly ``tools``; a no-op when the CLI has them already.

        Unbounded by itself: callers wrap it in a deadline. Raises SessionCrashed.
        """
        if tools == self.listed_tools:
            return
        self.offered_tools = tools
        served = self._lists_served
        request_id = f"ccwrap_tools_{next(_interrupt_ids)}"
        answered = False

        def done(event: protocol.Event) -> bool:
            nonlocal answered
            if isinstance(event, protocol.ControlResponse) and event.request_id == request_id:
                answered = True
            # The CLI fetches the new list at once; the next turn carries it.
            return answered and self._lists_served > served and self.listed_tools == tools

        await self._control(protocol.control_request_line(request_id, toolbridge.LIST_CHANGED),
                            done)

    def on_model(self, model: str) -> bool:
        """Whether the session is on ``model`` already (as asked for, or as the CLI named it)."""
        return model in (self.model_name, self.model)

    async def use_model(self, model: str) -> None:
        """Switch the session to ``model`` (``set_model``); a no-op when it is on it already.

        Unbounded by itself: callers wrap it in a deadline. Raises SessionCrashed.
        """
        if self.on_model(model):
            return
        request_id = f"ccwrap_model_{next(_interrupt_ids)}"
        line = protocol.control_request_line(request_id, {"subtype": "set_model", "model": model})
        reply: protocol.ControlResponse | None = None

        def done(event: protocol.Event) -> bool:
            nonlocal reply
            if isinstance(event, protocol.ControlResponse) and event.request_id == request_id:
                reply = event
            return reply is not None

        await self._control(line, done)
        assert reply is not None
        if reply.subtype != "success":
            raise SessionCrashed(f"set_model {model!r} failed: {reply.response}")
        self.model_name = model
        resolved = reply.response.get("model")
        self.model = resolved if isinstance(resolved, str) and resolved else model

    async def _control(self, line: bytes, done: Callable[[protocol.Event], bool]) -> None:
        if not self.alive:
            raise SessionCrashed(self.broken or self.describe_exit())
        self._busy = True
        try:
            await self._stdin.send_all(line)
            while not done(await self._read_event()):
                pass
            self._busy = False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken = "stdin closed"
            raise SessionCrashed(self.describe_exit()) from exc
        except BaseException:
            if self.broken is None:
                self.broken = "a control request was left before its answer"
            raise

    async def clear(self) -> None:
        """Reset the conversation in-process (``/clear``: no API call, ~70 ms)."""
        result = await self._turn(protocol.CLEAR_LINE, None)
        if result.is_error:
            raise SessionCrashed(f"/clear failed: {result.text}")
        self.tokens = 0
        self.turns = 0

    async def interrupt(self) -> bool:
        """Abort the running turn and read to its ``result``; True if the session is usable.

        Call it with the turn's reader cancelled; it bounds itself by nothing, so callers wrap it
        in a deadline (and a shield when cancellation got them here).
        """
        request_id = f"ccwrap_int_{next(_interrupt_ids)}"
        try:
            await self._stdin.send_all(protocol.interrupt_line(request_id))
            while True:
                event = await self._read_event()
                if isinstance(event, protocol.TurnResult):
                    self.broken = None
                    self._busy = False
                    return True
        except (SessionCrashed, trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def _turn(self, line: bytes, on_progress: OnProgress | None) -> protocol.TurnResult:
        if not self.alive:
            raise SessionCrashed(self.broken or self.describe_exit())
        self._busy = True
        state = self._turn_state = _TurnState()
        try:
            try:
                await self._stdin.send_all(line)
                event = await self._read_event()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # Gone before it said a word of this turn (it died just before): nothing ran.
                self.broken = "stdin closed"
                raise SessionLostBeforeTurn(self.describe_exit()) from exc
            except SessionCrashed as exc:
                if self.broken != "stdout closed":
                    raise  # it did say something (a line over the limit)
                raise SessionLostBeforeTurn(str(exc)) from exc
            while not isinstance(event, protocol.TurnResult):
                progress = state.progress(event)
                if on_progress is not None and progress is not None:
                    await on_progress(progress)
                event = await self._read_event()
            self._busy = False
            return state.finish(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken = "stdin closed"
            raise SessionCrashed(self.describe_exit()) from exc
        except BaseException:
            # Left before the result (cancelled, crashed): the stream is out of step until an
            # interrupt drains it.
            if self.broken is None:
                self.broken = "a turn was left before its result"
            raise

    async def _read_event(self) -> protocol.Event:
        line = await self._lines.readline()
        if line is None:
            self.broken = "stdout closed"
            # Give the exit status a moment to land so the error can say it.
            with trio.move_on_after(0.5):
                await self.exited.wait()
            raise SessionCrashed(self.describe_exit())
        event = protocol.parse_line(line)
        if isinstance(event, protocol.NotJson):
            if event.raw.strip():
                log.warning("[WARN] CLI wrote a non-JSON line, skipped: %.200s", event.raw)
                self._stderr_tail.append(f"stdout: {event.raw[:200]}")
        elif isinstance(event, protocol.Init):
            self.model = event.model
            self.cli_version = event.cli_version
            self.tools = event.tools
            self.mcp_servers = event.mcp_servers
        elif isinstance(event, protocol.ControlRequest):
            await self._answer_control(event)
        elif isinstance(event, protocol.MessageDelta):
            self._turn_state.stop_reason = event.stop_reason
        elif isinstance(event, protocol.MessageStop):
            # The API call's stream is over: every tool_use block is complete. Denied earlier
            # (even right after message_delta, seen on 2.1.332) the CLI may abort the stream.
            state = self._turn_state
            state.stopped = True
            state.attempt_open = False
            held, state.held = state.held, []
            for request_id in held:
                await self._send_answer(request_id, toolbridge.DENY)
        return event

    async def _answer_control(self, event: protocol.ControlRequest) -> None:
        if event.subtype == "mcp_message":
            message = event.request.get("message")
            if isinstance(message, dict) and message.get("method") == "tools/list":
                self.listed_tools = self.offered_tools
                self._lists_served += 1
            reply = toolbridge.mcp_reply(message, self.offered_tools)
            await self._send_answer(event.request_id, {"mcp_response": reply})
        elif event.subtype == "can_use_tool":
            # Denied at once, the stream is aborted and a parallel call is lost (PROTOCOL.md):
            # held until message_stop says the API call is complete.
            if self._turn_state.stopped:
                await self._send_answer(event.request_id, toolbridge.DENY)
            else:
                self._turn_state.held.append(event.request_id)
        else:
            log.warning("[WARN] CLI control request %r not understood; answered with an error",
                        event.subtype)
            await self._stdin.send_all(protocol.control_error_line(
                event.request_id, f"unsupported control request {event.subtype!r}"))

    async def _send_answer(self, request_id: str, response: dict[str, Any]) -> None:
        await self._stdin.send_all(protocol.control_response_line(request_id, response))

    async def _terminate(self) -> None:
        """End the child for good: stdin EOF, then SIGTERM, then SIGKILL. Always reaps."""
        process = self._process
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                await self._stdin.aclose()
                with trio.move_on_after(EXIT_GRACE_S):
                    await process.wait()
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(EXIT_GRACE_S):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()


@dataclass
class _TurnState:
    """What one turn's stream has shown so far: text, tool calls, the model, held denials."""

    calls: dict[int, list[str]] = field(default_factory=dict)  # block index -> [id, name, json]
    ordinals: dict[int, int] = field(default_factory=dict)  # block index -> call number
    model: str = ""
    stop_reason: str | None = None  # from message_delta
    stopped: bool = False  # message_stop seen
    held: list[str] = field(default_factory=list)
    rate_limits: list[protocol.RateLimit] = field(default_factory=list)
    retry_delay_ms: int | None = None  # the CLI's last api_retry
    # The API call under way (the CLI may retry one): its text, and whether its stream is still
    # open (no message_stop).
    attempt_text: list[str] = field(default_factory=list)
    attempt_open: bool = False

    def progress(self, event: protocol.Event) -> protocol.Progress | None:
        if isinstance(event, protocol.RateLimit):
            self.rate_limits.append(event)
            return None
        if isinstance(event, protocol.ApiRetry):
            self.retry_delay_ms = event.retry_delay_ms
            return None
        if isinstance(event, protocol.TextDelta):
            self.attempt_text.append(event.text)
            return event
        if isinstance(event, protocol.MessageStart):
            self.model = event.model or self.model
            self.attempt_open, self.attempt_text = True, []
            return event
        if isinstance(event, protocol.ToolUseStart) and event.name.startswith(toolbridge.PREFIX):
            # Only the client's tools: anything else is the CLI's business ("No such tool").
            ordinal = self.ordinals[event.index] = len(self.ordinals)
            name = toolbridge.client_name(event.name)
            self.calls[event.index] = [event.id, name, ""]
            return ToolCallStart(ordinal, event.id, name)
        if isinstance(event, protocol.ToolInputDelta) and event.index in self.calls:
            self.calls[event.index][2] += event.partial_json
            return ToolCallDelta(self.ordinals[event.index], event.partial_json)
        return None

    def finish(self, result: protocol.TurnResult) -> protocol.TurnResult:
        result = dataclasses.replace(result, rate_limits=tuple(self.rate_limits),
                                     retry_delay_ms=self.retry_delay_ms)
        calls = tuple(ToolCall(id_, name, arguments or "{}")
                      for id_, name, arguments in self.calls.values())
        # Stopped by our denial: aborted_tools; aborted_streaming if the CLI still read the
        # stream. Either way message_delta said tool_use, so every block arrived whole.
        if calls and (result.terminal_reason == "aborted_tools" or (
            self.stop_reason == "tool_use" and result.terminal_reason == "aborted_streaming"
        )):
            # The answer is the text before the calls (of the last API call, if it was retried).
            return dataclasses.replace(result, text="".join(self.attempt_text), is_error=False,
                                       tool_calls=calls, model=self.model)
        if (not result.is_error and result.text.strip() and self.attempt_open
                and "".join(self.attempt_text).strip() == result.text.strip()):
            # Defensive: a result that is just the text of an API stream still open (no
            # message_stop) would be a cut answer called complete. (What 2.1.332 really does
            # after a malformed event: message_stop with abandoned_blocks, then a retry.)
            return dataclasses.replace(result, is_error=True, model=self.model, text=(
                "the API's stream broke off mid-answer (no message_stop) and the CLI reported "
                "the partial text as complete; retry the request"))
        return dataclasses.replace(result, model=self.model)


@asynccontextmanager
async def open_session(
    command: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    startup_timeout_s: float,
) -> AsyncIterator[Session]:
    """Spawn the CLI, wait until it answers a first (``/clear``) turn, and own it until exit.

    Raises SpawnFailed if the binary cannot be started, or the child dies, talks no stream-json or
    stays silent for ``startup_timeout_s`` before that first answer.
    """
    try:
        process = await trio.lowlevel.open_process(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(cwd),
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not the child's
        )
    except OSError as exc:
        raise SpawnFailed(f"cannot start {command[0]!r}: {exc.strerror or exc}") from exc
    stderr_tail: deque[str] = deque(maxlen=5)
    session = Session(process, stderr_tail)
    if "--model" in command[:-1]:
        session.model_name = command[list(command).index("--model") + 1]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain_stderr, process, stderr_tail)
            nursery.start_soon(_watch_exit, process, session.exited)
            try:
                await _warm_up(session, startup_timeout_s)
                log.debug("session %r started", session)
                yield session
            finally:
                await session._terminate()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The helper tasks never raise, so a group holds the body's one exception: the nursery
        # is this function's detail, and callers catch SpawnFailed, not a group of it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
    finally:
        # Also covers a failure before the nursery existed.
        if process.returncode is None:
            await session._terminate()


async def _warm_up(session: Session, startup_timeout_s: float) -> None:
    """The first turn proves the child speaks stream-json, and reads its version and model."""
    try:
        with trio.fail_after(startup_timeout_s):
            await session.clear()
    except trio.TooSlowError as exc:
        raise SpawnFailed(
            f"no answer within {startup_timeout_s:g}s of spawn; {session.describe_exit()}"
        ) from exc
    except SessionCrashed as exc:
        raise SpawnFailed(f"died at start: {exc}") from exc


async def _drain_stderr(process: trio.Process, tail: deque[str]) -> None:
    # An unread stderr pipe fills and blocks the child; keep the last lines to explain a death.
    assert process.stderr is not None
    reader = LineReader(process.stderr, max_line=1 << 20)
    try:
        while (line := await reader.readline()) is not None:
            text = line.decode("utf-8", "replace").strip()
            if text:
                tail.append(text[:300])
                log.debug("CLI stderr: %s", text[:300])
    except (trio.ClosedResourceError, trio.BrokenResourceError, SessionCrashed):
        pass


async def _watch_exit(process: trio.Process, exited: trio.Event) -> None:
    await process.wait()
    exited.set()
