"""The ASGI app for running under the Hypercorn command (or any Trio ASGI server).

    hypercorn --worker-class trio --config container/hypercorn.toml ccwrap_trio.asgi:app

Configuration comes from the CCWRAP_* variables. The supervisor and the memory sampler start in
the app's lifespan, inside Quart-Trio's lifespan nursery, and stop with it; each Hypercorn worker
process therefore runs its own CLI session(s).
"""

from __future__ import annotations

import os
import sys

from quart_trio import QuartTrio

from .config import Config
from .errors import ConfigError
from .logs import configure_logging
from .server import BoundedTCPServer, Services


def create_asgi_app(config: Config) -> QuartTrio:
    # The hypercorn command's connections are BoundedTCPServer too (server.py hooks them), but
    # its config knows no send timeout: a client that stops reading is cut all the same.
    BoundedTCPServer.default_send_timeout_s = config.send_timeout_s
    services = Services(config)
    app = services.create_app()

    @app.before_serving
    async def start_services() -> None:
        await app.nursery.start(services.run)

    @app.after_serving
    async def stop_accepting() -> None:
        services.supervisor.begin_shutdown()

    # Hypercorn finished the in-flight requests (graceful_timeout) before the lifespan ends:
    # the services are then cancelled at once, which ends and reaps the CLI.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = None
    return app


def _load() -> QuartTrio:
    try:
        config = Config.load(os.environ)
    except ConfigError as exc:
        print(f"ccwrap-trio: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(config.log_level, config.log_format)
    return create_asgi_app(config)


app = _load()
