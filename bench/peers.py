#!/usr/bin/env python3
"""ccwrap-trio side by side with the peers a user would pick instead (issue 14, item 4).

    .venv/bin/python bench/peers.py [--quick] [--json results.json] [--keep]
    (or `make bench-peers`; `make bench-peers-setup` first builds bench/.peers-venv)

Every side drives the same pinned CLI (.tools/claude, 2.1.332) against the same stand-in API
(bench/nonce_standin.py: ccwrap_trio.standin whose answers also name the other requests'
nonces the model was shown), all on 127.0.0.1:

- ccwrap-trio, default settings (CCWRAP_SESSIONS=1, standby on), and CCWRAP_SESSIONS=4 for the
  throughput rows;
- the CLI spawned per request (bench/spawn_server.py, the same HTTP stack as ccwrap-trio);
- ccproxy (ccproxy-api 0.2.10, its Claude SDK plugin, claude-agent-sdk 0.1.4, installed in
  bench/.peers-venv) without its session pool (a CLI per request) and with its session pool
  (one CLI per session id: one id for the sequential rows, four for the throughput rows, so
  both pools have the same number of warm CLIs). ``sdk_message_mode = "ignore"`` (otherwise it
  appends the CLI's init message to each answer), ``builtin_permissions = false`` (otherwise
  each CLI is pointed at an MCP permission server on 127.0.0.1:8000), version check off (it
  fetches from GitHub at start).

Figures, one run: sequential p50/p99 (requests alternate between the sides one by one, stand-in
at 0 ms, a 200 ms pause after each, ccwrap-trio quiet before each of its requests); throughput
with 8 client threads and the stand-in at 200 ms (``[standin:latency=0.2]`` in each prompt; one
side at a time, the order rotated over the rounds); memory of each side's whole process tree
(server + CLIs: the sum of RSS, idle after the sequential rows and the peak during throughput);
isolation (every request carries a fresh nonce; an answer that names other nonces means the
model was shown earlier requests: reported as leaking context).

Missed targets are reported, not failures; exit status 1 if a side failed to start or answered
a request wrongly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import psutil
from run import (
    HTTP_TIMEOUT_S,
    MB,
    REAL_CLI,
    Budget,
    CpuWatch,
    Processes,
    Row,
    Server,
    base_env,
    machine,
    ms,
    pct,
    print_table,
    verdict_at_least,
    verdict_at_most,
    wait_quiet,
)

BENCH = Path(__file__).resolve().parent
PEERS_VENV = BENCH / ".peers-venv"
CCPROXY = PEERS_VENV / "bin/ccproxy"
PINNED = {"ccproxy-api": "0.2.10", "claude-agent-sdk": "0.1.4"}
SAW_RE = re.compile(r"\| saw (\d+) other nonces")
CLIENTS = 8
POOL_CLIS = 4  # warm CLIs in each pool for the throughput rows


@dataclass(frozen=True)
class Sizes:
    sequential: int  # requests per side, alternating
    throughput: int  # requests per side per round
    rounds: int
    time_budget_s: float  # per phase


FULL = Sizes(sequential=60, throughput=48, rounds=2, time_budget_s=300.0)
QUICK = Sizes(sequential=4, throughput=16, rounds=1, time_budget_s=90.0)


class RequestFailed(RuntimeError):
    pass


@dataclass
class Answer:
    latency_s: float
    saw_others: int  # other requests' nonces the model was shown


class Side:
    """One system under test: where to send a request, and how."""

    def __init__(self, server: Server, *, model: str, path: str = "/v1/chat/completions",
                 session_ids: list[str] | None = None) -> None:
        self.server = server
        self.name = server.name
        self.model = model
        self.path = path
        self.session_ids = session_ids  # ccproxy's pool: /claude/sdk/{id}/v1/chat/completions
        self.answers: list[Answer] = []
        self.errors: list[str] = []  # requests that got no right answer (reported, not fatal)
        self.lock = threading.Lock()

    def url(self, client_index: int) -> str:
        if self.session_ids:
            session = self.session_ids[client_index % len(self.session_ids)]
            return f"{self.server.url}/claude/sdk/{session}/v1/chat/completions"
        return self.server.url + self.path

    def ask(self, i: int, *, client: httpx.Client | None = None, client_index: int = 0,
            latency_directive: str = "") -> Answer:
        """One chat completion with a fresh nonce; checks the echo and reads the leak count."""
        nonce = f"nonce-{uuid.uuid4().hex[:8]}"
        text = f"benchmark request {i} {nonce}{latency_directive}"
        body = {"model": self.model, "messages": [{"role": "user", "content": text}]}
        client = client or self.server.client
        start = time.perf_counter()
        response = client.post(self.url(client_index), json=body)
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            self.fail(f"HTTP {response.status_code}: {response.text[:300]}")
        content = str(response.json()["choices"][0]["message"]["content"])
        saw = SAW_RE.search(content)
        if not content.startswith("echo:") or nonce not in content or saw is None:
            self.fail(f"unexpected answer {content[:300]!r}")
            raise AssertionError("unreachable")
        answer = Answer(elapsed, int(saw.group(1)))
        with self.lock:
            self.answers.append(answer)
        return answer

    def fail(self, message: str) -> NoReturn:
        with self.lock:
            self.errors.append(message)
        raise RequestFailed(f"{self.name}: {message}")

    def try_ask(self, i: int, **kwargs: Any) -> Answer | None:
        """ask(), but a wrong answer is counted in self.errors and the run goes on."""
        try:
            return self.ask(i, **kwargs)
        except RequestFailed as exc:
            print(f"   {exc}"[:300], flush=True)
            return None

    def quiet(self) -> None:
        wait_quiet(self.server)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_rss_mb(pid: int) -> tuple[float, int, set[str]]:
    """Sum of RSS over a process and its descendants; the count of CLI processes; their exes."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0, set()
    total, clis, exes = 0.0, 0, set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
            if proc.name().startswith("claude"):
                clis += 1
                exe = proc.exe()
                if exe:  # '' for a process that is exiting
                    exes.add(exe)
    return total / MB, clis, exes


