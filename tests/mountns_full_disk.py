"""A full disk under the REAL CLI's HOME, its login directory and the server's sandbox.

Run only by ``test_full_disk_real_cli.py``, which re-executes pytest on this file in a private
mount namespace (``unshare -rm``) with a small tmpfs mounted at ``CCWRAP_TEST_FULL_DISK``.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from pathlib import Path

import httpx
import pytest

from .conftest import real_stack, wait_for_health

pytestmark = [
    pytest.mark.real_cli,
    pytest.mark.skipif(not os.environ.get("CCWRAP_TEST_FULL_DISK"),
                       reason="runs inside a mount namespace with a small tmpfs only"),
]


def fill(disk: Path) -> Path:
    """Write until the disk is full (ENOSPC); the filler file, to remove later."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        chunk = b"\0" * 65536
        for _ in range(100_000):  # bounded: far more than the tmpfs holds
            try:
                out.write(chunk)
                out.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    small = b"\0" * 512
    for _ in range(1000):  # and the last few blocks
        try:
            with filler.open("ab") as out:
                out.write(small)
        except OSError:
            break
    return filler


def chat(text: str) -> dict[str, object]:
    return {"model": "haiku", "messages": [{"role": "user", "content": text}]}


def answered(response: httpx.Response, text: str) -> bool:
    """The request's own answer, or a clear error in OpenAI's shape: never anything else."""
    if response.status_code == 200:
        assert response.json()["choices"][0]["message"]["content"] == f"echo: {text}"
        return True
    error = response.json()["error"]
    assert response.status_code >= 500 and error["message"] and error["code"], response.text
    return False


async def test_a_full_disk_is_survived_and_recovered_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on 2.1.332: the CLI answers on with its HOME and login directory full (its writes
    fail quietly), and a new CLI starts on a full disk: the server stays up, answers every
    request, replaces a killed CLI while full, and serves on once the space is back."""
    disk = Path(os.environ["CCWRAP_TEST_FULL_DISK"])
    monkeypatch.setattr(tempfile, "tempdir", str(disk))  # the server's CLI sandbox goes there
    (disk / "home").mkdir(exist_ok=True)  # and the login directory (CLAUDE_CONFIG_DIR)
    async with real_stack(disk, environ={"HOME": str(disk / "home")}) as (url, _standin, _c), \
            httpx.AsyncClient(base_url=url, timeout=90) as http:
        assert answered(await http.post("/v1/chat/completions", json=chat("before")), "before")
        filler = fill(disk)
        with pytest.raises(OSError):
            (disk / "one-more").write_bytes(b"\0" * 65536)
        for i in range(3):
            text = f"while full {i}"
            assert answered(await http.post("/v1/chat/completions", json=chat(text)), text)
            assert (await http.get("/health/live")).status_code == 200
        # A CLI lost while the disk is full is replaced on the full disk.
        pid = (await http.get("/health")).json()["sessions"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        await wait_for_health(http, lambda h: h["sessions"][0]["pid"] not in (None, pid)
                              and h["sessions"][0]["status"] == "healthy", timeout=120)
        assert answered(await http.post("/v1/chat/completions", json=chat("respawned")),
                        "respawned")
        filler.unlink()
        assert answered(await http.post("/v1/chat/completions", json=chat("after")), "after")
        stats = (await http.get("/health")).json()["stats"]
    assert stats["crash_restarts"] == 1 and stats["total_errors"] == 0


async def test_a_server_started_on_a_full_disk_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Path(os.environ["CCWRAP_TEST_FULL_DISK"])
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    (disk / "home").mkdir(exist_ok=True)
    filler = fill(disk)
    try:
        async with real_stack(disk, environ={"HOME": str(disk / "home")}) as (url, _s, _c), \
                httpx.AsyncClient(base_url=url, timeout=90) as http:
            assert answered(await http.post("/v1/chat/completions", json=chat("full")), "full")
    finally:
        filler.unlink()
