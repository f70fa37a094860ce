"""Issue 10 (part A), findings 5 and 7: a streamed answer stays what the model said once when the
CLI retries the API by itself (connection dropped, malformed event), checked end to end on the
real CLI with the reconciliation rules on their own; and the CLI's own retries are bounded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ccwrap_trio.config import Config
from ccwrap_trio.reconcile import Reconciler
from ccwrap_trio.standin import Standin, StandinConfig

from .conftest import real_claude_bin, real_stack, running_server

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
# Deltas spaced out, so that the first attempt's text reaches the client before the fault.
SLOW = "[standin:delay=0.05]"


def feed_all(reconciler: Reconciler, events: list[str | None]) -> str:
    """Deltas (None: a new message_start); what reached the client."""
    out = ""
    for event in events:
        if event is None:
            reconciler.new_attempt()
        else:
            out += reconciler.feed(event)
    return out


def test_a_retry_that_repeats_the_text_sends_nothing_twice() -> None:
    r = Reconciler()
    out = feed_all(r, [None, "ok ", "nonce", None, "ok ", "nonce", " seen=1"])
    assert out == "ok nonce seen=1"
    assert r.rest("ok nonce seen=1") == ""


def test_an_unstreamed_retry_is_completed_from_the_result() -> None:
    r = Reconciler()
    assert feed_all(r, [None, "echo: alpha", " beta"]) == "echo: alpha beta"
    assert r.rest("echo: alpha beta gamma") == " gamma"


def test_a_retry_that_says_something_else_cannot_be_reconciled() -> None:
    r = Reconciler()
    assert feed_all(r, [None, "echo: alpha", None, "something", " else"]) == "echo: alpha"
    assert r.rest("something else") is None


def test_outer_whitespace_of_the_result_is_not_a_difference() -> None:
    r = Reconciler()
    feed_all(r, [None, "\n\nHello", " world\n"])
    assert r.rest("Hello world") == ""
    r = Reconciler()
    feed_all(r, [None, "\nHello"])
    assert r.rest("Hello world") == " world"


async def stream_text(url: str, prompt: str) -> tuple[str, list[dict[str, object]]]:
    async with httpx.AsyncClient(base_url=url, timeout=90) as http:
        response = await http.post("/v1/chat/completions", json={
            "model": "haiku", "stream": True, "messages": [{"role": "user", "content": prompt}]})
        assert response.status_code == 200, response.text
    frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""  # type: ignore[index]
        for c in chunks if c.get("choices")
    )
    return text, chunks


@pytest.mark.parametrize("fault", ["drop-mid-once", "malformed-once"])
async def test_real_cli_retry_mid_stream_streams_the_answer_once(
    tmp_path: Path, fault: str
) -> None:
    async with real_stack(tmp_path) as (url, standin, _config):
        text, chunks = await stream_text(url, f"{SLOW} [standin:{fault}] {WORDS}")
        assert standin.calls[0].fault == fault.split("-once")[0]
        last = chunks[-1]
        if "error" in last:
            # Under load the CLI sometimes dies of the malformed event ("Could not parse message
            # into JSON") instead of retrying: then the stream ends in an error, never in `stop`.
            assert fault == "malformed-once", last
            assert f"echo: {WORDS}".startswith(text)
            return
        assert [c.fault for c in standin.calls][-2:] == [fault.split("-once")[0], None]
        assert text == f"echo: {WORDS}"  # not doubled, not cut
        assert last["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]


async def test_real_cli_retry_with_another_answer_ends_in_an_error(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, _standin, _config):
        prompt = f"{SLOW} [standin:drop-mid-once] [standin:retry-differs] {WORDS}"
        text, chunks = await stream_text(url, prompt)
        assert chunks[-1]["error"]["code"] == "cli_error"  # type: ignore[index]
        assert not any(
            c["choices"][0].get("finish_reason") == "stop"  # type: ignore[index]
            for c in chunks if c.get("choices")
        )
        assert "different" not in text and text.startswith("echo: alpha")
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            stats = (await http.get("/health")).json()["stats"]
        assert stats["total_errors"] == 1 and stats["successes"] == 0


async def test_real_cli_gives_up_on_a_failing_api_after_two_retries(tmp_path: Path) -> None:
    """Finding 7, end to end: the default child environment bounds the CLI's own retries."""
    async with trio.open_nursery() as nursery:
        standin: Standin = await nursery.start(Standin(StandinConfig()).serve)
        home = tmp_path / "home"
        home.mkdir()
        environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(home),
                   "ANTHROPIC_BASE_URL": standin.url, "ANTHROPIC_API_KEY": "sk-standin-e2e",
                   "CCWRAP_CLAUDE_BIN": real_claude_bin(), "CCWRAP_PORT": "0",
                   "CCWRAP_STANDBY": "0", "CCWRAP_FORWARD_API_KEY": "1",
                   "CCWRAP_WORKDIR": str(tmp_path / "work"), "CCWRAP_SHUTDOWN_GRACE": "5"}
        config = Config.load(environ)
        async with running_server(config) as url, \
                httpx.AsyncClient(base_url=url, timeout=300) as http:
            started = trio.current_time()
            response = await http.post("/v1/chat/completions", json={"model": "haiku", "messages": [
                {"role": "user", "content": "[standin:status=529]"}]})
            elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    # An overloaded API stays what it is: 503 with a Retry-After (issue 13), not a 502.
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "upstream_overloaded"
    assert int(response.headers["retry-after"]) >= 1
    assert len([c for c in standin.calls if c.status == 529]) == 3  # one call, two retries
    assert elapsed < 60  # was ~178 s with the CLI's 10 retries; 2 retries back off ~2 s


