"""The SPIFFE bundle endpoint server on a real TLS socket, read by svidgate's own federation client (the code
that fetches partners' endpoints), by the stdlib `ssl`, and by PyJWT for the OIDC JWKS."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from svidgate.config import BundleEndpoint, BundleEndpointServerConfig
from svidgate.errors import SourceError
from svidgate.identity.bundle import Bundle
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid
from svidgate.sources.bundle_server import BundleEndpointServer, BundleSequence
from svidgate.sources.federation import fetch_bundle, parse_bundle_document
from tests.support.ca import TestCA

TD = TrustDomain("example.org")
ENDPOINT_ID = SpiffeId.parse("spiffe://example.org/bundle-endpoint")
REAL_NOW = time.time()
ISSUER = "https://oidc.example.org/tenant"


def real_ca() -> TestCA:
    # Real TLS stacks check validity against the wall clock, not an injected one.
    return TestCA(TD, not_before=REAL_NOW - 3600, not_after=REAL_NOW + 86400)


def endpoint_svid(ca: TestCA) -> X509Svid:
    return ca.create_x509_svid(ENDPOINT_ID, not_before=REAL_NOW - 60, not_after=REAL_NOW + 3600)


def snapshot(ca: TestCA, svid: X509Svid, version: int, **bundle_options: object) -> IdentitySnapshot:
    bundle = ca.bundle(**bundle_options)  # type: ignore[arg-type]
    return IdentitySnapshot(svids={ENDPOINT_ID: svid}, bundles={TD: bundle}, version=version)


def spiffe_client(port: int) -> BundleEndpoint:
    return BundleEndpoint(f"https://127.0.0.1:{port}/", "https_spiffe", ENDPOINT_ID)


async def fetch(port: int, anchors: dict[TrustDomain, Bundle]) -> Bundle:
    data = await fetch_bundle(spiffe_client(port), anchors)
    return parse_bundle_document(TD, data)


def peer_certificate(port: int, cafile_pem: bytes) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=cafile_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def https_get(port: int, path: str, cafile_pem: bytes, method: str = "GET") -> tuple[int, bytes]:
    import http.client

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=cafile_pem.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def root_pem(ca: TestCA) -> bytes:
    return ca.certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
async def spiffe_server(tmp_path: Path) -> AsyncIterator[tuple[BundleEndpointServer, SnapshotFeed, TestCA]]:
    ca = real_ca()
    feed = SnapshotFeed(snapshot(ca, endpoint_svid(ca), 1, refresh_hint=60))
    settings = BundleEndpointServerConfig(spiffe_id=ENDPOINT_ID, oidc_issuer=ISSUER)
    server = BundleEndpointServer(
        "127.0.0.1", 0, settings, TD, feed, BundleSequence(tmp_path / "sequence.json")
    )
    await server.start()
    try:
        yield server, feed, ca
    finally:
        await server.stop()


async def test_https_spiffe_serves_the_bundle_with_sequence_and_rotates_its_svid(
    spiffe_server: tuple[BundleEndpointServer, SnapshotFeed, TestCA],
) -> None:
    server, feed, ca = spiffe_server
    first = await fetch(server.port, ca.bundles())
    assert first.x509_authorities == (ca.certificate,)
    assert dict(first.jwt_authorities) == dict(ca.bundle().jwt_authorities)
    assert first.sequence == 1
    assert first.refresh_hint == 60

    # The source rotates the endpoint's SVID and adds a JWT key: new handshakes present the new SVID, the
    # document carries the new key under a higher sequence, without any restart.
    new_svid = endpoint_svid(ca)
    extra = real_ca()
    feed.publish(snapshot(ca, new_svid, 2, refresh_hint=60, extra_jwt={"next": extra.jwt_key.public_key()}))
    await asyncio.sleep(0)  # let the server's follower see the snapshot
    second = await fetch(server.port, ca.bundles())
    assert "next" in second.jwt_authorities
    assert second.sequence == 2
    presented = await asyncio.to_thread(peer_certificate, server.port, root_pem(ca))
    assert presented == new_svid.leaf

    # An unchanged bundle keeps its sequence (a new snapshot for an SVID alone is not a bundle change).
    feed.publish(snapshot(ca, new_svid, 3, refresh_hint=60, extra_jwt={"next": extra.jwt_key.public_key()}))
    await asyncio.sleep(0)
    assert (await fetch(server.port, ca.bundles())).sequence == 2


async def test_only_get_and_only_the_documents(
    spiffe_server: tuple[BundleEndpointServer, SnapshotFeed, TestCA],
) -> None:
    server, _, ca = spiffe_server
    status, _ = await asyncio.to_thread(https_get, server.port, "/", root_pem(ca), "POST")
    assert status == 405
    status, _ = await asyncio.to_thread(https_get, server.port, "/nothing", root_pem(ca))
    assert status == 404


async def test_oidc_discovery_and_jwks_verify_a_jwt_svid(
    spiffe_server: tuple[BundleEndpointServer, SnapshotFeed, TestCA],
) -> None:
    server, _, ca = spiffe_server
    status, body = await asyncio.to_thread(
        https_get, server.port, "/tenant/.well-known/openid-configuration", root_pem(ca)
    )
    assert status == 200
    discovery = json.loads(body)
    assert discovery["issuer"] == ISSUER
    assert discovery["jwks_uri"] == ISSUER + "/keys"
    assert discovery["response_types_supported"] == ["id_token"]
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]
    status, body = await asyncio.to_thread(https_get, server.port, "/tenant/keys", root_pem(ca))
    assert status == 200
    jwks = jwt.PyJWKSet.from_dict(json.loads(body))
    token = ca.create_jwt_svid("spiffe://example.org/web", ["vault"], now=REAL_NOW)
    key = next(k for k in jwks.keys if k.key_id == ca.jwt_kid)
    claims = jwt.decode(token, key=key, algorithms=["ES256"], audience="vault")
    assert claims["sub"] == "spiffe://example.org/web"
    # The JWKS carries no X.509 authority: a relying party must never verify tokens with a CA key.
    assert all("x5c" not in k for k in json.loads(body)["keys"])


def test_sequence_survives_a_restart_and_only_grows(tmp_path: Path) -> None:
    path = tmp_path / "bundle_endpoint" / "sequence.json"
    ca = TestCA(TD)
    first = BundleSequence(path)
    assert first.for_bundle(ca.bundle()) == 1
    assert first.for_bundle(ca.bundle()) == 1
    rotated = ca.bundle(extra_jwt={"k2": TestCA(TD).jwt_key.public_key()})
    assert first.for_bundle(rotated) == 2
    assert path.stat().st_mode & 0o777 == 0o600
    # A restart: the same bundle keeps its number, a different one gets a higher one, never a lower one.
    again = BundleSequence(path)
    assert again.for_bundle(rotated) == 2
    assert again.for_bundle(ca.bundle()) == 3
    # A source that numbers its bundles itself (the built-in CA) is never served below its own number.
    assert BundleSequence(None).for_bundle(ca.bundle(sequence=41)) == 41


async def test_https_web_presents_the_files_and_reloads_them(tmp_path: Path) -> None:
    web_ca = real_ca()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"

    def write_pair() -> x509.Certificate:
        cert, key = web_ca.create_x509_certificate(
            None, dns_names=["bundle.example.org"], not_before=REAL_NOW - 60, not_after=REAL_NOW + 3600
        )
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert

    first = write_pair()
    ca = TestCA(TD)
    feed = SnapshotFeed(IdentitySnapshot(bundles={TD: ca.bundle()}, version=1))
    settings = BundleEndpointServerConfig(profile="https_web", cert_file=cert_file, key_file=key_file)
    server = BundleEndpointServer(
        "127.0.0.1", 0, settings, TD, feed, BundleSequence(None), poll_interval=0.05
    )
    await server.start()
    try:
        assert await asyncio.to_thread(peer_certificate, server.port, root_pem(web_ca)) == first
        second = write_pair()
        for _ in range(200):
            presented = await asyncio.to_thread(peer_certificate, server.port, root_pem(web_ca))
            if presented == second:
                break
            await asyncio.sleep(0.05)
        assert presented == second
        # A half-written renewal (a key that does not match the certificate) keeps the last good pair.
        key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        await asyncio.sleep(0.2)
        assert await asyncio.to_thread(peer_certificate, server.port, root_pem(web_ca)) == second
    finally:
        await server.stop()


async def test_idle_and_slow_clients_cannot_hold_the_endpoint(tmp_path: Path) -> None:
    ca = real_ca()
    feed = SnapshotFeed(snapshot(ca, endpoint_svid(ca), 1))
    settings = BundleEndpointServerConfig(spiffe_id=ENDPOINT_ID)
    server = BundleEndpointServer(
        "127.0.0.1",
        0,
        settings,
        TD,
        feed,
        BundleSequence(None),
        max_connections=3,
        connection_lifetime=0.5,
        handshake_timeout=0.3,
    )
    await server.start()
    loop = asyncio.get_running_loop()
    hogs: list[socket.socket] = []
    try:
        # Three clients that connect and never finish a TLS handshake (one trickles bytes, slow-loris style).
        for _ in range(3):
            hog = socket.create_connection(("127.0.0.1", server.port))
            hog.setblocking(False)
            hogs.append(hog)
        await loop.sock_sendall(hogs[0], b"\x16")
        await asyncio.sleep(0.05)
        # A fourth connection is closed as soon as it is accepted: the slots are full.
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.setblocking(False)
        try:
            assert await asyncio.wait_for(loop.sock_recv(extra, 16), 2.0) == b""
        finally:
            extra.close()
        # The hogs are cut off (handshake timeout), their slots come back within the connection lifetime,
        # and a real fetch succeeds again.
        for hog in hogs:
            assert await asyncio.wait_for(loop.sock_recv(hog, 16), 2.0) == b""
        for _ in range(50):
            try:
                bundle = await fetch(server.port, ca.bundles())
                break
            except SourceError:
                await asyncio.sleep(0.1)
        assert bundle.x509_authorities == (ca.certificate,)
    finally:
        for hog in hogs:
            hog.close()
        await server.stop()


async def test_malformed_requests_get_400_and_one_line_without_traceback(
    spiffe_server: tuple[BundleEndpointServer, SnapshotFeed, TestCA], caplog: pytest.LogCaptureFixture
) -> None:
    server, _, ca = spiffe_server
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=root_pem(ca).decode())
    caplog.set_level(logging.DEBUG)
    for request in (b"\x00\x01garbage\r\n\r\n", b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
        writer.write(request)
        await writer.drain()
        assert (await reader.read(64)).startswith(b"HTTP/1.0 400 ")
        writer.close()
    await asyncio.sleep(0.05)
    lines = [r for r in caplog.records if r.name.startswith("svidgate.sources.bundle_server.http")]
    assert [r.getMessage() for r in lines] == ["bundle_endpoint.bad_request"] * 2
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
