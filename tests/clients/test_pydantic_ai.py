"""pydantic-ai's ``OpenAIResponsesModel``, unmodified, against ccwrap-trio over the REAL CLI.

Plain text, a streamed run, structured output both ways pydantic-ai asks for it (its default
tool output, ``final_result``, and ``NativeOutput``: ``text.format`` json_schema), and a
function tool the agent runs itself before the final answer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest
import trio
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider

from ..conftest import real_stack

pytestmark = pytest.mark.real_cli

CALL_TIMEOUT_S = 90


class City(pydantic.BaseModel):
    name: str
    population: int


def run_pydantic_ai(url: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        try:
            return await runs(OpenAIResponsesModel(
                "haiku", provider=OpenAIProvider(openai_client=client)
            ))
        finally:
            await client.close()

    async def runs(model: OpenAIResponsesModel) -> dict[str, Any]:
        plain = await Agent(model, instructions="Be brief.").run("Hello pydantic")
        async with Agent(model).run_stream("Hello streamed pydantic") as stream:
            chunks = [text async for text in stream.stream_text(delta=True)]
        native = await Agent(model, output_type=NativeOutput(City)).run("Paris as JSON")
        tool_output = await Agent(model, output_type=City).run(
            "Paris [standin:call=final_result]"
        )
        return {"plain": plain.output, "chunks": chunks, "native": native.output,
                "tool_output": tool_output.output}

    return asyncio.run(main())


async def test_pydantic_ai_responses_model(tmp_path: Path) -> None:
    async with real_stack(tmp_path, turn_limit=100) as (url, standin, _):
        with trio.fail_after(CALL_TIMEOUT_S):
            got = await trio.to_thread.run_sync(run_pydantic_ai, url, abandon_on_cancel=True)
    assert got["plain"].startswith("echo:")
    assert "".join(got["chunks"]).startswith("echo:") and len(got["chunks"]) >= 1
    assert isinstance(got["native"], City)
    assert isinstance(got["tool_output"], City)
    assert "Be brief." in str(standin.calls[0].body)
