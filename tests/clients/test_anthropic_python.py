"""The `anthropic` Python SDK, unmodified, against ccwrap-trio's Messages API over the REAL CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import pytest
import trio

from ..conftest import real_stack

pytestmark = pytest.mark.real_cli

WEATHER: Any = {
    "name": "get_weather", "description": "Get the weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                     "required": ["city"]},
}


def client_for(url: str, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=api_key, max_retries=0, timeout=120)


async def test_create_stream_tools_round_trip_and_count_tokens(tmp_path: Path) -> None:
    async with real_stack(tmp_path, turn_limit=100) as (url, standin, _):
        with client_for(url) as client:

            def run() -> dict[str, Any]:
                plain = client.messages.create(
                    model="haiku", max_tokens=256, system="Be brief.",
                    messages=[{"role": "user", "content": "hello there"}])
                with client.messages.stream(
                    model="haiku", max_tokens=256,
                    messages=[{"role": "user", "content": "stream me"}],
                ) as stream:
                    streamed_text = "".join(stream.text_stream)
                    streamed = stream.get_final_message()
                called = client.messages.create(
                    model="haiku", max_tokens=256, tools=[WEATHER],
                    messages=[{"role": "user", "content": "Paris? [standin:call=get_weather]"}])
                [use] = [block for block in called.content if block.type == "tool_use"]
                answered = client.messages.create(
                    model="haiku", max_tokens=256, tools=[WEATHER], messages=[
                        {"role": "user", "content": "Paris?"},
                        {"role": "assistant", "content": called.content},  # type: ignore[typeddict-item]
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}]},
                    ])
                with client.messages.stream(
                    model="haiku", max_tokens=256, tools=[WEATHER],
                    messages=[{"role": "user", "content": "Rome? [standin:call=get_weather]"}],
                ) as stream:
                    streamed_call = stream.get_final_message()
                counted = client.messages.count_tokens(
                    model="haiku", messages=[{"role": "user", "content": "hello there " * 50}])
                return {"plain": plain, "streamed_text": streamed_text, "streamed": streamed,
                        "called": called, "use": use, "answered": answered,
                        "streamed_call": streamed_call, "counted": counted}

            got = await trio.to_thread.run_sync(run)
    plain = got["plain"]
    assert plain.type == "message" and plain.role == "assistant"
    assert plain.stop_reason == "end_turn"
    assert plain.content[0].text.startswith("echo:")  # the system prompt makes it a conversation
    assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0
    assert got["streamed_text"].startswith("echo:") and "stream me" in got["streamed_text"]
    assert got["streamed"].content[0].text == got["streamed_text"]
    assert got["streamed"].stop_reason == "end_turn"
    assert got["called"].stop_reason == "tool_use"
    assert got["use"].name == "get_weather" and "city" in got["use"].input
    assert got["answered"].stop_reason == "end_turn"
    [streamed_use] = [b for b in got["streamed_call"].content if b.type == "tool_use"]
    assert streamed_use.name == "get_weather" and "city" in streamed_use.input
    assert got["streamed_call"].stop_reason == "tool_use"
    assert got["counted"].input_tokens > 100
    # The tool result reached the model, in the turn after the call.
    assert any("18 C" in str(call.body["messages"]) for call in standin.calls)
    # The system prompt reached the model too, inside the one user turn.
    assert "Be brief." in str(standin.calls[0].body["messages"])


async def test_errors_have_the_anthropic_shape(tmp_path: Path) -> None:
    async with real_stack(tmp_path, api_keys=("sk-right",)) as (url, standin, _):
        with client_for(url, api_key="sk-wrong") as wrong, client_for(url, "sk-right") as right:

            def run() -> list[Exception]:
                errors: list[Exception] = []
                for call in (
                    lambda: wrong.messages.create(model="haiku", max_tokens=8, messages=[
                        {"role": "user", "content": "hi"}]),
                    lambda: right.messages.create(model="gpt-nope", max_tokens=8, messages=[
                        {"role": "user", "content": "hi"}]),
                    lambda: right.messages.create(model="haiku", max_tokens=8, messages=[
                        {"role": "tool", "content": "hi"}]),  # type: ignore[list-item,typeddict-item]
                ):
                    try:
                        call()
                    except anthropic.APIStatusError as exc:
                        errors.append(exc)
                return errors

            unauthorized, not_found, bad = await trio.to_thread.run_sync(run)
    assert isinstance(unauthorized, anthropic.AuthenticationError)
    assert isinstance(not_found, anthropic.NotFoundError)
    assert isinstance(bad, anthropic.BadRequestError)
    assert bad.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "messages.0.role" in bad.message
    assert bad.request_id  # the request-id header
    assert standin.calls == [] or all("hi" not in str(c.body) for c in standin.calls)
