"""A whole svidgate server in-process: on the test's event loop (`running_server`), or on an event loop in
a thread of its own (`ServerThread`), so that a test notices, with a timeout, a server whose loop is stuck."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from prometheus_client import CollectorRegistry

from svidgate.config import load_config
from svidgate.identity.clock import Clock
from svidgate.runtime.server import Server

_T = TypeVar("_T")


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


class ServerThread:
    """A whole `Server` on an event loop in another thread; `call()` runs a coroutine there, or times out."""

    def __init__(self, config: Path, clock: Clock, *, timeout: float = 15.0) -> None:
        self._config = config
        self._timeout = timeout
        self._clock = clock
        self._loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))
        self._thread.daemon = True
        self._thread.start()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self.server = Server(
            load_config(self._config), self._config, registry=CollectorRegistry(), clock=self._clock
        )
        try:
            await self.server.start()
        except BaseException as exc:
            self.error = exc
            return
        finally:
            self.started.set()
        await self._stopping.wait()
        await self.server.stop("test")

    def call(self, make: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``await make()`` on the server's loop; `concurrent.futures.TimeoutError` if it is stuck."""

        async def run() -> _T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout)

    def stop(self) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()