class PeakSampler:
    """Samples each side's process tree every 0.25 s in a thread; keeps the peaks."""

    def __init__(self, sides: list[Side]) -> None:
        self.sides = sides
        self.peak_mb: dict[str, float] = {s.name: 0.0 for s in sides}
        self.peak_clis: dict[str, int] = {s.name: 0 for s in sides}
        self.exes: set[str] = set()
        self.active: str | None = None  # only the side being measured is sampled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            for side in self.sides:
                if side.name != self.active:
                    continue
                mb, clis, exes = tree_rss_mb(side.server.pid)
                self.peak_mb[side.name] = max(self.peak_mb[side.name], mb)
                self.peak_clis[side.name] = max(self.peak_clis[side.name], clis)
                self.exes |= exes


class PeerBench:
    def __init__(self, sizes: Sizes, scratch: Path) -> None:
        self.sizes = sizes
        self.scratch = scratch
        self.procs = Processes(scratch)
        self._homes = 0

    def home(self) -> Path:
        self._homes += 1
        path = self.scratch / f"home{self._homes}"
        path.mkdir()
        return path

    def env(self) -> dict[str, str]:
        env = base_env(self.home())
        # The pinned CLI first on PATH: ccproxy finds `claude` there (without it, its binary
        # resolver falls back to `npx --yes @anthropic-ai/claude-code`, an unpinned download).
        env["PATH"] = f"{REAL_CLI.parent}{os.pathsep}{env['PATH']}"
        return env

    def standin(self) -> Server:
        return self.procs.start(
            "nonce-standin", [sys.executable, str(BENCH / "nonce_standin.py"), "--port", "0"],
            self.env(), "standin listening on",
        )

    def ccwrap(self, name: str, standin: Server, **settings: Any) -> Side:
        env = self.env()
        env.update({
            "CCWRAP_PORT": "0", "CCWRAP_CLAUDE_BIN": str(REAL_CLI), "CCWRAP_SHUTDOWN_GRACE": "5",
            "ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": "sk-bench",
            "CCWRAP_FORWARD_API_KEY": "1",
            # This checkout's server, whichever venv runs the script.
            "PYTHONPATH": str(BENCH.parent / "src"),
        })
        for key, value in settings.items():
            env["CCWRAP_" + key.upper()] = str(value)
        server = self.procs.start(
            name, [sys.executable, "-m", "ccwrap_trio", "serve"], env, "ccwrap-trio listening on",
            timeout_s=90.0,
            standby=str(settings.get("standby", "1")) != "0",
            sessions=int(settings.get("sessions", 1)),
        )
        wait_quiet(server)
        return Side(server, model="haiku")

    def spawn(self, standin: Server) -> Side:
        env = self.env()
        env.update({"ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": "sk-bench"})
        server = self.procs.start(
            "spawn-per-request",
            [sys.executable, str(BENCH / "spawn_server.py"), "--port", "0",
             "--claude-bin", str(REAL_CLI)],
            env, "spawn server listening on",
        )
        return Side(server, model="haiku")

    def ccproxy(self, name: str, standin: Server, *, pool: bool,
                session_ids: list[str] | None = None) -> Side:
        port = free_port()
        config = self.scratch / f"{name}.toml"
        config.write_text(CCPROXY_CONFIG.format(
            port=port, pool="true" if pool else "false", logs=self.scratch / f"{name}-plugin-logs",
        ))
        env = self.env()
        env.update({
            "CONFIG_FILE": str(config), "NO_COLOR": "1",
            "ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": "sk-bench",
            # What ccwrap-trio and the spawn server give their CLI.
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        })
        server = self.procs.start(
            name, [str(CCPROXY), "serve", "--host", "127.0.0.1", "--port", str(port)], env,
            r"server_ready\b.*?url\S*?", timeout_s=90.0,  # \S*?: colour codes
        )
        return Side(server, model="claude-haiku-4-5", path="/claude/sdk/v1/chat/completions",
                    session_ids=session_ids)


