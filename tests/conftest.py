from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from ccwrap_trio.config import Config, child_environment
from ccwrap_trio.server import serve
from ccwrap_trio.standin import Standin, StandinConfig

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLAUDE = Path(__file__).with_name("fake_claude.py")


def write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_cli(tmp_path: Path) -> Path:
    """An executable that runs tests/fake_claude.py with this interpreter."""
    return write_executable(
        tmp_path / "fake-claude",
        f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_CLAUDE}" "$@"\n',
    )


def real_claude_bin() -> str:
    """The pinned real CLI: CCWRAP_TEST_CLAUDE_BIN, else the one .ci/run / make install."""
    candidates = [
        os.environ.get("CCWRAP_TEST_CLAUDE_BIN", ""),
        str(ROOT / ".tools/claude/node_modules/.bin/claude"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("claude")
    if found:
        return found
    pytest.fail("the real Claude Code CLI is not installed: run `make install` (or .ci/run)")


@pytest.fixture
def make_config(tmp_path: Path, fake_cli: Path) -> Any:
    """Config for tests: the fake CLI, port 0, short timeouts, an isolated child env."""

    def make(*, env: dict[str, str] | None = None, **overrides: Any) -> Config:
        workdir = tmp_path / "work"
        workdir.mkdir(exist_ok=True)
        environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **(env or {})}
        base = Config(
            port=0,
            standby=False,  # one CLI per server unless a test asks for the standby
            claude_bin=str(fake_cli),
            workdir=workdir,
            query_timeout_s=10.0,
            startup_timeout_s=10.0,
            interrupt_grace_s=2.0,
            shutdown_grace_s=5.0,
            memory_sample_interval_s=0.5,
            # The fake CLI's FAKE_* knobs bypass the allow-list; nothing else does.
            child_env={
                **child_environment(environ, forward_api_key=True),
                **{k: v for k, v in (env or {}).items() if k.startswith("FAKE_")},
            },
        )
        return dataclasses.replace(base, **overrides)

    return make


@asynccontextmanager
async def running_server(config: Config, **kwargs: Any) -> AsyncIterator[str]:
    """Serve ``config`` on 127.0.0.1 (port 0) in a nursery; yield the base URL; stop it after."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(lambda task_status: serve(
            config, shutdown=shutdown, task_status=task_status, **kwargs
        ))
        try:
            yield urls[0]
        finally:
            shutdown.set()


@asynccontextmanager
async def real_stack(
    tmp_path: Path, *, environ: dict[str, str | None] | None = None, **overrides: Any
) -> AsyncIterator[tuple[str, Standin, Config]]:
    """The stand-in API and ccwrap-trio over the real CLI; yields (base URL, stand-in, config).

    ``environ`` adds to (or replaces in) the server's environment the CLI's is derived from;
    a None value removes the variable (``ANTHROPIC_API_KEY`` for a subscription login).
    """
    async with trio.open_nursery() as nursery:
        standin: Standin = await nursery.start(Standin(StandinConfig()).serve)
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        environ = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(home),  # a fresh HOME: no login, no user settings
            "ANTHROPIC_BASE_URL": standin.url,
            "ANTHROPIC_API_KEY": "sk-standin-e2e",
            "CLAUDE_CODE_MAX_RETRIES": "1",
            "API_TIMEOUT_MS": "30000",
            **(environ or {}),
        }
        environ = {name: value for name, value in environ.items() if value is not None}
        config = Config(
            port=0,
            standby=False,
            claude_bin=real_claude_bin(),
            query_timeout_s=60.0,
            startup_timeout_s=60.0,
            interrupt_grace_s=5.0,
            shutdown_grace_s=5.0,
            memory_sample_interval_s=0.5,
            forward_api_key=True,
            child_env=child_environment(environ, forward_api_key=True),
        )
        config = dataclasses.replace(config, **overrides)
        async with running_server(config) as url:
            yield url, standin, config
        nursery.cancel_scope.cancel()


async def stream_until(url: str, body: dict[str, Any], marker: bytes) -> bytes:
    """POST ``body`` over a raw socket, read until ``marker`` arrives, then walk away.

    A raw socket, so that leaving is a plain close, as a crashed client's would be (HTTP client
    libraries leave half-read streams to the garbage collector).
    """
    payload = json.dumps(body).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    received = b""
    with trio.fail_after(60):
        while marker not in received:
            received += await stream.receive_some(65536)
    await stream.aclose()
    return received


async def wait_for(predicate: Any, *, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` (sync) until true; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


async def wait_for_health(
    http: Any, predicate: Any, *, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll ``/health`` (through the httpx client ``http``) until ``predicate(body)``; the body.

    Tests order concurrent requests by what the server says, never by sleeping: a sleep that is
    long enough on a quiet machine is too short on a loaded one.
    """
    with trio.fail_after(timeout):
        while True:
            body: dict[str, Any] = (await http.get("/health")).json()
            if predicate(body):
                return body
            await trio.sleep(0.02)


@pytest.fixture(autouse=True)
def _log_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ccwrap_trio")


async def run_pytest_namespaced(unshare: list[str], script: str, inner: Path,
                              env: dict[str, str]) -> str:
    """Run pytest on ``inner`` in new namespaces (``unshare`` and its flags), after ``script``
    (a shell line ending in ``exec "$@"``); its output, once every test in it passed."""
    command = [*unshare, "sh", "-c", script, "namespaced",
               sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(inner)]
    with trio.fail_after(300):
        done = await trio.run_process(command, cwd=ROOT, env=env, check=False,
                                      capture_stdout=True, capture_stderr=True)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output[-6000:]
    assert " passed" in output and "skipped" not in output, output[-2000:]
    return output
