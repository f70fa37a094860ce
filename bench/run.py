#!/usr/bin/env python3
"""ccwrap-trio benchmarks: five comparisons, each side a real process on 127.0.0.1.

    .venv/bin/python bench/run.py [--quick] [--only 1,3] [--chart docs/benchmarks.png]
                                  [--json results.json]

1. Overhead floor: ccwrap-trio over an instant fake CLI (bench/fake_cli.py) against a bare
   Quart-Trio endpoint on the same Hypercorn (bench/floor_app.py). Target: p50 within 2 ms.
2. Warm versus spawn: ccwrap-trio over the real CLI against a spawn-per-request server
   (bench/spawn_server.py), both against the stand-in API answering at once. Target: 8x.
3. Restarts in the request path: CCWRAP_SESSION_MAX_REQUESTS=8 with the standby, without it,
   and a lifetime that never ends; real CLI, sequential requests. Target: standby p99 <= 1.2x.
4. Pool scaling: requests/s with CCWRAP_SESSIONS=1, 2, 4, stand-in latency 200 ms, 8 clients.
   Target: 1.8x at 2, 3x at 4.
5. Memory: server RSS idle and after 2,000 requests (instant fake CLI), CLI RSS per session and
   server RSS growth over real-CLI requests. Target: idle < 60 MB, growth < 5 MB / 1,000.

How requests are interleaved: when the sides of a comparison can run at once, they do, and
requests alternate between them (A, B, A, B...) with a short pause after each, so each request
meets an idle machine and drift in the machine's load hits both sides alike. Where a side's
behaviour depends on requests arriving back to back (comparison 3, the back-to-back rows of 1),
requests go in blocks of consecutive requests per side, the blocks alternating between sides,
and every side is quiet (no spawn in flight) before a block starts.

Every loop is bounded in count and in time; servers are stopped (SIGTERM, then SIGKILL) at the end.
Logs of every process are kept in a scratch directory under /tmp, printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from ccwrap_trio.memory import least_squares_slope

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(sys.executable).parent
CCWRAP = VENV_BIN / "ccwrap-trio"
REAL_CLI = ROOT / ".tools/claude/node_modules/.bin/claude"
HTTP_TIMEOUT_S = 60.0
MB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Sizes:
    floor_pairs: int  # comparison 1, spaced: requests per side
    floor_block: int  # comparison 1, back to back: requests per block
    floor_blocks: int  # ... blocks per side
    warm_pairs: int  # comparison 2: requests per side
    restart_block: int  # comparison 3: requests per block (not a multiple of 8: see below)
    restart_blocks: int  # ... blocks per side (block * blocks = requests per side)
    pool_requests: int  # comparison 4: requests per setting per round
    pool_rounds: int
    pool_clients: int
    memory_requests: int  # comparison 5, fake CLI
    memory_real_requests: int  # comparison 5, real CLI
    time_budget_s: float  # per comparison: loops stop early (and say so) past this


FULL = Sizes(
    floor_pairs=400, floor_block=50, floor_blocks=6, warm_pairs=100, restart_block=50,
    restart_blocks=4, pool_requests=64, pool_rounds=3, pool_clients=8, memory_requests=2000,
    memory_real_requests=300, time_budget_s=300.0,
)
QUICK = Sizes(
    floor_pairs=60, floor_block=25, floor_blocks=2, warm_pairs=6, restart_block=50,
    restart_blocks=1, pool_requests=16, pool_rounds=1, pool_clients=8, memory_requests=300,
    memory_real_requests=40, time_budget_s=60.0,
)


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path
    standby: bool = False
    sessions: int = 1
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=HTTP_TIMEOUT_S))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def health(self) -> dict[str, Any]:
        response = self.client.get(self.url + "/health")
        data: dict[str, Any] = response.json()
        return data

    def request(self, i: int) -> float:
        return ask(self, i)

    def rss_mb(self) -> float:
        return float(psutil.Process(self.pid).memory_info().rss) / MB

    def cli_rss_mb(self) -> dict[int, float]:
        """Each CLI child's process tree RSS, by pid (what /health calls cli_rss_mb)."""
        out: dict[int, float] = {}
        for child in psutil.Process(self.pid).children():
            try:
                tree = [child, *child.children(recursive=True)]
                out[child.pid] = sum(p.memory_info().rss for p in tree) / MB
            except psutil.Error:
                continue
        return out