# enabled_plugins: only the Claude SDK plugin (the others need OAuth logins or other APIs).
CCPROXY_CONFIG = """\
enabled_plugins = ["claude_sdk"]

[server]
host = "127.0.0.1"
port = {port}

[logging]
level = "INFO"
plugin_log_base_dir = "{logs}"

[scheduler]
version_check_enabled = false

[plugins.claude_sdk]
builtin_permissions = false
session_pool_enabled = {pool}
sdk_message_mode = "ignore"
"""


# --------------------------------------------------------------------------------------------
# Phases


def sequential(sides: list[Side], count: int, budget: Budget) -> dict[str, list[float]]:
    """count requests per side, alternating request by request (who goes first alternates)."""
    lat: dict[str, list[float]] = {s.name: [] for s in sides}
    for i in range(count):
        if not budget.ok():
            break
        for side in sides if i % 2 == 0 else sides[::-1]:
            side.quiet()
            answer = side.try_ask(i)
            if answer is not None:
                lat[side.name].append(answer.latency_s)
            time.sleep(0.2)
    return lat


def concurrent(side: Side, count: int, offset: int) -> tuple[float, list[float]]:
    """count requests from CLIENTS threads (client k keeps its own connection); (req/s, lats)."""
    indexes = iter(range(offset, offset + count))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            while not errors:
                with lock:
                    i = next(indexes, None)
                if i is None:
                    return
                try:
                    answer = side.try_ask(i, client=client, client_index=k,
                                          latency_directive=" [standin:latency=0.2]")
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)
                    return
                if answer is None:  # counted in side.errors, not in the throughput
                    continue
                with lock:
                    latencies.append(answer.latency_s)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CLIENTS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=HTTP_TIMEOUT_S * 4)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return len(latencies) / elapsed, latencies


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": float("nan"), "p99": float("nan")}
    return {"n": len(values), "p50": statistics.median(values), "p99": pct(values, 99)}


