"""Trust bundles of federated trust domains: watched files and SPIFFE bundle endpoints.

A `FederatedBundles` keeps one bundle per configured foreign trust domain and is driven by its owner (a
source): `refresh()` does whatever is due at the clock's current time (re-read changed files, fetch endpoints
whose refresh time has come) and says whether any bundle changed; `next_due()` says when to call it again.
Nothing here publishes snapshots; the source merges `bundles()` into its own.

Rules (SPIFFE_Federation.md):

- A new bundle passes `bundle_update_rejection` before it replaces the one held: no lower
  ``spiffe_sequence`` (sequence numbers only go up, so a lower one is a stale replica or a replay), and no
  trust domain left without a usable authority for a use it had. A rejected update keeps the last good
  bundle and is reported once (log ``bundle.update_rejected`` and the owner's rejection sink).
- The next fetch happens after the bundle's ``spiffe_refresh_hint`` (clamped to [10 s, 1 day]), or after the
  endpoint's configured `refresh` when the bundle has no hint.
- A failed fetch or a bad file keeps the last good bundle; failures are retried with a backoff that starts at
  10 s and never exceeds the refresh interval. Bundle files, like endpoint bodies, are read up to 1 MiB.

Blocking I/O (file reads, HTTPS) happens inside `refresh()`; an asyncio owner runs it in a worker thread.
Never imports gRPC.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from svidgate.config import BundleEndpoint, FederationConfig
from svidgate.errors import BundleError, SourceError, X509SvidError
from svidgate.identity.bundle import (
    MAX_BUNDLE_BYTES,
    Bundle,
    BundleRejection,
    BundleRejectionSink,
    bundle_update_rejection,
    parse_pem_bundle,
    parse_spiffe_bundle,
    pem_bundle,
    report_bundle_rejection,
    report_rejected_authorities,
)
from svidgate.identity.clock import Clock
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import spiffe_id_of

log = logging.getLogger(__name__)

MIN_REFRESH = 10.0
MAX_REFRESH = 86400.0
FIRST_RETRY = 10.0
FETCH_TIMEOUT = 10.0
RACY_SECONDS = 2.0

#: Fetches a bundle endpoint: (endpoint, trust bundles to authenticate https_spiffe with) -> document bytes.
Fetcher = Callable[[BundleEndpoint, Mapping[TrustDomain, Bundle]], bytes]


def parse_bundle_document(trust_domain: TrustDomain, data: bytes) -> Bundle:
    """Parse a bundle as a SPIFFE bundle (JSON) when it looks like JSON, else as PEM certificates.

    Raises:
        BundleError: the document is neither.
    """
    if data.lstrip()[:1] == b"{":
        return parse_spiffe_bundle(trust_domain, data)
    return parse_pem_bundle(trust_domain, data)


def same_bundle(a: Bundle | None, b: Bundle | None) -> bool:
    """Whether two bundles carry the same authorities, sequence and hint (Bundle has identity equality)."""
    if a is None or b is None:
        return a is b
    return (
        a.trust_domain == b.trust_domain
        and a.x509_authorities == b.x509_authorities
        and a.sequence == b.sequence
        and a.refresh_hint == b.refresh_hint
        and dict(a.jwt_authorities).keys() == dict(b.jwt_authorities).keys()
        and all(a.jwt_authorities[k] == b.jwt_authorities[k] for k in a.jwt_authorities)
    )


class FileTooLargeError(SourceError):
    """A watched file is larger than its cap (bundle files: `MAX_BUNDLE_BYTES`, as endpoint bodies)."""


class WatchedFile:
    """A file whose content is re-read when its metadata changes and reported only when its bytes change.

    Args:
        path: the file.
        max_bytes: the largest content accepted; more is never read into memory (at most max_bytes + 1).
    """

    def __init__(self, path: Path, max_bytes: int = MAX_BUNDLE_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._stat_key: tuple[int, int, int, int] | None = None
        self._digest: bytes | None = None

    def poll(self) -> bytes | None:
        """Return the file's content when it differs from the last content returned, else None.

        Raises:
            OSError: the file cannot be read (the next poll tries again).
            FileTooLargeError: the new content is over `max_bytes` (reported once per change, like content).
        """
        st = os.stat(self.path)
        key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        if key == self._stat_key:
            return None
        with open(self.path, "rb") as file:
            data = file.read(self.max_bytes + 1)
        digest = hashlib.sha256(data).digest()
        # File systems stamp mtimes with a coarse clock: a second write within the same tick can keep every
        # stat field. Trust the stat key only once the file is older than that ("racy git" rule); until then
        # every poll hashes the content.
        self._stat_key = key if time.time() - st.st_mtime > RACY_SECONDS else None
        if digest == self._digest:
            return None
        self._digest = digest
        if len(data) > self.max_bytes:
            raise FileTooLargeError(f"{self.path}: larger than {self.max_bytes} bytes")
        return data

    def forget(self) -> None:
        """Make the next poll return the content even if unchanged (after a failed parse, to retry later)."""
        self._stat_key = None


def fetch_bundle(endpoint: BundleEndpoint, bundles: Mapping[TrustDomain, Bundle]) -> bytes:
    """GET a SPIFFE bundle endpoint and return the document.

    Profiles (SPIFFE_Federation.md 5):

    - ``https_web``: ordinary Web PKI TLS; the server certificate must chain to the system CAs (or to
      `endpoint.ca_file`) and match the URL's host name.
    - ``https_spiffe``: the server presents an X.509-SVID. What is pinned is the endpoint's SPIFFE ID
      (`endpoint.endpoint_spiffe_id`), not a key or a certificate: the chain must validate against the X.509
      authorities of that ID's trust domain *as currently held* (so the trust anchors roll forward with each
      bundle update, as the spec intends), and the leaf's one URI SAN must be exactly that ID. The URL's host
      name is not checked; SVIDs need not carry DNS names.

    Redirects are not followed and bodies over 1 MiB are refused.

    Args:
        endpoint: the endpoint configuration.
        bundles: the bundles known now (own and federated), for https_spiffe.

    Returns:
        The response body.

    Raises:
        SourceError: TLS, HTTP or authentication failure, with the reason.
    """
    url = urllib.parse.urlsplit(endpoint.url)
    if url.scheme != "https" or not url.hostname:
        raise SourceError(f"{endpoint.url}: not an https URL")
    expected_id: SpiffeId | None = None
    if endpoint.profile == "https_spiffe":
        expected_id = endpoint.endpoint_spiffe_id
        if expected_id is None:
            raise SourceError(f"{endpoint.url}: https_spiffe needs endpoint_spiffe_id")
        anchor = bundles.get(expected_id.trust_domain)
        if anchor is None or not anchor.x509_authorities:
            raise SourceError(
                f"{endpoint.url}: no X.509 authorities for {expected_id.trust_domain} to authenticate "
                f"{expected_id} with"
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # SPIFFE authenticates the URI SAN, checked below
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=pem_bundle(anchor).decode("ascii"))
    else:
        cafile = str(endpoint.ca_file) if endpoint.ca_file is not None else None
        context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    conn = http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=FETCH_TIMEOUT, context=context)
    try:
        conn.connect()
        if expected_id is not None:
            _check_peer_spiffe_id(conn, expected_id, endpoint.url)
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise SourceError(f"{endpoint.url}: HTTP {response.status} {response.reason}")
        body = response.read(MAX_BUNDLE_BYTES + 1)
        if len(body) > MAX_BUNDLE_BYTES:
            raise SourceError(f"{endpoint.url}: bundle larger than {MAX_BUNDLE_BYTES} bytes")
        return body
    except ssl.SSLError as exc:
        raise SourceError(f"{endpoint.url}: TLS failed: {exc.reason or exc}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise SourceError(f"{endpoint.url}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def _check_peer_spiffe_id(conn: http.client.HTTPSConnection, expected: SpiffeId, url: str) -> None:
    sock = conn.sock
    der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
    if not der:
        raise SourceError(f"{url}: the server presented no certificate")
    try:
        actual = spiffe_id_of(x509.load_der_x509_certificate(der), "endpoint certificate")
    except (X509SvidError, ValueError) as exc:
        raise SourceError(f"{url}: {exc}") from None
    if actual != expected:
        raise SourceError(f"{url}: the endpoint presented {actual}, expected {expected}")


@dataclass(slots=True)
class _FederatedTrustDomain:
    trust_domain: TrustDomain
    config: FederationConfig
    file: WatchedFile | None
    bundle: Bundle | None = None
    next_file_check: float = 0.0
    next_fetch: float = 0.0
    failures: int = 0


class FederatedBundles:
    """The bundles of all federated trust domains, kept current from files and bundle endpoints.

    Args:
        federation: `Config.federation`.
        clock: the time source (refresh decisions only; HTTPS itself uses real time).
        poll_interval: seconds between checks of bundle files.
        fetch: the endpoint fetcher (tests may replace it); `fetch_bundle` by default.
        on_rejected: told of every rejected bundle update (the runtime counts them), when given.
    """

    def __init__(
        self,
        federation: Mapping[TrustDomain, FederationConfig],
        clock: Clock,
        poll_interval: float = 5.0,
        fetch: Fetcher = fetch_bundle,
        on_rejected: BundleRejectionSink | None = None,
    ) -> None:
        self._clock = clock
        self._poll_interval = poll_interval
        self._fetch = fetch
        self._on_rejected = on_rejected
        self._domains = [
            _FederatedTrustDomain(
                trust_domain=td,
                config=cfg,
                file=WatchedFile(cfg.bundle_file) if cfg.bundle_file is not None else None,
            )
            for td, cfg in federation.items()
        ]

    def bundles(self) -> dict[TrustDomain, Bundle]:
        """The current bundle of every federated trust domain that has one yet."""
        return {d.trust_domain: d.bundle for d in self._domains if d.bundle is not None}

    def next_due(self) -> float:
        """The earliest clock time at which `refresh()` has something to do (inf when never)."""
        times = [d.next_file_check for d in self._domains if d.file is not None]
        times += [d.next_fetch for d in self._domains if d.config.bundle_endpoint is not None]
        return min(times, default=float("inf"))

    def refresh(self, local_bundles: Mapping[TrustDomain, Bundle]) -> bool:
        """Do everything that is due now: re-read changed bundle files, fetch due endpoints.

        Args:
            local_bundles: bundles the owner holds besides the federated ones (its own trust domain's), used
                to authenticate https_spiffe endpoints whose ID is in that trust domain.

        Returns:
            True when any federated bundle changed.
        """
        changed = False
        for domain in self._domains:
            now = self._clock()
            if domain.file is not None and now >= domain.next_file_check:
                domain.next_file_check = now + self._poll_interval
                changed |= self._check_file(domain)
            endpoint = domain.config.bundle_endpoint
            if endpoint is not None and now >= domain.next_fetch:
                anchors = {**local_bundles, **self.bundles()}
                changed |= self._fetch_endpoint(domain, endpoint, anchors, now)
        return changed

    def _check_file(self, domain: _FederatedTrustDomain) -> bool:
        assert domain.file is not None
        try:
            data = domain.file.poll()
        except FileTooLargeError as exc:
            self._reject(domain, BundleRejection("too_large", str(exc)), str(domain.file.path))
            return False
        except OSError as exc:
            domain.file.forget()
            if domain.failures == 0 or domain.bundle is None:
                log.warning(
                    "federation.bundle_file_unreadable",
                    extra={
                        "fields": _fields(domain, path=str(domain.file.path), error=exc.strerror or str(exc))
                    },
                )
            return False
        if data is None:
            return False
        try:
            bundle = parse_bundle_document(domain.trust_domain, data)
        except BundleError as exc:
            # The bad content stays "seen", so it is reported once; a new write is read again.
            self._reject(domain, BundleRejection("malformed", str(exc)), str(domain.file.path))
            return False
        return self._install(domain, bundle, f"file {domain.file.path}")

    def _fetch_endpoint(
        self,
        domain: _FederatedTrustDomain,
        endpoint: BundleEndpoint,
        anchors: Mapping[TrustDomain, Bundle],
        now: float,
    ) -> bool:
        try:
            data = self._fetch(endpoint, anchors)
            bundle = parse_bundle_document(domain.trust_domain, data)
        except (SourceError, BundleError) as exc:
            domain.failures += 1
            retry = min(FIRST_RETRY * 2 ** (domain.failures - 1), endpoint.refresh)
            domain.next_fetch = now + retry
            if isinstance(exc, BundleError):
                # The endpoint answered, but with a document that is no bundle: a rejected update.
                self._reject(domain, BundleRejection("malformed", str(exc)), endpoint.url)
                return False
            log.warning(
                "federation.fetch_failed",
                extra={
                    "fields": _fields(
                        domain,
                        url=endpoint.url,
                        error=str(exc),
                        retry_seconds=retry,
                        kept_last=domain.bundle is not None,
                    )
                },
            )
            return False
        domain.failures = 0
        interval = endpoint.refresh
        if bundle.refresh_hint is not None:
            interval = min(max(float(bundle.refresh_hint), MIN_REFRESH), MAX_REFRESH)
        domain.next_fetch = now + interval
        return self._install(domain, bundle, endpoint.url)

    def _install(self, domain: _FederatedTrustDomain, bundle: Bundle, origin: str) -> bool:
        current = domain.bundle
        if same_bundle(current, bundle):
            return False
        rejection = bundle_update_rejection(current, bundle)
        if rejection is not None:
            self._reject(domain, rejection, origin)
            return False
        report_rejected_authorities(bundle, origin)
        domain.bundle = bundle
        log.info(
            "federation.bundle_updated",
            extra={
                "fields": _fields(
                    domain,
                    origin=origin,
                    sequence=bundle.sequence,
                    x509_authorities=len(bundle.x509_authorities),
                    jwt_authorities=len(bundle.jwt_authorities),
                )
            },
        )
        return True

    def _reject(self, domain: _FederatedTrustDomain, rejection: BundleRejection, origin: str) -> None:
        report_bundle_rejection(
            domain.trust_domain,
            rejection,
            origin,
            kept_last=domain.bundle is not None,
            sink=self._on_rejected,
        )


def _fields(domain: _FederatedTrustDomain, **fields: object) -> dict[str, object]:
    return {"trust_domain": str(domain.trust_domain), **fields}