class Processes:
    """Every process this run started; all stopped at exit, children included."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._started: list[Server] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str], ready: str, *,
        timeout_s: float = 30.0, standby: bool = False, sessions: int = 1,
    ) -> Server:
        log_path = self.scratch / f"{name}.log"
        log_file = log_path.open("wb")
        popen = subprocess.Popen(
            argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=str(self.scratch),
        )
        log_file.close()
        pattern = re.compile(ready + r"\s*(http://127\.0\.0\.1:\d+)")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = pattern.search(log_path.read_text(errors="replace"))
            if match:
                server = Server(name, popen, match.group(1), log_path, standby, sessions)
                self._started.append(server)
                return server
            if popen.poll() is not None:
                break
            time.sleep(0.05)
        popen.kill()
        popen.wait()
        raise RuntimeError(f"{name} did not start; log: {log_path}\n{log_path.read_text()[-2000:]}")

    def stop(self, server: Server) -> None:
        if server not in self._started:
            return
        self._started.remove(server)
        server.client.close()
        try:
            children = psutil.Process(server.pid).children(recursive=True)
        except psutil.Error:
            children = []
        if server.popen.poll() is None:
            server.popen.send_signal(signal.SIGTERM)
            try:
                server.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.popen.kill()
                server.popen.wait()
        for child in children:  # CLIs of a server that did not end them (it always should)
            with contextlib.suppress(psutil.Error):
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    child.kill()

    def stop_all(self) -> None:
        for server in list(self._started):
            self.stop(server)


def base_env(home: Path) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home), "LANG": "C.UTF-8"}
    return env


def fake_cli_executable(scratch: Path) -> Path:
    path = scratch / "fake-claude"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{BENCH / "fake_cli.py"}" "$@"\n')
    path.chmod(0o755)
    return path


class DirectCli:
    """The real CLI in the same persistent mode and flags as ccwrap-trio's sessions, driven
    straight over its pipes: the CLI's own turn time, with no HTTP and no server. Like the
    server, it sends /clear after each answer (not timed: off the path for spaced requests)."""

    name = "direct-cli"

    def __init__(self, standin: Server, home: Path, workdir: Path) -> None:
        from ccwrap_trio.config import Config, child_environment

        environ = {**base_env(home), "ANTHROPIC_BASE_URL": standin.url,
                   "ANTHROPIC_API_KEY": "sk-bench"}
        command = Config(claude_bin=str(REAL_CLI)).cli_command()
        self.popen = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=str(workdir), env=child_environment(environ, forward_api_key=True),
        )
        self.turn("/clear")

    def turn(self, text: str) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        line = {"type": "user", "message": {"role": "user", "content": text}}
        self.popen.stdin.write((json.dumps(line) + "\n").encode())
        self.popen.stdin.flush()
        for _ in range(10_000):  # bounded: a turn writes a few dozen lines
            out = self.popen.stdout.readline()
            if not out:
                raise RequestFailed("direct CLI: stdout closed")
            with contextlib.suppress(ValueError):
                message = json.loads(out)
                if isinstance(message, dict) and message.get("type") == "result":
                    return message
                if isinstance(message, dict) and message.get("type") == "control_request":
                    self.answer(message)
        raise RequestFailed("direct CLI: no result line")

    def answer(self, message: dict[str, Any]) -> None:
        """The session's own SDK MCP server, answered as ccwrap-trio's session does (no tools):
        unanswered, the CLI waits for it before its first turn."""
        from ccwrap_trio import protocol, toolbridge

        assert self.popen.stdin is not None
        request = message.get("request") or {}
        if request.get("subtype") == "mcp_message":
            response = {"mcp_response": toolbridge.mcp_reply(request.get("message"), ())}
            self.popen.stdin.write(protocol.control_response_line(message["request_id"], response))
            self.popen.stdin.flush()

    def request(self, i: int) -> float:
        start = time.perf_counter()
        result = self.turn(payload(i)["messages"][0]["content"])
        elapsed = time.perf_counter() - start
        if result.get("is_error") or f"request {i}" not in str(result.get("result")):
            raise RequestFailed(f"direct CLI: unexpected result {str(result)[:300]}")
        self.turn("/clear")
        return elapsed

    def stop(self) -> None:
        if self.popen.poll() is None:
            assert self.popen.stdin is not None
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class Bench:
    def __init__(self, sizes: Sizes, scratch: Path) -> None:
        self.sizes = sizes
        self.scratch = scratch
        self.procs = Processes(scratch)
        self.fake_cli = fake_cli_executable(scratch)
        self._homes = 0

    def home(self) -> Path:
        self._homes += 1
        path = self.scratch / f"home{self._homes}"
        path.mkdir()
        return path

    def standin(self, latency_s: float = 0.0) -> Server:
        env = base_env(self.home())
        return self.procs.start(
            f"standin-{latency_s:g}s",
            [sys.executable, "-m", "ccwrap_trio.standin", "--port", "0",
             "--latency", str(latency_s)],
            env, "standin listening on",
        )

    def ccwrap(
        self, name: str, *, real: bool, standin: Server | None = None, **settings: Any
    ) -> Server:
        env = base_env(self.home())
        env.update({
            "CCWRAP_PORT": "0",
            "CCWRAP_CLAUDE_BIN": str(REAL_CLI if real else self.fake_cli),
            "CCWRAP_SHUTDOWN_GRACE": "5",
        })
        if real:
            assert standin is not None
            env.update({
                "ANTHROPIC_BASE_URL": standin.url,
                "ANTHROPIC_API_KEY": "sk-bench",
                "CCWRAP_FORWARD_API_KEY": "1",
            })
        for key, value in settings.items():
            env["CCWRAP_" + key.upper()] = str(value)
        standby = str(settings.get("standby", "1")) not in ("0", "false", "off", "no")
        sessions = int(settings.get("sessions", 1))
        server = self.procs.start(
            name, [str(CCWRAP), "serve"], env, "ccwrap-trio listening on",
            timeout_s=90.0, standby=standby, sessions=sessions,
        )
        wait_quiet(server)
        return server

    def floor(self) -> Server:
        return self.procs.start(
            "floor", [sys.executable, str(BENCH / "floor_app.py"), "--port", "0"],
            base_env(self.home()), "floor listening on",
        )

    def spawn_server(self, standin: Server) -> Server:
        env = base_env(self.home())
        env.update({"ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": "sk-bench"})
        return self.procs.start(
            "spawn-server",
            [sys.executable, str(BENCH / "spawn_server.py"), "--port", "0",
             "--claude-bin", str(REAL_CLI)],
            env, "spawn server listening on",
        )


def wait_quiet(server: Any, timeout_s: float = 90.0) -> None:
    """Until every session is healthy and idle, and the standby (if enabled) is warm."""
    if not isinstance(server, Server) or not server.name.startswith("ccwrap"):
        return
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            last = server.health()
            sessions = last.get("sessions", [])
            ready = (
                len(sessions) == server.sessions
                and all(s["status"] == "healthy" and s["pid"] and not s["busy"] for s in sessions)
                and last.get("queued") == 0
                and (not server.standby or last.get("standby", {}).get("pid"))
            )
            if ready:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} not quiet after {timeout_s}s: {last}")


# --------------------------------------------------------------------------------------------
# Requests and figures


def payload(i: int) -> dict[str, Any]:
    return {"model": "haiku", "messages": [{"role": "user", "content": f"benchmark request {i}"}]}


class RequestFailed(RuntimeError):
    pass


def ask(server: Server, i: int, client: httpx.Client | None = None) -> float:
    """One chat completion; its latency in seconds. Raises RequestFailed unless 200 + echo."""
    client = client or server.client
    start = time.perf_counter()
    response = client.post(server.url + "/v1/chat/completions", json=payload(i))
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RequestFailed(f"{server.name}: HTTP {response.status_code}: {response.text[:300]}")
    content = response.json()["choices"][0]["message"]["content"]
    if not content.startswith("echo:") or f"request {i}" not in content:
        raise RequestFailed(f"{server.name}: unexpected answer {content[:200]!r}")
    return elapsed


def pct(values: list[float], q: float) -> float:
    """Percentile q (0-100), linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values), "p50": statistics.median(values), "p90": pct(values, 90),
        "p99": pct(values, 99), "max": max(values), "mean": statistics.fmean(values),
    }


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.exceeded = False

    def ok(self) -> bool:
        if time.monotonic() > self.deadline:
            self.exceeded = True
        return not self.exceeded


