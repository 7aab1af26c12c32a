"""SDS end to end with real Envoys: mTLS between two Envoys with SVIDs and bundles from svidgate.

client Envoy (egress, plain HTTP in) --mTLS--> server Envoy (ingress, SAN match) --> backend (records XFCC)

svidgate runs in the test (grpc.aio on this event loop) behind the SO_PEERCRED front on a unix socket; the
Envoys run envoy-examples/sds-mtls's files with only their ports, socket and (for the intruder) node id
moved. The server Envoy speaks SotW SDS,
the client Envoy delta SDS, so both protocols are exercised against a real Envoy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import os
import shutil
import tempfile
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry

from svidgate.config import SdsConfig, Selector, Workload
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import FakeClock
from svidgate.identity.keys import KeyType
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid
from svidgate.metrics import Metrics
from svidgate.peercred import PeerRegistry
from svidgate.sds.servicer import SERVER_OPTIONS, SecretDiscoveryServicer
from tests.support.envoy import EXAMPLES, EnvoyProcess, shipped_config
from tests.support.peercred import ClaimedFront

pytestmark = pytest.mark.e2e

TD = TrustDomain("example.org")
PARTNER_TD = TrustDomain("partner.test")
SERVER_ID = SpiffeId.parse("spiffe://example.org/server")
CLIENT_ID = SpiffeId.parse("spiffe://example.org/client")
PARTNER_CLIENT_ID = SpiffeId.parse("spiffe://partner.test/client")
EXAMPLE = EXAMPLES / "sds-mtls"


# -- the backend ---------------------------------------------------------------------------------------------


class _Backend(http.server.BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        self.server.seen.append(self.headers.get("x-forwarded-client-cert", ""))  # type: ignore[attr-defined]
        body = b"ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# -- an in-test svidgate -------------------------------------------------------------------------------------


class Svidgate:
    """One trust domain's svidgate: a CA, a feed, the SDS servicer on an inner socket, the peercred front."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        workloads: tuple[Workload, ...],
        sock_dir: Path,
        sds: SdsConfig | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.workloads = workloads
        self.sds = sds if sds is not None else SdsConfig()
        self.clock = FakeClock(__import__("time").time())
        self.ca = BuiltinCa.in_memory(trust_domain, KeyType.EC_P256, self.clock)
        self.federated: dict[TrustDomain, BuiltinCa] = {}
        self.socket = sock_dir / f"{trust_domain.name}.sock"
        self.inner = sock_dir / f".{trust_domain.name}.inner"
        self.version = 0
        self.feed = SnapshotFeed(self.snapshot())
        self.metrics = Metrics(CollectorRegistry(), process_metrics=False)
        self._server: grpc.aio.Server | None = None
        self._front: ClaimedFront | None = None

    def snapshot(self, svids: dict[SpiffeId, X509Svid] | None = None) -> IdentitySnapshot:
        self.version += 1
        bundles = {self.trust_domain: self.ca.bundle()}
        bundles.update({td: ca.bundle() for td, ca in self.federated.items()})
        if svids is None:
            svids = {w.spiffe_id: self.ca.mint_x509_svid(w.spiffe_id, 3600) for w in self.workloads}
        return IdentitySnapshot(svids, bundles, self.version)

    def rotate(self) -> None:
        self.feed.publish(self.snapshot())

    async def start(self) -> None:
        registry = PeerRegistry()
        self._server = grpc.aio.server(options=list(SERVER_OPTIONS), maximum_concurrent_rpcs=None)
        SecretDiscoveryServicer(
            self.feed, self.workloads, self.sds, self.trust_domain, peers=registry, metrics=self.metrics.sds
        ).add_to_server(self._server)
        self._server.add_insecure_port(f"unix:{self.inner}")
        await self._server.start()
        self._front = ClaimedFront(self.socket, str(self.inner), registry)
        await self._front.start()

    async def stop(self) -> None:
        if self._front is not None:
            await self._front.close()
        if self._server is not None:
            await self._server.stop(grace=None)
        self._server = self._front = None

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


WORKLOADS = (
    # The server's identity needs the kernel-verified uid too: proves the SO_PEERCRED front end to end.
    Workload(SERVER_ID, (Selector.parse("envoy:node_id:server"), Selector.parse(f"unix:uid:{os.getuid()}"))),
    Workload(CLIENT_ID, (Selector.parse("envoy:node_id:client"),)),
)


@pytest.fixture
async def svidgate(sock_dir: Path) -> AsyncIterator[Svidgate]:
    gate = Svidgate(TD, WORKLOADS, sock_dir)
    await gate.start()
    yield gate
    await gate.stop()