def run(bench: PeerBench, raw: dict[str, Any]) -> list[Row]:
    sizes = bench.sizes
    standin = bench.standin()
    ccwrap = bench.ccwrap("ccwrap-trio", standin)
    spawn = bench.spawn(standin)
    nopool = bench.ccproxy("ccproxy-nopool", standin, pool=False)
    pool_ids = [f"bench-{k}" for k in range(POOL_CLIS)]
    pool = bench.ccproxy("ccproxy-pool", standin, pool=True, session_ids=pool_ids[:1])
    seq_sides = [ccwrap, spawn, nopool, pool]
    for side in seq_sides:  # warm up: connections, imports, the pool's first CLI
        for i in range(2):
            side.quiet()
            side.try_ask(-1 - i)

    # Sequential, stand-in at 0 ms, one warm CLI in each pool.
    budget = Budget(sizes.time_budget_s)
    seq = sequential(seq_sides, sizes.sequential, budget)
    raw["sequential"] = {"latencies": seq, "budget_exceeded": budget.exceeded}
    idle: dict[str, dict[str, Any]] = {}
    for side in seq_sides:
        side.quiet()
    time.sleep(2.0)  # a CLI that just answered keeps working for ~2 s (docs/benchmarks.md)
    for side in seq_sides:
        mb, clis, _ = tree_rss_mb(side.server.pid)
        idle[side.name] = {"mb": mb, "clis": clis}
    raw["idle_memory"] = idle

    # Throughput: 8 clients, stand-in at 200 ms; pools with POOL_CLIS warm CLIs each.
    bench.procs.stop(ccwrap.server)
    ccwrap4 = bench.ccwrap("ccwrap-trio-N4", standin, sessions=POOL_CLIS)
    ccwrap1 = bench.ccwrap("ccwrap-trio-N1", standin)
    pool.session_ids = pool_ids
    for k in range(POOL_CLIS):  # one warm CLI per session id before measuring
        pool.try_ask(-100 - k, client_index=k)
    tp_sides = [ccwrap1, ccwrap4, spawn, nopool, pool]
    rates: dict[str, list[float]] = {s.name: [] for s in tp_sides}
    tp_lat: dict[str, list[float]] = {s.name: [] for s in tp_sides}
    budget = Budget(sizes.time_budget_s)
    with PeakSampler(tp_sides) as sampler:
        for round_ in range(sizes.rounds):
            order = tp_sides[round_:] + tp_sides[:round_]
            for side in order if round_ % 2 == 0 else order[::-1]:
                if not budget.ok():
                    break
                for other in tp_sides:
                    other.quiet()
                time.sleep(0.5)
                sampler.active = side.name
                rate, lat = concurrent(side, sizes.throughput, 10_000 * (round_ + 1))
                sampler.active = None
                rates[side.name].append(rate)
                tp_lat[side.name].extend(lat)
    raw["throughput"] = {"rates": rates, "latencies": tp_lat, "peak_mb": sampler.peak_mb,
                         "peak_clis": sampler.peak_clis, "budget_exceeded": budget.exceeded}
    raw["cli_executables"] = sorted(sampler.exes)
    restarts = {s.name: s.server.health()["stats"]["restart_count"]
                for s in (ccwrap1, ccwrap4)}
    leaks = {s.name: leak_summary(s) for s in (ccwrap, ccwrap1, ccwrap4, spawn, nopool, pool)}
    raw["isolation"] = leaks
    raw["ccwrap_restarts"] = restarts
    raw["errors"] = {s.name: s.errors for s in (ccwrap, ccwrap1, ccwrap4, spawn, nopool, pool)}
    return table(seq, idle, rates, tp_lat, sampler, leaks, restarts,
                 names={"ccwrap": ccwrap.name, "ccwrap1": ccwrap1.name, "ccwrap4": ccwrap4.name,
                        "spawn": spawn.name, "nopool": nopool.name, "pool": pool.name})


def leak_summary(side: Side) -> dict[str, int]:
    saw = [a.saw_others for a in side.answers]
    leaking = sum(n > 0 for n in saw)
    return {"answers": len(saw), "leaking": leaking, "max_seen": max(saw, default=0),
            "errors": len(side.errors)}


