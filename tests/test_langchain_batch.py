"""The issue's failure, reproduced: a LangChain ``abatch`` of 80 prompts against one session,
with the SDK's default retries, over the REAL CLI. With ``Retry-After: 1`` on every 429, 13-15 of
them failed; with Retry-After estimated from the backlog, every one completes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import trio

from .conftest import real_stack

langchain_openai = pytest.importorskip("langchain_openai")

pytestmark = pytest.mark.real_cli
PROMPTS = 80
# Each answer takes a little while, as a model's does: the queue drains at a few requests per
# second, far slower than "come back in 1 s".
LATENCY = "[standin:latency=0.25]"


async def test_abatch_of_80_completes_with_default_retries(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, config):
        assert config.sessions == 1 and config.max_queue < PROMPTS  # the queue does overflow

        def batch() -> tuple[list[str], float]:
            # The SDK's defaults: max_retries=2, honouring Retry-After.
            llm = langchain_openai.ChatOpenAI(base_url=f"{url}/v1", api_key="unused",
                                              model="haiku", timeout=300)
            started = time.monotonic()
            answers = asyncio.run(llm.abatch([f"prompt {i} {LATENCY}" for i in range(PROMPTS)]))
            return [str(answer.content) for answer in answers], time.monotonic() - started

        answers, took_s = await trio.to_thread.run_sync(batch)
        async with httpx.AsyncClient(base_url=url) as http:
            health = (await http.get("/health")).json()
    assert answers == [f"echo: prompt {i}" for i in range(PROMPTS)]
    stats = health["stats"]
    assert stats["rejected"] >= 1  # the queue overflowed and clients came back when told
    assert stats["successes"] == PROMPTS
    assert len(standin.calls) == PROMPTS
    print(f"abatch of {PROMPTS}: {took_s:.1f}s, {stats['rejected']} queue_full answers")