# -- Envoys --------------------------------------------------------------------------------------------------


def server_envoy(
    gate: Svidgate,
    backend_port: int,
    tmp_path: Path,
    sds_api: str = "GRPC",
    validation_context: str = "ALL",
) -> EnvoyProcess:
    # The shipped file accepts spiffe://example.org/client; these tests also federate with partner.test.
    allowed = [{"san_type": "URI", "matcher": {"exact": str(i)}} for i in (CLIENT_ID, PARTNER_CLIENT_ID)]
    config = shipped_config(
        EXAMPLE / "server-envoy.yaml",
        listeners={"ingress": 0},
        clusters={"svidgate": gate.socket, "backend": backend_port},
        everywhere={"api_type": sds_api, "match_typed_subject_alt_names": allowed},
    )
    if validation_context != "ALL":
        assert config.count("name: ALL") == 1
        config = config.replace("name: ALL", f"name: {validation_context}")
    return EnvoyProcess(config, tmp_path, name="server", component_log_level="secret:debug,config:debug")


def client_envoy(
    gate: Svidgate, server_port: int, tmp_path: Path, *, name: str = "client", node_id: str = "client"
) -> EnvoyProcess:
    # The shipped file expects the server spiffe://example.org/server (SERVER_ID) and speaks delta SDS.
    config = shipped_config(
        EXAMPLE / "client-envoy.yaml",
        listeners={"egress": 0},
        clusters={"svidgate": gate.socket, "server": server_port},
        node_id=node_id,
    )
    return EnvoyProcess(config, tmp_path, name=name, component_log_level="secret:debug,config:debug")


