"""Runs ``mountns_full_disk.py`` (the real CLI on a full disk) in a private mount namespace with
a small tmpfs: ``unshare -rm``, ``mount -t tmpfs``, then pytest on that file. Nothing of the
host's file systems fills up, and the mount goes with the namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import run_pytest_namespaced

pytestmark = pytest.mark.real_cli

INNER = Path(__file__).with_name("mountns_full_disk.py")
MOUNT = 'mount -t tmpfs -o size=16m,mode=0700 tmpfs "$CCWRAP_TEST_FULL_DISK" && exec "$@"'


def _mount_namespace_works(disk: Path) -> str | None:
    """None if a private mount namespace with a tmpfs can be made here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT, "probe", "true"],
                           env={**os.environ, "CCWRAP_TEST_FULL_DISK": str(disk)},
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return f"unshare -m with a tmpfs is not permitted here: {probe.stderr.strip()[:200]}"
    return None


async def test_full_disk_in_a_private_mount_namespace(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if (why := _mount_namespace_works(disk)) is not None:
        pytest.skip(why)
    env = {**os.environ, "CCWRAP_TEST_FULL_DISK": str(disk)}
    output = await run_pytest_namespaced(["unshare", "-rm"], MOUNT, INNER, env)
    assert "2 passed" in output
    assert not any(disk.iterdir())  # the tmpfs was the namespace's: the host saw nothing
