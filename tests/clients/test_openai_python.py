"""The `openai` Python SDK, unmodified, against ccwrap-trio over the REAL Claude Code CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
import trio

from ..conftest import real_stack, wait_for_health

pytestmark = pytest.mark.real_cli


class Person(pydantic.BaseModel):
    name: str
    age: int


class Team(pydantic.BaseModel):
    """Nested models: the SDK sends a schema with $defs/$ref."""

    title: str
    members: list[Person]
    lead: Person


def client_for(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)


async def test_sync_async_and_streaming(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        with client_for(url) as client:
            plain = await trio.to_thread.run_sync(lambda: client.chat.completions.create(
                model="haiku", messages=[{"role": "user", "content": "sync from python"}]))

            def stream() -> list[Any]:
                return list(client.chat.completions.create(
                    model="haiku",
                    messages=[{"role": "user", "content": "stream these five words please"}],
                    stream=True, stream_options={"include_usage": True}))

            chunks = await trio.to_thread.run_sync(stream)

        async def async_call() -> str:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
                reply = await c.chat.completions.create(
                    model="haiku", messages=[{"role": "user", "content": "async from python"}])
                return reply.choices[0].message.content or ""

        async_text = await trio.to_thread.run_sync(asyncio.run, async_call())

    assert plain.choices[0].message.content == "echo: sync from python"
    assert async_text == "echo: async from python"
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "echo: stream these five words please"
    assert len(pieces) >= 5  # token by token, as the CLI's partial messages arrive
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    stream_call = next(c for c in standin.calls if "five words" in json.dumps(c.body))
    assert usage is not None
    assert usage.completion_tokens == stream_call.usage["output_tokens"]
    assert usage.prompt_tokens == stream_call.usage["input_tokens"] + stream_call.usage.get(
        "cache_read_input_tokens", 0) + stream_call.usage.get("cache_creation_input_tokens", 0)


async def test_parse_returns_a_validated_pydantic_model(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        with client_for(url) as client:
            completion = await trio.to_thread.run_sync(
                lambda: client.beta.chat.completions.parse(
                    model="haiku",
                    messages=[{"role": "user", "content": "Describe a small team."}],
                    response_format=Team,
                )
            )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Team)
    assert isinstance(parsed.lead, Person)
    assert Team.model_validate_json(completion.choices[0].message.content or "") == parsed
    sent = json.dumps(standin.calls[-1].body)
    assert "json-schema" in sent and "$defs" in sent


async def test_invalid_first_answer_is_repaired_in_the_same_conversation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        with client_for(url) as client:
            completion = await trio.to_thread.run_sync(
                lambda: client.beta.chat.completions.parse(
                    model="haiku",
                    messages=[{"role": "user", "content": "A person. [standin:invalid-first]"}],
                    response_format=Person,
                )
            )
        async with httpx.AsyncClient(base_url=url) as http:
            stats = (await http.get("/health")).json()["stats"]
    assert isinstance(completion.choices[0].message.parsed, Person)
    assert stats["schema_repairs"] == 1 and stats["schema_failures"] == 0
    assert "[WARN] Structured output invalid, repair 1/2" in caplog.text
    # The repair turn went to the same conversation: the API saw the invalid answer in it.
    assert len(standin.calls) == 2
    repair_messages = json.dumps(standin.calls[1].body["messages"])
    assert standin.calls[0].reply in repair_messages or json.dumps(
        standin.calls[0].reply)[1:-1] in repair_messages
    assert "does not validate" in repair_messages
    # Usage counts both turns.
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == sum(c.usage["output_tokens"] for c in standin.calls)


async def test_error_types(tmp_path: Path) -> None:
    async with real_stack(tmp_path, api_keys=("sk-ccwrap-test-1",), max_queue=1) as (url, _, _c):
        with client_for(url, api_key="sk-wrong-key-123") as wrong:
            with pytest.raises(openai.AuthenticationError):
                await trio.to_thread.run_sync(lambda: wrong.models.list())
        with client_for(url, api_key="sk-ccwrap-test-1") as client:
            with pytest.raises(openai.BadRequestError) as bad:
                await trio.to_thread.run_sync(lambda: client.chat.completions.create(
                    model="haiku", messages=[{"role": "user", "content": "x"}], n=3))
            assert bad.value.param == "n"  # type: ignore[attr-defined]
            rate_limited: list[Exception] = []

            async def ask(text: str) -> None:
                try:
                    await trio.to_thread.run_sync(lambda: client.chat.completions.create(
                        model="haiku", messages=[{"role": "user", "content": text}]))
                except openai.RateLimitError as exc:
                    rate_limited.append(exc)

            async with httpx.AsyncClient(base_url=url) as http, trio.open_nursery() as nursery:
                nursery.start_soon(ask, "slow one [standin:latency=5]")
                await wait_for_health(http, lambda h: h["active_queries"] == 1)
                nursery.start_soon(ask, "waits in the queue")
                await wait_for_health(http, lambda h: h["queued"] == 1)
                nursery.start_soon(ask, "turned away")
    assert len(rate_limited) == 1
