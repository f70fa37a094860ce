"""What a client controls (issue 10 B): hostile schemas, regexes and bodies cost a bounded amount
and never stall the event loop; logs and echoes carry no client or model content.

The latency tests are the one timed assertion the issue asks for: ``/health/live`` must answer
within 100 ms while the hostile request is served (the probes' 90th percentile, and no probe over
2 s: see ``served_with_live_probe``). The hostile client runs in a thread with a
blocking HTTP client, so that its own work is not counted against the server's event loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from ccwrap_trio import protocol
from ccwrap_trio.core import Content
from ccwrap_trio.session import OnProgress

from .conftest import running_server
from .fakes import FakeSession

LIVE_LIMIT_S = 0.100
STALL_LIMIT_S = 2.0


class ScriptedSession(FakeSession):
    """Answers every turn with the same text (the model's answer a test needs)."""

    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = answer

    async def ask(
        self, content: Content, on_progress: OnProgress | None = None
    ) -> protocol.TurnResult:
        self.turns += 1
        self.prompts.append(content if isinstance(content, str) else str(content))
        return protocol.TurnResult(self.answer, False, "success", protocol.Usage(input_tokens=5))


def scripted(answer: str) -> Callable[[], Any]:
    @asynccontextmanager
    async def factory() -> AsyncIterator[FakeSession]:
        session = ScriptedSession(answer)
        try:
            yield session
        finally:
            session.die()

    return factory


def chat(text: str = "hi", schema: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "haiku", "messages": [{"role": "user", "content": text}]}
    if schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "s", "schema": schema}}
    return body | extra


async def served_with_live_probe(
    url: str, payload: bytes, *, path: str = "/v1/chat/completions"
) -> tuple[httpx.Response, float]:
    """POST ``payload`` from a thread while polling /health/live; (response, its probe latency).

    The latency is the 90th percentile of the probes; no probe may wait ``STALL_LIMIT_S``. A
    stalled loop (seconds, before the fix) makes every probe in the stall slow; a machine that
    other work loads (CI shares its CPU) delays a few probes now and then: the percentile tells
    the first from the second, where the slowest probe alone would not.
    """
    latencies: list[float] = []
    done = trio.Event()
    result: list[httpx.Response] = []

    def post() -> httpx.Response:
        with httpx.Client(base_url=url, timeout=120) as client:
            return client.post(path, content=payload,
                               headers={"Content-Type": "application/json"})

    async def hostile() -> None:
        result.append(await trio.to_thread.run_sync(post))
        done.set()

    async with httpx.AsyncClient(base_url=url) as probe, trio.open_nursery() as nursery:
        await probe.get("/health/live")  # the connection is open before the clock starts
        nursery.start_soon(hostile)
        with trio.fail_after(120):
            for _ in range(100_000):  # bounded; ends when the hostile request is answered
                if done.is_set():
                    break
                started = time.perf_counter()
                response = await probe.get("/health/live")
                assert response.status_code == 200
                latencies.append(time.perf_counter() - started)
    assert latencies, "the hostile request was answered before any probe"
    assert max(latencies) < STALL_LIMIT_S, f"the event loop stalled {max(latencies):.2f}s"
    latencies.sort()
    return result[0], latencies[int(0.9 * (len(latencies) - 1))]