def alternate(
    servers: list[Any], count: int, budget: Budget, *, pause_s: float,
    before: Callable[[Any], None] | None = None,
) -> dict[str, list[float]]:
    """count requests per side, rotating sides request by request (A, B, A, B...)."""
    lat: dict[str, list[float]] = {s.name: [] for s in servers}
    for i in range(count):
        if not budget.ok():
            break
        order = servers if i % 2 == 0 else servers[::-1]  # who goes first alternates too
        for server in order:
            if before is not None:
                before(server)
            lat[server.name].append(server.request(i))
            time.sleep(pause_s)
    return lat


def blocks(
    servers: list[Server], block: int, count: int, budget: Budget,
    cpu: dict[str, float] | None = None, settle_s: float = 0.0,
) -> dict[str, list[float]]:
    """count blocks of `block` back-to-back requests per server; blocks rotate between servers,
    and every server is quiet before a block starts. With `cpu`, adds up the CPU seconds each
    server and its CLIs used from the start of a block until it is quiet again plus settle_s
    (a new CLI keeps working in the background for ~2 s after it answers its first turn)."""
    lat: dict[str, list[float]] = {s.name: [] for s in servers}
    n = 0
    for round_ in range(count):
        order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]
        for server in order:
            if not budget.ok():
                return lat
            for other in servers:
                wait_quiet(other)
            time.sleep(0.3)
            before = cpu_seconds(server) if cpu is not None else 0.0
            for _ in range(block):
                lat[server.name].append(ask(server, n))
                n += 1
            if cpu is not None:
                wait_quiet(server)
                time.sleep(settle_s)
                cpu[server.name] = cpu.get(server.name, 0.0) + cpu_seconds(server) - before
    return lat


def cpu_seconds(server: Server) -> float:
    """CPU time (user + system) of the server, its reaped children and its live children."""
    process = psutil.Process(server.pid)
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return float(total)


# --------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    comparison: str
    a: str
    b: str
    ratio: str
    target: str
    verdict: str


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def lat_cell(name: str, s: dict[str, float]) -> str:
    return f"{name}: p50 {ms(s['p50'])}, p99 {ms(s['p99'])} (n={s['n']})"


def verdict_at_most(value: float, limit: float, unit: str) -> str:
    if value <= limit:
        return f"met (margin {limit - value:.2f}{unit})"
    return f"MISSED by {value - limit:.2f}{unit}"


def verdict_at_least(value: float, limit: float, unit: str) -> str:
    if value >= limit:
        return f"met (margin {value - limit:.2f}{unit})"
    return f"MISSED by {limit - value:.2f}{unit} ({value / limit:.0%} of target)"


