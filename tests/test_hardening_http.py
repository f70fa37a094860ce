"""Issue 10 (part A) over real sockets: connections that are really closed, clients that never
read, a failing memory sampler, a CLI frozen in /clear (fake and real)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ccwrap_trio import memory
from ccwrap_trio.config import Config, child_environment
from ccwrap_trio.session import open_session
from ccwrap_trio.standin import Standin, StandinConfig
from ccwrap_trio.supervisor import SessionLike

from .conftest import real_claude_bin, running_server, wait_for


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes its side; fails if it never does."""
    received = b""
    with trio.fail_after(20):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # a reset is a close too
                return received
            if not chunk:
                return received
            received += chunk


@pytest.mark.parametrize(
    ("length", "body", "status"),
    [
        pytest.param(100, b"x" * 100, b"401", id="401-body-sent"),
        pytest.param(100, b"", b"401", id="401-body-withheld"),
        pytest.param(5000, b"x" * 5000, b"413", id="413"),
    ],
)
async def test_answered_without_reading_the_body_really_closes(
    make_config: Any, length: int, body: bytes, status: bytes
) -> None:
    """Finding 1: `Connection: close` was said, but the socket stayed open until the client left."""
    config = make_config(api_keys=("secret-key-1",) if status == b"401" else (),
                         max_body_bytes=2048)
    async with running_server(config) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
        async with stream:
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length + body
            )
            received = await read_to_eof(stream)
    assert received.startswith(b"HTTP/1.1 " + status), received[:200]
    assert b"connection: close" in received.lower()


async def test_client_that_never_reads_a_stream_is_cut_and_counted(make_config: Any) -> None:
    """Finding 6: a stream nobody reads was held forever, with its answer buffered."""
    config = make_config(send_timeout_s=1.0, query_timeout_s=20.0)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await stream_never_read_is_cut(url, http)


async def stream_never_read_is_cut(url: str, http: httpx.AsyncClient) -> None:
    """A 4 MB stream to a socket that never reads is cut and counted; the server serves on."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    await sock.connect(("127.0.0.1", port_of(url)))
    stream = trio.SocketStream(sock)
    payload = json.dumps({"model": "haiku", "stream": True, "messages": [
        {"role": "user", "content": "FAKE:stream-big=4000000"}]}).encode()
    async with stream:
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
        )

        async def disconnects() -> int:
            return int((await http.get("/health")).json()["stats"]["disconnects"])

        with trio.fail_after(30):
            while await disconnects() < 1:
                await trio.sleep(0.1)
        received = await read_to_eof(stream)  # the server closed its side
    assert received.startswith(b"HTTP/1.1 200")
    assert len(received) < 4_000_000  # cut, not delivered whole
    health = (await http.get("/health")).json()
    stats = health["stats"]
    assert stats["total_requests"] == (
        stats["successes"] + stats["total_errors"] + stats["rejected"]
    ), stats
    assert health["active_queries"] == 0
    ok = await http.post("/v1/chat/completions", json={
        "model": "haiku", "messages": [{"role": "user", "content": "still here"}]})
    assert ok.status_code == 200, ok.text


async def test_memory_sampler_out_of_file_descriptors_keeps_serving(
    make_config: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 1: the sampler's OSError(EMFILE) escaped the services nursery: the server exited."""
    failing = True
    real = memory.take_sample

    def take_sample(pids: Any, at: float) -> memory.MemorySample:
        if failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(pids, at)

    monkeypatch.setattr(memory, "take_sample", take_sample)
    config = make_config(memory_sample_interval_s=0.05)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await wait_for(lambda: caplog.text.count("Memory sample skipped") >= 3)
        with trio.fail_after(10):
            while (await http.get("/health")).status_code != 200:  # the session is up
                await trio.sleep(0.05)
        failing = False
        response = await http.post("/v1/chat/completions", json={
            "model": "haiku", "messages": [{"role": "user", "content": "hello"}]})
        assert response.status_code == 200


