"""Federated bundles: watched files, bundle endpoints (fake and a real HTTPS server), sequence numbers."""

from __future__ import annotations

import base64
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from svidgate.config import BundleEndpoint, FederationConfig
from svidgate.errors import BundleError, SourceError
from svidgate.identity.bundle import (
    MAX_BUNDLE_BYTES,
    Bundle,
    pem_bundle,
    public_key_to_jwk,
    spiffe_bundle_json,
)
from svidgate.identity.clock import FakeClock, system_clock
from svidgate.identity.sources.federation import (
    FIRST_RETRY,
    MIN_REFRESH,
    FederatedBundles,
    FileTooLargeError,
    WatchedFile,
    fetch_bundle,
    parse_bundle_document,
)
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from tests.support.ca import TestCA
from tests.support.files import replace_file

OWN = TrustDomain("example.org")
OTHER = TrustDomain("other.org")


@pytest.fixture
def other_ca() -> TestCA:
    return TestCA(OTHER)


def with_sequence(bundle: Bundle, sequence: int | None, refresh_hint: int | None = None) -> Bundle:
    return replace(bundle, sequence=sequence, refresh_hint=refresh_hint)


# -- documents -----------------------------------------------------------------------------------------


def test_parse_bundle_document_detects_the_format(other_ca: TestCA) -> None:
    bundle = other_ca.bundle()
    from_json = parse_bundle_document(OTHER, b"  \n" + spiffe_bundle_json(bundle))
    from_pem = parse_bundle_document(OTHER, pem_bundle(bundle))
    assert from_json.x509_authorities == from_pem.x509_authorities == bundle.x509_authorities
    assert from_json.jwt_authorities.keys() == bundle.jwt_authorities.keys()
    assert not from_pem.jwt_authorities
    with pytest.raises(BundleError):
        parse_bundle_document(OTHER, b"not a bundle")


# -- bundle files --------------------------------------------------------------------------------------


def file_federation(path: Path, clock: FakeClock) -> FederatedBundles:
    return FederatedBundles({OTHER: FederationConfig(bundle_file=path)}, clock, poll_interval=5)


def test_bundle_file_is_loaded_and_watched(tmp_path: Path, clock: FakeClock, other_ca: TestCA) -> None:
    path = tmp_path / "other.json"
    replace_file(path, spiffe_bundle_json(with_sequence(other_ca.bundle(), 1)))
    federation = file_federation(path, clock)
    assert federation.bundles() == {}
    assert federation.refresh({}) is True
    assert federation.bundles()[OTHER].sequence == 1
    assert federation.next_due() == clock() + 5
    assert federation.refresh({}) is False  # not due
    clock.advance(5)
    assert federation.refresh({}) is False  # due, unchanged
    replace_file(path, spiffe_bundle_json(with_sequence(other_ca.bundle(), 2)))
    clock.advance(5)
    assert federation.refresh({}) is True
    assert federation.bundles()[OTHER].sequence == 2


