"""The `ccwrap-trio` command as an operator runs it: a real process, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import trio

from ccwrap_trio import __version__
from ccwrap_trio.cli import build_parser
from ccwrap_trio.config import SETTINGS, Config
from ccwrap_trio.errors import ConfigError

from .conftest import wait_for_health

ENTRY = [sys.executable, "-m", "ccwrap_trio"]


def test_version() -> None:
    out = subprocess.run([*ENTRY, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"ccwrap-trio {__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("ccwrap-trio")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"CCWRAP_PORT": "eighty"}, [],
         "CCWRAP_PORT must be an integer from 0 to 65535, got 'eighty'"),
        ({}, ["--turn-limit", "0"], "--turn-limit must be an integer >= 1, got '0'"),
        ({"CCWRAP_ISOLATION": "some"}, [],
         "CCWRAP_ISOLATION must be one of clear, none, got 'some'"),
        ({"CCWRAP_QUERY_TIMEOUT": "-1"}, [],
         "CCWRAP_QUERY_TIMEOUT must be a number of seconds > 0"),
        ({"CCWRAP_PROACTIVE_PCT": "101"}, [],
         "CCWRAP_PROACTIVE_PCT must be an integer from 1 to 100"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    env: dict[str, str], args: list[str], message: str
) -> None:
    out = subprocess.run(
        [*ENTRY, "serve", *args], capture_output=True, text=True, env={**os.environ, **env},
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert message in out.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.1"])  # taken; not this machine's
def test_a_port_that_cannot_be_bound_exits_2_with_one_line(fake_cli: Path, host: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [*ENTRY, "serve", "--host", host, "--port", str(port)], capture_output=True, text=True,
            env={**os.environ, "CCWRAP_CLAUDE_BIN": str(fake_cli), "CCWRAP_LOG_LEVEL": "error"},
            timeout=60,
        )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"ccwrap-trio: cannot listen on {host}:{port}: "
        + ("Address already in use" if host == "127.0.0.1" else "Cannot assign requested address")
    ]


def test_a_missing_cli_is_said_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the bind then fails, so the process ends by itself
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = subprocess.run(
            [*ENTRY, "serve", "--port", str(taken.getsockname()[1])], capture_output=True,
            text=True, timeout=60,
            env={**os.environ, "CCWRAP_CLAUDE_BIN": str(tmp_path / "no-such-claude")},
        )
    assert out.stderr.splitlines()[0].endswith(
        f"[ERROR] the Claude Code CLI '{tmp_path / 'no-such-claude'}' is not an executable on "
        "PATH (CCWRAP_CLAUDE_BIN): /health says offline until it is")


def test_help_says_each_default_once() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    options = help_text[help_text.index("options:"):]
    workdir = options[options.index("--workdir"):options.index("--startup-timeout")]
    assert workdir.count("default") == 1
    assert "CLAUDE_CODE_OAUTH_TOKEN" in help_text


def test_flags_win_over_environment() -> None:
    args = build_parser().parse_args(["serve", "--port", "9000", "--model", "sonnet"])
    config = Config.load({"CCWRAP_PORT": "8000", "CCWRAP_MODEL": "opus",
                          "CCWRAP_TURN_LIMIT": "7"}, vars(args))
    assert (config.port, config.model, config.turn_limit) == (9000, "sonnet", 7)


def test_defaults_are_the_documented_contract() -> None:
    config = Config.load({})
    assert (config.host, config.port, config.claude_bin, config.model) == (
        "127.0.0.1", 8204, "claude", "haiku")
    assert (config.token_limit, config.turn_limit, config.proactive_pct) == (150_000, 10, 80)
    assert (config.query_timeout_s, config.max_queue) == (300.0, 64)
    assert (config.recovery_attempts, config.recovery_max_backoff_s) == (5, 60.0)
    assert (config.isolation, config.memory_sample_interval_s, config.workdir) == (
        "clear", 5.0, None)
    assert config == Config(child_env=config.child_env)
    assert {s.env for s in SETTINGS} >= {
        "CCWRAP_HOST", "CCWRAP_PORT", "CCWRAP_CLAUDE_BIN", "CCWRAP_CLAUDE_ARGS", "CCWRAP_MODEL",
        "CCWRAP_SYSTEM_PROMPT", "CCWRAP_TOKEN_LIMIT", "CCWRAP_TURN_LIMIT", "CCWRAP_PROACTIVE_PCT",
        "CCWRAP_QUERY_TIMEOUT", "CCWRAP_MAX_QUEUE", "CCWRAP_RECOVERY_ATTEMPTS",
        "CCWRAP_RECOVERY_MAX_BACKOFF", "CCWRAP_ISOLATION", "CCWRAP_MEMORY_SAMPLE_INTERVAL",
        "CCWRAP_WORKDIR"}


def test_relative_paths_are_made_absolute(tmp_path: Path) -> None:
    config = Config.load({"CCWRAP_CLAUDE_BIN": "./bin/claude", "CCWRAP_WORKDIR": "work"})
    assert config.claude_bin == os.path.join(os.getcwd(), "bin/claude")
    assert config.workdir == Path(os.getcwd(), "work")
    assert Config.load({"CCWRAP_CLAUDE_BIN": "claude"}).claude_bin == "claude"  # found on PATH


def test_cli_command_is_locked_down() -> None:
    config = Config.load({"CCWRAP_CLAUDE_ARGS": "--max-turns 1 --append-system-prompt 'a b'"})
    command = config.cli_command()
    joined = " ".join(command)
    for flag in ("--input-format stream-json", "--output-format stream-json", "--verbose",
                 "--permission-mode default", "--permission-prompt-tool stdio",
                 "--no-session-persistence", "--strict-mcp-config", "--model haiku"):
        assert flag in joined
    # Client tools only through our own SDK MCP server, never allowed to run.
    assert json.loads(command[command.index("--mcp-config") + 1]) == {
        "mcpServers": {"oa": {"type": "sdk", "name": "oa"}}}
    assert "--allowedTools" not in command and "--dangerously-skip-permissions" not in command
    assert command[command.index("--tools") + 1] == ""
    assert command[command.index("--setting-sources") + 1] == ""
    assert command[-4:] == ["--max-turns", "1", "--append-system-prompt", "a b"]


def test_child_env_is_an_allow_list() -> None:
    environ = {"PATH": "/bin", "HOME": "/h", "ANTHROPIC_API_KEY": "sk-secret",
               "AWS_SECRET_ACCESS_KEY": "x", "CCWRAP_API_KEYS": "key-0123456789"}
    assert "ANTHROPIC_API_KEY" not in Config.load(environ).child_env
    forwarded = Config.load({**environ, "CCWRAP_FORWARD_API_KEY": "1"}).child_env
    assert forwarded["ANTHROPIC_API_KEY"] == "sk-secret"
    assert "AWS_SECRET_ACCESS_KEY" not in forwarded and "CCWRAP_API_KEYS" not in forwarded
    assert forwarded["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert forwarded["ENABLE_TOOL_SEARCH"] == "false"
    with pytest.raises(ConfigError, match="CCWRAP_FORWARD_API_KEY"):
        Config.load({"CCWRAP_FORWARD_API_KEY": "maybe"})


def test_api_keys_are_parsed_and_never_shown() -> None:
    config = Config.load({"CCWRAP_API_KEYS": " key-aaaaaaaa , key-bbbbbbbb,"})
    assert config.api_keys == ("key-aaaaaaaa", "key-bbbbbbbb")
    assert "key-aaaa" not in repr(config)
    with pytest.raises(ConfigError) as info:
        Config.load({"CCWRAP_API_KEYS": "short,sk-0123456789"})
    assert "short" not in str(info.value) and "sk-0123456789" not in str(info.value)


@asynccontextmanager
async def server_process(
    env: dict[str, str],
) -> AsyncIterator[tuple[trio.Process, str, bytearray]]:
    """``python -m ccwrap_trio serve`` on port 0; yields (process, base URL, its stderr so far).

    Its stderr is read all along: the server logs every request, and a pipe nobody reads fills
    and blocks it.
    """
    process = await trio.lowlevel.open_process(
        [*ENTRY, "serve"], env={**os.environ, "CCWRAP_PORT": "0", "PYTHONUNBUFFERED": "1", **env},
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    assert process.stderr is not None
    stderr = process.stderr
    log = bytearray()
    listening = trio.Event()

    async def drain() -> None:
        while chunk := await stderr.receive_some(65536):
            log.extend(chunk)
            if not listening.is_set() and re.search(rb"listening on http://\S+", log):
                listening.set()
        listening.set()  # EOF: the server died; the caller's check below says so

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            with trio.fail_after(30):
                await listening.wait()
            match = re.search(rb"listening on (http://\S+)", log)
            assert match, log.decode()
            yield process, match.group(1).decode(), log
            if process.returncode is None:
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_rapid_requests_keep_a_real_server_process_small(fake_cli: Path) -> None:
    """The operator quick reference's stress test on a real server process."""
    env = {"CCWRAP_CLAUDE_BIN": str(fake_cli), "CCWRAP_SESSION_MAX_REQUESTS": "8",
           "CCWRAP_MEMORY_SAMPLE_INTERVAL": "0.2"}
    async with server_process(env) as (_, url, _log):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            for i in range(20):
                reply = await trio.to_thread.run_sync(lambda i=i: client.chat.completions.create(
                    model="haiku", messages=[{"role": "user", "content": f"prompt {i}"}]))
                assert reply.choices[0].message.content == f"echo: prompt {i}"
        async with httpx.AsyncClient(base_url=url) as http:
            await trio.sleep(0.5)  # one more memory sample after the last request
            health = (await http.get("/health")).json()
    assert health["stats"]["restart_count"] == health["stats"]["lifetime_restarts"] == 2
    assert health["stats"]["successes"] == 20
    assert health["memory"]["rss_mb"] < 100


