"""The ``ccwrap-trio`` command: ``serve`` (flags mirror CCWRAP_* variables) and ``--version``."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .config import SETTINGS, Config
from .errors import ConfigError
from .logs import configure_logging
from .server import serve

log = logging.getLogger("ccwrap_trio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccwrap-trio",
        description="An OpenAI-compatible HTTP API in front of warm Claude Code CLI sessions.",
    )
    parser.add_argument("--version", action="version", version=f"ccwrap-trio {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve", help="run the server", description="Run the server. Flags win over variables."
    )
    for setting in SETTINGS:
        serve_parser.add_argument(
            setting.flag,
            dest=setting.env,
            metavar=setting.env,
            # A help text that explains its own default says it once.
            help=setting.help if "default" in setting.help
            else f"{setting.help} (default: {setting.default or 'unset'!s:.40})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = Config.load(os.environ, vars(args))
    except ConfigError as exc:
        print(f"ccwrap-trio: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    if shutil.which(config.claude_bin) is None:
        # Said at once, in one line; the server still starts and recovers when the CLI appears.
        log.error(
            "[ERROR] the Claude Code CLI %r is not an executable on PATH (CCWRAP_CLAUDE_BIN): "
            "/health says offline until it is", config.claude_bin,
        )
    try:
        trio.run(_serve_until_signalled, config)
    except (OSError, BaseExceptionGroup) as exc:
        failure = _bind_failure(exc)
        if failure is None:
            raise
        print(f"ccwrap-trio: cannot listen on {config.host}:{config.port}: "
              f"{failure.strerror or failure}", file=sys.stderr)
        return 2
    return 0


# What binding the address can fail with: the port is taken, the address is not ours, no right.
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM})


def _bind_failure(exc: BaseException) -> OSError | None:
    """The bind error in ``exc`` (bare or alone in nested exception groups), else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError) and exc.errno in BIND_ERRNOS:
        return exc
    if isinstance(exc, socket.gaierror):
        return exc
    return None


async def _serve_until_signalled(config: Config) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if shutdown.is_set():
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("%s received", signal.Signals(signum).name)
                    shutdown.set()

        nursery.start_soon(watch_signals)
        await serve(config, shutdown=shutdown)
        nursery.cancel_scope.cancel()
