"""The root nursery: supervisor, memory sampler and Hypercorn, started here and only here."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .app import create_app
from .config import Config
from .memory import MemorySampler
from .session import open_session
from .supervisor import SessionFactory, SessionLike, Supervisor

log = logging.getLogger(__name__)


def session_factory(config: Config, workdir: Path) -> SessionFactory:
    """How a worker opens a real CLI session with this config."""

    def factory() -> AbstractAsyncContextManager[SessionLike, bool | None]:
        return open_session(
            config.cli_command(),
            env=dict(config.child_env),
            cwd=workdir,
            startup_timeout_s=config.startup_timeout_s,
        )

    return factory


@asynccontextmanager
async def cli_workdir(config: Config) -> AsyncIterator[Path]:
    """The CLI's working directory: the configured one, or a fresh empty private one."""
    if config.workdir is not None:
        config.workdir.mkdir(parents=True, exist_ok=True)
        yield config.workdir
        return
    path = Path(tempfile.mkdtemp(prefix="ccwrap-trio-"))  # mode 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def serve(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    session_factory_override: SessionFactory | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole server until ``shutdown`` is set, then stop gracefully.

    Hands the bound URLs to ``task_status`` once Hypercorn listens (so port 0 works in tests).
    On shutdown: new requests get 503, in-flight ones have ``shutdown_grace_s`` to finish, then the
    CLI is ended and reaped.
    """
    shutdown = shutdown if shutdown is not None else trio.Event()
    async with cli_workdir(config) as workdir:
        factory = session_factory_override or session_factory(config, workdir)
        supervisor = Supervisor(config, factory)
        sampler = MemorySampler(config.memory_sample_interval_s, supervisor.cli_pids)
        app = create_app(config, supervisor, sampler)
        hypercorn_config = HypercornConfig()
        hypercorn_config.bind = [_bind(config.host, config.port)]
        hypercorn_config.graceful_timeout = config.shutdown_grace_s
        hypercorn_config.accesslog = None
        hypercorn_config.errorlog = logging.getLogger("hypercorn.error")

        async def stop_accepting() -> None:
            await shutdown.wait()
            log.info(
                "shutting down: finishing in-flight requests (grace %gs)", config.shutdown_grace_s
            )
            supervisor.begin_shutdown()

        async with trio.open_nursery() as nursery:

            async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await hypercorn_serve(
                    app, hypercorn_config, shutdown_trigger=stop_accepting, task_status=task_status
                )
                # Hypercorn returns once its connections are done (or the grace ran out); then
                # cancelling the supervisor ends and reaps the CLI.
                nursery.cancel_scope.cancel()

            await nursery.start(supervisor.run)
            await nursery.start(sampler.run)
            urls = await nursery.start(run_http)
            log.info("ccwrap-trio listening on %s", ", ".join(urls))
            task_status.started(urls)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