async def test_sigterm_finishes_in_flight_requests_and_reaps_the_cli(
    fake_cli: Path, tmp_path: Path
) -> None:
    """SIGTERM: the running request finishes, new ones are refused, exit 0, no CLI left."""
    env = {"CCWRAP_CLAUDE_BIN": str(fake_cli), "CCWRAP_SHUTDOWN_GRACE": "10"}
    async with server_process(env) as (process, url, log):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            with trio.fail_after(30):
                while (await http.get("/health")).json()["status"] != "healthy":
                    await trio.sleep(0.05)
            cli_pid = (await http.get("/health")).json()["session"]["pid"]
            result: dict[str, httpx.Response] = {}

            async def in_flight() -> None:
                result["slow"] = await http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "FAKE:sleep=3 still answered"}]})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)
                await wait_for_health(http, lambda h: h["active_queries"] == 1)
                process.send_signal(signal.SIGTERM)
                with pytest.raises(httpx.HTTPError), trio.fail_after(10):  # no longer accepting
                    while True:
                        async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:
                            await fresh.get("/health")
                        await trio.sleep(0.02)
        with trio.fail_after(30):
            code = await process.wait()
    assert result["slow"].status_code == 200
    assert json.loads(result["slow"].content)["choices"][0]["message"]["content"] == (
        "echo: still answered")
    assert code == 0, log.decode()
    assert b"SIGTERM received" in log
    assert not psutil.pid_exists(cli_pid)


async def test_idle_keep_alive_clients_do_not_hold_shutdown(fake_cli: Path) -> None:
    """SIGTERM with nothing in flight exits at once, even with keep-alive connections open."""
    env = {"CCWRAP_CLAUDE_BIN": str(fake_cli), "CCWRAP_SHUTDOWN_GRACE": "30"}
    async with server_process(env) as (process, url, _log):
        async with httpx.AsyncClient(base_url=url) as http:  # keeps its connection open
            await http.get("/health")
            start = trio.current_time()
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                code = await process.wait()
    assert code == 0
    assert trio.current_time() - start < 10  # not the 30 s grace
