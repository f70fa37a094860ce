"""The `openai` SDK's Responses API, unmodified, against ccwrap-trio over the REAL CLI.

``responses.create`` (plain and ``stream=True``), ``responses.stream``, ``responses.parse`` with
a pydantic model, and function tools with a ``function_call_output`` round trip: what the SDK
sends is what ``POST /v1/responses`` must take, and what it reads (``output_text``,
``output_parsed``, the typed stream events) is what it must get.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
import trio

from ..conftest import real_stack

pytestmark = pytest.mark.real_cli

WEATHER: Any = {
    "type": "function", "name": "get_weather", "description": "Get the weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False},
    "strict": True,
}
STOCK: Any = {
    "type": "function", "name": "lookup_stock", "description": "Look up a stock price",
    "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}},
                   "required": ["ticker"]},
}


class City(pydantic.BaseModel):
    name: str
    population: int


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_create_stream_and_parse(tmp_path: Path) -> None:
    async with real_stack(tmp_path, turn_limit=100) as (url, standin, _):
        with client_for(url) as client:

            def run() -> dict[str, Any]:
                plain = client.responses.create(
                    model="haiku", instructions="Be brief.", input="Hello there",
                    temperature=1, store=False, metadata={"k": "v"},
                )
                events = [event.type for event in client.responses.create(
                    model="haiku", input=[{"role": "user", "content": "Stream please"}],
                    stream=True,
                )]
                with client.responses.stream(
                    model="haiku",
                    input=[{"role": "user",
                            "content": [{"type": "input_text", "text": "Helper stream"}]}],
                ) as stream:
                    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
                    final = stream.get_final_response()
                parsed = client.responses.parse(
                    model="haiku", input="Paris, as JSON.", text_format=City,
                )
                with client.responses.stream(
                    model="haiku", input="Paris, as JSON, streamed.", text_format=City,
                ) as stream:
                    for _ in stream:
                        pass
                    parsed_stream = stream.get_final_response()
                return {"plain": plain, "events": events, "deltas": deltas, "final": final,
                        "parsed": parsed, "parsed_stream": parsed_stream}

            got = await trio.to_thread.run_sync(run)
    plain = got["plain"]
    assert plain.status == "completed" and plain.object == "response"
    assert plain.output_text.startswith("echo: ") and "Hello there" in json.dumps(
        standin.calls[0].body["messages"])
    assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
    assert plain.metadata == {"k": "v"}
    # instructions reached the model as the conversation's system block
    assert "Be brief." in json.dumps(standin.calls[0].body["messages"])
    events = got["events"]
    assert events[:2] == ["response.created", "response.in_progress"]
    assert events[-1] == "response.completed"
    for kind in ("response.output_item.added", "response.content_part.added",
                 "response.output_text.delta", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done"):
        assert kind in events
    assert "".join(got["deltas"]) == "echo: Helper stream"
    assert got["final"].output_text == "echo: Helper stream"
    parsed = got["parsed"]
    assert isinstance(parsed.output_parsed, City)
    assert isinstance(got["parsed_stream"].output_parsed, City)
    # the schema travelled in the prompt (the stand-in answers such a request with valid JSON)
    assert "json-schema" in json.dumps(standin.calls[-1].body["messages"])


async def test_function_tools_round_trip(tmp_path: Path) -> None:
    async with real_stack(tmp_path, turn_limit=100) as (url, standin, _):
        with client_for(url) as client:

            def run() -> dict[str, Any]:
                first = client.responses.create(
                    model="haiku", tools=[WEATHER],
                    input="Paris? [standin:call=get_weather]",
                )
                calls = [item for item in first.output if item.type == "function_call"]
                followup = client.responses.create(
                    model="haiku", tools=[WEATHER],
                    input=[
                        {"role": "user", "content": "Paris?"},
                        *[item.model_dump(exclude_none=True) for item in first.output],
                        {"type": "function_call_output", "call_id": calls[0].call_id,
                         "output": "18 C"},
                    ],
                )
                named = client.responses.create(
                    model="haiku", tools=[WEATHER, STOCK],
                    tool_choice={"type": "function", "name": "lookup_stock"},
                    input="[standin:call=lookup_stock]",
                )
                with client.responses.stream(
                    model="haiku", tools=[WEATHER, STOCK],
                    input="[standin:call=get_weather,lookup_stock]",
                ) as stream:
                    kinds = [event.type for event in stream]
                    streamed = stream.get_final_response()
                return {"first": first, "calls": calls, "followup": followup, "named": named,
                        "kinds": kinds, "streamed": streamed}

            got = await trio.to_thread.run_sync(run)
    first, calls = got["first"], got["calls"]
    assert first.output[0].type == "message" and first.output_text == "Let me check."
    assert calls and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"]
    assert got["followup"].output_text.startswith("echo:")
    assert "18 C" in json.dumps(standin.calls[1].body["messages"])
    named = [item for item in got["named"].output if item.type == "function_call"]
    assert [item.name for item in named] == ["lookup_stock"]
    kinds = got["kinds"]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    streamed = [item for item in got["streamed"].output if item.type == "function_call"]
    assert [item.name for item in streamed] == ["get_weather", "lookup_stock"]
    assert all(json.loads(item.arguments) for item in streamed)


async def test_bad_input_is_a_400_naming_the_field_and_nothing_reaches_the_cli(
    tmp_path: Path,
) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for body, param in (
                ({"model": "haiku", "input": "x", "previous_response_id": "resp_1"},
                 "previous_response_id"),
                ({"model": "haiku", "input": "x", "tools": [{"type": "web_search"}]},
                 "tools[0].type"),
                ({"model": "haiku", "input": "x", "background": True}, "background"),
                ({"model": "haiku", "input": [{"type": "function_call_output",
                                               "call_id": "nope", "output": "1"}]},
                 "input[0].call_id"),
                ({"model": "haiku", "input": "x",
                  "text": {"format": {"type": "json_schema", "name": "X",
                                      "schema": {"type": "nonsense"}}}},
                 "text.format.schema"),
            ):
                response = await http.post("/v1/responses", json=body)
                assert response.status_code == 400, body
                assert response.json()["error"]["param"] == param
            # the alias without /v1 answers too
            response = await http.post("/responses", json={"model": "haiku", "input": "hi"})
            assert response.status_code == 200 and response.json()["status"] == "completed"
            metrics = (await http.get("/metrics")).text
    assert len(standin.calls) == 1  # only the good request reached the model
    assert 'ccwrap_endpoint_requests_total{endpoint="responses"} 6.0' in metrics
    assert 'ccwrap_endpoint_requests_total{endpoint="chat_completions"} 0.0' in metrics
