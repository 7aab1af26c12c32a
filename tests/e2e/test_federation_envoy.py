"""Two svidgates federate with each other through their bundle endpoints, with real Envoys and real Checks.

    Envoy A (client, SDS from svidgate A) --mTLS a.org <-> b.org--> Envoy B (server, SDS from svidgate B)

- svidgate A (a.org) and B (b.org) each serve a bundle endpoint (https_spiffe); each is bootstrapped once
  from `svidgate bundle` of the other and then follows the other's endpoint. Federation is added by SIGHUP
  (live) once the endpoints' ports are known.
- Envoy A calls Envoy B with mTLS across the trust domains; Check on each side accepts the other's JWT-SVIDs.
- A's CA rotates during the test (its state is written in code so that the next authority is prepared a few
  seconds after start and signs a few seconds later): traffic keeps flowing through the Envoys with no file
  copied by hand, and B accepts A's JWT-SVIDs signed with the new key.
- svidgate C (c.org, an https_web bundle endpoint, refresh hint 1 h) rolls its CA key between two starts: B
  accepts a JWT-SVID signed with that key on first sight (one fetch for the unknown ``kid``), and a burst of
  1,000 Checks with unknown keys costs C's endpoint at most one more request.
- Removing A from B's config by SIGHUP makes Envoy B refuse A's client and Check deny A's tokens within
  seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import serialization
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import system_clock
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import TrustDomain
from tests.support.ca import TestCA
from tests.support.ca_state import roll_ca, write_ca_state
from tests.support.checkserver import Backend, echo_backend
from tests.support.envoy import EXAMPLES, EnvoyProcess, shipped_config
from tests.support.runtime import (
    ServeProcess,
    check_request,
    fetch_jwt_svid,
    scrape,
    value,
)
from tests.support.tempdir import short_dir

pytestmark = pytest.mark.e2e

A, B, C = TrustDomain("a.org"), TrustDomain("b.org"), TrustDomain("c.org")
A_CLIENT = "spiffe://a.org/client"
B_SERVER = "spiffe://b.org/server"
#: A's first authority: the next one is prepared at half of it and signs from 5/6 on (~7 s and ~22 s after
#: the state is written).
A_LIFETIME = 45.0
A_ELAPSED = 15.5


def svidgate_config(
    td: TrustDomain,
    run: Path,
    state: Path,
    *,
    workloads: str,
    federation: str = "",
    allow: str = "",
    bundle_endpoint: str = "",
) -> str:
    policies = (
        f"""\
  policies:
    - name: api
      match: {{path_prefix: /api}}
      audiences: [spiffe://{td.name}/api]
      allow: {allow}
"""
        if allow
        else ""
    )
    return f"""\
trust_domain: {td.name}
state_dir: {state}
listen:
  grpc: [unix://{run}/sds.sock]
  workload_api: unix://{run}/workload.sock
  check: tcp://127.0.0.1:0
  http: 127.0.0.1:0
  bundle_endpoint: 127.0.0.1:0
ca: {{ca_ttl: 121s, x509_svid_ttl: 60s, jwt_svid_ttl: 30s}}
bundle_endpoint:
{bundle_endpoint}
workloads:
{workloads}
  - spiffe_id: spiffe://{td.name}/app
    selectors: [unix:uid:{os.getuid()}]
{federation}
authz:
  unknown_key_wait: 3s   # loopback fetches under a loaded CI machine; Envoy is not in this path
{policies}
server: {{config_poll_interval: 0s, drain_grace: 1s}}
log: {{level: info}}
"""


def spiffe_partner(td: TrustDomain, port: int, bundle_file: Path) -> str:
    return f"""\
  {td.name}:
    bundle_file: {bundle_file}
    bundle_endpoint:
      url: https://127.0.0.1:{port}/
      profile: https_spiffe
      endpoint_spiffe_id: spiffe://{td.name}/bundle-endpoint
"""


def san(spiffe_id: str) -> dict[str, object]:
    return {"san_type": "URI", "matcher": {"exact": spiffe_id}}


def cli_bundle(config: Path) -> bytes:
    return subprocess.run(
        [sys.executable, "-m", "svidgate", "bundle", "--config", str(config)],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout


def listener_port(process: ServeProcess, event: str, **match: str) -> int:
    for line in process.events(event):
        if all(line.get(k) == v for k, v in match.items()):
            return int(str(line["address"]).rsplit(":", 1)[1])
    raise AssertionError(f"no {event} {match}:\n{process.log()}")


class Side:
    """One svidgate process with its files."""

    def __init__(self, td: TrustDomain, root: Path) -> None:
        self.td = td
        self.root = root
        self.run = root / "run"
        self.state = root / "state"
        self.config = root / "svidgate.yaml"
        self.process = ServeProcess(self.config)

    def write(self, **kwargs: str) -> None:
        self.config.write_text(svidgate_config(self.td, self.run, self.state, **kwargs))

    @property
    def sds_socket(self) -> Path:
        return self.run / "sds.sock"

    @property
    def bundle_port(self) -> int:
        return listener_port(self.process, "bundle_endpoint.listening")

    @property
    def check_port(self) -> int:
        return listener_port(self.process, "grpc.listening", listener="check")

    async def reload(self) -> None:
        count = len(self.process.events("config.reloaded"))
        self.process.signal(signal.SIGHUP)
        await self.process.wait_for_event("config.reloaded", after=count, timeout=20)

    async def jwt(self, audience: str) -> str:
        async with grpc.aio.insecure_channel(f"unix:{self.run}/workload.sock") as channel:
            return await fetch_jwt_svid(channel, audience)

    async def check(self, token: str) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.check_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = await stub.Check(check_request("/api/x", token), timeout=10)
        return int(response.status.code)

    async def stop(self) -> None:
        if self.process.proc is not None and self.process.proc.poll() is None:
            self.process.signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                await self.process.wait_exit(15)
        self.process.kill()


@pytest.fixture
def root() -> Iterator[Path]:
    with short_dir("sg-fed-") as path:
        yield path


@pytest.fixture
def backend() -> Iterator[Backend]:
    with echo_backend() as server:
        yield server


@contextlib.asynccontextmanager
async def running(*sides: Side) -> AsyncIterator[None]:
    try:
        await asyncio.gather(*(side.process.start() for side in sides))
        yield
    finally:
        await asyncio.gather(*(side.stop() for side in sides))


def get(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


async def status_is(port: int, status: int) -> bool:
    return await asyncio.to_thread(get, port) == status


async def eventually(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_two_svidgates_federate_rotate_and_unfederate(root: Path, backend: Backend) -> None:
    a, b, c = Side(A, root / "a"), Side(B, root / "b"), Side(C, root / "c")
    # -- CA states in code: A rotates soon after start; B and C are long-lived.
    write_ca_state(a.state, A, not_before=time.time() - A_ELAPSED, lifetime=A_LIFETIME)
    BuiltinCa.load_or_create(b.state, B, KeyType.EC_P256, system_clock, ca_ttl=3600)
    BuiltinCa.load_or_create(c.state, C, KeyType.EC_P256, system_clock, ca_ttl=3600)
    web_ca = TestCA(TrustDomain("web.test"), not_before=time.time() - 3600, not_after=time.time() + 86400)
    cert, key = web_ca.create_x509_certificate(
        None, dns_names=["localhost"], not_before=time.time() - 60, not_after=time.time() + 3600
    )
    (root / "c" / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "c" / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (root / "web-ca.pem").write_bytes(web_ca.certificate.public_bytes(serialization.Encoding.PEM))

    spiffe_endpoint = "  spiffe_id: spiffe://{}/bundle-endpoint"
    a_workloads = f"  - spiffe_id: {A_CLIENT}\n    selectors: [envoy:node_id:client]"
    b_workloads = f"  - spiffe_id: {B_SERVER}\n    selectors: [envoy:node_id:server]"
    a.write(workloads=a_workloads, bundle_endpoint=spiffe_endpoint.format("a.org"))
    b.write(workloads=b_workloads, bundle_endpoint=spiffe_endpoint.format("b.org"))
    c.write(
        workloads="",
        bundle_endpoint=(
            f"  profile: https_web\n  cert_file: {root / 'c' / 'tls.crt'}\n"
            f"  key_file: {root / 'c' / 'tls.key'}\n  refresh_hint: 1h"
        ),
    )
    # -- bootstrap, once, from `svidgate bundle`
    a_json, b_json = root / "a.json", root / "b.json"
    a_json.write_bytes(cli_bundle(a.config))
    b_json.write_bytes(cli_bundle(b.config))

    async with running(a, b, c):
        # -- federate both ways, live (SIGHUP), now that the endpoints' ports are known
        c_partner = f"""\
  c.org:
    bundle_endpoint:
      url: https://localhost:{c.bundle_port}/
      profile: https_web
      ca_file: {root / "web-ca.pem"}
"""
        a.write(
            workloads=a_workloads,
            bundle_endpoint=spiffe_endpoint.format("a.org"),
            federation="federation:\n" + spiffe_partner(B, b.bundle_port, b_json),
            allow='["spiffe://b.org/*"]',
        )
        b_federation = "federation:\n" + spiffe_partner(A, a.bundle_port, a_json) + c_partner
        b.write(
            workloads=b_workloads,
            bundle_endpoint=spiffe_endpoint.format("b.org"),
            federation=b_federation,
            allow='["spiffe://a.org/*", "spiffe://c.org/*"]',
        )
        await asyncio.gather(a.reload(), b.reload())
        # Each partner's endpoint answers a fetch (the bundle itself equals the bootstrap file, so no
        # federation.bundle_updated is logged for it).
        for partner in (a, b, c):
            await eventually(lambda partner=partner: bundle_requests(partner), 20, f"a fetch of {partner.td}")
        for side in (a, b):
            assert not side.process.events("federation.fetch_failed"), side.process.log()

        # -- mTLS across the trust domains through real Envoys
        # The shipped sds-mtls Envoys, with the addresses, node and SPIFFE IDs of this test changed by name.
        server_config = shipped_config(
            EXAMPLES / "sds-mtls" / "server-envoy.yaml",
            listeners={"ingress": 0},
            clusters={"svidgate": b.sds_socket, "backend": backend.server_address[1]},
            everywhere={"match_typed_subject_alt_names": [san(A_CLIENT)]},
        )
        async with EnvoyProcess(server_config, root, name="envoy-b") as envoy_b:
            client_config = shipped_config(
                EXAMPLES / "sds-mtls" / "client-envoy.yaml",
                listeners={"egress": 0},
                clusters={"svidgate": a.sds_socket, "server": envoy_b.listener_port("ingress")},
                node_id="client",
                everywhere={"match_typed_subject_alt_names": [san(B_SERVER)]},
            )
            async with EnvoyProcess(client_config, root, name="envoy-a") as envoy_a:
                egress = envoy_a.listener_port("egress")
                await eventually(lambda: status_is(egress, 200), 20, "A -> B over mTLS")
                assert backend.received[-1]["x-forwarded-client-cert"].count(f"URI={A_CLIENT}") == 1

                # From here until after A's CA rotation, requests flow through the Envoys continuously.
                statuses: list[int] = []
                traffic = asyncio.ensure_future(send_requests(egress, statuses))

                # -- Check on each side accepts the other side's JWT-SVIDs
                assert await b.check(await a.jwt("spiffe://b.org/api")) == 0
                assert await a.check(await b.jwt("spiffe://a.org/api")) == 0

                # -- C rolls its CA key between two starts; B has not fetched since (hint 1 h)
                await first_sight_and_burst(b, c)

                # -- A's CA rotates: traffic keeps flowing, nobody copies a file
                await a.process.wait_for_event("ca.activated", timeout=60)
                # A's SVIDs are re-minted under the new authority at activation; Envoy A must have used them.
                await asyncio.sleep(3)
                traffic.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await traffic
                assert len(statuses) > 20
                assert set(statuses) == {200}, f"{statuses.count(200)}/{len(statuses)} requests succeeded"
                # B learnt A's next authority from A's endpoint before it signed: its JWT-SVIDs verify at B.
                assert await b.check(await a.jwt("spiffe://b.org/api")) == 0

                # -- A removed from B by SIGHUP: refused by Envoy B and by Check within seconds
                token = await a.jwt("spiffe://b.org/api")
                b.write(
                    workloads=b_workloads,
                    bundle_endpoint=spiffe_endpoint.format("b.org"),
                    federation="federation:\n" + c_partner,
                    allow='["spiffe://c.org/*"]',
                )
                await b.reload()
                await eventually(lambda: status_is(egress, 503), 10, "Envoy B to refuse A")
                assert await b.check(token) != 0


async def bundle_requests(side: Side) -> float:
    """Bundle documents `side`'s endpoint served (its /metrics)."""
    samples = await scrape(listener_port(side.process, "http.listening"))
    name = "svidgate_bundle_endpoint_requests_total"
    if (name, (("code", "200"), ("document", "bundle"))) not in samples:
        return 0.0
    return value(samples, name, document="bundle", code="200")


async def send_requests(port: int, statuses: list[int]) -> None:
    while True:
        statuses.append(await asyncio.to_thread(get, port))
        await asyncio.sleep(0.1)


async def first_sight_and_burst(b: Side, c: Side) -> None:
    port = c.bundle_port
    await c.stop()
    roll_ca(c.state, C, now=time.time())
    # The same endpoint address after the restart: B's configuration names it.
    c.config.write_text(
        c.config.read_text().replace("bundle_endpoint: 127.0.0.1:0", f"bundle_endpoint: 127.0.0.1:{port}")
    )
    c.process = ServeProcess(c.config)
    await c.process.start()
    token = await c.jwt("spiffe://b.org/api")
    fetches = len(b.process.events("federation.unknown_key_fetch"))
    assert await b.check(token) == 0, b.process.log()
    assert len(b.process.events("federation.unknown_key_fetch")) == fetches + 1

    # 1,000 Checks with made-up key IDs: at most one more request to C's endpoint (one per 10 s per trust
    # domain), and every one of them denied.
    before = await bundle_requests(c)
    forger = TestCA(C)
    tokens = [
        forger.create_jwt_svid(
            "spiffe://c.org/app", ["spiffe://b.org/api"], now=time.time(), extra_header={"kid": f"k{i}"}
        )
        for i in range(1000)
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{b.check_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        responses: list[external_auth_pb2.CheckResponse] = []
        for start in range(0, len(tokens), 100):
            responses += await asyncio.gather(
                *(stub.Check(check_request("/api/x", t), timeout=10) for t in tokens[start : start + 100])
            )
    assert all(r.status.code != 0 for r in responses)
    assert await bundle_requests(c) - before <= 1