def get(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def request(envoy: EnvoyProcess) -> tuple[int, str]:
    return await asyncio.to_thread(get, envoy.listener_port("egress"))


def cert_serials(envoy: EnvoyProcess) -> set[str]:
    """Serial numbers of the certificates (not CAs) Envoy holds, from admin /certs."""
    serials = set()
    for entry in envoy.admin_json("/certs").get("certificates", []):
        for cert in entry.get("cert_chain", []):
            serials.add(cert["serial_number"])
    return serials


async def eventually(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate() if callable(predicate) else predicate
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def xfcc_uri(xfcc: str) -> str:
    fields = dict(part.split("=", 1) for part in xfcc.split(";") if "=" in part)
    return fields.get("URI", "")


def xfcc_hash(xfcc: str) -> str:
    fields = dict(part.split("=", 1) for part in xfcc.split(";") if "=" in part)
    return fields.get("Hash", "")


# -- tests ---------------------------------------------------------------------------------------------------


async def test_mtls_with_san_match_and_rotation_without_restart(
    svidgate: Svidgate, backend: http.server.ThreadingHTTPServer, tmp_path: Path
) -> None:
    seen: list[str] = backend.seen  # type: ignore[attr-defined]
    async with (
        server_envoy(svidgate, backend.server_address[1], tmp_path) as server,
        client_envoy(svidgate, server.listener_port("ingress"), tmp_path) as client,
    ):
        status, body = await request(client)
        assert (status, body) == (200, "ok")
        assert xfcc_uri(seen[-1]) == str(CLIENT_ID)
        first_hash = xfcc_hash(seen[-1])
        client_pid, server_pid = client.pid, server.pid
        before = await asyncio.to_thread(cert_serials, client)

        # Rotation: new SVIDs published; both Envoys pick them up without a restart.
        svidgate.rotate()
        await eventually(
            lambda: asyncio.to_thread(lambda: cert_serials(client).isdisjoint(before)),
            what="client Envoy to load its rotated SVID",
        )
        await eventually(lambda: asyncio.to_thread(lambda: request_hash_changed(client, seen, first_hash)))
        assert (client.pid, server.pid) == (client_pid, server_pid)
        assert client.running()
        assert server.running()
        # SotW (server) and delta (client) streams were both served; nothing was NACKed.
        assert svidgate.sample("svidgate_sds_streams", api="sotw") >= 1
        assert svidgate.sample("svidgate_sds_streams", api="delta") >= 1
        assert svidgate.sample("svidgate_sds_nacks_total", resource="default") == 0
        assert svidgate.sample("svidgate_sds_acks_total", resource="default") >= 4


def request_hash_changed(client: EnvoyProcess, seen: list[str], old_hash: str) -> bool:
    status, _ = get(client.listener_port("egress"))
    return status == 200 and xfcc_hash(seen[-1]) != old_hash and xfcc_uri(seen[-1]) == str(CLIENT_ID)


async def test_unlisted_spiffe_id_is_refused_by_san_match(
    svidgate: Svidgate, backend: http.server.ThreadingHTTPServer, tmp_path: Path
) -> None:
    # A third identity, valid in the trust domain, but not in the server Envoy's SAN list.
    other = SpiffeId.parse("spiffe://example.org/intruder")
    svidgate.workloads = (*svidgate.workloads, Workload(other, (Selector.parse("envoy:node_id:intruder"),)))
    await svidgate.stop()
    svidgate.rotate()
    await svidgate.start()
    async with server_envoy(svidgate, backend.server_address[1], tmp_path) as server:
        port = server.listener_port("ingress")
        async with client_envoy(svidgate, port, tmp_path, name="intruder", node_id="intruder") as intruder:
            status, _ = await request(intruder)
            assert status == 503  # the TLS handshake fails: upstream connect error
            assert not backend.seen  # type: ignore[attr-defined]
            assert sum(server.stats("ssl.fail_verify_san").values()) >= 1


async def test_federated_trust_domain_accepted_through_all(
    svidgate: Svidgate, backend: http.server.ThreadingHTTPServer, sock_dir: Path, tmp_path: Path
) -> None:
    # partner.test has its own svidgate; each side federates with the other (bundles exchanged).
    partner = Svidgate(
        PARTNER_TD, (Workload(PARTNER_CLIENT_ID, (Selector.parse("envoy:node_id:client"),)),), sock_dir
    )
    partner.federated[TD] = svidgate.ca
    svidgate.federated[PARTNER_TD] = partner.ca
    svidgate.rotate()
    partner.rotate()
    await partner.start()
    try:
        async with (
            server_envoy(svidgate, backend.server_address[1], tmp_path) as server,
            client_envoy(partner, server.listener_port("ingress"), tmp_path, name="partner") as client,
        ):
            status, _ = await request(client)
            assert status == 200
            assert xfcc_uri(backend.seen[-1]) == str(PARTNER_CLIENT_ID)  # type: ignore[attr-defined]
            # Federation withdrawn: ALL loses partner.test and the next handshake is refused.
            del svidgate.federated[PARTNER_TD]
            svidgate.rotate()
            await eventually(
                lambda: asyncio.to_thread(lambda: get(client.listener_port("egress"))[0] == 503),
                what="the server Envoy to stop accepting partner.test",
            )
            # Refused by the SPIFFE validator (no bundle for partner.test), not by the SAN match.
            assert sum(server.stats("ssl.fail_verify_error").values()) >= 1
    finally:
        await partner.stop()


def forged_svid(issuer: BuiltinCa, spiffe_id: SpiffeId) -> X509Svid:
    """A well-formed X.509-SVID for `spiffe_id` signed by `issuer`'s CA, whatever trust domain the ID names:
    what a federated partner's CA (compromised or malicious) can always produce."""
    authority = issuer.current
    assert authority.x509_key is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forger")]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.x509_key.public_key()),
            critical=False,
        )
        .sign(authority.x509_key, hashes.SHA256())
    )
    return X509Svid(spiffe_id, (cert,), key)


async def test_istio_rootca_refuses_a_partner_signed_own_domain_identity(
    backend: http.server.ThreadingHTTPServer, sock_dir: Path, tmp_path: Path
) -> None:
    # Issue 9 item 4: in Istio mode ROOTCA spans every trust domain. Pooled into one trusted_ca, a certificate
    # for spiffe://example.org/client signed by partner.test's CA passed (200, the backend saw the forged ID).
    own = Svidgate(TD, WORKLOADS, sock_dir, sds=SdsConfig(istio_compat=True))
    partner = Svidgate(
        PARTNER_TD, (Workload(PARTNER_CLIENT_ID, (Selector.parse("envoy:node_id:client"),)),), sock_dir
    )
    own.federated[PARTNER_TD] = partner.ca
    partner.federated[TD] = own.ca
    # The forger is a partner.test Envoy whose SVID names an example.org ID the server's SAN match allows.
    partner.workloads = (*partner.workloads, Workload(CLIENT_ID, (Selector.parse("envoy:node_id:forger"),)))
    own.rotate()
    partner.feed.publish(
        partner.snapshot(
            {
                PARTNER_CLIENT_ID: partner.ca.mint_x509_svid(PARTNER_CLIENT_ID, 3600),
                CLIENT_ID: forged_svid(partner.ca, CLIENT_ID),
            }
        )
    )
    seen: list[str] = backend.seen  # type: ignore[attr-defined]
    await own.start()
    await partner.start()
    try:
        async with server_envoy(
            own, backend.server_address[1], tmp_path, validation_context="ROOTCA"
        ) as server:
            port = server.listener_port("ingress")
            async with (
                client_envoy(own, port, tmp_path) as genuine,
                client_envoy(partner, port, tmp_path, name="partner") as genuine_partner,
                client_envoy(partner, port, tmp_path, name="forger", node_id="forger") as forger,
            ):
                assert (await request(genuine))[0] == 200
                assert xfcc_uri(seen[-1]) == str(CLIENT_ID)
                assert (await request(genuine_partner))[0] == 200
                assert xfcc_uri(seen[-1]) == str(PARTNER_CLIENT_ID)
                served = len(seen)
                assert (await request(forger))[0] == 503  # the TLS handshake is refused
                assert len(seen) == served  # the backend never saw the forged identity
                # Refused by the chain check against example.org's own roots, not by the SAN match.
                assert sum(server.stats("ssl.fail_verify_error").values()) >= 1
                assert sum(server.stats("ssl.fail_verify_san").values()) == 0
    finally:
        await partner.stop()
        await own.stop()


