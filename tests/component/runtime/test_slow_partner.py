"""A slow federation partner never stops the own identity (issue 9, item 6).

The partner is a real HTTPS bundle endpoint that answers ``200 OK`` with a Content-Length and then sends one
byte every 50 ms (`DrippingBundleEndpoint`). The server under test runs in a thread of its own, on its own
event loop, with an injected clock: if anything there blocked on the partner, the calls below would time out
instead of hanging this test.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from svidgate.identity.clock import FakeClock
from svidgate.identity.spiffe_id import SpiffeId
from tests.support.bundle_endpoint import DrippingBundleEndpoint
from tests.support.runtime import (
    WEB,
    Layout,
    check_request,
    http_get,
    tcp_grpc_target,
    write_config,
)
from tests.support.server import ServerThread

#: Generous: each call below takes milliseconds unless it is stuck behind the partner.
STUCK = 15.0
NEW = SpiffeId.parse("spiffe://example.org/new")


def federation_yaml(endpoint: DrippingBundleEndpoint, timeout: str = "1s") -> str:
    return f"""\
federation:
  partner.test:
    bundle_endpoint:
      url: {endpoint.url}
      profile: https_web
      ca_file: {endpoint.ca_file}
      timeout: {timeout}
"""


class Events(logging.Handler):
    """Collects svidgate's structured log events (any thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [getattr(r, "fields", {}) for r in list(self.records) if r.getMessage() == event]

    def wait(self, event: str, timeout: float = STUCK) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.named(event)
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {event} within {timeout}s")


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    logger = logging.getLogger("svidgate")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _metric(body: str, line_start: str) -> float:
    (line,) = [line for line in body.splitlines() if line.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


def test_a_dripping_partner_stops_nothing_but_its_own_bundle(layout: Layout, events: Events) -> None:
    endpoint = DrippingBundleEndpoint(layout.root)
    write_config(layout, extra=federation_yaml(endpoint))
    clock = FakeClock(float(int(time.time())))
    running = ServerThread(layout.config, clock, timeout=STUCK)
    try:
        # Start-up does not wait for the partner: ready with the own identity, the partner reported apart.
        assert running.started.wait(STUCK), "start-up waited for the dripping bundle endpoint"
        assert running.error is None, running.error
        server = running.server
        assert server is not None
        assert server.http_port
        assert endpoint.dripping.wait(STUCK), "the partner was never asked for its bundle"
        status, body, _ = http_get(server.http_port, "/readyz")
        readyz = json.loads(body)
        assert status == 200, body
        assert "no bundle yet for federated trust domain(s) partner.test" in readyz["reason"]
        partner = next(s for s in readyz["sources"] if s["source"] == "federation")
        assert (partner["trust_domain"], partner["up"]) == ("partner.test", False)
        assert http_get(server.http_port, "/healthz")[:2] == (200, "ok\n")
        # Check answers (the policy for /healthz needs no token).
        with grpc.insecure_channel(tcp_grpc_target(server)) as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            assert check(check_request("/healthz"), timeout=STUCK).status.code == 0

        # Minting proceeds on the injected clock while the drip goes on.
        source = server.source
        assert source is not None
        web = SpiffeId.parse(WEB)
        before = source.feed.current().svids[web].leaf.serial_number
        clock.advance(1801)  # past the half-life of the 1 h SVIDs

        async def refresh() -> bool:
            assert source is not None
            return source.refresh()

        assert running.call(refresh)
        assert source.feed.current().svids[web].leaf.serial_number != before

        # A reload that adds a workload completes, and the new identity is minted at once.
        text = layout.config.read_text().replace(
            "authz:", f"  - spiffe_id: {NEW}\n    selectors: [envoy:node_id:new]\nauthz:", 1
        )
        layout.config.write_text(text)
        assert running.call(lambda: server.reload("SIGHUP"))
        assert NEW in source.feed.current().svids
        assert http_get(server.http_port, "/healthz")[0] == 200

        # The fetch fails at its total deadline (1 s) although a byte arrives every 50 ms; logged and counted.
        failed = events.wait("federation.fetch_failed")
        assert failed["trust_domain"] == "partner.test"
        assert "no complete response within the 1s deadline" in failed["error"]
        assert endpoint.dripping.is_set()
        _, metrics, _ = http_get(server.http_port, "/metrics")
        partner_labels = 'source="federation",trust_domain="partner.test"'
        assert _metric(metrics, f"svidgate_source_up{{{partner_labels}}}") == 0
        assert _metric(metrics, f'svidgate_source_failures_total{{reason="fetch",{partner_labels}}}') >= 1
        assert _metric(metrics, 'svidgate_source_up{source="builtin",trust_domain="example.org"}') == 1
        assert _metric(metrics, "svidgate_ready ") == 1
    finally:
        endpoint.stop()
        running.stop()