# --------------------------------------------------------------------------------------------
# Log parsing (ccwrap-trio's text log format)

_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def restart_gaps(log_path: Path) -> list[float]:
    """Seconds from each '[RESTART] Starting' to the next '[RESTART] Memory after': how long a
    worker had no session (single-worker servers). A gap longer than a swap is a spawn wait."""
    gaps: list[float] = []
    started: float | None = None
    for line in log_path.read_text(errors="replace").splitlines():
        match = _LOG_TS.match(line)
        if not match:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if "[RESTART] Starting" in line:
            started = at
        elif "[RESTART] Memory after" in line and started is not None:
            gaps.append(at - started)
            started = None
    return gaps


# --------------------------------------------------------------------------------------------
# Comparisons


def comparison_1(bench: Bench, rows: list[Row], raw: dict[str, Any]) -> None:
    sizes = bench.sizes
    floor = bench.floor()
    # Default settings (isolation=clear, turn limit 10, standby on), isolation=none, and both
    # with a turn limit that never triggers, to tell the per-request path from the restarts
    # (with an instant CLI, the default turn limit restarts the session every 8 requests).
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "ccwrap-clear": ("isolation=clear (default settings)", {}),
        "ccwrap-none": ("isolation=none", {"isolation": "none"}),
        "ccwrap-clear-norestart": ("isolation=clear, no restarts (SESSION_MAX_REQUESTS=100000)",
                                   {"session_max_requests": 100000}),
        "ccwrap-none-norestart": ("isolation=none, no restarts (SESSION_MAX_REQUESTS=100000)",
                                  {"isolation": "none", "session_max_requests": 100000}),
    }
    ccwraps = [bench.ccwrap(name, real=False, **settings)
               for name, (_, settings) in variants.items()]
    servers = [floor, *ccwraps]
    for server in servers:  # warm up connections, imports, caches
        for i in range(20):
            ask(server, i)
        wait_quiet(server)
    budget = Budget(sizes.time_budget_s)
    spaced = alternate(servers, sizes.floor_pairs, budget, pause_s=0.01, before=wait_quiet)
    b2b = blocks(servers, sizes.floor_block, sizes.floor_blocks, budget)
    raw["1"] = {"spaced": spaced, "back_to_back": b2b, "budget_exceeded": budget.exceeded,
                "restarts": {s.name: s.health()["stats"]["restart_count"] for s in ccwraps}}
    shown = {"spaced": ("ccwrap-clear", "ccwrap-none"), "back to back": tuple(variants)}
    for mode, lat in (("spaced", spaced), ("back to back", b2b)):
        f = summary(lat["floor"])
        for name in shown[mode]:
            s = summary(lat[name])
            diff_ms = (s["p50"] - f["p50"]) * 1000
            rows.append(Row(
                f"1. overhead floor, {variants[name][0]}, {mode}",
                lat_cell("ccwrap", s) + f"; {raw['1']['restarts'][name]} restarts in all",
                lat_cell("floor", f),
                f"{diff_ms:+.2f} ms p50 ({s['p50'] / f['p50']:.2f}x); "
                f"p99 {(s['p99'] - f['p99']) * 1000:+.1f} ms",
                "p50 <= floor + 2 ms",
                verdict_at_most(diff_ms, 2.0, " ms"),
            ))
    for server in servers:
        bench.procs.stop(server)


def comparison_2(bench: Bench, rows: list[Row], raw: dict[str, Any]) -> None:
    sizes = bench.sizes
    standin = bench.standin(0.0)
    warm = bench.ccwrap("ccwrap-warm", real=True, standin=standin)
    # The same without restarts (and no standby): the wrapper's own cost over the CLI's turn.
    steady = bench.ccwrap("ccwrap-steady", real=True, standin=standin, session_max_requests=100000,
                          standby=0)
    spawn = bench.spawn_server(standin)
    workdir = bench.scratch / "direct-work"
    workdir.mkdir()
    direct = DirectCli(standin, bench.home(), workdir)
    try:
        sides: list[Server | DirectCli] = [warm, spawn, steady, direct]
        for side in sides:
            for i in range(3):
                side.request(i)
        budget = Budget(sizes.time_budget_s)
        lat = alternate(sides, sizes.warm_pairs, budget, pause_s=0.2, before=wait_quiet)
        restarts = warm.health()["stats"]["restart_count"]
    finally:
        direct.stop()
    # The full latency lists go to the chart; the direct side is a reference, not plotted.
    raw["2"] = {"latencies": {warm.name: lat[warm.name], spawn.name: lat[spawn.name]},
                "steady": lat[steady.name], "direct_cli": lat[direct.name],
                "budget_exceeded": budget.exceeded, "restarts": restarts}
    w, s, d = summary(lat[warm.name]), summary(lat[spawn.name]), summary(lat[direct.name])
    st = summary(lat[steady.name])
    ratio = s["p50"] / w["p50"]
    rows.append(Row(
        "2. warm (ccwrap-trio) vs spawn per request, real CLI, stand-in at 0 ms",
        lat_cell("ccwrap", w) + f"; {restarts} restarts", lat_cell("spawn", s),
        f"{ratio:.1f}x lower p50 (p99 {s['p99'] / w['p99']:.1f}x)",
        "ccwrap p50 >= 8x lower", verdict_at_least(ratio, 8.0, "x"),
    ))
    rows.append(Row(
        "2. (reference) ccwrap-trio, default settings and without restarts "
        "(SESSION_MAX_REQUESTS=100000, "
        "no standby), vs the same CLI session driven over its pipes directly (no HTTP)",
        lat_cell("default", w) + "; " + lat_cell("no restarts", st), lat_cell("CLI alone", d),
        f"default {(w['p50'] - d['p50']) * 1000:+.1f} ms p50, no restarts "
        f"{(st['p50'] - d['p50']) * 1000:+.1f} ms p50", "-", "-",
    ))
    for server in (warm, steady, spawn, standin):
        bench.procs.stop(server)


