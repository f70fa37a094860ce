"""The root nursery: the services (supervisor, memory sampler) and Hypercorn.

Two ways to run: ``serve()`` (``ccwrap-trio serve``) starts the services and Hypercorn in one
nursery; ``asgi.py`` (``hypercorn ccwrap_trio.asgi:app``) starts the same ``Services`` in the
app's lifespan nursery. Either way tasks are started here and only here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import hypercorn.trio.run
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer
from quart_trio import QuartTrio

from .app import create_app
from .config import Config
from .keys import KeyRing
from .memory import MemorySampler
from .sandbox import Sandbox, cli_sandbox, forget_cli_session
from .session import open_session
from .supervisor import SessionFactory, SessionLike, Supervisor

log = logging.getLogger(__name__)


class Services:
    """The supervisor, the memory sampler and the key ring, and the CLI sandbox they need."""

    def __init__(self, config: Config, session_factory: SessionFactory | None = None) -> None:
        self.config = config
        self.sandbox: Sandbox | None = None
        self.supervisor = Supervisor(
            config, session_factory or self._open_session, sessions=config.sessions
        )
        self.sampler = MemorySampler(config.memory_sample_interval_s, self.supervisor.cli_pids)
        # The client keys; the key file is read now (a bad one stops the start) and on SIGHUP.
        self.keys = KeyRing(config.api_keys, config.api_keys_file)

    def __repr__(self) -> str:
        return f"<Services {self.supervisor!r} {self.sampler!r}>"

    def create_app(self) -> QuartTrio:
        return create_app(self.config, self.supervisor, self.sampler, self.keys)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ready once queries are accepted and memory is sampled."""
        async with cli_sandbox(self.config) as sandbox, trio.open_nursery() as nursery:
            self.sandbox = sandbox
            await nursery.start(self.supervisor.run)
            await nursery.start(self.sampler.run)
            await nursery.start(self.keys.run)
            task_status.started()

    @asynccontextmanager
    async def _open_session(self) -> AsyncIterator[SessionLike]:
        sandbox = self.sandbox
        assert sandbox is not None, "sessions open only while Services.run runs"
        config = self.config
        pid: int | None = None
        try:
            async with open_session(
                config.cli_command(),
                env=sandbox.child_env(config.child_env),
                cwd=sandbox.workdir,
                startup_timeout_s=config.startup_timeout_s,
            ) as session:
                pid = session.pid
                yield session
        finally:
            if pid is not None:
                forget_cli_session(config.child_env.get("CLAUDE_CONFIG_DIR"), pid, sandbox.workdir)


class InFlight:
    """ASGI middleware counting HTTP exchanges from request to the last byte of the response.

    On shutdown, Hypercorn would hold idle keep-alive connections open for the whole grace
    period; this tells ``serve`` when nothing is in flight any more, so it can stop at once.
    """

    def __init__(self, app: Any) -> None:
        self._app = app
        self.count = 0
        self._idle = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        self.count += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()
                self._idle = trio.Event()

    async def wait_idle(self) -> None:
        if self.count:
            await self._idle.wait()


# Closing a connection's socket: a FIN to a peer that may not read; bounded all the same.
CLOSE_GRACE_S = 5.0


class ServerConfig(HypercornConfig):
    """Hypercorn's config plus what ``BoundedTCPServer`` needs (Hypercorn has no write timeout)."""

    send_timeout_s: float = math.inf


class BoundedTCPServer(TCPServer):
    """Hypercorn's connection with two fixes: sends have a deadline, and a close really closes.

    - Hypercorn shields every ``send_all``: a client that stops reading holds the response's task
      (and its data) forever, past any deadline of ours. Here a send that makes no progress for
      ``send_timeout_s`` aborts the connection (the app sees a disconnect).
    - A response with ``Connection: close`` is closed from the app's own task, which Quart-Trio
      cancels as that very close delivers ``http.disconnect``: the close was cancelled at its
      first checkpoint and the socket stayed open until the client went away. Shielded here.
    """

    # For a Hypercorn config that is not a ServerConfig (the hypercorn command's): asgi.py sets
    # it from CCWRAP_SEND_TIMEOUT.
    default_send_timeout_s: float = math.inf

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, RawData):
            await super().protocol_send(event)  # Closed: through the shielded _close below
            return
        timeout_s = getattr(self.config, "send_timeout_s", self.default_send_timeout_s)
        async with self.send_lock:
            try:
                with trio.CancelScope(shield=True), trio.fail_after(timeout_s):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
            except trio.TooSlowError:
                log.warning("[WARN] Client read nothing for %gs; connection closed", timeout_s)
                await self._close()
                await self.protocol.handle(Closed())

    async def _close(self) -> None:
        with trio.move_on_after(CLOSE_GRACE_S, shield=True):
            await super()._close()
        with trio.CancelScope(shield=True):
            await self.stream.aclose()  # idempotent; ends a send_eof that timed out


# Hypercorn's trio worker builds connections from this module global: the one place to hook.
hypercorn.trio.run.TCPServer = BoundedTCPServer  # type: ignore[attr-defined]


def hypercorn_config(config: Config) -> HypercornConfig:
    hypercorn = ServerConfig()
    hypercorn.send_timeout_s = config.send_timeout_s
    hypercorn.bind = [_bind(config.host, config.port)]
    hypercorn.graceful_timeout = config.shutdown_grace_s
    hypercorn.accesslog = None
    hypercorn.errorlog = logging.getLogger("hypercorn.error")
    return hypercorn


async def serve(
    config: Config,
    *,
    shutdown: trio.Event | None = None,
    session_factory_override: SessionFactory | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole server until ``shutdown`` is set, then stop gracefully.

    Hands the bound URLs to ``task_status`` once Hypercorn listens (so port 0 works in tests).
    On shutdown: new requests (and ``/health/ready``) get 503 while in-flight ones have
    ``shutdown_grace_s`` to finish, then the listeners close and the CLI is ended and reaped.
    """
    shutdown = shutdown if shutdown is not None else trio.Event()
    services = Services(config, session_factory_override)
    app = InFlight(services.create_app())

    async def stop_accepting() -> None:
        await shutdown.wait()
        log.info(
            "shutting down: finishing in-flight requests (grace %gs)", config.shutdown_grace_s
        )
        services.supervisor.begin_shutdown()
        # Keep listening while in-flight requests finish: a new connection (a kubelet's
        # readiness probe, a load balancer's check, a late client) gets 503 "shutting down",
        # not a refused connection. Hypercorn closes its listeners when this returns.
        with trio.move_on_after(config.shutdown_grace_s):
            await app.wait_idle()

    async with trio.open_nursery() as nursery:

        async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn_serve(
                app, hypercorn_config(config), shutdown_trigger=stop_accepting,
                task_status=task_status,
            )
            # Hypercorn returns once its connections are done (or the grace ran out); then
            # cancelling the services ends and reaps the CLI.
            nursery.cancel_scope.cancel()

        async def stop_when_idle() -> None:
            # Requests in flight finish (within the grace); then idle keep-alive connections
            # are not worth waiting for.
            await shutdown.wait()
            with trio.move_on_after(config.shutdown_grace_s):
                await app.wait_idle()
            nursery.cancel_scope.cancel()

        await nursery.start(services.run)
        urls = await nursery.start(run_http)
        nursery.start_soon(stop_when_idle)
        log.info("ccwrap-trio listening on %s", ", ".join(urls))
        task_status.started(urls)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
