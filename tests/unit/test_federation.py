"""Federated bundles: watched files, bundle endpoints (fake and a real HTTPS server), sequence numbers."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
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

from svidgate.config import BundleEndpoint, FederationConfig, parse_config
from svidgate.errors import BundleError, ConfigError, SourceError
from svidgate.identity.bundle import (
    MAX_BUNDLE_BYTES,
    Bundle,
    pem_bundle,
    public_key_to_jwk,
    spiffe_bundle_json,
)
from svidgate.identity.clock import FakeClock, system_clock
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.sources.federation import (
    FIRST_RETRY,
    MIN_REFRESH,
    UNKNOWN_KEY_FETCH_INTERVAL,
    FederatedBundles,
    FileTooLargeError,
    WatchedFile,
    fetch_bundle,
    parse_bundle_document,
)
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


async def test_parse_bundle_document_detects_the_format(other_ca: TestCA) -> None:
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


async def test_bundle_file_is_loaded_and_watched(tmp_path: Path, clock: FakeClock, other_ca: TestCA) -> None:
    path = tmp_path / "other.json"
    replace_file(path, spiffe_bundle_json(with_sequence(other_ca.bundle(), 1)))
    federation = file_federation(path, clock)
    assert federation.bundles() == {}
    assert await federation.refresh({}) is True
    assert federation.bundles()[OTHER].sequence == 1
    assert federation.next_due() == clock() + 5
    assert await federation.refresh({}) is False  # not due
    clock.advance(5)
    assert await federation.refresh({}) is False  # due, unchanged
    replace_file(path, spiffe_bundle_json(with_sequence(other_ca.bundle(), 2)))
    clock.advance(5)
    assert await federation.refresh({}) is True
    assert federation.bundles()[OTHER].sequence == 2


async def test_bad_bundle_file_keeps_the_last_bundle(
    tmp_path: Path, clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "other.pem"
    replace_file(path, pem_bundle(other_ca.bundle()))
    federation = file_federation(path, clock)
    await federation.refresh({})
    good = federation.bundles()[OTHER]
    replace_file(path, b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            clock.advance(5)
            assert await federation.refresh({}) is False
        path.unlink()
        clock.advance(5)
        assert await federation.refresh({}) is False
    assert federation.bundles()[OTHER] is good
    assert caplog.messages.count("bundle.update_rejected") == 1
    assert "federation.bundle_file_unreadable" in caplog.messages


async def test_lower_sequence_is_ignored(
    tmp_path: Path, clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "other.json"
    replace_file(path, spiffe_bundle_json(with_sequence(other_ca.bundle(), 7)))
    federation = file_federation(path, clock)
    await federation.refresh({})
    rotated = TestCA(OTHER)
    replace_file(path, spiffe_bundle_json(with_sequence(rotated.bundle(), 6)))
    clock.advance(5)
    with caplog.at_level(logging.WARNING):
        assert await federation.refresh({}) is False
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
async def test_rejected_file_update_keeps_the_last_good_bundle(
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
    assert await federation.refresh({}) is True
    good = federation.bundles()[OTHER]
    replace_file(path, update(other_ca))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # reported once per change, not once per poll
            clock.advance(5)
            assert await federation.refresh({}) is False
    assert federation.bundles()[OTHER] is good
    assert sink == [(OTHER, reason)]
    (line,) = rejected_lines(caplog)
    assert line["trust_domain"] == "other.org"
    assert line["reason"] == reason
    assert line["kept_last"] is True


async def test_rejected_endpoint_update_keeps_the_last_good_bundle(
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
    await federation.refresh({})
    good = federation.bundles()[OTHER]
    clock.advance(100)
    with caplog.at_level(logging.WARNING):
        assert await federation.refresh({}) is False
    assert federation.bundles()[OTHER] is good
    assert dict(good.jwt_authorities) == dict(other_ca.bundle().jwt_authorities)
    assert sink == [(OTHER, "no_usable_jwt_authority")]
    (line,) = rejected_lines(caplog)
    assert line["origin"] == "https://other.org/bundle"
    assert "RSA key of 1024 bits is below the 2048-bit floor" in str(line["detail"])
    assert federation.next_due() == clock() + 100  # fetched fine: the normal schedule, no retry storm


async def test_unusable_authorities_beside_good_ones_are_left_out_and_logged(
    tmp_path: Path, clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    doc = json.loads(spiffe_bundle_json(other_ca.bundle()))
    doc["keys"].append({"use": "jwt-svid", "kid": "weak", **public_key_to_jwk(WEAK_JWT)})
    path = tmp_path / "other.json"
    replace_file(path, json.dumps(doc).encode())
    sink = Rejections()
    federation = FederatedBundles({OTHER: FederationConfig(bundle_file=path)}, clock, on_rejected=sink)
    with caplog.at_level(logging.WARNING):
        assert await federation.refresh({}) is True
    bundle = federation.bundles()[OTHER]
    assert dict(bundle.jwt_authorities) == dict(other_ca.bundle().jwt_authorities)
    assert sink == []  # the update was applied; only the weak key was not
    (line,) = [r.fields for r in caplog.records if r.getMessage() == "bundle.authority_rejected"]  # type: ignore[attr-defined]
    assert line["trust_domain"] == "other.org"
    assert line["reason"] == "keys[2] (jwt-svid 'weak'): RSA key of 1024 bits is below the 2048-bit floor"


async def test_bundle_files_are_read_up_to_the_cap(tmp_path: Path) -> None:
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

    async def __call__(self, endpoint: BundleEndpoint, bundles: Mapping[TrustDomain, Bundle]) -> bytes:
        self.calls += 1
        response = self.responses.pop(0)
        if isinstance(response, Exception):
            raise response
        return response


def endpoint_federation(clock: FakeClock, fetch: FakeFetcher, refresh: float = 300) -> FederatedBundles:
    endpoint = BundleEndpoint("https://other.org/bundle", "https_web", refresh=refresh)
    return FederatedBundles({OTHER: FederationConfig(bundle_endpoint=endpoint)}, clock, fetch=fetch)


async def test_endpoint_refresh_hint_sets_the_next_fetch(clock: FakeClock, other_ca: TestCA) -> None:
    fetch = FakeFetcher()
    fetch.responses = [
        spiffe_bundle_json(with_sequence(other_ca.bundle(), 1, refresh_hint=60)),
        spiffe_bundle_json(with_sequence(other_ca.bundle(), 1, refresh_hint=1)),
        spiffe_bundle_json(with_sequence(other_ca.bundle(), 2)),
    ]
    federation = endpoint_federation(clock, fetch)
    assert await federation.refresh({}) is True
    assert federation.next_due() == clock() + 60  # the hint, not the configured 300 s
    clock.advance(59)
    assert await federation.refresh({}) is False
    assert fetch.calls == 1
    clock.advance(1)
    assert await federation.refresh({}) is True  # same keys, new hint: a new Bundle value
    assert federation.next_due() == clock() + MIN_REFRESH  # a hint of 1 s is clamped
    clock.advance(MIN_REFRESH)
    assert await federation.refresh({}) is True
    assert federation.next_due() == clock() + 300  # no hint: the configured refresh
    assert federation.bundles()[OTHER].sequence == 2


async def test_endpoint_failure_keeps_the_last_bundle_and_backs_off(
    clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    fetch = FakeFetcher()
    good = spiffe_bundle_json(with_sequence(other_ca.bundle(), 3))
    fetch.responses = [good, SourceError("connection refused"), b"{not json", good]
    federation = endpoint_federation(clock, fetch, refresh=100)
    await federation.refresh({})
    kept = federation.bundles()[OTHER]
    clock.advance(100)
    with caplog.at_level(logging.WARNING):
        assert await federation.refresh({}) is False
        assert federation.next_due() == clock() + FIRST_RETRY
        clock.advance(FIRST_RETRY)
        assert await federation.refresh({}) is False
        assert federation.next_due() == clock() + 2 * FIRST_RETRY
    assert federation.bundles()[OTHER] is kept
    assert caplog.messages.count("federation.fetch_failed") == 1  # connection refused
    assert caplog.messages.count("bundle.update_rejected") == 1  # answered, but not a bundle
    clock.advance(2 * FIRST_RETRY)
    assert await federation.refresh({}) is False  # the same bundle again: nothing to publish
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
        #: When set, sent as the whole response (status line, headers and body) instead of `body`.
        self.raw: bytes | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if server.raw is not None:
                    self.wfile.write(server.raw)
                    return
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


async def test_https_spiffe_fetch_authenticates_the_endpoint_id(
    server: BundleServer, own_ca: TestCA, other_ca: TestCA
) -> None:
    server.body = spiffe_bundle_json(other_ca.bundle())
    data = await fetch_bundle(spiffe_endpoint(server.port), {OWN: own_ca.bundle()})
    assert parse_bundle_document(OTHER, data).x509_authorities == other_ca.bundle().x509_authorities


async def test_https_spiffe_rejects_another_spiffe_id(server: BundleServer, own_ca: TestCA) -> None:
    server.body = b"{}"
    wrong = SpiffeId.parse("spiffe://example.org/somebody-else")
    with pytest.raises(SourceError, match=r"presented spiffe://example\.org/bundle-endpoint, expected"):
        await fetch_bundle(spiffe_endpoint(server.port, wrong), {OWN: own_ca.bundle()})


async def test_https_spiffe_rejects_a_server_the_bundle_does_not_vouch_for(server: BundleServer) -> None:
    now = time.time()
    stranger = TestCA(OWN, not_before=now - 3600, not_after=now + 86400)
    with pytest.raises(SourceError, match="TLS failed"):
        await fetch_bundle(spiffe_endpoint(server.port), {OWN: stranger.bundle()})


async def test_https_spiffe_needs_a_bundle_for_the_endpoint_trust_domain(server: BundleServer) -> None:
    with pytest.raises(SourceError, match=r"no X\.509 authorities for example\.org"):
        await fetch_bundle(spiffe_endpoint(server.port), {})


async def test_https_web_with_ca_file(
    server: BundleServer, own_ca: TestCA, other_ca: TestCA, tmp_path: Path
) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pem_bundle(own_ca.bundle()))
    server.body = pem_bundle(other_ca.bundle())
    endpoint = BundleEndpoint(f"https://localhost:{server.port}/b", "https_web", ca_file=roots)
    assert await fetch_bundle(endpoint, {}) == server.body
    # Without the private root, Web PKI (the system store) does not trust the server.
    with pytest.raises(SourceError, match="TLS failed"):
        await fetch_bundle(replace(endpoint, ca_file=None), {})


async def test_https_http_error_status(server: BundleServer, own_ca: TestCA) -> None:
    server.status = 404
    with pytest.raises(SourceError, match="HTTP 404"):
        await fetch_bundle(spiffe_endpoint(server.port), {OWN: own_ca.bundle()})


async def test_federation_over_https_end_to_end(
    server: BundleServer, own_ca: TestCA, other_ca: TestCA
) -> None:
    server.body = spiffe_bundle_json(with_sequence(other_ca.bundle(), 5, refresh_hint=120))
    clock = FakeClock(system_clock())
    federation = FederatedBundles(
        {OTHER: FederationConfig(bundle_endpoint=spiffe_endpoint(server.port))}, clock, poll_interval=5
    )
    assert await federation.refresh({OWN: own_ca.bundle()}) is True
    assert federation.bundles()[OTHER].sequence == 5
    assert federation.next_due() == clock() + 120
    server.body = spiffe_bundle_json(with_sequence(other_ca.bundle(), 4))  # a stale replica
    clock.advance(120)
    assert await federation.refresh({OWN: own_ca.bundle()}) is False
    assert federation.bundles()[OTHER].sequence == 5


# -- response framing (a real TLS server sends the bytes) ----------------------------------------------


def _chunked(data: bytes, size: int) -> bytes:
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-Trailer: t\r\n\r\n"


async def test_fetch_reads_chunked_and_close_delimited_bodies(
    server: BundleServer, own_ca: TestCA, other_ca: TestCA
) -> None:
    document = spiffe_bundle_json(other_ca.bundle())
    # Go's net/http (SPIRE's bundle endpoint) sends bodies over 2 KiB chunked.
    server.raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(document, 700)
    assert await fetch_bundle(spiffe_endpoint(server.port), {OWN: own_ca.bundle()}) == document
    server.raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + document
    assert await fetch_bundle(spiffe_endpoint(server.port), {OWN: own_ca.bundle()}) == document


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n", "not an HTTP/1.1 response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n", "bundle larger than 1048576 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "closed before the response was complete"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunked body"),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", "longer than 65536 bytes"),
        (b"HTTP/1.1 302 Found\r\nLocation: https://elsewhere/\r\n\r\n", "HTTP 302 Found"),
    ],
)
async def test_fetch_refuses_bad_responses_with_one_precise_error(
    server: BundleServer, own_ca: TestCA, raw: bytes, error: str
) -> None:
    server.raw = raw
    with pytest.raises(SourceError, match=re.escape(error)):
        await fetch_bundle(spiffe_endpoint(server.port), {OWN: own_ca.bundle()})


# -- one task per trust domain, each fetch under a total deadline --------------------------------------


async def test_a_hanging_partner_delays_nobody_else_and_fails_at_its_deadline(
    clock: FakeClock, other_ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    slow, fast = TrustDomain("slow.org"), OTHER
    released = asyncio.Event()
    fetched: list[str] = []

    async def fetch(endpoint: BundleEndpoint, bundles: Mapping[TrustDomain, Bundle]) -> bytes:
        fetched.append(endpoint.url)
        if "slow" in endpoint.url:
            await released.wait()  # never, within its deadline
        return spiffe_bundle_json(other_ca.bundle())

    federation = FederatedBundles(
        {
            slow: FederationConfig(
                bundle_endpoint=BundleEndpoint("https://slow.org/b", "https_web", timeout=0.2)
            ),
            fast: FederationConfig(bundle_endpoint=BundleEndpoint("https://other.org/b", "https_web")),
        },
        clock,
        fetch=fetch,
    )
    changed = asyncio.Event()
    with caplog.at_level(logging.WARNING):
        task = asyncio.create_task(federation.run(dict, changed.set))
        try:
            await asyncio.wait_for(changed.wait(), 10)
            # The fast partner's bundle arrived while the slow one's fetch still hangs.
            assert set(federation.bundles()) == {fast}
            while "federation.fetch_failed" not in caplog.messages:
                await asyncio.sleep(0.01)
            statuses = {s.trust_domain: s for s in federation.statuses()}
            assert statuses["slow.org"].up is False
            assert "no complete response within the 0.2s deadline" in statuses["slow.org"].error
            assert dict(statuses["slow.org"].failures) == {"fetch": 1}
            assert statuses["other.org"].up is True
            # "Fetch this trust domain now" wakes only that trust domain's task.
            calls = len(fetched)
            federation.fetch_now(fast)
            while len(fetched) == calls:
                await asyncio.sleep(0.01)
            assert fetched[calls:] == ["https://other.org/b"]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


# -- bundle_endpoint.timeout ---------------------------------------------------------------------------


def _endpoint_config(extra: str) -> str:
    return (
        "trust_domain: example.org\nfederation:\n  other.org:\n    bundle_endpoint:\n"
        f"      url: https://other.org/bundle\n      profile: https_web\n{extra}"
    )


def test_the_fetch_deadline_defaults_to_10s_and_is_configurable() -> None:
    (default,) = parse_config(_endpoint_config("")).federation.values()
    assert default.bundle_endpoint is not None
    assert default.bundle_endpoint.timeout == 10.0
    (short,) = parse_config(_endpoint_config("      timeout: 500ms\n")).federation.values()
    assert short.bundle_endpoint is not None
    assert short.bundle_endpoint.timeout == 0.5


@pytest.mark.parametrize(
    ("value", "error"),
    [("0s", "federation.other.org.bundle_endpoint.timeout"), ("6m", "timeout: at most 300s")],
)
def test_the_fetch_deadline_is_validated(value: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(_endpoint_config(f"      timeout: {value}\n"))


# -- out-of-schedule fetches for unknown keys, and reloads ------------------------------------------------


async def test_unknown_key_fetches_are_shared_and_rate_limited_per_trust_domain(
    clock: FakeClock, other_ca: TestCA, tmp_path: Path
) -> None:
    fetch = FakeFetcher()
    document = spiffe_bundle_json(with_sequence(other_ca.bundle(), 1, refresh_hint=3600))
    fetch.responses = [document] * 3
    file_only = TrustDomain("file.org")
    replace_file(tmp_path / "file.json", spiffe_bundle_json(TestCA(file_only).bundle()))
    endpoint = BundleEndpoint("https://other.org/bundle", "https_web")
    federation = FederatedBundles(
        {
            OTHER: FederationConfig(bundle_endpoint=endpoint),
            file_only: FederationConfig(bundle_file=tmp_path / "file.json"),
        },
        clock,
        fetch=fetch,
    )
    assert federation.request_fetch(OTHER) is None  # not running: nothing would do it
    changes: list[int] = []
    runner = asyncio.create_task(federation.run(lambda: {}, lambda: changes.append(1)))
    try:
        while fetch.calls < 1:  # the scheduled first fetch
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        first = federation.request_fetch(OTHER)
        assert first is not None
        assert federation.request_fetch(OTHER) is first  # shared while it has not run
        assert await asyncio.wait_for(asyncio.wrap_future(first), 5) is False  # same bundle: no change
        assert fetch.calls == 2
        assert federation.request_fetch(OTHER) is None  # within the interval
        clock.advance(UNKNOWN_KEY_FETCH_INTERVAL)
        again = federation.request_fetch(OTHER)
        assert again is not None
        await asyncio.wait_for(asyncio.wrap_future(again), 5)
        assert fetch.calls == 3
        # Never for a trust domain without an endpoint, nor one that is not federated.
        assert federation.request_fetch(file_only) is None
        assert federation.request_fetch(TrustDomain("nobody.org")) is None
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_set_federation_keeps_unchanged_drops_removed_and_starts_new(
    clock: FakeClock, other_ca: TestCA, tmp_path: Path
) -> None:
    replace_file(tmp_path / "other.json", spiffe_bundle_json(other_ca.bundle()))
    third = TrustDomain("third.org")
    replace_file(tmp_path / "third.json", spiffe_bundle_json(TestCA(third).bundle()))
    other_cfg = FederationConfig(bundle_file=tmp_path / "other.json")
    federation = FederatedBundles({OTHER: other_cfg}, clock)
    changes: list[int] = []
    runner = asyncio.create_task(federation.run(lambda: {}, lambda: changes.append(1)))
    try:
        while not changes:
            await asyncio.sleep(0)
        kept = federation.bundles()[OTHER]
        # Adding: the new trust domain's task reads at once; the unchanged one keeps its bundle object.
        assert (
            federation.set_federation(
                {OTHER: other_cfg, third: FederationConfig(bundle_file=tmp_path / "third.json")}
            )
            is False
        )
        while len(changes) < 2:
            await asyncio.sleep(0)
        assert set(federation.bundles()) == {OTHER, third}
        assert federation.bundles()[OTHER] is kept
        # Removing: gone before set_federation returns, and it says so (the owner publishes).
        assert (
            federation.set_federation({third: FederationConfig(bundle_file=tmp_path / "third.json")}) is True
        )
        assert set(federation.bundles()) == {third}
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
