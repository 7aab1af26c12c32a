"""A whole svidgate server in-process, on the test's event loop."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from svidgate.config import load_config
from svidgate.server import Server


@contextlib.asynccontextmanager
async def running_server(
    config_path: Path, registry: CollectorRegistry | None = None
) -> AsyncIterator[Server]:
    """Start svidgate from the config file at `config_path`; drain and stop it on exit.

    Args:
        config_path: the config file (relative paths in it are resolved against its directory).
        registry: the Prometheus registry (default: a fresh one, so servers never share series).
    """
    server = Server(load_config(config_path), config_path, registry=registry or CollectorRegistry())
    await server.start()
    try:
        yield server
    finally:
        await server.stop("test")
