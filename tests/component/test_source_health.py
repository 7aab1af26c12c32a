"""A lost upstream is visible (issue 9, item 7): a whole server on the real SPIRE source, whose agent (a real
Workload API server on a unix socket) goes away and comes back, with an injected clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from svidgate.config import load_config
from svidgate.identity.clock import FakeClock
from svidgate.server import READY_MIN_LIFETIME_LEFT, Server
from svidgate.sources.spire import SpireSource
from tests.component.runtime_support import Layout, http_get, scrape, value, write_config
from tests.support.tempdir import short_dir
from tests.support.workloadapi import APP, serve_workload_api

SPIRE = {"source": "spire", "trust_domain": "example.org"}


async def _eventually(condition: Callable[[], object], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


async def _up(server: Server) -> float:
    assert server.http_port
    return value(await scrape(server.http_port), "svidgate_source_up", **SPIRE)


async def test_a_lost_spire_agent_shows_in_metrics_and_then_in_readiness(layout: Layout) -> None:
    with short_dir("agent-") as agent_dir:
        agent_socket = agent_dir / "workload.sock"
        write_config(layout, extra=f"source:\n  kind: spire\n  spire_socket: unix://{agent_socket}\n")
        clock = FakeClock(float(int(time.time())))
        server = Server(load_config(layout.config), layout.config, registry=CollectorRegistry(), clock=clock)
        async with serve_workload_api(directory=agent_dir):
            await server.start()
            try:
                source = server.source
                assert isinstance(source, SpireSource)
                await _eventually(lambda: all(source.connected.values()), "both streams attached")
                assert server.http_port
                samples = await scrape(server.http_port)
                assert value(samples, "svidgate_source_up", **SPIRE) == 1
                # A connected stream is fresh now.
                assert value(samples, "svidgate_source_last_success_timestamp_seconds", **SPIRE) == clock()
                assert server.readiness() == (True, "ok")
            except BaseException:
                await server.stop("test")
                raise
        try:
            # The agent is gone: the metric moves at once; readiness holds while the SVIDs are fresh.
            lost_at = clock()
            deadline = time.monotonic() + 15
            while await _up(server) != 0:
                assert time.monotonic() < deadline, "svidgate_source_up never went to 0"
                await asyncio.sleep(0.02)
            await _eventually(lambda: not any(source.connected.values()), "both streams lost")
            clock.advance(60)
            samples = await scrape(server.http_port)
            assert value(samples, "svidgate_source_last_success_timestamp_seconds", **SPIRE) == lost_at
            assert value(samples, "svidgate_source_failures_total", reason="stream_lost", **SPIRE) >= 1
            assert value(samples, "svidgate_ready") == 1
            status, body, _ = await asyncio.to_thread(http_get, server.http_port, "/readyz")
            (spire,) = json.loads(body)["sources"]
            assert status == 200
            assert (spire["source"], spire["up"], spire["last_success"]) == ("spire", False, lost_at)
            assert "FetchX509SVID" in spire["error"] or "FetchJWTBundles" in spire["error"]

            # Time passes with nobody renewing the SVID: past three quarters of its life, not ready.
            svid = server.source.feed.current().svids[APP]  # type: ignore[union-attr]
            lifetime = svid.expires_at - svid.leaf.not_valid_before_utc.timestamp()
            clock.now = svid.expires_at - lifetime * READY_MIN_LIFETIME_LEFT + 1
            status, body, _ = await asyncio.to_thread(http_get, server.http_port, "/readyz")
            reason = json.loads(body)["reason"]
            assert status == 503, body
            assert f"X.509-SVID {APP} expires in" in reason
            assert "source spire is down" in reason
            assert value(await scrape(server.http_port), "svidgate_ready") == 0

            # The agent is back and renews: up and ready again.
            async with serve_workload_api(directory=agent_dir) as agent:
                agent.clock.now = clock()
                agent.source.refresh()  # re-minted on the agent's (advanced) clock
                await _eventually(lambda: server.readiness()[0], "ready again")
                await _eventually(lambda: all(source.connected.values()), "both streams back")
                assert await _up(server) == 1
        finally:
            await server.stop("test")