def test_bad_bundle_file_keeps_the_last_bundle(
    tmp_path: Path, clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "other.pem"
    replace_file(path, pem_bundle(other_ca.bundle()))
    federation = file_federation(path, clock)
    federation.refresh({})
    good = federation.bundles()[OTHER]
    replace_file(path, b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            clock.advance(5)
            assert federation.refresh({}) is False
        path.unlink()
        clock.advance(5)
        assert federation.refresh({}) is False
    assert federation.bundles()[OTHER] is good
    assert caplog.messages.count("bundle.update_rejected") == 1
    assert "federation.bundle_file_unreadable" in caplog.messages


def test_lower_sequence_is_ignored(
    tmp_path: Path, clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "other.json"
    replace_file(path, spiffe_bundle_json(with_sequence(other_ca.bundle(), 7)))
    federation = file_federation(path, clock)
    federation.refresh({})
    rotated = TestCA(OTHER)
    replace_file(path, spiffe_bundle_json(with_sequence(rotated.bundle(), 6)))
    clock.advance(5)
    with caplog.at_level(logging.WARNING):
        assert federation.refresh({}) is False
    assert federation.bundles()[OTHER].sequence == 7
    assert federation.bundles()[OTHER].x509_authorities == other_ca.bundle().x509_authorities
    (record,) = [r for r in caplog.records if r.getMessage() == "bundle.update_rejected"]
    assert record.fields["reason"] == "sequence_regressed"  # type: ignore[attr-defined]


# -- acceptance rules in the apply step (issue 9 item 5) -----------------------------------------------


class Rejections(list[tuple[TrustDomain, str]]):
    """A `BundleRejectionSink` that remembers what it was told."""

    def __call__(self, trust_domain: TrustDomain, reason: str) -> None:
        self.append((trust_domain, reason))


def rejected_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.fields for r in caplog.records if r.getMessage() == "bundle.update_rejected"]  # type: ignore[attr-defined]


WEAK_JWT = rsa.generate_private_key(65537, 1024).public_key()  # noqa: S505 - the weak key under test


def jwt_only(key: object, kid: str = "weak") -> bytes:
    return json.dumps({"keys": [{"use": "jwt-svid", "kid": kid, **public_key_to_jwk(key)}]}).encode()  # type: ignore[arg-type]


def with_x509(ca: TestCA, certificate: x509.Certificate) -> bytes:
    """`ca`'s bundle document with its X.509 authority replaced by `certificate`."""
    doc = json.loads(spiffe_bundle_json(ca.bundle()))
    der = base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()
    for key in doc["keys"]:
        if key["use"] == "x509-svid":
            key.clear()
            key.update({"use": "x509-svid", "kty": "EC", "x5c": [der]})
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        # The reported case: a bundle file whose only key is RSA-1024 dropped the good keys (tokens 401).
        (lambda ca: jwt_only(WEAK_JWT), "no_usable_authority"),
        (
            lambda ca: spiffe_bundle_json(Bundle(OTHER, x509_authorities=(ca.certificate,))),
            "no_usable_jwt_authority",
        ),
        (
            lambda ca: with_x509(ca, ca.create_x509_certificate("spiffe://other.org/leaf")[0]),
            "no_usable_x509_authority",
        ),
        (lambda ca: b'{"keys": []}', "no_usable_authority"),
        (lambda ca: b"{not json", "malformed"),
        (lambda ca: b" " * (MAX_BUNDLE_BYTES + 1), "too_large"),
    ],
    ids=["rsa-1024-jwt-only", "jwt-keys-gone", "leaf-as-x509-authority", "empty", "malformed", "over-1MiB"],
)
def test_rejected_file_update_keeps_the_last_good_bundle(
    tmp_path: Path,
    clock: FakeClock,
    other_ca: TestCA,
    caplog: pytest.LogCaptureFixture,
    update: Callable[[TestCA], bytes],
    reason: str,
) -> None:
    path = tmp_path / "other.json"
    replace_file(path, spiffe_bundle_json(other_ca.bundle()))
    sink = Rejections()
    federation = FederatedBundles({OTHER: FederationConfig(bundle_file=path)}, clock, on_rejected=sink)
    assert federation.refresh({}) is True
    good = federation.bundles()[OTHER]
    replace_file(path, update(other_ca))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # reported once per change, not once per poll
            clock.advance(5)
            assert federation.refresh({}) is False
    assert federation.bundles()[OTHER] is good
    assert sink == [(OTHER, reason)]
    (line,) = rejected_lines(caplog)
    assert line["trust_domain"] == "other.org"
    assert line["reason"] == reason
    assert line["kept_last"] is True