def comparison_3(bench: Bench, rows: list[Row], raw: dict[str, Any]) -> None:
    sizes = bench.sizes
    standin = bench.standin(0.0)
    on = bench.ccwrap("ccwrap-standby", real=True, standin=standin,
                      session_max_requests=8, standby=1)
    off = bench.ccwrap("ccwrap-nostandby", real=True, standin=standin,
                       session_max_requests=8, standby=0)
    never = bench.ccwrap("ccwrap-norestart", real=True, standin=standin,
                         session_max_requests=100000)
    servers = [on, off, never]
    budget = Budget(sizes.time_budget_s * 1.5)
    cpu: dict[str, float] = {}
    lat = blocks(servers, sizes.restart_block, sizes.restart_blocks, budget, cpu, settle_s=2.0)
    health = {s.name: s.health() for s in servers}
    n = summary(lat[never.name])
    # Client side: requests slower than the no-restart side's p50 by more than 150 ms (a warm
    # turn is ~30-60 ms, a spawn ~300-600 ms). Server side (the log): how long the worker had
    # no session at each restart; over 50 ms means the next request waited for a spawn.
    slow_cut = n["p50"] + 0.150
    result: dict[str, Any] = {"latencies": lat, "budget_exceeded": budget.exceeded,
                              "slow_cut_s": slow_cut}
    for server in servers:
        gaps = restart_gaps(server.log_path)
        result[server.name] = {
            "restarts": health[server.name]["stats"]["restart_count"],
            "proactive": health[server.name]["stats"]["proactive_restarts"],
            "waits_client": sum(x > slow_cut for x in lat[server.name]),
            "restart_gaps_s": gaps,
            "gaps_over_50ms": sum(g > 0.05 for g in gaps),
            "cpu_ms_per_request": cpu.get(server.name, 0.0) / max(1, len(lat[server.name]))
            * 1000,
        }
        if server is not never:
            # SESSION_MAX_REQUESTS=8: every 9th request is a new session's first turn.
            values = lat[server.name]
            first = [values[k] for k in range(8, len(values), 8)]
            rest = [v for k, v in enumerate(values) if k < 8 or k % 8]
            result[server.name]["first_turn_p50_s"] = statistics.median(first) if first else None
            result[server.name]["other_turns_p50_s"] = statistics.median(rest)
            result[server.name]["other_turns_p99_s"] = pct(rest, 99)
    raw["3"] = result
    for server, label in ((on, "standby on"), (off, "standby off")):
        s = summary(lat[server.name])
        info = result[server.name]
        ratio = s["p99"] / n["p99"]
        gaps = info["restart_gaps_s"]
        rows.append(Row(
            f"3. restarts in the path, SESSION_MAX_REQUESTS=8, {label}, vs no restarts "
            f"(sequential, real CLI)",
            lat_cell(label, s) + f"; {info['restarts']} restarts, {info['waits_client']} "
            f"requests slower than the no-restart p50 + 150 ms; worker without a session at a "
            f"restart: "
            f"median {ms(statistics.median(gaps)) if gaps else '-'}, "
            f"max {ms(max(gaps)) if gaps else '-'}, over 50 ms (a request waited for a spawn) at "
            f"{info['gaps_over_50ms']} of {len(gaps)} restarts; "
            "first request on a new session: p50 "
            f"{ms(info['first_turn_p50_s']) if info['first_turn_p50_s'] else '-'}, the others: "
            f"p50 {ms(info['other_turns_p50_s'])}, p99 {ms(info['other_turns_p99_s'])}; "
            f"CPU (server + CLIs) {info['cpu_ms_per_request']:.0f} ms per request",
            lat_cell("no restarts", n) + f"; CPU {result[never.name]['cpu_ms_per_request']:.0f}"
            " ms per request",
            f"p99 {ratio:.2f}x, p50 {s['p50'] / n['p50']:.2f}x",
            "p99 <= 1.2x no restarts" if server is on else "(reference)",
            verdict_at_most(ratio, 1.2, "x") if server is on else "-",
        ))
    for server in (*servers, standin):
        bench.procs.stop(server)


