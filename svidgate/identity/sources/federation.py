"""Trust bundles of federated trust domains: watched files and SPIFFE bundle endpoints.

A `FederatedBundles` keeps one bundle per configured foreign trust domain and is driven by its owner (a
source): `refresh()` does whatever is due at the clock's current time (re-read changed files, fetch endpoints
whose refresh time has come) and says whether any bundle changed; `next_due()` says when to call it again.
Nothing here publishes snapshots; the source merges `bundles()` into its own.

Rules (SPIFFE_Federation.md):

- A bundle document with a lower ``spiffe_sequence`` than the one held is ignored (logged): sequence numbers
  only go up, so a lower one is a stale replica or a replay.
- The next fetch happens after the bundle's ``spiffe_refresh_hint`` (clamped to [10 s, 1 day]), or after the
  endpoint's configured `refresh` when the bundle has no hint.
- A failed fetch or a bad file keeps the last good bundle; failures are retried with a backoff that starts at
  10 s and never exceeds the refresh interval.
- A JWT-SVID whose ``kid`` is not in a federated bundle may trigger one extra fetch of that trust domain's
  endpoint (`fetch_for_unknown_key`), at most once per `UNKNOWN_KEY_FETCH_INTERVAL` per trust domain, never
  for a trust domain without an endpoint; `LiveFederation` shares one fetch among concurrent callers.
- `set_federation` applies a reloaded ``federation`` section: a removed trust domain's bundle is gone from
  `bundles()` at once; a new or changed one starts over and is due at once.

Blocking I/O (file reads, HTTPS) happens inside `refresh()`; an asyncio owner runs it in a worker thread.
Never imports gRPC.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.client
import logging
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from svidgate.config import BundleEndpoint, FederationConfig
from svidgate.errors import BundleError, SourceError, X509SvidError
from svidgate.identity.bundle import Bundle, parse_pem_bundle, parse_spiffe_bundle, pem_bundle
from svidgate.identity.clock import Clock
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import spiffe_id_of

log = logging.getLogger(__name__)

MIN_REFRESH = 10.0
MAX_REFRESH = 86400.0
FIRST_RETRY = 10.0
#: A bundle document larger than this is refused; real bundles are a few kilobytes.
MAX_BUNDLE_BYTES = 1 << 20
FETCH_TIMEOUT = 10.0
RACY_SECONDS = 2.0
#: An unknown JWT-SVID ``kid`` fetches a trust domain's endpoint at most this often (seconds): tokens with
#: made-up key IDs must not turn into a flood of fetches at the partner.
UNKNOWN_KEY_FETCH_INTERVAL = 10.0

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


class WatchedFile:
    """A file whose content is re-read when its metadata changes and reported only when its bytes change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stat_key: tuple[int, int, int, int] | None = None
        self._digest: bytes | None = None

    def poll(self) -> bytes | None:
        """Return the file's content when it differs from the last content returned, else None.

        Raises:
            OSError: the file cannot be read (the next poll tries again).
        """
        st = os.stat(self.path)
        key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        if key == self._stat_key:
            return None
        data = self.path.read_bytes()
        digest = hashlib.sha256(data).digest()
        # File systems stamp mtimes with a coarse clock: a second write within the same tick can keep every
        # stat field. Trust the stat key only once the file is older than that ("racy git" rule); until then
        # every poll hashes the content.
        self._stat_key = key if time.time() - st.st_mtime > RACY_SECONDS else None
        if digest == self._digest:
            return None
        self._digest = digest
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
    #: clock time of the last fetch for an unknown key (rate limit), -inf when none yet
    last_unknown_key_fetch: float = float("-inf")
    #: a scheduled and an on-demand fetch of the same trust domain never run at once
    fetch_lock: threading.Lock = field(default_factory=threading.Lock)


