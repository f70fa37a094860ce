"""The pinned Claude Code CLI, unmodified, as a client of ccwrap-trio (``ANTHROPIC_BASE_URL``).

The client CLI sends its own system prompt, its built-in tools, ``thinking``, ``metadata`` and
``?beta=true``, and probes ``count_tokens``; ccwrap-trio answers it like the Anthropic API would,
over its own (server-side) real CLI and the stand-in API.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import trio

from ..conftest import real_claude_bin, real_stack

pytestmark = pytest.mark.real_cli


async def test_claude_p_json_answers_through_ccwrap(tmp_path: Path) -> None:
    async with real_stack(tmp_path, api_keys=("sk-client",), turn_limit=100) as (url, standin, _):
        home = tmp_path / "client-home"
        home.mkdir()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(home),
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_API_KEY": "sk-client",
            "CLAUDE_CODE_MAX_RETRIES": "0",
        }
        with trio.fail_after(120):
            done = await trio.run_process(
                [real_claude_bin(), "-p", "say hello to ccwrap", "--output-format", "json"],
                env=env, cwd=home, capture_stdout=True, capture_stderr=True, check=False,
            )
        async with httpx.AsyncClient(base_url=url) as http:
            metrics = (await http.get("/metrics")).text
    # Every request it made was answered as the API would: its probe, and no fallback after a 400.
    assert 'route="/api/hello",status="200"' in metrics
    assert 'route="/v1/messages",status="200"' in metrics
    assert 'status="4' not in metrics.replace('route="/v1/messages",status="200"', "")
    assert done.returncode == 0, done.stderr.decode()[-2000:] + done.stdout.decode()[-2000:]
    answer = json.loads(done.stdout)
    assert answer["is_error"] is False, answer
    assert answer["result"].startswith("echo:")
    assert "say hello to ccwrap" in json.dumps([call.body for call in standin.calls])