def comparison_4(bench: Bench, rows: list[Row], raw: dict[str, Any]) -> None:
    sizes = bench.sizes
    standin = bench.standin(0.2)
    # Default settings (turn limit 10: a restart every 8 requests per session, one standby for
    # the pool), and, to tell the pool from its restarts, a turn limit that never triggers.
    keys = [(n, restarts) for restarts in (True, False) for n in (1, 2, 4)]
    servers = {
        (n, restarts): bench.ccwrap(
            f"ccwrap-pool{n}" + ("" if restarts else "-norestart"), real=True, standin=standin,
            sessions=n, **({} if restarts else {"session_max_requests": 100000}),
        )
        for n, restarts in keys
    }
    budget = Budget(sizes.time_budget_s * 2)
    throughput: dict[Any, list[float]] = {k: [] for k in keys}
    lat: dict[Any, list[float]] = {k: [] for k in keys}
    cores: dict[Any, list[float]] = {k: [] for k in keys}  # CPU cores busy while measured
    orders = [keys, keys[::-1], keys[2:] + keys[:2]]
    for round_ in range(sizes.pool_rounds):
        for key in orders[round_ % len(orders)]:
            if not budget.ok():
                break
            for server in servers.values():
                wait_quiet(server)
            time.sleep(0.3)
            cpu_before = cpu_seconds(servers[key]) + cpu_seconds(standin)
            started = time.perf_counter()
            rate, latencies = run_concurrent(
                servers[key], sizes.pool_requests, sizes.pool_clients, round_ * 1000
            )
            elapsed = time.perf_counter() - started
            cores[key].append(
                (cpu_seconds(servers[key]) + cpu_seconds(standin) - cpu_before) / elapsed
            )
            throughput[key].append(rate)
            lat[key].extend(latencies)
    restarts = {k: s.health()["stats"]["restart_count"] for k, s in servers.items()}
    without = {k: sessionless_seconds(s.log_path) for k, s in servers.items()}
    raw["4"] = {
        f"N={k[0]}" + ("" if k[1] else ", no restarts"): {
            "throughput": throughput[k], "latencies": lat[k], "restarts": restarts[k],
            "cores_busy": cores[k], "sessionless_s": without[k],
        }
        for k in keys
    } | {"budget_exceeded": budget.exceeded}

    def cell(key: tuple[int, bool]) -> str:
        rate = statistics.median(throughput[key])
        return (
            f"N={key[0]}: {rate:.2f} req/s (rounds: "
            f"{', '.join(f'{r:.2f}' for r in throughput[key])}; p50 "
            f"{ms(statistics.median(lat[key]))}; {restarts[key]} restarts, sessions without a "
            f"CLI for {without[key]:.1f} s in all; {statistics.median(cores[key]):.2f} of "
            f"{os.cpu_count()} cores busy)"
        )

    for with_restarts in (True, False):
        base = statistics.median(throughput[(1, with_restarts)])
        for n, target in ((2, 1.8), (4, 3.0)):
            key = (n, with_restarts)
            ratio = statistics.median(throughput[key]) / base
            label = "default settings (turn limit 10)" if with_restarts else \
                "no restarts (SESSION_MAX_REQUESTS=100000), diagnostic"
            rows.append(Row(
                f"4. pool scaling, CCWRAP_SESSIONS={n} vs 1, {label} ({sizes.pool_clients} "
                f"clients, {sizes.pool_requests} requests x {len(throughput[key])} rounds, "
                "stand-in 200 ms)",
                cell(key), cell((1, with_restarts)), f"{ratio:.2f}x",
                f">= {target}x" if with_restarts else f"({target}x)",
                verdict_at_least(ratio, target, "x") if with_restarts else
                ("would meet" if ratio >= target else "would miss"),
            ))
    for server in (*servers.values(), standin):
        bench.procs.stop(server)


def sessionless_seconds(log_path: Path) -> float:
    """Worker-seconds spent between '[RESTART] Starting' and '[RESTART] Memory after' (a
    session being replaced), summed over all workers, from the server's log."""
    total, outstanding, last = 0.0, 0, 0.0
    for line in log_path.read_text(errors="replace").splitlines():
        match = _LOG_TS.match(line)
        if not match or "[RESTART]" not in line:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        total += outstanding * (at - last) if outstanding else 0.0
        last = at
        if "[RESTART] Starting" in line:
            outstanding += 1
        elif "[RESTART] Memory after" in line and outstanding:
            outstanding -= 1
    return total


def run_concurrent(
    server: Server, count: int, clients: int, offset: int
) -> tuple[float, list[float]]:
    """count requests from `clients` threads; (requests per second, latencies)."""
    lock = threading.Lock()
    next_index = iter(range(offset, offset + count))
    latencies: list[float] = []
    errors: list[BaseException] = []

    def worker() -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None or errors:
                    return
                try:
                    latencies.append(ask(server, i, client))
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=HTTP_TIMEOUT_S * 2)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return len(latencies) / elapsed, latencies