def sse_data(raw: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.splitlines()
            if line.startswith("data: {")]


async def streamed_answer(http: httpx.AsyncClient, dialect: str, prompt: str) -> tuple[str, str]:
    """One streamed answer in ``dialect``: (its text, how it ended)."""
    if dialect == "chat":
        response = await http.post("/v1/chat/completions", json={
            "stream": True, "messages": [{"role": "user", "content": prompt}]})
        chunks = sse_data(response.text)
        text = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c.get("choices"))
        last = chunks[-1]
        return text, "error" if "error" in last else last["choices"][0]["finish_reason"]
    if dialect == "responses":
        response = await http.post("/v1/responses", json={"stream": True, "input": prompt})
        events = sse_data(response.text)
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        return text, events[-1]["type"]
    response = await http.post("/v1/messages", json={
        "max_tokens": 200, "stream": True, "messages": [{"role": "user", "content": prompt}]})
    events = sse_data(response.text)
    text = "".join(e["delta"]["text"] for e in events
                   if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta")
    ends = [e for e in events if e["type"] in ("message_delta", "error")]
    return text, ends[-1]["type"] if ends[-1]["type"] == "error" else ends[-1]["delta"][
        "stop_reason"]


@pytest.mark.parametrize("dialect", ["chat", "responses", "anthropic"])
@pytest.mark.parametrize("fault", ["unstreamed-retry", "streamed-retry"])
async def test_every_dialect_streams_a_retried_answer_once_and_whole(
    make_config: Any, dialect: str, fault: str
) -> None:
    """Seen on the real CLI under load: after a malformed event it abandons the streamed blocks
    and retries, streamed again or not. Each dialect's deltas add up to the answer, once."""
    prompt = f"FAKE:{fault} one two three four five six"
    async with running_server(make_config()) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as http:
        text, ending = await streamed_answer(http, dialect, prompt)
        stats = (await http.get("/health")).json()["stats"]
    assert text == "echo: one two three four five six"
    assert ending == {"chat": "stop", "responses": "response.completed",
                      "anthropic": "end_turn"}[dialect]
    assert stats["successes"] == 1 and stats["total_errors"] == 0
