"""The API's errors keep their meaning through the REAL CLI (on an API key): a 429 stays a 429
with the API's Retry-After, a 529 becomes a 503, a refused login a 502 that says to log in again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import real_stack

pytestmark = pytest.mark.real_cli


def chat(text: str) -> dict[str, Any]:
    return {"model": "haiku", "messages": [{"role": "user", "content": text}]}


async def test_api_429_keeps_its_status_and_retry_after(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, standin, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            limited = await http.post("/v1/chat/completions", json=chat(
                "hi [standin:status=429] [standin:retry-after=2]"))
            ready = await http.get("/health/ready")
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    # The API said 2 s; the CLI waited that (plus jitter) before its retry and passed it on.
    assert limited.headers["retry-after"] == "2"
    assert [call.status for call in standin.calls] == [429, 429]  # CLAUDE_CODE_MAX_RETRIES=1
    assert ready.status_code == 200  # an API key's rate limit is no reason to stop routing


async def test_api_529_is_503_with_retry_after(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, _, _config):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            overloaded = await http.post("/v1/chat/completions",
                                         json=chat("hi [standin:status=529]"))
    assert overloaded.status_code == 503
    assert overloaded.json()["error"]["code"] == "upstream_overloaded"
    assert overloaded.json()["error"]["type"] == "service_unavailable"
    assert int(overloaded.headers["retry-after"]) >= 1


async def test_api_401_is_502_log_in_again_and_not_ready(tmp_path: Path) -> None:
    async with real_stack(tmp_path) as (url, _, _config):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            refused = await http.post("/v1/chat/completions",
                                      json=chat("hi [standin:status=401]"))
            not_ready = await http.get("/health/ready")
            health = (await http.get("/health")).json()
            # A turn that works again means the login works again.
            ok = await http.post("/v1/chat/completions", json=chat("logged in again"))
            ready = await http.get("/health/ready")
    assert refused.status_code == 502
    error = refused.json()["error"]
    assert error["code"] == "upstream_auth_failed"
    assert "log in again" in error["message"]
    assert not_ready.status_code == 503
    assert any("log in again" in reason for reason in not_ready.json()["reasons"])
    assert health["limits"]["login_ok"] is False
    assert ok.status_code == 200
    assert ready.status_code == 200