def table(
    seq: dict[str, list[float]], idle: dict[str, dict[str, Any]], rates: dict[str, list[float]],
    tp_lat: dict[str, list[float]], sampler: PeakSampler, leaks: dict[str, dict[str, int]],
    restarts: dict[str, int], names: dict[str, str],
) -> list[Row]:
    rows: list[Row] = []
    s = {key: summary(seq[name]) for key, name in names.items() if name in seq}
    rate = {key: statistics.median(rates[name]) if rates.get(name) else float("nan")
            for key, name in names.items()}

    def errors(key: str) -> str:
        count = leaks[names[key]]["errors"]
        return f"; {count} of its requests in the run FAILED (no right answer)" if count else ""

    def seq_cell(key: str) -> str:
        return (f"p50 {ms(s[key]['p50'])}, p99 {ms(s[key]['p99'])} (n={s[key]['n']})"
                + errors(key))

    def tp_cell(key: str) -> str:
        name = names[key]
        rounds = ", ".join(f"{r:.2f}" for r in rates.get(name, []))
        return (f"{rate[key]:.2f} req/s (rounds: {rounds}; p50 "
                f"{ms(statistics.median(tp_lat[name])) if tp_lat.get(name) else '-'}; "
                f"peak {sampler.peak_clis[name]} CLIs)" + errors(key))

    def isolation(key: str) -> str:
        info = leaks[names[key]]
        if info["leaking"]:
            return (f"LEAKS context: {info['leaking']} of {info['answers']} answers saw earlier "
                    f"requests' nonces (up to {info['max_seen']})")
        return f"isolated: 0 of {info['answers']} answers saw another request's nonce"

    ratio = s["nopool"]["p50"] / s["ccwrap"]["p50"]
    rows.append(Row(
        "sequential p50/p99, ccwrap-trio (default settings) vs ccproxy without its pool "
        "(stand-in 0 ms, alternating)",
        "ccwrap-trio: " + seq_cell("ccwrap"), "ccproxy, no pool: " + seq_cell("nopool"),
        f"{ratio:.1f}x lower p50 (p99 {s['nopool']['p99'] / s['ccwrap']['p99']:.1f}x)",
        ">= 10x lower", verdict_at_least(ratio, 10.0, "x"),
    ))
    ratio = s["spawn"]["p50"] / s["ccwrap"]["p50"]
    rows.append(Row(
        "sequential p50/p99, ccwrap-trio vs the CLI spawned per request (bench/spawn_server.py)",
        "ccwrap-trio: " + seq_cell("ccwrap"), "spawn per request: " + seq_cell("spawn"),
        f"{ratio:.1f}x lower p50", "(>= 15x, issue's row; measured in bench/run.py too)",
        verdict_at_least(ratio, 15.0, "x"),
    ))
    ratio = s["ccwrap"]["p50"] / s["pool"]["p50"]
    rows.append(Row(
        "sequential p50/p99, ccwrap-trio (1 session) vs ccproxy's pool (1 session id: 1 warm CLI)",
        "ccwrap-trio: " + seq_cell("ccwrap"), "ccproxy pool: " + seq_cell("pool"),
        f"{ratio:.2f}x ccproxy's p50", "<= 1.1x", verdict_at_most(ratio, 1.1, "x"),
    ))
    for key in ("ccwrap1", "ccwrap4"):
        ratio = rate[key] / rate["nopool"]
        label = ("default settings, CCWRAP_SESSIONS=1" if key == "ccwrap1"
                 else f"CCWRAP_SESSIONS={POOL_CLIS}")
        rows.append(Row(
            f"throughput, {CLIENTS} clients, stand-in 200 ms: ccwrap-trio ({label}; "
            f"{restarts[names[key]]} restarts) vs ccproxy without its pool",
            "ccwrap-trio: " + tp_cell(key), "ccproxy, no pool: " + tp_cell("nopool"),
            f"{ratio:.2f}x", ">= 3x higher", verdict_at_least(ratio, 3.0, "x"),
        ))
    per_cli = (rate["ccwrap4"] / POOL_CLIS) / (rate["pool"] / POOL_CLIS)
    rows.append(Row(
        f"throughput per warm CLI, {CLIENTS} clients, stand-in 200 ms: ccwrap-trio "
        f"CCWRAP_SESSIONS={POOL_CLIS} vs ccproxy's pool with {POOL_CLIS} session ids",
        f"ccwrap-trio: {rate['ccwrap4'] / POOL_CLIS:.2f} req/s per CLI; " + tp_cell("ccwrap4"),
        f"ccproxy pool: {rate['pool'] / POOL_CLIS:.2f} req/s per CLI; " + tp_cell("pool"),
        f"{per_cli:.2f}x", ">= 0.85x, with isolation kept",
        verdict_at_least(per_cli, 0.85, "x")
        + ("" if not leaks[names["ccwrap4"]]["leaking"] else "; but ccwrap-trio LEAKED"),
    ))
    rows.append(Row(
        "throughput, reference: the CLI spawned per request",
        "spawn per request: " + tp_cell("spawn"), "-", "-", "-", "-",
    ))
    for key, label in (("ccwrap", "ccwrap-trio (1 session + standby)"),
                       ("spawn", "spawn per request"), ("nopool", "ccproxy, no pool"),
                       ("pool", "ccproxy pool (1 session id)")):
        info = idle[names[key]]
        rows.append(Row(
            f"memory, whole process tree (server + CLIs, sum of RSS): {label}",
            f"idle after the sequential rows: {info['mb']:.0f} MB ({info['clis']} CLIs)",
            f"peak during throughput: {sampler.peak_mb[names[key]]:.0f} MB "
            f"({sampler.peak_clis[names[key]]} CLIs)" if key != "ccwrap" else
            f"peak during throughput, N=1: {sampler.peak_mb[names['ccwrap1']]:.0f} MB "
            f"({sampler.peak_clis[names['ccwrap1']]} CLIs); N={POOL_CLIS}: "
            f"{sampler.peak_mb[names['ccwrap4']]:.0f} MB "
            f"({sampler.peak_clis[names['ccwrap4']]} CLIs)",
            "-", "-", "-",
        ))
    for key, label in (("ccwrap", "ccwrap-trio, sequential"), ("ccwrap1", "ccwrap-trio N=1"),
                       ("ccwrap4", f"ccwrap-trio N={POOL_CLIS}"), ("spawn", "spawn per request"),
                       ("nopool", "ccproxy, no pool"), ("pool", "ccproxy pool")):
        rows.append(Row(f"isolation (a nonce per request): {label}", isolation(key),
                        "-", "-", "isolated", "met" if not leaks[names[key]]["leaking"]
                        else "LEAKS"))
    return rows