def exponential_schema(levels: int) -> dict[str, Any]:
    """Each level two '$ref's to the next: validating visits 2**levels subschemas."""
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
            for i in range(levels)}
    defs[f"d{levels}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


async def test_exponential_ref_schema_is_a_400_and_live_stays_fast(make_config: Any) -> None:
    schema = exponential_schema(17)  # 1.2 KB; before the limits it blocked the loop for seconds
    async with running_server(make_config()) as url:
        response, latency = await served_with_live_probe(url, json.dumps(chat(schema=schema))
                                                         .encode())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "schema_too_complex"
    assert error["param"] == "response_format.json_schema.schema"
    assert latency < LIVE_LIMIT_S


async def test_backtracking_pattern_fails_validation_and_live_stays_fast(
    make_config: Any,
) -> None:
    # ^(x+x+)+y$ on 27 x's: seconds of Python `re`, holding the GIL; RE2 answers at once.
    answer = json.dumps("x" * 27)
    schema = {"type": "string", "pattern": "^(x+x+)+y$"}
    async with running_server(
        make_config(schema_repairs=1), session_factory_override=scripted(answer)
    ) as url:
        response, latency = await served_with_live_probe(url, json.dumps(chat(schema=schema))
                                                         .encode())
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "invalid_structured_output"
    assert "does not match" in response.json()["error"]["message"]
    assert latency < LIVE_LIMIT_S


async def test_recursive_schema_against_a_deep_answer_is_cut_and_live_stays_fast(
    make_config: Any,
) -> None:
    # Two branches per level of the answer: 2**depth evaluations without the step budget.
    branch = {"type": "object", "properties": {"a": {"$ref": "#/$defs/t"}}}
    schema = {"$defs": {"t": {"anyOf": [branch, branch]}}, "$ref": "#/$defs/t"}
    answer = '{"a":' * 16 + "1" + "}" * 16  # 2**16 evaluations: seconds without the budget
    async with running_server(
        make_config(schema_repairs=2), session_factory_override=scripted(answer)
    ) as url:
        response, latency = await served_with_live_probe(url, json.dumps(chat(schema=schema))
                                                         .encode())
    assert response.status_code == 502
    assert "too complex" in response.json()["error"]["message"]
    assert latency < LIVE_LIMIT_S


def ten_megabytes_of_small_parts(dialect: str) -> tuple[str, bytes]:
    """(path, body): one user message of 330,000 one-letter text parts, just under 10 MB."""
    if dialect == "chat":
        path, body = "/v1/chat/completions", {
            "model": "haiku", "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 330_000}]}
    elif dialect == "responses":
        path, body = "/v1/responses", {
            "model": "haiku", "max_output_tokens": 16, "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "a"}] * 270_000}]}
    else:
        path, body = "/v1/messages", {
            "model": "haiku", "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 330_000}]}
    payload = json.dumps(body).encode()
    assert 5 * 1024 * 1024 < len(payload) <= 10 * 1024 * 1024
    return path, payload


@pytest.mark.parametrize("dialect", ["chat", "responses", "anthropic"])
async def test_ten_megabyte_body_of_small_parts_keeps_live_fast(
    make_config: Any, dialect: str
) -> None:
    # Parsing 330,000 content parts took 2+ s on the event loop (Responses and Messages parsed
    # there still); in a thread json.loads alone held the GIL for 0.1-0.5 s. Now in a worker
    # process (offload.py).
    path, payload = ten_megabytes_of_small_parts(dialect)
    async with running_server(make_config()) as url:
        response, latency = await served_with_live_probe(url, payload, path=path)
    assert response.status_code == 200, response.text[:300]
    assert latency < LIVE_LIMIT_S


@pytest.mark.parametrize("dialect", ["chat", "responses", "anthropic"])
async def test_a_big_bad_body_parsed_in_a_process_is_the_dialects_400(
    make_config: Any, dialect: str
) -> None:
    """The worker process's errors come back as the front end's own, ``param`` and all."""
    path, payload = ten_megabytes_of_small_parts(dialect)
    bad = payload.replace(b'"model": "haiku"', b'"model": 7', 1)
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post(path, content=bad, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    if dialect == "anthropic":
        assert response.json()["type"] == "error"
        assert "model" in response.json()["error"]["message"]
    else:
        assert response.json()["error"]["param"] == "model"


async def test_deep_schema_gets_a_clear_400(make_config: Any) -> None:
    schema: dict[str, Any] = {}
    for _ in range(200):
        schema = {"items": schema}
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=chat(schema=schema))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "schema_too_complex"
    assert "deeper than 64 levels" in error["message"]
    assert "recursion" not in error["message"]


async def test_pattern_outside_re2_is_a_clear_400(make_config: Any) -> None:
    schema = {"type": "string", "pattern": "(a)\\1"}
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=chat(schema=schema))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported"
    assert "RE2" in response.json()["error"]["message"]


async def test_invalid_answers_stay_out_of_the_logs(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "PatientJaneDoeSSN123456789"
    schema = {"type": "object", "properties": {"ssn": {"type": "integer"}}}
    async with running_server(
        make_config(schema_repairs=1),
        session_factory_override=scripted(json.dumps({"ssn": secret})),
    ) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=chat(schema=schema))
    assert response.status_code == 502
    assert secret in response.json()["error"]["message"]  # the client may see its model's answer
    assert "[WARN] Structured output invalid, repair 1/1: at $.ssn: type" in caplog.text
    assert "[ERROR] Structured output invalid after 1 repairs" in caplog.text
    assert secret not in caplog.text


async def test_long_model_name_is_a_400(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        # Ids starting "claude-" are allowed (CCWRAP_MODELS): only the length is at stake.
        long = await http.post("/v1/chat/completions",
                               json=chat(model="claude-" + "m" * 250, stream=True))
        fine = await http.post("/v1/chat/completions", json=chat(model="claude-" + "m" * 249))
    assert long.status_code == 400
    assert long.json()["error"]["param"] == "model"
    assert len(long.content) < 1000  # the name is not echoed back
    assert fine.status_code == 200


async def test_quoted_values_in_errors_are_cut_short(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as http:
        role = await http.post("/v1/chat/completions", json={
            "model": "haiku", "messages": [{"role": "r" * 100_000, "content": "hi"}]})
    assert role.status_code == 400
    assert len(role.content) < 1000


async def test_request_id_carrying_a_key_is_replaced(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-key-one-123456"
    async with running_server(make_config(api_keys=(key,))) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            headers = {"Authorization": f"Bearer {key}"}
            for given in (key, f"trace-{key}-1", key[2:12]):
                response = await http.post("/v1/chat/completions", json=chat(),
                                           headers=headers | {"X-Request-ID": given})
                assert response.status_code == 200
                assert response.headers["X-Request-ID"].startswith("req_")
            kept = await http.post("/v1/chat/completions", json=chat(),
                                   headers=headers | {"X-Request-ID": "trace-42"})
            history = (await http.get("/status/history")).text
    assert kept.headers["X-Request-ID"] == "trace-42"
    assert key[2:12] not in history and key[2:12] not in caplog.text


async def test_authorization_header_is_parsed_properly(make_config: Any) -> None:
    key = "sk-key-one-123456"
    async with running_server(make_config(api_keys=(key,))) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            tab = await http.get("/v1/models", headers={"Authorization": f"Bearer\t{key}"})
            spaces = await http.get("/v1/models", headers={"Authorization": f"bearer   {key}"})
            basic = await http.get("/v1/models", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert tab.status_code == 200 and spaces.status_code == 200
    assert basic.status_code == 401
    assert basic.json()["error"]["code"] == "invalid_api_key"
    assert "Bearer" in basic.json()["error"]["message"]
    assert "didn't provide" not in basic.json()["error"]["message"]
