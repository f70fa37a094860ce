"""Runs ``netns_usage_limits.py`` (the real CLI on a subscription login) in a loopback-only
network namespace: ``unshare -rn``, ``ip link set lo up``, then pytest on that file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import run_pytest_namespaced

pytestmark = pytest.mark.real_cli

INNER = Path(__file__).with_name("netns_usage_limits.py")


def _unshare_works() -> str | None:
    """None if a loopback-only namespace can be made here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is not installed"
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return f"unshare -n is not permitted here: {probe.stderr.strip()[:200]}"
    return None


async def test_usage_limits_in_a_loopback_only_namespace() -> None:
    if (why := _unshare_works()) is not None:
        pytest.skip(why)
    env = {**os.environ, "CCWRAP_TEST_NETNS": "1"}
    await run_pytest_namespaced(["unshare", "-rn"], 'ip link set lo up && exec "$@"', INNER, env)
