"""instructor (``Mode.TOOLS``, its default), unmodified, over the REAL CLI.

instructor needs ``jiter<0.15``, which the ``openai`` pinned beside the server's tests does not
allow, so it runs from a virtualenv of its own (``tests/clients/instructor/.venv``, built by
``make install`` from ``tests/clients/instructor/requirements.txt``), as a user's program would.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from ..conftest import real_stack

pytestmark = pytest.mark.real_cli

HERE = Path(__file__).resolve().parent / "instructor"
PYTHON = HERE / ".venv" / "bin" / "python"


async def test_instructor_tools_mode_gets_a_validated_model(tmp_path: Path) -> None:
    if not PYTHON.is_file():
        pytest.fail("instructor's virtualenv is missing: run `make install`")
    async with real_stack(tmp_path) as (url, standin, _config):
        with trio.fail_after(150):
            done = await trio.run_process(
                [str(PYTHON), str(HERE / "client.py"), f"{url}/v1"], capture_stdout=True,
                capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
        calls = list(standin.calls)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output[-4000:]
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    # The model's own tool_use (the stand-in fills the schema), validated by instructor.
    assert result["city"] == {"name": "text", "population": 0}
    assert result["tool_calls"] == ["City"] and result["finish_reason"] == "tool_calls"
    assert result["versions"]["instructor"] == "1.17.0"
    assert len(calls) == 1  # one API call: the forced tool call, nothing run, no second turn