async def test_svidgate_restart_under_running_envoy(
    svidgate: Svidgate, backend: http.server.ThreadingHTTPServer, tmp_path: Path
) -> None:
    async with (
        server_envoy(svidgate, backend.server_address[1], tmp_path) as server,
        client_envoy(svidgate, server.listener_port("ingress"), tmp_path) as client,
    ):
        assert (await request(client))[0] == 200
        await svidgate.stop()
        # svidgate is gone: Envoy keeps serving with the secrets it has.
        for _ in range(3):
            assert (await request(client))[0] == 200
        # A new svidgate (fresh metrics, same socket path) with rotated SVIDs: both Envoys resubscribe.
        svidgate.metrics = Metrics(CollectorRegistry(), process_metrics=False)
        before = await asyncio.to_thread(cert_serials, client)
        svidgate.rotate()
        await svidgate.start()
        await eventually(
            lambda: (
                svidgate.sample("svidgate_sds_streams", api="sotw") >= 1
                and svidgate.sample("svidgate_sds_streams", api="delta") >= 1
            ),
            timeout=20,
            what="both Envoys to reconnect",
        )
        await eventually(
            lambda: asyncio.to_thread(lambda: cert_serials(client).isdisjoint(before)),
            what="the rotated SVID after resubscription",
        )
        assert (await request(client))[0] == 200


async def test_bad_secret_is_nacked_once_without_push_loop(
    svidgate: Svidgate, backend: http.server.ThreadingHTTPServer, tmp_path: Path
) -> None:
    async with (
        server_envoy(svidgate, backend.server_address[1], tmp_path) as server,
        client_envoy(svidgate, server.listener_port("ingress"), tmp_path) as client,
    ):
        assert (await request(client))[0] == 200
        pushes_before = svidgate.sample("svidgate_sds_pushes_total", resource="default")
        # The server's new SVID comes with a key that does not match its certificate.
        good = {w.spiffe_id: svidgate.ca.mint_x509_svid(w.spiffe_id, 3600) for w in svidgate.workloads}
        other = svidgate.ca.mint_x509_svid(SERVER_ID, 3600)
        broken = X509Svid(SERVER_ID, good[SERVER_ID].cert_chain, other.private_key)
        svidgate.feed.publish(svidgate.snapshot({**good, SERVER_ID: broken}))
        await eventually(
            lambda: svidgate.sample("svidgate_sds_nacks_total", resource="default") >= 1,
            what="the server Envoy to NACK the broken secret",
        )
        # Give a NACK loop every chance to show itself, then check it did not happen.
        await asyncio.sleep(1.0)
        assert svidgate.sample("svidgate_sds_nacks_total", resource="default") == 1
        # Exactly one push per Envoy for that snapshot (server: broken, client: its new good SVID).
        assert svidgate.sample("svidgate_sds_pushes_total", resource="default") == pushes_before + 2
        # The server Envoy keeps serving with its previous certificate.
        assert (await request(client))[0] == 200
        # A good SVID afterwards is pushed and accepted.
        svidgate.rotate()
        await eventually(
            lambda: svidgate.sample("svidgate_sds_acks_total", resource="default") >= 5,
            what="the good SVID to be ACKed",
        )
        assert svidgate.sample("svidgate_sds_nacks_total", resource="default") == 1
        assert (await request(client))[0] == 200