class FederatedBundles:
    """The bundles of all federated trust domains, kept current from files and bundle endpoints.

    Args:
        federation: `Config.federation`.
        clock: the time source (refresh decisions only; HTTPS itself uses real time).
        poll_interval: seconds between checks of bundle files.
        fetch: the endpoint fetcher (tests may replace it); `fetch_bundle` by default.
    """

    def __init__(
        self,
        federation: Mapping[TrustDomain, FederationConfig],
        clock: Clock,
        poll_interval: float = 5.0,
        fetch: Fetcher = fetch_bundle,
    ) -> None:
        self._clock = clock
        self._poll_interval = poll_interval
        self._fetch = fetch
        # Replaced whole (one reference assignment) by `set_federation` on the event loop while `refresh` may
        # run in a worker thread: readers take the list once and never see a half-applied reload.
        self._domains = [_new_domain(td, cfg) for td, cfg in federation.items()]
        self._reserve = threading.Lock()
        # The owner's schedule and a reload's immediate refresh run in different threads: one at a time.
        self._refreshing = threading.Lock()

    @property
    def trust_domains(self) -> tuple[TrustDomain, ...]:
        """The federated trust domains configured now."""
        return tuple(d.trust_domain for d in self._domains)

    def bundles(self) -> dict[TrustDomain, Bundle]:
        """The current bundle of every federated trust domain that has one yet."""
        return {d.trust_domain: d.bundle for d in self._domains if d.bundle is not None}

    def set_federation(self, federation: Mapping[TrustDomain, FederationConfig]) -> bool:
        """Apply a reloaded ``federation`` section.

        An unchanged trust domain keeps its bundle and schedule. A removed one is dropped (its bundle leaves
        `bundles()` now). A new or changed one starts from nothing and is due at once: a changed source of a
        bundle is not vouched for by the bundle the old source delivered, so that bundle is not kept.

        Returns:
            True when `bundles()` changed (a bundle was dropped); new ones arrive with the next `refresh()`.
        """
        current = {d.trust_domain: d for d in self._domains}
        domains: list[_FederatedTrustDomain] = []
        for td, cfg in federation.items():
            old = current.get(td)
            domains.append(old if old is not None and old.config == cfg else _new_domain(td, cfg))
        kept = {id(d) for d in domains}
        dropped = [d for d in current.values() if id(d) not in kept]
        self._domains = domains
        for domain in dropped:
            log.info(
                "federation.trust_domain_removed"
                if domain.trust_domain not in federation
                else "federation.trust_domain_changed",
                extra={"fields": _fields(domain, had_bundle=domain.bundle is not None)},
            )
        for domain in domains:
            if domain.trust_domain not in current:
                log.info("federation.trust_domain_added", extra={"fields": _fields(domain)})
        return any(d.bundle is not None for d in dropped)

    def reserve_unknown_key_fetch(self, trust_domain: TrustDomain) -> bool:
        """Whether a fetch for an unknown ``kid`` of `trust_domain` may start now; if so, it is counted.

        False for a trust domain that is not federated or has no endpoint, and within
        `UNKNOWN_KEY_FETCH_INTERVAL` of the previous such fetch. Thread-safe.
        """
        domain = self._domain(trust_domain)
        if domain is None or domain.config.bundle_endpoint is None:
            return False
        with self._reserve:
            now = self._clock()
            if now < domain.last_unknown_key_fetch + UNKNOWN_KEY_FETCH_INTERVAL:
                return False
            domain.last_unknown_key_fetch = now
            return True

    def fetch_for_unknown_key(
        self, trust_domain: TrustDomain, local_bundles: Mapping[TrustDomain, Bundle]
    ) -> bool:
        """Fetch `trust_domain`'s endpoint now (once `reserve_unknown_key_fetch` said yes); blocks on I/O.

        Returns:
            True when its bundle changed.
        """
        domain = self._domain(trust_domain)
        endpoint = domain.config.bundle_endpoint if domain is not None else None
        if domain is None or endpoint is None:
            return False
        anchors = {**local_bundles, **self.bundles()}
        log.info("federation.unknown_key_fetch", extra={"fields": _fields(domain, url=endpoint.url)})
        with domain.fetch_lock:
            return self._fetch_endpoint(domain, endpoint, anchors, self._clock())

    def _domain(self, trust_domain: TrustDomain) -> _FederatedTrustDomain | None:
        return next((d for d in self._domains if d.trust_domain == trust_domain), None)

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
        with self._refreshing:
            return self._refresh_locked(local_bundles)

    def _refresh_locked(self, local_bundles: Mapping[TrustDomain, Bundle]) -> bool:
        changed = False
        for domain in self._domains:
            now = self._clock()
            if domain.file is not None and now >= domain.next_file_check:
                domain.next_file_check = now + self._poll_interval
                changed |= self._check_file(domain)
            endpoint = domain.config.bundle_endpoint
            if endpoint is not None and now >= domain.next_fetch:
                anchors = {**local_bundles, **self.bundles()}
                with domain.fetch_lock:
                    changed |= self._fetch_endpoint(domain, endpoint, anchors, now)
        return changed

    def _check_file(self, domain: _FederatedTrustDomain) -> bool:
        assert domain.file is not None
        try:
            data = domain.file.poll()
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
            # The bad content stays "seen", so it is logged once; a new write is read again.
            log.warning(
                "federation.bundle_file_invalid",
                extra={"fields": _fields(domain, path=str(domain.file.path), error=str(exc), kept_last=True)},
            )
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
        if (
            current is not None
            and current.sequence is not None
            and bundle.sequence is not None
            and bundle.sequence < current.sequence
        ):
            log.warning(
                "federation.sequence_regressed",
                extra={
                    "fields": _fields(
                        domain, origin=origin, sequence=bundle.sequence, current_sequence=current.sequence
                    )
                },
            )
            return False
        if same_bundle(current, bundle):
            return False
        if not bundle.x509_authorities and not bundle.jwt_authorities:
            log.warning(
                "federation.bundle_empty", extra={"fields": _fields(domain, origin=origin, kept_last=True)}
            )
            return False
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


