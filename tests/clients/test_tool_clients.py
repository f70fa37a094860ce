"""The libraries people build on, unmodified, calling tools through Chat Completions over the
REAL CLI: LangChain (``bind_tools`` with a ``ToolMessage`` round trip, and
``with_structured_output(method="function_calling")``), pydantic-ai's ``OpenAIChatModel``
(its default structured output is a tool; an ``@agent.tool`` the agent runs itself), the OpenAI
Agents SDK's ``OpenAIChatCompletionsModel`` with a ``function_tool`` (the SDK runs it and asks
the model again), and LiteLLM ``completion(tools=...)``.

The stand-in answers with a tool call while the conversation carries an unanswered
``[standin:call=NAME]`` directive, and with text once a tool result follows it, as a model would:
each agent loop below really goes round (call, run, result, answer). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest
import trio

from ..conftest import real_stack

pytestmark = pytest.mark.real_cli

CALL_TIMEOUT_S = 120
ran: list[str] = []  # what the client-side tools were run with, by the libraries themselves


class City(pydantic.BaseModel):
    name: str
    population: int


def weather(city: str) -> str:
    """Get the weather for a city."""
    ran.append(city)
    return f"18 C in {city}"


def run_langchain(url: str) -> dict[str, Any]:
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    get_weather = tool("get_weather")(weather)
    llm = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="haiku",  # type: ignore[arg-type]
                     max_retries=0, timeout=CALL_TIMEOUT_S)
    bound = llm.bind_tools([get_weather])
    question = HumanMessage("Weather in Paris? [standin:call=get_weather]")
    asked = bound.invoke([question])
    result = get_weather.invoke(asked.tool_calls[0])  # a ToolMessage with the call's id
    answered = bound.invoke([question, asked, result])
    structured = llm.with_structured_output(City, method="function_calling").invoke(
        "Paris as a city [standin:call=City]"
    )
    return {"asked": asked, "result": result, "answered": answered, "structured": structured}


def run_pydantic_ai(url: str) -> dict[str, Any]:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    async def main() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        try:
            model = OpenAIChatModel("haiku", provider=OpenAIProvider(openai_client=client))
            # Its default structured output: a tool named final_result.
            city = await Agent(model, output_type=City).run("Paris [standin:call=final_result]")
            agent = Agent(model, instructions="Use the tool.")
            agent.tool_plain(weather, name="get_weather")
            tooled = await agent.run("Weather in Lyon? [standin:call=get_weather]")
            return {"city": city.output, "tooled": tooled.output,
                    "messages": len(tooled.all_messages())}
        finally:
            await client.close()

    return asyncio.run(main())


def run_agents(url: str) -> dict[str, Any]:
    from agents import (
        Agent,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    async def main() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        set_tracing_disabled(True)
        try:
            model = OpenAIChatCompletionsModel(model="haiku", openai_client=client)
            agent = Agent(name="weather", instructions="Use the tool.", model=model,
                          tools=[function_tool(weather, name_override="get_weather")])
            result = await Runner.run(agent, "Weather in Nice? [standin:call=get_weather]")
            return {"output": result.final_output, "responses": len(result.raw_responses)}
        finally:
            await client.close()

    return asyncio.run(main())


def run_litellm(url: str) -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no fetch of the price list
    import litellm

    litellm.telemetry = False
    return litellm.completion(
        model="openai/haiku", api_base=f"{url}/v1", api_key="unused", timeout=CALL_TIMEOUT_S,
        messages=[{"role": "user", "content": "Weather in Rome? [standin:call=get_weather]"}],
        tools=[{"type": "function", "function": {
            "name": "get_weather", "description": "Get the weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}],
    )


async def in_thread(function: Any, url: str) -> Any:
    with trio.fail_after(CALL_TIMEOUT_S * 2):
        return await trio.to_thread.run_sync(function, url, abandon_on_cancel=True)


async def test_langchain_bind_tools_round_trip_and_function_calling_output(
    tmp_path: Path,
) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        got = await in_thread(run_langchain, url)
    asked, answered = got["asked"], got["answered"]
    assert [call["name"] for call in asked.tool_calls] == ["get_weather"]
    assert asked.tool_calls[0]["args"]["city"]
    assert got["result"].tool_call_id == asked.tool_calls[0]["id"]
    assert not answered.tool_calls and str(answered.content).startswith("echo:")
    # The ToolMessage reached the model in the rendered history, under its call's id.
    history = json.dumps(standin.calls[1].body)
    assert "<tool_result" in history and asked.tool_calls[0]["id"] in history
    assert isinstance(got["structured"], City)


async def test_pydantic_ai_chat_model_output_tool_and_agent_tool(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        got = await in_thread(run_pydantic_ai, url)
    assert isinstance(got["city"], City)
    assert str(got["tooled"]).startswith("echo:")
    assert got["messages"] >= 4  # ask, the call, the tool's return, the answer
    assert ran  # pydantic-ai ran the tool itself, with the model's arguments
    assert any("get_weather" in json.dumps(call.body.get("tools")) for call in standin.calls)


async def test_agents_sdk_chat_completions_model_runs_its_function_tool(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, _standin, _):
        got = await in_thread(run_agents, url)
    assert got["responses"] == 2  # the call, then the answer after the tool's result
    assert str(got["output"]).startswith("echo:")
    assert ran


async def test_litellm_completion_with_tools(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, _standin, _):
        response = await in_thread(run_litellm, url)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"]
