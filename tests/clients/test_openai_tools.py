"""The `openai` Python SDK, unmodified, with tools: against ccwrap-trio over the REAL CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest
import trio

from ..conftest import real_stack

pytestmark = pytest.mark.real_cli


class GetWeather(pydantic.BaseModel):
    """Get the weather for a city."""

    city: str
    unit: str = "c"


WEATHER = openai.pydantic_function_tool(GetWeather, name="get_weather")
STOCK: Any = {"type": "function", "function": {
    "name": "lookup_stock", "description": "Look up a stock price",
    "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}},
                   "required": ["ticker"]}}}


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_tools_round_trip_parallel_choice_and_stream(tmp_path: Path) -> None:
    async with real_stack(tmp_path, turn_limit=100) as (url, standin, _):
        with client_for(url) as client:

            def run() -> dict[str, Any]:
                first = client.chat.completions.create(
                    model="haiku", tools=[WEATHER],
                    messages=[{"role": "user", "content": "Paris? [standin:call=get_weather]"}])
                call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
                followup = client.chat.completions.create(model="haiku", tools=[WEATHER], messages=[
                    {"role": "user", "content": "Paris?"},
                    first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[misc]
                    {"role": "tool", "tool_call_id": call.id, "content": "18 C"},
                ])
                parallel = client.chat.completions.create(
                    model="haiku", tools=[WEATHER, STOCK],
                    tool_choice="required",
                    messages=[{"role": "user",
                               "content": "[standin:call=get_weather,lookup_stock]"}])
                named = client.chat.completions.create(
                    model="haiku", tools=[WEATHER, STOCK],
                    tool_choice={"type": "function", "function": {"name": "lookup_stock"}},
                    messages=[{"role": "user", "content": "[standin:call=lookup_stock]"}])
                parsed = client.beta.chat.completions.parse(
                    model="haiku", tools=[WEATHER],
                    messages=[{"role": "user", "content": "[standin:call=get_weather]"}])
                with client.beta.chat.completions.stream(
                    model="haiku", tools=[WEATHER, STOCK],
                    messages=[{"role": "user",
                               "content": "[standin:call=get_weather,lookup_stock]"}],
                ) as stream:
                    for _ in stream:
                        pass
                    streamed = stream.get_final_completion()
                return {"first": first, "followup": followup, "parallel": parallel,
                        "named": named, "parsed": parsed, "streamed": streamed}

            got = await trio.to_thread.run_sync(run)
    first = got["first"].choices[0]
    assert first.finish_reason == "tool_calls" and first.message.content == "Let me check."
    assert json.loads(first.message.tool_calls[0].function.arguments)["city"]
    assert got["followup"].choices[0].message.content.startswith("echo:")
    assert "18 C" in json.dumps(standin.calls[1].body["messages"])
    assert [c.function.name for c in got["parallel"].choices[0].message.tool_calls] == [
        "get_weather", "lookup_stock"]
    assert got["named"].choices[0].message.tool_calls[0].function.name == "lookup_stock"
    parsed_call = got["parsed"].choices[0].message.tool_calls[0]
    assert isinstance(parsed_call.function.parsed_arguments, GetWeather)
    streamed = got["streamed"].choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [c.function.name for c in streamed.message.tool_calls] == ["get_weather",
                                                                      "lookup_stock"]
    assert all(json.loads(c.function.arguments) for c in streamed.message.tool_calls)