async def test_fake_cli_frozen_in_clear_is_replaced(make_config: Any) -> None:
    """Finding 2, with the fake CLI over pipes: the next request is answered, not 504 for good."""
    config = make_config(clear_timeout_s=1.0)
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        first = await http.post("/v1/chat/completions", json={
            "model": "haiku", "messages": [{"role": "user", "content": "FAKE:hang-next-clear"}]})
        assert first.status_code == 200
        second = await http.post("/v1/chat/completions", json={
            "model": "haiku", "messages": [{"role": "user", "content": "after"}]})
        assert second.status_code == 200, second.text
        stats = (await http.get("/health")).json()["stats"]
    assert stats["timeout_restarts"] == 1
    assert stats["successes"] == 2


class _StopsOnClear:
    """A real session that SIGSTOPs its own CLI the first time ``/clear`` is sent after a turn."""

    def __init__(self, session: SessionLike, stopped: list[int]) -> None:
        self._session = session
        self._stopped = stopped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    async def clear(self) -> None:
        if self._session.turns and not self._stopped:
            self._stopped.append(self._session.pid)
            os.kill(self._session.pid, signal.SIGSTOP)
        await self._session.clear()


async def test_real_cli_stopped_during_clear_is_replaced(tmp_path: Path) -> None:
    """Finding 2, with the real CLI frozen (SIGSTOP) while it owes the answer to /clear."""
    stopped: list[int] = []
    async with trio.open_nursery() as nursery:
        standin: Standin = await nursery.start(Standin(StandinConfig()).serve)
        home = tmp_path / "home"
        home.mkdir()
        work = tmp_path / "work"
        work.mkdir()
        environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(home),
                   "ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": "sk-standin-e2e",
                   "CLAUDE_CODE_MAX_RETRIES": "1"}
        config = Config(port=0, standby=False, claude_bin=real_claude_bin(), workdir=work,
                        query_timeout_s=60.0, startup_timeout_s=60.0, clear_timeout_s=3.0,
                        shutdown_grace_s=5.0, forward_api_key=True,
                        child_env=child_environment(environ, forward_api_key=True))

        @asynccontextmanager
        async def factory_impl() -> AsyncIterator[SessionLike]:
            async with open_session(config.cli_command(), env=dict(config.child_env), cwd=work,
                                    startup_timeout_s=config.startup_timeout_s) as session:
                yield _StopsOnClear(session, stopped)  # type: ignore[misc]

        def factory() -> AbstractAsyncContextManager[SessionLike, bool | None]:
            return factory_impl()

        try:
            async with running_server(config, session_factory_override=factory) as url, \
                    httpx.AsyncClient(base_url=url, timeout=90) as http:
                for text in ("first", "second"):
                    response = await http.post("/v1/chat/completions", json={
                        "model": "haiku", "messages": [{"role": "user", "content": text}]})
                    assert response.status_code == 200, response.text
                stats = (await http.get("/health")).json()["stats"]
        finally:
            for pid in stopped:  # never leave a stopped process behind
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        nursery.cancel_scope.cancel()
    assert stopped
    assert stats["timeout_restarts"] == 1
    assert stats["successes"] == 2



async def test_server_at_its_file_descriptor_limit_degrades_and_recovers(fake_cli: Path) -> None:
    """Finding 1 as found: a server process with few fds, flooded with idle connections, stayed
    up only until its memory sampler hit EMFILE; now it waits the flood out and serves again."""
    limit = 96
    launcher = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'ccwrap_trio', 'serve'])"
    )
    env = {**os.environ, "CCWRAP_PORT": "0", "PYTHONUNBUFFERED": "1", "CCWRAP_STANDBY": "0",
           "CCWRAP_CLAUDE_BIN": str(fake_cli), "CCWRAP_MEMORY_SAMPLE_INTERVAL": "0.1"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", launcher], env=env, stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert process.stderr is not None
    stderr = process.stderr
    log = bytearray()
    try:
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                while chunk := await stderr.receive_some(65536):
                    log.extend(chunk)

            nursery.start_soon(drain)
            await wait_for(lambda: re.search(rb"listening on http://\S+", log) is not None,
                           timeout=30)
            match = re.search(rb"listening on (http://\S+)", log)
            assert match is not None
            url = match.group(1).decode()
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                await wait_for_healthy(http)
                flood = []
                for _ in range(limit + 20):  # more than it can hold: its fds run out
                    flood.append(await trio.open_tcp_stream("127.0.0.1", port_of(url)))
                await wait_for(
                    lambda: b"Memory sample skipped" in log or process.poll() is not None,
                    timeout=30,
                )
                assert process.returncode is None, log.decode()[-2000:]
                for stream in flood:
                    await stream.aclose()
                await wait_for_healthy(http)
                response = await http.post("/v1/chat/completions", json={
                    "model": "haiku", "messages": [{"role": "user", "content": "hello"}]})
                assert response.status_code == 200, response.text
            assert process.returncode is None
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_for_healthy(http: httpx.AsyncClient) -> None:
    with trio.fail_after(30):
        while True:
            with suppress(httpx.TransportError):
                if (await http.get("/health")).status_code == 200:
                    return
            await trio.sleep(0.1)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENOMEM])
