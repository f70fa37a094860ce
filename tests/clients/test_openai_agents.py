"""The OpenAI Agents SDK (``openai-agents``), unmodified, against ccwrap-trio over the REAL CLI.

Its default model class speaks the Responses API (``OpenAIResponsesModel``), non-streamed for
``Runner.run`` and streamed for ``Runner.run_streamed``. A ``function_tool`` is called by the
model and run by the SDK: with ``stop_on_first_tool`` the tool's result is the final output (the
stand-in calls a tool whenever its directive is anywhere in the conversation, so a second model
turn would call it again; the ``function_call_output`` round trip itself is covered in
test_openai_responses.py). Tracing is off: nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from agents import (
    Agent,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.models.multi_provider import MultiProvider
from agents.models.openai_responses import OpenAIResponsesModel

from ..conftest import real_stack

pytestmark = pytest.mark.real_cli

CALL_TIMEOUT_S = 90
calls: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """Get the weather for a city."""
    calls.append(city)
    return f"18 C in {city}"


def run_agents(url: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        set_tracing_disabled(True)
        set_default_openai_client(client, use_for_tracing=False)
        set_default_openai_api("responses")  # the default, said out loud
        try:
            plain = Agent(name="plain", instructions="Be brief.", model="haiku")
            first = await Runner.run(plain, "Hello agents")
            streamed = Runner.run_streamed(plain, "Hello streamed agents")
            kinds = [event.type async for event in streamed.stream_events()]
            tools = Agent(name="weather", instructions="Use the tool.", model="haiku",
                          tools=[get_weather], tool_use_behavior="stop_on_first_tool")
            tooled = await Runner.run(tools, "Weather in Paris? [standin:call=get_weather]")
            # "haiku" resolves to the SDK's default model class: the Responses one.
            model = MultiProvider().get_model("haiku")
            return {"first": first, "streamed": streamed, "kinds": kinds, "tooled": tooled,
                    "model": model}
        finally:
            await client.close()

    return asyncio.run(main())


async def test_agents_sdk_default_model_with_a_function_tool(tmp_path: Path) -> None:
    async with real_stack(tmp_path, turn_limit=100) as (url, standin, _):
        with trio.fail_after(CALL_TIMEOUT_S):
            got = await trio.to_thread.run_sync(run_agents, url, abandon_on_cancel=True)
    assert str(got["first"].final_output).startswith("echo:")
    assert got["first"].raw_responses and isinstance(got["model"], OpenAIResponsesModel)
    assert str(got["streamed"].final_output).startswith("echo:")
    assert "raw_response_event" in got["kinds"]
    assert got["tooled"].final_output.startswith("18 C in ")
    assert calls and calls[-1]  # the SDK ran the tool with the model's arguments
    # every call went through the Responses API to the model, with the SDK's instructions
    assert all("Be brief." in str(call.body) or "Use the tool." in str(call.body)
               for call in standin.calls)

