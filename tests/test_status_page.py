"""The operator status page (/status) in a real headless browser: Debian's ``chromium``.

The browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: the
browser reads commands on fd 3 and writes replies and events on fd 4, NUL-separated JSON), so no
websocket client and no port are needed. The test loads the page from a real server over the fake
CLI, lets the page's own JavaScript fetch /health and /status/history, reads what the page shows
and compares it with /health; it saves a screenshot to test-artifacts/status-page.png.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .conftest import ROOT, running_server

ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOT = ARTIFACTS / "status-page.png"
UNREACHABLE_SCREENSHOT = ARTIFACTS / "status-page-unreachable.png"
VIEWPORT = {"width": 1440, "height": 900}  # a laptop screen
INSTALL_HINT = (
    "Debian's chromium is needed for the status page test: "
    "`apt-get update && apt-get install -y chromium` (or set CCWRAP_TEST_CHROMIUM to a "
    "Chromium/Chrome executable)"
)


def chromium_bin() -> str:
    candidates = [os.environ.get("CCWRAP_TEST_CHROMIUM", ""), "chromium", "chromium-browser"]
    for candidate in candidates:
        found = candidate and shutil.which(candidate)
        if found:
            return found
    pytest.fail(INSTALL_HINT)


class Browser:
    """A minimal DevTools-protocol client over chromium's debugging pipe."""

    def __init__(self, send: trio.lowlevel.FdStream, receive: trio.lowlevel.FdStream) -> None:
        self._send = send
        self._receive = receive
        self._ids = itertools.count(1)
        self._replies: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        self.events: list[dict[str, Any]] = []
        self.event_arrived = trio.Event()

    async def read_forever(self) -> None:
        buffer = b""
        while True:
            chunk = await self._receive.receive_some(1 << 16)
            if not chunk:
                for channel in self._replies.values():
                    channel.close()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    if message["id"] in self._replies:
                        self._replies.pop(message["id"]).send_nowait(message)
                else:
                    self.events.append(message)
                    self.event_arrived.set()
                    self.event_arrived = trio.Event()

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._replies[ident] = send
        with trio.fail_after(timeout):
            async with self._send_lock:
                await self._send.send_all(json.dumps(message).encode() + b"\0")
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise AssertionError(f"chromium went away during {method}") from None
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def wait_event(
        self, method: str, *, since: int = 0, timeout: float = 15.0
    ) -> dict[str, Any]:
        """The first ``method`` event from ``self.events[since:]`` on, waiting for it."""
        seen = since
        with trio.fail_after(timeout):
            while True:
                for event in self.events[seen:]:
                    if event["method"] == method:
                        return event
                seen = len(self.events)
                await self.event_arrived.wait()

