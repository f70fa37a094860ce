"""Graphiti's own LLM client, unmodified, against ccwrap-trio over the REAL CLI.

Graphiti (``graphiti-core``) extracts entities with ``OpenAIGenericClient``: it sends its own
prompt (``prompt_library.extract_nodes.extract_message``) with
``response_format={"type": "json_schema", "json_schema": {"name": "ExtractedEntities",
"schema": ExtractedEntities.model_json_schema()}}`` (no ``strict``), ``temperature`` 1 and
``max_tokens`` 16384, and ``json.loads`` the content it gets back (after stripping a code fence).
Here that call must come back as a dict that Graphiti's own ``ExtractedEntities`` model accepts,
with the schema having reached the model (the stand-in API) in a ```` ```json-schema ```` block,
and a first answer that does not validate must be repaired by the server, not by the client.

No graph database is involved: ``generate_response`` is the LLM call alone. Graphiti's PostHog
telemetry fires only when a ``Graphiti`` object is built (which this test never does) and is off
under pytest anyway; ``GRAPHITI_TELEMETRY_ENABLED=false`` is set before the import all the same,
so nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from openai.lib._pydantic import to_strict_json_schema

from ..conftest import real_stack

os.environ["GRAPHITI_TELEMETRY_ENABLED"] = "false"

with warnings.catch_warnings():
    # graphiti_core (0.31.x) declares one pydantic model with a class-based `Config`, which
    # warns at import; the suite turns warnings into errors.
    warnings.filterwarnings("ignore", message=r".*class-based `config` is deprecated")
    from graphiti_core.llm_client.config import LLMConfig
    from graphiti_core.llm_client.openai_client import OpenAIClient
    from graphiti_core.llm_client.openai_generic_client import OpenAIGenericClient
    from graphiti_core.prompts import Message, prompt_library
    from graphiti_core.prompts.extract_nodes import ExtractedEntities

pytestmark = pytest.mark.real_cli

EPISODE = "Nisha: I met Jordan Lee at the Belmont Arts Center in Denver yesterday."
SCHEMA = ExtractedEntities.model_json_schema()
CALL_TIMEOUT_S = 90


def extraction_messages(*, suffix: str = "") -> list[Message]:
    """Graphiti's own entity-extraction prompt for one message episode, as Graphiti builds it.

    The context is what ``graphiti_core.utils.maintenance.node_operations.extract_nodes`` passes
    for a message episode with no custom entity types.
    """
    context: dict[str, Any] = {
        "episode_content": EPISODE,
        "episode_timestamp": "2025-01-01T12:00:00+00:00",
        "previous_episodes": [
            {"content": "Jordan Lee: Hi Nisha!", "timestamp": "2025-01-01T11:59:00+00:00"}
        ],
        "custom_extraction_instructions": "",
        "entity_types": [
            {
                "entity_type_id": 0,
                "entity_type_name": "Entity",
                "entity_type_description": "A specific, identifiable entity.",
            }
        ],
        "source_description": "chat",
    }
    messages = prompt_library.extract_nodes.extract_message(context)
    messages[-1].content += suffix
    return messages


def graphiti_extract(
    base_url: str, messages: list[Message], default_client: bool = False
) -> dict[str, Any]:
    """Run Graphiti's ``generate_response`` on its own asyncio loop (call in a worker thread).

    ``default_client``: Graphiti's default ``OpenAIClient`` (``responses.parse``, the Responses
    API) instead of ``OpenAIGenericClient`` (Chat Completions).
    """

    async def main() -> dict[str, Any]:
        config = LLMConfig(
            api_key="unused", base_url=f"{base_url}/v1", model="haiku", small_model="haiku"
        )
        client = OpenAIClient(config=config) if default_client else OpenAIGenericClient(
            config=config
        )
        try:
            return await client.generate_response(
                messages,
                response_model=ExtractedEntities,
                prompt_name="extract_nodes.extract_message",
            )
        finally:
            await client.client.close()

    return asyncio.run(main())


async def extract(
    base_url: str, messages: list[Message], *, default_client: bool = False
) -> dict[str, Any]:
    with trio.fail_after(CALL_TIMEOUT_S):
        return await trio.to_thread.run_sync(
            graphiti_extract, base_url, messages, default_client, abandon_on_cancel=True
        )


async def health(base_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        response = await http.get("/health")
    body: dict[str, Any] = response.json()
    return body


def role_text(call_body: dict[str, Any], role: str = "user") -> str:
    """All text of one role in a Messages API request body, blocks joined."""
    texts = []
    for message in call_body.get("messages", []):
        if message.get("role") != role:
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [b.get("text", "") for b in content if isinstance(b, dict)]
    return "\n".join(texts)


def assert_carries_schema(call_body: dict[str, Any], schema: dict[str, Any] = SCHEMA) -> None:
    text = role_text(call_body)
    assert "```json-schema" in text, text[-2000:]
    fenced = text.split("```json-schema", 1)[1].split("```", 1)[0]
    sent = json.loads(fenced)
    # The schema that reached the model is Graphiti's (or an equivalent of it): it accepts
    # exactly what Graphiti's own schema accepts on these probes.
    probes: list[Any] = [
        {"extracted_entities": [{"name": "Nisha", "entity_type_id": 0}]},
        {"extracted_entities": [{"name": "Nisha"}]},
        {},
    ]
    for probe in probes:
        assert jsonschema.Draft202012Validator(sent).is_valid(probe) == (
            jsonschema.Draft202012Validator(schema).is_valid(probe)
        ), probe


async def test_graphiti_entity_extraction_returns_a_validated_dict(tmp_path: Path) -> None:
    messages = extraction_messages()
    async with real_stack(tmp_path) as (url, standin, _):
        result = await extract(url, copy.deepcopy(messages))
        stats = (await health(url))["stats"]
        calls = list(standin.calls)

    entities = ExtractedEntities.model_validate(result)
    assert entities.extracted_entities, result
    assert len(calls) == 1, [call.reply for call in calls]
    (call,) = calls
    assert_carries_schema(call.body)
    # Graphiti's own prompt (system and user) reached the model.
    sent = json.dumps(call.body)
    assert "entity extraction specialist" in sent
    assert "Belmont Arts Center" in sent
    # What Graphiti got is what the model answered: bare JSON, no client-side retry.
    assert result == json.loads(call.reply)
    assert stats["total_requests"] == 1
    assert stats["successes"] == 1
    assert stats["schema_repairs"] == 0


async def test_graphiti_gets_a_server_repaired_answer(tmp_path: Path) -> None:
    messages = extraction_messages(suffix="\n[standin:invalid-first]")
    async with real_stack(tmp_path) as (url, standin, _):
        result = await extract(url, copy.deepcopy(messages))
        stats = (await health(url))["stats"]
        calls = list(standin.calls)

    ExtractedEntities.model_validate(result)
    assert len(calls) == 2, [call.reply for call in calls]
    first, last = calls
    assert_carries_schema(first.body)
    # The model's first answer did not validate; the server repaired it within one request, in
    # the same conversation (the model sees its own invalid answer) and with the schema again.
    assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(json.loads(first.reply))
    assert first.reply in role_text(last.body, "assistant")
    assert_carries_schema(last.body)
    assert result == json.loads(last.reply)
    assert stats["schema_repairs"] >= 1
    assert stats["total_requests"] == 1  # the repair is the server's: Graphiti did not retry
    assert stats["successes"] == 1


@pytest.mark.parametrize("suffix", ["", "\n[standin:invalid-first]"], ids=["valid", "repaired"])
async def test_graphiti_default_client_over_the_responses_api(tmp_path: Path, suffix: str) -> None:
    """Graphiti's default ``OpenAIClient`` calls ``responses.parse``: it gets a validated dict."""
    messages = extraction_messages(suffix=suffix)
    async with real_stack(tmp_path) as (url, standin, _):
        result = await extract(url, copy.deepcopy(messages), default_client=True)
        stats = (await health(url))["stats"]
        calls = list(standin.calls)

    entities = ExtractedEntities.model_validate(result)
    assert entities.extracted_entities, result
    # responses.parse sends the strict form of the model's schema (all fields required)
    assert_carries_schema(calls[0].body, to_strict_json_schema(ExtractedEntities))
    sent = json.dumps(calls[0].body)
    assert "entity extraction specialist" in sent and "Belmont Arts Center" in sent
    assert result == json.loads(calls[-1].reply)
    assert len(calls) == (2 if suffix else 1), [call.reply for call in calls]
    assert stats["schema_repairs"] == (1 if suffix else 0)
    assert stats["total_requests"] == 1  # a repair is the server's: Graphiti did not retry
    assert stats["successes"] == 1