def check_peers() -> str | None:
    """None if bench/.peers-venv has the pinned versions, else what is wrong."""
    if not CCPROXY.exists():
        return f"{CCPROXY} is missing: run `make bench-peers-setup`"
    done = subprocess.run([str(PEERS_VENV / "bin/pip"), "freeze"], capture_output=True,
                          text=True, timeout=60, check=False)
    have = dict(line.split("==", 1) for line in done.stdout.splitlines() if "==" in line)
    wrong = [f"{name} {have.get(name)} (want {version})" for name, version in PINNED.items()
             if have.get(name) != version]
    return f"bench/.peers-venv has {', '.join(wrong)}" if wrong else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of requests per side")
    parser.add_argument("--json", type=Path, help="write every figure and latency here")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    problem = check_peers()
    if problem:
        parser.error(problem)
    if not os.access(REAL_CLI, os.X_OK):
        parser.error(f"the real CLI is not at {REAL_CLI}: run `make install`")
    scratch = Path(tempfile.mkdtemp(prefix="ccwrap-peers-"))
    bench = PeerBench(QUICK if args.quick else FULL, scratch)
    raw: dict[str, Any] = {"machine": machine(), "quick": args.quick, "peers": PINNED}
    print(f"machine: {raw['machine']}\nscratch (logs): {scratch}", flush=True)
    load_before, started, watch = os.getloadavg(), time.monotonic(), CpuWatch()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    failed = False
    rows: list[Row] = []
    try:
        rows = run(bench, raw)
    except (RuntimeError, httpx.HTTPError) as exc:
        failed = True
        print(f"FAILED: {exc}", flush=True)
    except KeyboardInterrupt:
        failed = True
        print("interrupted", flush=True)
    finally:
        bench.procs.stop_all()
    raw["load"] = {"before": load_before, "after": os.getloadavg(),
                   "seconds": time.monotonic() - started, "others_cores": watch.others_cores()}
    table_text = print_table(rows)
    print("\n" + table_text)
    print(f"\nload average before -> after: {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"other processes used {raw['load']['others_cores']:.2f} cores on average; "
          f"total {raw['load']['seconds']:.0f}s")
    if any(errors for name, errors in raw.get("errors", {}).items() if name.startswith("ccwrap")):
        failed = True  # the peers' failures are figures; ccwrap-trio's are a failed run
    exes = raw.get("cli_executables", [])
    print(f"CLI executables seen in the process trees: {exes}")
    pinned_exe = str(REAL_CLI.resolve().parent.parent)
    if any(not exe.startswith(pinned_exe) for exe in exes):
        print("WARNING: a CLI outside the pinned install ran")
        failed = True
    if args.json:
        raw["table"] = table_text
        args.json.write_text(json.dumps(raw, indent=1, default=str))
        print(f"figures written to {args.json}")
    if failed or args.keep:
        print(f"logs kept in {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