async def test_spawn_out_of_fds_or_memory_recovers(
    make_config: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    code: int,
) -> None:
    """Finding 1: a spawn that fails for want of fds or memory is a clear error, then recovery."""
    real = trio.lowlevel.open_process
    failures = [1, 1]

    async def open_process(*args: Any, **kwargs: Any) -> trio.Process:
        if failures:
            failures.pop()
            raise OSError(code, os.strerror(code))
        return await real(*args, **kwargs)

    monkeypatch.setattr(trio.lowlevel, "open_process", open_process)
    async with running_server(make_config()) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as http:
        response = await http.post("/v1/chat/completions", json={
            "model": "haiku", "messages": [{"role": "user", "content": "hello"}]})
        assert response.status_code == 200, response.text
        stats = (await http.get("/health")).json()["stats"]
    assert stats["recovery_attempts"] == 2
    assert caplog.text.count("[RESTART] FAILED: cannot start") == 2
    assert os.strerror(code) in caplog.text


async def test_a_stream_cut_off_upstream_is_an_error_not_a_short_answer(make_config: Any) -> None:
    """The CLI sometimes reports an API stream that broke off (no message_stop) as a complete
    answer: the client gets an error, never the partial text called ``stop``."""
    prompt = "FAKE:cut-stream one two three four five six"
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        plain = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": prompt}]})
        streamed = await http.post("/v1/chat/completions", json={
            "stream": True, "messages": [{"role": "user", "content": prompt}]})
        fine = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "one two three"}]})
    assert plain.status_code == 502 and plain.json()["error"]["code"] == "cli_error"
    assert "broke off mid-answer" in plain.json()["error"]["message"]
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert "error" in chunks[-1]
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason") == "stop"
                   for c in chunks)
    assert fine.json()["choices"][0]["message"]["content"] == "echo: one two three"


async def test_a_cli_gone_just_before_the_turn_is_replaced_and_the_request_served(
    make_config: Any, tmp_path: Path
) -> None:
    """A CLI that dies between requests a moment before the next is sent (its exit not seen
    yet) never said a word of that turn: the request is served by the next session, not a 502."""
    vanish = tmp_path / "vanish"
    config = make_config(env={"FAKE_CLAUDE_VANISH_FILE": str(vanish)})
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        assert (await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "warm"}]})).status_code == 200
        for stream in (False, True):
            vanish.touch()
            response = await http.post("/v1/chat/completions", json={
                "stream": stream, "messages": [{"role": "user", "content": "served anyway"}]})
            assert response.status_code == 200, response.text
            if stream:
                chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                          if line.startswith("data: {")]
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            else:
                text = response.json()["choices"][0]["message"]["content"]
            assert text == "echo: served anyway"
        # One that takes every CLI with it is tried on a second session, then answered 502.
        poison = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "FAKE:vanish"}]})
        stats = (await http.get("/health")).json()["stats"]
    assert poison.status_code == 502 and poison.json()["error"]["code"] == "cli_crashed"
    assert stats["crash_restarts"] == 4 and stats["successes"] == 3
    assert stats["total_errors"] == 1