def _fields(domain: _FederatedTrustDomain, **fields: object) -> dict[str, object]:
    return {"trust_domain": str(domain.trust_domain), **fields}


def _new_domain(trust_domain: TrustDomain, config: FederationConfig) -> _FederatedTrustDomain:
    file = WatchedFile(config.bundle_file) if config.bundle_file is not None else None
    return _FederatedTrustDomain(trust_domain=trust_domain, config=config, file=file)


#: Asks for a fetch of a trust domain's bundle because a JWT-SVID named a key it does not hold; returns the
#: future of that fetch (True: the bundle changed and was published), or None when no fetch is allowed.
BundleRefresher = Callable[[TrustDomain], "concurrent.futures.Future[bool] | None"]


class LiveFederation:
    """What changes federation outside the owner's schedule: a reload (`reconfigure`) and a JWT-SVID with an
    unknown ``kid`` (`request_fetch`).

    `request_fetch` may be called from any thread (Check runs on grpcio's threaded server and on grpc.aio):
    the fetch runs in a worker thread started from the event loop, and the new snapshot is published on the
    loop (the feed is not thread-safe). Callers asking for the same trust domain while a fetch runs share that
    fetch; `FederatedBundles.reserve_unknown_key_fetch` rate-limits new ones.

    Args:
        federation: the federated bundles.
        local_bundles: returns the owner's own bundles (to authenticate https_spiffe endpoints).
        publish: publishes a new snapshot; called on the event loop when the bundle changed.
    """

    def __init__(
        self,
        federation: FederatedBundles,
        local_bundles: Callable[[], Mapping[TrustDomain, Bundle]],
        publish: Callable[[], None],
    ) -> None:
        self._federation = federation
        self._local_bundles = local_bundles
        self._publish = publish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._in_flight: dict[TrustDomain, concurrent.futures.Future[bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._rescheduled: asyncio.Event | None = None
        #: fetches started, for tests and metrics
        self.started = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop snapshots are published on (the owner's `run()` calls this)."""
        self._loop = loop
        self._rescheduled = asyncio.Event()

    async def sleep(self, delay: float, sleep: Callable[[float], Awaitable[None]]) -> None:
        """The owner's pause between steps: `sleep(delay)`, cut short when federation was reconfigured (its
        schedule, and so the owner's next due time, changed)."""
        rescheduled = self._rescheduled
        if rescheduled is None:
            await sleep(delay)
            return
        pause = asyncio.ensure_future(sleep(delay))
        woken = asyncio.ensure_future(rescheduled.wait())
        try:
            await asyncio.wait((pause, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            slept = pause.done()
            if not slept:
                pause.cancel()
        rescheduled.clear()
        if slept:
            # Whatever the injected sleep raised (tests stop the loop that way) reaches the owner.
            if pause.cancelled():
                raise asyncio.CancelledError
            pause.result()

    def reconfigure(self, federation: Mapping[TrustDomain, FederationConfig]) -> None:
        """Apply a reloaded ``federation`` section; call on the event loop.

        A removed trust domain leaves the published snapshot before this returns (SDS validation contexts,
        Check and the Workload API follow the snapshot); new and changed ones are read or fetched at once in a
        worker thread and published when they arrive.
        """
        if self._federation.set_federation(federation):
            self._publish()
        if self._loop is not None:
            self._spawn(self._refresh_now())

    async def _refresh_now(self) -> None:
        try:
            if await asyncio.to_thread(self._federation.refresh, self._local_bundles()):
                self._publish()
        finally:
            # New trust domains have their next fetch scheduled now: the owner must wake for it.
            if self._rescheduled is not None:
                self._rescheduled.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_fetch(self, trust_domain: TrustDomain) -> concurrent.futures.Future[bool] | None:
        """The fetch of `trust_domain` in flight, a new one, or None (no endpoint, rate-limited, no loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        with self._lock:
            future = self._in_flight.get(trust_domain)
            if future is not None:
                return future
            if not self._federation.reserve_unknown_key_fetch(trust_domain):
                return None
            future = concurrent.futures.Future()
            self._in_flight[trust_domain] = future
            self.started += 1
        loop.call_soon_threadsafe(self._start, trust_domain, future)
        return future

    def _start(self, trust_domain: TrustDomain, future: concurrent.futures.Future[bool]) -> None:
        self._spawn(self._run(trust_domain, future))

    async def _run(self, trust_domain: TrustDomain, future: concurrent.futures.Future[bool]) -> None:
        changed = False
        try:
            local = self._local_bundles()
            changed = await asyncio.to_thread(self._federation.fetch_for_unknown_key, trust_domain, local)
            if changed:
                self._publish()
        finally:
            with self._lock:
                self._in_flight.pop(trust_domain, None)
            if not future.done():
                future.set_result(changed)