# Puts the pipe ends on the fd numbers chromium expects (3 and 4), then becomes chromium. (A
# shell cannot do it: dash's redirections take single-digit fds only.)
TRAMPOLINE = """
import fcntl, os, sys
given = [int(sys.argv[1]), int(sys.argv[2])]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in given]  # out of the way of 3 and 4
for fd in given:
    os.close(fd)
os.dup2(high[0], 3)
os.dup2(high[1], 4)
for fd in high:
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


@contextlib.asynccontextmanager
async def open_chromium(executable: str, profile: Path, log: Path) -> AsyncIterator[Browser]:
    """Headless chromium with the DevTools pipe on fds 3 (commands) and 4 (replies)."""
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    args = [
        executable,
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-default-apps", "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars",
        "--force-device-scale-factor=1", "--remote-debugging-pipe", f"--user-data-dir={profile}",
        f"--window-size={VIEWPORT['width']},{VIEWPORT['height']}",
        # Nothing but 127.0.0.1 resolves: the page (and chromium) can reach no one else.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "about:blank",
    ]
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", TRAMPOLINE, str(to_browser_r), str(from_browser_w), *args],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
            pass_fds=(to_browser_r, from_browser_w), start_new_session=True,
        )
    os.close(to_browser_r)
    os.close(from_browser_w)
    send = trio.lowlevel.FdStream(to_browser_w)
    receive = trio.lowlevel.FdStream(from_browser_r)
    browser = Browser(send, receive)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(browser.read_forever)
            try:
                yield browser
            finally:
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    with contextlib.suppress(Exception):
                        await browser.call("Browser.close", timeout=3)
                    await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # chromium and its helpers, by group id
            with trio.move_on_after(5) as reap:
                reap.shield = True
                await process.wait()
        await send.aclose()
        await receive.aclose()


# What the page shows: every [data-field] (its text and raw value), the page's state, the table of
# recent requests and the banner. Evaluated in the page.
READ_PAGE = """(() => {
  const fields = {};
  for (const node of document.querySelectorAll('[data-field]')) {
    fields[node.dataset.field] = {text: node.textContent.trim(), value: node.dataset.value};
  }
  const requests = [...document.querySelectorAll('#requests tbody tr[data-request-id]')].map(
    (tr) => ({id: tr.dataset.requestId, outcome: tr.dataset.outcome,
              cells: [...tr.cells].map((td) => td.textContent.trim())}));
  const keys = [...document.querySelectorAll('#keys tbody tr')].map(
    (tr) => [...tr.cells].map((td) => td.textContent.trim()));
  return {state: document.body.dataset.state, updates: Number(document.body.dataset.updates),
          fields, requests, keys, banner: document.querySelector('#banner').textContent,
          title: document.title,
          restartMarkers: document.querySelectorAll('#events-chart g title').length,
          memoryPaths: document.querySelectorAll('#memory-chart path').length};
})()"""


async def read_page(browser: Browser, session: str) -> dict[str, Any]:
    reply = await browser.call(
        "Runtime.evaluate", {"expression": READ_PAGE, "returnByValue": True}, session=session
    )
    assert "exceptionDetails" not in reply, reply
    value: dict[str, Any] = reply["result"]["value"]
    return value


async def wait_page(
    browser: Browser, session: str, predicate: Any, *, timeout: float = 15.0
) -> dict[str, Any]:
    """Read the page until ``predicate(page)`` holds; fail after ``timeout`` with the last read."""
    page: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            page = await read_page(browser, session)
            if predicate(page):
                return page
            await trio.sleep(0.1)
    raise AssertionError(f"the page never got there; it shows: {json.dumps(page)[:3000]}")


async def screenshot(browser: Browser, session: str, path: Path) -> None:
    """The whole page, not only the viewport, at the laptop width."""
    metrics = await browser.call("Page.getLayoutMetrics", session=session)
    height = int(metrics["cssContentSize"]["height"]) + 1
    shot = await browser.call("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height, "scale": 1},
    }, session=session)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


KEY = "status-page-key-0001"  # named "ops": the page shows its usage by name, never the key


async def chat(http: httpx.AsyncClient, prompt: str) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={
        "model": "haiku", "messages": [{"role": "user", "content": prompt}],
    }, headers={"Authorization": f"Bearer {KEY}"})


async def test_status_page_shows_what_health_says_in_headless_chromium(
    make_config: Any, tmp_path: Path
) -> None:
    executable = chromium_bin()
    # turn_limit=5: the 4th request reaches the proactive threshold (80%), one restart follows.
    # isolation=none: the context keeps its tokens, so the gauge has something to show.
    config = make_config(
        memory_sample_interval_s=0.2, turn_limit=5, isolation="none", shutdown_grace_s=1.0,
        api_keys=(f"ops:{KEY}",),
    )
    log = tmp_path / "chromium.log"
    try:
        async with open_chromium(executable, tmp_path / "profile", log) as browser:
            target = next(t for t in (await browser.call("Target.getTargets"))["targetInfos"]
                          if t["type"] == "page")
            session = (await browser.call("Target.attachToTarget", {
                "targetId": target["targetId"], "flatten": True,
            }))["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                await browser.call(f"{domain}.enable", session=session)
            await browser.call("Emulation.setDeviceMetricsOverride", {
                **VIEWPORT, "deviceScaleFactor": 1, "mobile": False,
            }, session=session)
            await exercise_page(browser, session, config)
    except BaseException:
        if log.exists():
            print(f"chromium's log ({log}):\n{log.read_text(errors='replace')[-4000:]}")
        raise


async def exercise_page(browser: Browser, session: str, config: Any) -> None:
    async with running_server(config) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        for prompt in ("hello", "FAKE:error=boom", "how are you", "FAKE:tokens=5000 third"):
            response = await chat(http, prompt)
            if "boom" in prompt:
                assert response.status_code == 502, response.text
                failed_id = response.headers["x-request-id"]
            else:
                assert response.status_code == 200, response.text

        async def health() -> dict[str, Any]:
            reply = await http.get("/health")
            assert reply.status_code in (200, 503), reply.text
            body: dict[str, Any] = reply.json()
            return body

        # The 4th turn put the session at 80%: wait for the proactive restart to be over.
        with trio.fail_after(10):
            while True:
                now = await health()
                if now["stats"]["restart_count"] == 1 and now["status"] == "healthy":
                    break
                await trio.sleep(0.05)
        for prompt in ("after the restart", "FAKE:tokens=1234 once more"):
            assert (await chat(http, prompt)).status_code == 200
        before = await health()
        traffic_done = time.time()
        with trio.fail_after(10):  # a couple of memory samples taken after the traffic
            while sum(sample["t"] > traffic_done for sample in
                      (await http.get("/status/history")).json()["memory"]) < 2:
                await trio.sleep(0.1)

        loads = len(browser.events)
        await browser.call("Page.navigate", {"url": f"{url}/status?interval=0.5"}, session=session)
        await browser.wait_event("Page.loadEventFired", since=loads)
        # Two refreshes after `before`: the page has rendered a /health newer than it.
        first = await wait_page(browser, session, lambda p: p["updates"] >= 1)
        page = await wait_page(
            browser, session, lambda p: p["updates"] >= first["updates"] + 2
        )
        after = await health()
        await screenshot(browser, session, SCREENSHOT)

        fields = page["fields"]
        assert page["state"] == "live"
        # Numbers that do not move without traffic: the same in /health and on the page.
        for name in ("session.pid", "context_usage.tokens", "context_usage.turns",
                     "context_usage.token_limit", "context_usage.turn_limit",
                     "stats.restart_count", "stats.total_requests", "stats.total_errors",
                     "stats.successes", "stats.proactive_restarts", "queued", "active_queries"):
            expected = dig(after, name)
            assert dig(before, name) == expected, name
            assert fields[name]["value"] == str(expected), (name, fields[name], expected)
            assert number(fields[name]["text"]) == expected, (name, fields[name], expected)
        assert fields["status"]["text"] == after["status"] == "healthy"
        assert fields["version"]["text"] == after["version"]
        assert fields["session.model"]["text"] == after["session"]["model"]
        assert fields["session.cli_version"]["text"] == after["session"]["cli_version"]
        assert number(fields["context_usage.turn_pct"]["text"]) == after["context_usage"][
            "turn_pct"]
        assert number(fields["context_usage.token_pct"]["text"]) == after["context_usage"][
            "token_pct"]
        assert fields["limits.max_queue"]["value"] == str(config.max_queue)
        # The traffic above, as the test counted it.
        assert after["stats"]["total_requests"] == 6
        assert after["stats"]["total_errors"] == 1
        assert after["stats"]["restart_count"] == 1
        assert after["context_usage"]["turns"] == 2
        assert after["context_usage"]["tokens"] > 0
        # Memory moves: the page's value lies between the two /health readings, give or take.
        low = min(before["memory"]["rss_mb"], after["memory"]["rss_mb"]) - 5
        high = max(before["memory"]["rss_mb"], after["memory"]["rss_mb"]) + 5
        assert low <= number(fields["memory.rss_mb"]["text"]) <= high, fields["memory.rss_mb"]
        assert number(fields["memory.cli_rss_mb"]["text"]) > 0
        assert page["memoryPaths"] >= 2  # the server and CLI lines

        # The last requests, newest first: the failed one is listed as an error.
        listed = {row["id"]: row for row in page["requests"]}
        assert len(page["requests"]) == 6
        assert listed[failed_id]["outcome"] == "error"
        assert "CliError" in listed[failed_id]["cells"]
        assert page["restartMarkers"] >= 1  # the proactive restart on the timeline
        # Usage per key, by name: the same counts as /health's.
        ops = after["keys"]["ops"]
        assert page["keys"] == [["ops", "5", "1", "0", "0", f"{ops['tokens']['prompt']:,}",
                                 f"{ops['tokens']['completion']:,}"]]
        assert KEY not in json.dumps(page)

        # The page loaded nothing but itself and its two JSON documents, and threw nothing.
        urls = {e["params"]["request"]["url"].split("?")[0] for e in browser.events
                if e["method"] == "Network.requestWillBeSent"}
        assert urls <= {f"{url}/status", f"{url}/health", f"{url}/status/history"}, urls
        problems = [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"
                    or (e["method"] == "Runtime.consoleAPICalled"
                        and e["params"]["type"] in ("error", "assert"))
                    or (e["method"] == "Log.entryAdded"
                        and e["params"]["entry"]["level"] == "error")]
        assert not problems, problems

    # The server is gone: the page says so, and keeps the last figures.
    gone = await wait_page(browser, session, lambda p: p["state"] == "unreachable", timeout=15)
    assert gone["fields"]["status"]["text"] == "unreachable"
    assert "unreachable" in gone["banner"].lower()
    assert gone["fields"]["session.pid"]["value"] == str(after["session"]["pid"])
    await screenshot(browser, session, UNREACHABLE_SCREENSHOT)


def dig(document: dict[str, Any], dotted: str) -> Any:
    value: Any = document
    for key in dotted.split("."):
        value = value[key]
    return value

