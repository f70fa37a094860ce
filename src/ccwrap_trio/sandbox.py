"""Where the CLI runs: a private HOME, TMPDIR and working directory holding nothing of the host's.

Defence in depth behind the CLI's lockdown flags and variables (config.py) and the turn text's
neutralization (expansions.py): even a way to make the CLI read a file that nobody has found yet
would find "~", "." and "$TMPDIR" empty. The login stays where ``claude /login`` put it, named by
``CLAUDE_CONFIG_DIR`` (config.child_environment), outside every directory the CLI is given.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from .config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sandbox:
    """The directories one server's CLI children get; ``root`` is removed when the server stops."""

    root: Path
    home: Path
    tmp: Path
    workdir: Path

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (the config's allow-listed environment) with the private HOME and TMPDIR."""
        return {**base, "HOME": str(self.home), "TMPDIR": str(self.tmp)}


@asynccontextmanager
async def cli_sandbox(config: Config) -> AsyncIterator[Sandbox]:
    """A fresh private (0700) sandbox; the working directory is ``CCWRAP_WORKDIR`` if set."""
    root = Path(await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="ccwrap-trio-")))
    home, tmp = root / "home", root / "tmp"
    workdir = config.workdir if config.workdir is not None else root / "work"
    for path in (home, tmp, workdir):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        yield Sandbox(root=root, home=home, tmp=tmp, workdir=workdir)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def forget_cli_session(config_dir: str | None, pid: int, workdir: Path) -> None:
    """Remove the registry files a CLI leaves in ``<config dir>/sessions`` when it is killed.

    Each CLI registers itself as ``sessions/<pid>.json`` (and a ``.key``) and removes them when
    it exits cleanly; a SIGKILLed one cannot. Only files naming our working directory are ours.
    """
    if not config_dir:
        return
    sessions = Path(config_dir) / "sessions"
    record = sessions / f"{pid}.json"
    try:
        if json.loads(record.read_text()).get("cwd") != str(workdir):
            return
    except (OSError, ValueError, AttributeError):
        return
    for path in (record, *sessions.glob(f"{pid}.*.key")):
        try:
            path.unlink()
        except OSError as exc:
            log.debug("could not remove %s: %s", path, exc)