def test_rejected_endpoint_update_keeps_the_last_good_bundle(
    clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    fetch = FakeFetcher()
    weak_only = json.loads(spiffe_bundle_json(other_ca.bundle()))
    weak_only["keys"] = [k for k in weak_only["keys"] if k["use"] == "x509-svid"]
    weak_only["keys"].append({"use": "jwt-svid", "kid": "weak", **public_key_to_jwk(WEAK_JWT)})
    fetch.responses = [spiffe_bundle_json(other_ca.bundle()), json.dumps(weak_only).encode()]
    sink = Rejections()
    endpoint = BundleEndpoint("https://other.org/bundle", "https_web", refresh=100)
    federation = FederatedBundles(
        {OTHER: FederationConfig(bundle_endpoint=endpoint)}, clock, fetch=fetch, on_rejected=sink
    )
    federation.refresh({})
    good = federation.bundles()[OTHER]
    clock.advance(100)
    with caplog.at_level(logging.WARNING):
        assert federation.refresh({}) is False
    assert federation.bundles()[OTHER] is good
    assert dict(good.jwt_authorities) == dict(other_ca.bundle().jwt_authorities)
    assert sink == [(OTHER, "no_usable_jwt_authority")]
    (line,) = rejected_lines(caplog)
    assert line["origin"] == "https://other.org/bundle"
    assert "RSA key of 1024 bits is below the 2048-bit floor" in str(line["detail"])
    assert federation.next_due() == clock() + 100  # fetched fine: the normal schedule, no retry storm


def test_unusable_authorities_beside_good_ones_are_left_out_and_logged(
    tmp_path: Path, clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    doc = json.loads(spiffe_bundle_json(other_ca.bundle()))
    doc["keys"].append({"use": "jwt-svid", "kid": "weak", **public_key_to_jwk(WEAK_JWT)})
    path = tmp_path / "other.json"
    replace_file(path, json.dumps(doc).encode())
    sink = Rejections()
    federation = FederatedBundles({OTHER: FederationConfig(bundle_file=path)}, clock, on_rejected=sink)
    with caplog.at_level(logging.WARNING):
        assert federation.refresh({}) is True
    bundle = federation.bundles()[OTHER]
    assert dict(bundle.jwt_authorities) == dict(other_ca.bundle().jwt_authorities)
    assert sink == []  # the update was applied; only the weak key was not
    (line,) = [r.fields for r in caplog.records if r.getMessage() == "bundle.authority_rejected"]  # type: ignore[attr-defined]
    assert line["trust_domain"] == "other.org"
    assert line["reason"] == "keys[2] (jwt-svid 'weak'): RSA key of 1024 bits is below the 2048-bit floor"


def test_bundle_files_are_read_up_to_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b" " * (MAX_BUNDLE_BYTES + 1))
    with pytest.raises(FileTooLargeError, match="larger than 1048576 bytes"):
        WatchedFile(path).poll()
    path.write_bytes(b" " * MAX_BUNDLE_BYTES)
    watched = WatchedFile(path)
    assert watched.poll() == b" " * MAX_BUNDLE_BYTES


# -- bundle endpoints with a fake fetcher --------------------------------------------------------------


class FakeFetcher:
    def __init__(self) -> None:
        self.responses: list[bytes | Exception] = []
        self.calls = 0

    def __call__(self, endpoint: BundleEndpoint, bundles: Mapping[TrustDomain, Bundle]) -> bytes:
        self.calls += 1
        response = self.responses.pop(0)
        if isinstance(response, Exception):
            raise response
        return response


def endpoint_federation(clock: FakeClock, fetch: FakeFetcher, refresh: float = 300) -> FederatedBundles:
    endpoint = BundleEndpoint("https://other.org/bundle", "https_web", refresh=refresh)
    return FederatedBundles({OTHER: FederationConfig(bundle_endpoint=endpoint)}, clock, fetch=fetch)


def test_endpoint_refresh_hint_sets_the_next_fetch(clock: FakeClock, other_ca: TestCA) -> None:
    fetch = FakeFetcher()
    fetch.responses = [
        spiffe_bundle_json(with_sequence(other_ca.bundle(), 1, refresh_hint=60)),
        spiffe_bundle_json(with_sequence(other_ca.bundle(), 1, refresh_hint=1)),
        spiffe_bundle_json(with_sequence(other_ca.bundle(), 2)),
    ]
    federation = endpoint_federation(clock, fetch)
    assert federation.refresh({}) is True
    assert federation.next_due() == clock() + 60  # the hint, not the configured 300 s
    clock.advance(59)
    assert federation.refresh({}) is False
    assert fetch.calls == 1
    clock.advance(1)
    assert federation.refresh({}) is True  # same keys, new hint: a new Bundle value
    assert federation.next_due() == clock() + MIN_REFRESH  # a hint of 1 s is clamped
    clock.advance(MIN_REFRESH)
    assert federation.refresh({}) is True
    assert federation.next_due() == clock() + 300  # no hint: the configured refresh
    assert federation.bundles()[OTHER].sequence == 2


def test_endpoint_failure_keeps_the_last_bundle_and_backs_off(
    clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    fetch = FakeFetcher()
    good = spiffe_bundle_json(with_sequence(other_ca.bundle(), 3))
    fetch.responses = [good, SourceError("connection refused"), b"{not json", good]
    federation = endpoint_federation(clock, fetch, refresh=100)
    federation.refresh({})
    kept = federation.bundles()[OTHER]
    clock.advance(100)
    with caplog.at_level(logging.WARNING):
        assert federation.refresh({}) is False
        assert federation.next_due() == clock() + FIRST_RETRY
        clock.advance(FIRST_RETRY)
        assert federation.refresh({}) is False
        assert federation.next_due() == clock() + 2 * FIRST_RETRY
    assert federation.bundles()[OTHER] is kept
    assert caplog.messages.count("federation.fetch_failed") == 1  # connection refused
    assert caplog.messages.count("bundle.update_rejected") == 1  # answered, but not a bundle
    clock.advance(2 * FIRST_RETRY)
    assert federation.refresh({}) is False  # the same bundle again: nothing to publish
    assert federation.next_due() == clock() + 100


# -- a real HTTPS bundle endpoint on 127.0.0.1 ---------------------------------------------------------

ENDPOINT_ID = SpiffeId.parse("spiffe://example.org/bundle-endpoint")


class BundleServer:
    """An HTTPS server on 127.0.0.1:0 that serves `body` at any path.

    Its certificate is an X.509-SVID for `ENDPOINT_ID` (with the DNS SAN ``localhost`` too, for https_web)
    issued by an intermediate of `server_ca`, so the server sends leaf + intermediate and the client must
    build the path to the root it holds.
    """

    def __init__(self, server_ca: TestCA, tmp_path: Path) -> None:
        # Wall-clock validity: OpenSSL checks the certificates against real time, not a FakeClock.
        now = time.time()
        intermediate = server_ca.child_ca(not_before=now - 3600, not_after=now + 86400)
        svid = intermediate.create_x509_svid(
            ENDPOINT_ID, dns_names=["localhost"], not_before=now - 60, not_after=now + 3600
        )
        cert_file, key_file = tmp_path / "server.pem", tmp_path / "server_key.pem"
        cert_file.write_bytes(svid.cert_chain_pem())
        key_file.write_bytes(svid.private_key_pem())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self.body = b""
        self.status = 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def own_ca() -> TestCA:
    now = time.time()
    return TestCA(OWN, not_before=now - 3600, not_after=now + 86400)


@pytest.fixture
def server(own_ca: TestCA, tmp_path: Path) -> Iterator[BundleServer]:
    bundle_server = BundleServer(own_ca, tmp_path)
    try:
        yield bundle_server
    finally:
        bundle_server.stop()


def spiffe_endpoint(port: int, endpoint_id: SpiffeId = ENDPOINT_ID) -> BundleEndpoint:
    return BundleEndpoint(f"https://127.0.0.1:{port}/bundle", "https_spiffe", endpoint_id)


def test_https_spiffe_fetch_authenticates_the_endpoint_id(
    server: BundleServer, own_ca: TestCA, other_ca: TestCA
) -> None:
    server.body = spiffe_bundle_json(other_ca.bundle())
    data = fetch_bundle(spiffe_endpoint(server.port), {OWN: own_ca.bundle()})
    assert parse_bundle_document(OTHER, data).x509_authorities == other_ca.bundle().x509_authorities


def test_https_spiffe_rejects_another_spiffe_id(server: BundleServer, own_ca: TestCA) -> None:
    server.body = b"{}"
    wrong = SpiffeId.parse("spiffe://example.org/somebody-else")
    with pytest.raises(SourceError, match=r"presented spiffe://example\.org/bundle-endpoint, expected"):
        fetch_bundle(spiffe_endpoint(server.port, wrong), {OWN: own_ca.bundle()})


def test_https_spiffe_rejects_a_server_the_bundle_does_not_vouch_for(server: BundleServer) -> None:
    now = time.time()
    stranger = TestCA(OWN, not_before=now - 3600, not_after=now + 86400)
    with pytest.raises(SourceError, match="TLS failed"):
        fetch_bundle(spiffe_endpoint(server.port), {OWN: stranger.bundle()})


def test_https_spiffe_needs_a_bundle_for_the_endpoint_trust_domain(server: BundleServer) -> None:
    with pytest.raises(SourceError, match=r"no X\.509 authorities for example\.org"):
        fetch_bundle(spiffe_endpoint(server.port), {})


def test_https_web_with_ca_file(
    server: BundleServer, own_ca: TestCA, other_ca: TestCA, tmp_path: Path
) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pem_bundle(own_ca.bundle()))
    server.body = pem_bundle(other_ca.bundle())
    endpoint = BundleEndpoint(f"https://localhost:{server.port}/b", "https_web", ca_file=roots)
    assert fetch_bundle(endpoint, {}) == server.body
    # Without the private root, Web PKI (the system store) does not trust the server.
    with pytest.raises(SourceError, match="TLS failed"):
        fetch_bundle(replace(endpoint, ca_file=None), {})


def test_https_http_error_status(server: BundleServer, own_ca: TestCA) -> None:
    server.status = 404
    with pytest.raises(SourceError, match="HTTP 404"):
        fetch_bundle(spiffe_endpoint(server.port), {OWN: own_ca.bundle()})


def test_federation_over_https_end_to_end(server: BundleServer, own_ca: TestCA, other_ca: TestCA) -> None:
    server.body = spiffe_bundle_json(with_sequence(other_ca.bundle(), 5, refresh_hint=120))
    clock = FakeClock(system_clock())
    federation = FederatedBundles(
        {OTHER: FederationConfig(bundle_endpoint=spiffe_endpoint(server.port))}, clock, poll_interval=5
    )
    assert federation.refresh({OWN: own_ca.bundle()}) is True
    assert federation.bundles()[OTHER].sequence == 5
    assert federation.next_due() == clock() + 120
    server.body = spiffe_bundle_json(with_sequence(other_ca.bundle(), 4))  # a stale replica
    clock.advance(120)
    assert federation.refresh({OWN: own_ca.bundle()}) is False
    assert federation.bundles()[OTHER].sequence == 5