def comparison_5(bench: Bench, rows: list[Row], raw: dict[str, Any]) -> None:
    sizes = bench.sizes
    # Server RSS over many requests: the instant fake CLI, default settings.
    fake = bench.ccwrap("ccwrap-memory", real=False)
    time.sleep(2.0)
    idle = fake.rss_mb()
    health_idle = fake.health()["memory"]["rss_mb"]
    samples: list[tuple[int, float]] = [(0, idle)]
    step = max(1, sizes.memory_requests // 10)
    budget = Budget(sizes.time_budget_s)
    done = 0
    while done < sizes.memory_requests and budget.ok():
        for _ in range(step):
            ask(fake, done)
            done += 1
        samples.append((done, fake.rss_mb()))
    end = samples[-1][1]
    raw_growth = (end - idle) / done * 1000
    # Slope after the first tenth (imports and caches filled by the first requests).
    steady = samples[2:] if len(samples) > 3 else samples
    slope = (least_squares_slope(steady) or 0.0) * 1000
    fake_restarts = fake.health()["stats"]["restart_count"]
    bench.procs.stop(fake)

    # The real CLI: server RSS over fewer requests, and each CLI session's RSS.
    standin = bench.standin(0.0)
    real = bench.ccwrap("ccwrap-memory-real", real=True, standin=standin)
    time.sleep(2.0)
    real_idle = real.rss_mb()
    cli_fresh = real.cli_rss_mb()
    real_samples: list[tuple[int, float]] = [(0, real_idle)]
    real_step = max(1, sizes.memory_real_requests // 5)
    budget = Budget(sizes.time_budget_s)
    real_done = 0
    while real_done < sizes.memory_real_requests and budget.ok():
        for _ in range(real_step):
            ask(real, real_done)
            real_done += 1
        real_samples.append((real_done, real.rss_mb()))
    wait_quiet(real)
    cli_after = real.cli_rss_mb()
    health = real.health()
    real_growth = (real_samples[-1][1] - real_idle) / real_done * 1000
    bench.procs.stop(real)

    # A long-lived session (turn limit never reached): the CLI's own growth over turns.
    long = bench.ccwrap("ccwrap-memory-long", real=True, standin=standin,
                        session_max_requests=100000, standby=0)
    long_pid = long.health()["sessions"][0]["pid"]
    long_start = long.cli_rss_mb()[long_pid]
    budget = Budget(sizes.time_budget_s)
    for i in range(sizes.memory_real_requests):
        if not budget.ok():
            break
        ask(long, i)
    long_end = long.cli_rss_mb().get(long_pid, float("nan"))
    bench.procs.stop(long)
    bench.procs.stop(standin)

    raw["5"] = {
        "fake": {"idle_mb": idle, "health_idle_mb": health_idle, "samples": samples,
                 "raw_growth_mb_per_1000": raw_growth, "slope_mb_per_1000": slope,
                 "restarts": fake_restarts},
        "real": {"idle_mb": real_idle, "samples": real_samples, "cli_fresh_mb": cli_fresh,
                 "cli_after_mb": cli_after, "growth_mb_per_1000": real_growth,
                 "health_sessions": health["sessions"], "health_memory": health["memory"],
                 "restarts": health["stats"]["restart_count"]},
        "long_session": {"turns": sizes.memory_real_requests, "cli_start_mb": long_start,
                         "cli_end_mb": long_end},
    }
    rows.append(Row(
        "5. server RSS idle (instant fake CLI, default settings)",
        f"{idle:.1f} MB (psutil; /health says {health_idle:.1f} MB)", "-", "-",
        "< 60 MB", verdict_at_most(idle, 60.0, " MB"),
    ))
    rows.append(Row(
        f"5. server RSS growth over {done} requests (instant fake CLI, {fake_restarts} restarts)",
        f"{idle:.1f} -> {end:.1f} MB: {raw_growth:+.2f} MB / 1,000 requests",
        f"slope after the first {samples[2][0] if len(samples) > 3 else 0}: "
        f"{slope:+.2f} MB / 1,000",
        "-", "< 5 MB / 1,000", verdict_at_most(max(raw_growth, slope), 5.0, " MB"),
    ))
    cli_now = sorted(cli_after.values())
    rows.append(Row(
        f"5. real CLI: server RSS over {real_done} requests; CLI RSS per session",
        f"server {real_idle:.1f} -> {real_samples[-1][1]:.1f} MB ({real_growth:+.2f} MB / "
        f"1,000; {health['stats']['restart_count']} restarts)",
        f"CLI per session (session + standby): fresh {fmt_mb(sorted(cli_fresh.values()))}, "
        f"after {fmt_mb(cli_now)}; one session over {sizes.memory_real_requests} turns: "
        f"{long_start:.0f} -> {long_end:.0f} MB",
        "-", "growth < 5 MB / 1,000", verdict_at_most(real_growth, 5.0, " MB"),
    ))


def fmt_mb(values: list[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in values) + " MB"


# --------------------------------------------------------------------------------------------
# Chart


def chart(raw: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed: no chart (.venv/bin/pip install matplotlib)"
    panels = [key for key in ("2", "3") if key in raw]
    if not panels:
        return "no chart: comparisons 2 and 3 did not run"
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.4), squeeze=False)
    titles = {
        "2": "2. warm session vs spawn per request\n(real CLI, stand-in API at 0 ms)",
        "3": "3. restarts in the request path, sequential\n"
             "(real CLI, CCWRAP_SESSION_MAX_REQUESTS=8)",
    }
    labels = {
        "ccwrap-warm": "ccwrap-trio (warm)", "spawn-server": "spawn per request",
        "ccwrap-standby": "turn limit 10, standby on",
        "ccwrap-nostandby": "turn limit 10, standby off",
        "ccwrap-norestart": "no restarts (turn limit 100000)",
    }
    for ax, key in zip(axes[0], panels, strict=True):
        for name, values in raw[key]["latencies"].items():
            xs = sorted(v * 1000 for v in values)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            p50, p99 = statistics.median(xs), pct(xs, 99)
            ax.step(xs, ys, where="post",
                    label=f"{labels.get(name, name)}: p50 {p50:.0f}, p99 {p99:.0f} ms")
        ax.set_xscale("log")
        ticks = [t for t in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
                 if min(min(v) for v in raw[key]["latencies"].values()) * 500 <= t
                 <= max(max(v) for v in raw[key]["latencies"].values()) * 2000]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("latency per request (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(titles[key], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart saved to {path} (matplotlib {matplotlib.__version__})"


# --------------------------------------------------------------------------------------------
# Main


COMPARISONS: dict[str, Callable[[Bench, list[Row], dict[str, Any]], None]] = {
    "1": comparison_1, "2": comparison_2, "3": comparison_3, "4": comparison_4, "5": comparison_5,
}


class CpuWatch:
    """How busy the machine was with processes other than this benchmark's own, in cores.

    Exact once every process the benchmark started has been reaped (their CPU time then sits in
    this process's children_user/children_system)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy = machine_busy_seconds()
        self.ours = our_cpu_seconds()

    def others_cores(self) -> float:
        elapsed = time.monotonic() - self.started
        busy = machine_busy_seconds() - self.busy
        ours = our_cpu_seconds() - self.ours
        return max(0.0, busy - ours) / elapsed if elapsed > 0 else 0.0


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq")
    return float(sum(getattr(times, name, 0.0) for name in fields))


def our_cpu_seconds() -> float:
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            total += (child_times.user + child_times.system + child_times.children_user
                      + child_times.children_system)
    return float(total)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    cli = subprocess.run([str(REAL_CLI), "--version"], capture_output=True, text=True,
                         timeout=30, check=False).stdout.strip()
    return {
        "cpus": os.cpu_count(), "cpu": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(), "cli": cli,
        "platform": platform.platform(),
    }


def print_table(rows: list[Row]) -> str:
    lines = ["| comparison | A | B | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row.comparison, row.a, row.b, row.ratio, row.target, row.verdict]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced counts (a smoke check)")
    parser.add_argument("--only", default="1,2,3,4,5", help="comparisons to run, e.g. 1,3")
    parser.add_argument("--chart", type=Path, help="save a PNG chart of comparisons 2 and 3")
    parser.add_argument("--json", type=Path, help="write every figure and latency here")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in COMPARISONS]
    if unknown:
        parser.error(f"unknown comparison(s) {unknown}: choose from 1-5")
    if any(c in chosen for c in "2345") and not os.access(REAL_CLI, os.X_OK):
        parser.error(f"the real CLI is not at {REAL_CLI}: run `make install`")
    sizes = QUICK if args.quick else FULL
    scratch = Path(tempfile.mkdtemp(prefix="ccwrap-bench-"))
    bench = Bench(sizes, scratch)
    rows: list[Row] = []
    raw: dict[str, Any] = {"machine": machine(), "quick": args.quick, "load": {}}
    started = time.monotonic()
    print(f"machine: {raw['machine']}", flush=True)
    print(f"scratch (logs): {scratch}", flush=True)
    failed = False
    try:
        for key in chosen:
            load_before = os.getloadavg()
            t0 = time.monotonic()
            watch = CpuWatch()
            print(f"-- comparison {key}: load average {load_before[0]:.2f}", flush=True)
            try:
                COMPARISONS[key](bench, rows, raw)
            except (RuntimeError, httpx.HTTPError) as exc:
                failed = True
                print(f"comparison {key} FAILED: {exc}", flush=True)
                rows.append(Row(f"{key}. FAILED", str(exc)[:300], "-", "-", "-", "FAILED"))
            finally:
                bench.procs.stop_all()
            others = watch.others_cores()
            raw["load"][key] = {"before": load_before, "after": os.getloadavg(),
                                "seconds": time.monotonic() - t0, "others_cores": others}
            print(f"   done in {time.monotonic() - t0:.0f}s, load average "
                  f"{os.getloadavg()[0]:.2f}; other processes used {others:.2f} cores "
                  "on average", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        failed = True
    finally:
        bench.procs.stop_all()
    table = print_table(rows)
    print()
    print(table)
    loads = ", ".join(
        f"{k}: {v['before'][0]:.2f}->{v['after'][0]:.2f}" for k, v in raw["load"].items()
    )
    other_cores = ", ".join(f"{k}: {v['others_cores']:.2f}" for k, v in raw["load"].items())
    print(f"\n1-minute load average before->after each comparison: {loads}")
    print(f"CPU cores used by processes other than this benchmark's, on average: {other_cores}")
    kept = failed or args.keep
    print(f"total {time.monotonic() - started:.0f}s"
          + (f"; logs kept in {scratch}" if kept else ""))
    if args.chart:
        print(chart(raw, args.chart))
    if args.json:
        raw["table"] = table
        args.json.write_text(json.dumps(raw, indent=1, default=str))
        print(f"figures written to {args.json}")
    if not failed and not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
