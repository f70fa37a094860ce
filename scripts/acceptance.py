"""The core acceptance checks, as a new user would try them, on real processes.

Starts the stand-in Anthropic API and `ccwrap-trio serve` over the REAL Claude Code CLI (all on
127.0.0.1), then: 20 rapid requests through the `openai` SDK with
CCWRAP_SESSION_MAX_REQUESTS=8 (each must answer its own prompt; restart_count must grow by 2;
the server's RSS must stay under 100 MB), a hung API turn (504 within CCWRAP_QUERY_TIMEOUT + 5 s,
/health fast meanwhile, the next request answered). Prints the figures; exits 1 if a check fails.

    .venv/bin/python scripts/acceptance.py [--standby 0|1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
CLAUDE = ROOT / ".tools/claude/node_modules/.bin/claude"
QUERY_TIMEOUT_S = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--standby", default="1", choices=("0", "1"))
    args = parser.parse_args()
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("  ok   " if ok else "  FAIL ") + what)
        if not ok:
            failures.append(what)

    python = sys.executable
    standin = subprocess.Popen(
        [python, "-m", "ccwrap_trio.standin", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert standin.stdout is not None
    standin_url = standin.stdout.readline().split()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, "HOME": tempfile.mkdtemp(prefix="ccwrap-acceptance-"),
        "ANTHROPIC_BASE_URL": standin_url, "ANTHROPIC_API_KEY": "sk-standin",
        "CCWRAP_FORWARD_API_KEY": "1", "CCWRAP_CLAUDE_BIN": str(CLAUDE), "CCWRAP_PORT": str(port),
        "CCWRAP_SESSION_MAX_REQUESTS": "8", "CCWRAP_QUERY_TIMEOUT": str(QUERY_TIMEOUT_S),
        "CCWRAP_STANDBY": args.standby, "CCWRAP_MEMORY_SAMPLE_INTERVAL": "1",
    }
    server = subprocess.Popen(
        [python, "-m", "ccwrap_trio", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if http.get("/health").json()["status"] == "healthy":
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            print(f"ccwrap-trio on {url} (real CLI, stand-in API, standby={args.standby})")
            before = http.get("/health").json()["stats"]["restart_count"]
            latencies = []
            with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
                answered = 0
                for i in range(20):
                    start = time.monotonic()
                    reply = client.chat.completions.create(
                        model="haiku", messages=[{"role": "user", "content": f"prompt {i}"}]
                    )
                    latencies.append(time.monotonic() - start)
                    answered += reply.choices[0].message.content == f"echo: prompt {i}"
                    time.sleep(0.1)
            time.sleep(1.2)  # one more memory sample
            health = http.get("/health").json()
            grew = health["stats"]["restart_count"] - before
            print(f"20 requests: p50 {statistics.median(latencies) * 1000:.0f} ms, "
                  f"max {max(latencies) * 1000:.0f} ms; restart_count +{grew}; "
                  f"rss {health['memory']['rss_mb']} MB; "
                  f"CLI rss {health['memory']['cli_rss_mb']} MB")
            check(answered == 20, "each of 20 requests answered its own prompt")
            check(grew == 2, "restart_count grew by 2")
            check(health["memory"]["rss_mb"] < 100, "server RSS under 100 MB")

            result: dict[str, float | int] = {}

            def hung() -> None:
                start = time.monotonic()
                response = http.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hang [standin:hang]"}]})
                result.update(status=response.status_code, seconds=time.monotonic() - start)

            thread = threading.Thread(target=hung)
            thread.start()
            time.sleep(0.5)
            health_ms = []
            for _ in range(20):
                start = time.monotonic()
                http.get("/health")
                health_ms.append((time.monotonic() - start) * 1000)
                time.sleep(0.1)
            thread.join()
            print(f"hung API turn: {result['status']} after {result['seconds']:.2f} s; /health "
                  f"during it: median {statistics.median(health_ms):.1f} ms, "
                  f"max {max(health_ms):.1f} ms")
            check(result["status"] == 504, "the hung turn got 504")
            check(result["seconds"] < QUERY_TIMEOUT_S + 5, "within CCWRAP_QUERY_TIMEOUT + 5 s")
            check(max(health_ms) < 100, "/health answered within 100 ms while the turn hung")
            after = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "after the hang"}]})
            check(after.status_code == 200, "the next request succeeded")
    finally:
        server.terminate()
        code = server.wait(timeout=60)
        standin.terminate()
        standin.wait(timeout=10)
    check(code == 0, "SIGTERM: exit 0")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
