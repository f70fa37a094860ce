"""Usage limits through the REAL CLI logged in with a (fake) subscription token.

Run only by ``test_usage_limits_real_cli.py``, which re-executes pytest on this file inside a
loopback-only network namespace (``unshare -n``): with ``CLAUDE_CODE_OAUTH_TOKEN`` the CLI also
calls Anthropic's own hosts, and those calls must go nowhere. The stand-in answers with the
``anthropic-ratelimit-unified-*`` headers of a subscription (``Standin.unified``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from ccwrap_trio.standin import UnifiedLimit

from .conftest import real_stack

pytestmark = [
    pytest.mark.real_cli,
    pytest.mark.skipif(os.environ.get("CCWRAP_TEST_NETNS") != "1",
                       reason="runs inside a loopback-only network namespace only"),
]

# A subscription login: a fake OAuth token and no API key (PROTOCOL.md, "Usage limits").
OAUTH = {"CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-ccwrap-test-token", "ANTHROPIC_API_KEY": None}
RESET_IN_S = 6.0


def samples(text: str) -> dict[str, float]:
    """A Prometheus exposition's samples: ``name{labels}`` -> value."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def chat(text: str) -> dict[str, Any]:
    return {"model": "haiku", "messages": [{"role": "user", "content": text}]}


async def test_rejected_window_answers_429_until_reset_then_serves(tmp_path: Path) -> None:
    async with real_stack(tmp_path, environ=OAUTH) as (url, standin, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            assert (await http.post("/v1/chat/completions", json=chat("before"))).status_code \
                == 200
            resets_at = math.ceil(time.time() + RESET_IN_S)
            standin.unified = UnifiedLimit("five_hour", utilization=1.0, resets_at=resets_at)

            refused = await http.post("/v1/chat/completions", json=chat("over the limit"))
            calls_after_limit = len(standin.calls)
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert error["code"] == "usage_limit_reached"
            assert error["type"] == "rate_limit_error"
            assert "5-hour" in error["message"]
            assert time.strftime("%H:%M:%S", time.gmtime(resets_at)) in error["message"]
            wait_s = int(refused.headers["retry-after"])
            assert 1 <= wait_s <= RESET_IN_S + 1
            assert abs(wait_s - (resets_at - time.time())) <= 2

            # Until the reset: answered at once, no CLI turn, no API call.
            again = await http.post("/v1/chat/completions", json=chat("still over"))
            assert again.status_code == 429
            assert again.json()["error"]["code"] == "usage_limit_reached"
            streamed = await http.post("/v1/chat/completions",
                                       json={**chat("streamed"), "stream": True})
            assert streamed.status_code == 429
            assert len(standin.calls) == calls_after_limit

            health = (await http.get("/health")).json()
            assert health["status"] == "healthy"
            assert health["limits"]["limited"] is True
            assert health["limits"]["limited_until"] == resets_at
            window = health["limits"]["windows"]["five_hour"]
            assert window == {"status": "rejected", "utilization": 1.0, "resets_at": resets_at}
            ready = await http.get("/health/ready")
            assert ready.status_code == 503
            assert any("usage limit" in reason for reason in ready.json()["reasons"])
            metrics = samples((await http.get("/metrics")).text)
            assert metrics['ccwrap_usage_limit_utilization{window="five_hour"}'] == 1.0
            assert metrics['ccwrap_usage_limit_resets_at_seconds{window="five_hour"}'] == resets_at
            assert metrics["ccwrap_usage_limited"] == 1.0

            # The SDK sees a RateLimitError that carries the header.
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError) as caught:
                await trio.to_thread.run_sync(lambda: client.chat.completions.create(
                    model="haiku", messages=[{"role": "user", "content": "sdk"}]))
            client.close()
            assert int(caught.value.response.headers["retry-after"]) >= 1
            assert caught.value.code == "usage_limit_reached"
            assert len(standin.calls) == calls_after_limit

            # Past the reset the state says so (the wall clock is the state here).
            with trio.fail_after(RESET_IN_S + 20):
                while (await http.get("/health")).json()["limits"]["limited"]:
                    await trio.sleep(0.2)
            back = await http.post("/v1/chat/completions", json=chat("after the reset"))
            assert back.status_code == 200
            assert back.json()["choices"][0]["message"]["content"] == "echo: after the reset"
            assert len(standin.calls) == calls_after_limit + 1
            assert (await http.get("/health/ready")).status_code == 200


async def test_warning_logs_once_per_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with real_stack(tmp_path, environ=OAUTH) as (url, standin, _):
        # Two hours into the 5-hour window at 95%: the CLI reports allowed_warning.
        resets_at = int(time.time()) + 3 * 3600
        standin.unified = UnifiedLimit("five_hour", utilization=0.95, resets_at=resets_at)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for text in ("one", "two"):
                answer = await http.post("/v1/chat/completions", json=chat(text))
                assert answer.status_code == 200
            health = (await http.get("/health")).json()
            metrics = samples((await http.get("/metrics")).text)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and r.getMessage().startswith("[WARN] Usage limit near")]
    assert len(warnings) == 1
    assert "5-hour window is at 95%" in warnings[0].getMessage()
    assert health["limits"]["limited"] is False
    assert health["limits"]["windows"]["five_hour"]["status"] == "allowed_warning"
    assert metrics['ccwrap_usage_limit_utilization{window="five_hour"}'] == 0.95
