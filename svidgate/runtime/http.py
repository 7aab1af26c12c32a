"""The HTTP endpoints of ``listen.http``: ``/metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz``.

Served by aiohttp (already the bundle endpoint's server) instead of a hand-written HTTP/1.1 parser: the
protocol work (request parsing, limits, HEAD, 405 with ``Allow``, keep-alive) is aiohttp's. The Prometheus
exposition is prometheus_client's public `generate_latest` for the process's registry; every scrape-time
collector (SVID expiry, bundle age, source health, readiness) reads immutable state, so it runs on the event
loop without locks.

This module imports only aiohttp, prometheus_client and `svidgate.runtime.listeners` (for the bind error).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from svidgate.logs import aiohttp_server_logger
from svidgate.runtime.listeners import bind_error, bracket_host

__all__ = ["HttpEndpoint"]

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]
Details = Callable[[], dict[str, object]]

#: Probes and Prometheus send a few hundred bytes; a longer request line or header field is answered 400.
MAX_LINE = 8190
#: Headers per request; probes send a handful.
MAX_HEADERS = 32
#: Prometheus scrapes every 15-60 s and probes every few seconds: an idle connection is not kept longer.
KEEPALIVE_TIMEOUT = 5.0
#: On stop, how long a request in flight may still finish (aiohttp's default is 60 s; the drain is bounded).
SHUTDOWN_TIMEOUT = 2.0

_TEXT = "text/plain"
#: Probe answers are about now: no proxy or client may cache them.
_HEADERS = {"Cache-Control": "no-store", "Server": "svidgate"}


_aiohttp_log = aiohttp_server_logger(__name__ + ".aiohttp", "http.bad_request")


class HttpEndpoint:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one TCP address.

    Args:
        host: address to bind.
        port: port to bind (0: the kernel picks; see `port`).
        registry: served on ``/metrics``.
        readiness: returns ``(ready, reason)`` for ``/readyz``.
        details: more fields for the ``/readyz`` JSON body (the health of every source).
        before_metrics: awaited before each ``/metrics`` answer (Check worker processes report their counts).
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        details: Details | None = None,
        before_metrics: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._registry = registry
        self._readiness = readiness
        self._details = details
        self._before_metrics = before_metrics
        self._runner: web.AppRunner | None = None
        #: ``/healthz`` answers 503 once this is False (the process is stopping).
        self.alive = True

    async def start(self) -> int:
        """Bind and start serving.

        Returns:
            The bound port.

        Raises:
            ListenerError: the address cannot be bound.
        """
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            access_log=None,
            logger=_aiohttp_log,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise bind_error("http", f"{bracket_host(self.host)}:{self.port}", exc) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop serving; idempotent."""
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        if self._before_metrics is not None:
            await self._before_metrics()
        return web.Response(
            body=generate_latest(self._registry), headers={**_HEADERS, "Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, _request: web.Request) -> web.Response:
        if self.alive:
            return web.Response(text="ok\n", content_type=_TEXT, headers=_HEADERS)
        return web.Response(status=503, text="stopping\n", content_type=_TEXT, headers=_HEADERS)

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, reason = self._readiness()
        document: dict[str, object] = {"ready": ready, "reason": reason}
        if self._details is not None:
            document.update(self._details())
        return web.Response(
            status=200 if ready else 503,
            body=json.dumps(document).encode() + b"\n",
            content_type="application/json",
            headers=_HEADERS,
        )
