"""Trust bundles of federated trust domains: watched files and SPIFFE bundle endpoints.

A `FederatedBundles` keeps one bundle per configured foreign trust domain. Under `run()` every trust domain
has its own task and schedule, independent of the owner's minting and CA rotation and of every other trust
domain: a partner whose endpoint hangs delays nothing but its own bundle. Each task re-reads its bundle file
when it changes and fetches its endpoint when the refresh time has come, then tells the owner (a source) that
a bundle changed; the source merges `bundles()` into its next snapshot. `fetch_now()` asks one trust domain's
task to fetch at once; adding or removing a trust domain is starting or cancelling one task.

Each step has two halves: getting the document (`fetch_bundle`, or reading the file) and applying it
(`_install`, which decides whether a parsed bundle replaces the one held). Fetching is asyncio all the way, so
it never blocks the event loop, and it runs under a **total deadline** (`bundle_endpoint.timeout`, default
10 s) covering connect, TLS, request, headers and body: a per-read timeout would let an endpoint that sends
one byte every few seconds hold the fetch for as long as it likes. Cancelling the task (SIGTERM) ends a fetch
at once. File reads and document parsing run in a worker thread.

Rules (SPIFFE_Federation.md):

- A new bundle passes `bundle_update_rejection` before it replaces the one held: no lower
  ``spiffe_sequence`` (sequence numbers only go up, so a lower one is a stale replica or a replay), and no
  trust domain left without a usable authority for a use it had. A rejected update keeps the last good
  bundle and is reported once (log ``bundle.update_rejected`` and the owner's rejection sink).
- The next fetch happens after the bundle's ``spiffe_refresh_hint`` (clamped to [10 s, 1 day]), or after the
  endpoint's configured `refresh` when the bundle has no hint.
- A failed fetch or a bad file keeps the last good bundle; failures are retried with a backoff that starts at
  10 s and never exceeds the refresh interval. Bundle files, like endpoint bodies, are read up to 1 MiB.
- A JWT-SVID whose ``kid`` is not in a federated bundle may ask for one out-of-schedule fetch of that trust
  domain's endpoint (`request_fetch`, callable from any thread): at most one per trust domain every
  `UNKNOWN_KEY_FETCH_INTERVAL`, never for a trust domain without an endpoint, and concurrent callers share
  the fetch in flight.
- `set_federation` applies a reloaded ``federation`` section while `run()` runs: a removed trust domain's
  task is cancelled and its bundle leaves `bundles()` at once; a new or changed one gets a fresh task that
  reads and fetches at once.

Never imports gRPC.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

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
from svidgate.identity.federation import DEFAULT_POLL_INTERVAL, BundleEndpoint, FederationSettings
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import spiffe_id_of
from svidgate.sources.base import SourceHealth, SourceStatus

log = logging.getLogger(__name__)

MIN_REFRESH = 10.0
MAX_REFRESH = 86400.0
FIRST_RETRY = 10.0
#: A response head (status line and headers) larger than this is refused.
MAX_HEAD_BYTES = 64 * 1024
RACY_SECONDS = 2.0
#: A trust domain's task looks at its schedule at least this often, so that a stepped clock is noticed soon.
MAX_SLEEP = 60.0
#: An unknown JWT-SVID ``kid`` fetches a trust domain's endpoint at most this often (seconds): tokens with
#: made-up key IDs must not turn into a flood of requests to the partner.
UNKNOWN_KEY_FETCH_INTERVAL = 10.0

#: Fetches a bundle endpoint: (endpoint, trust bundles to authenticate https_spiffe with) -> document bytes.
#: The caller applies the endpoint's total deadline.
Fetcher = Callable[[BundleEndpoint, Mapping[TrustDomain, Bundle]], Awaitable[bytes]]


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


async def fetch_bundle(endpoint: BundleEndpoint, bundles: Mapping[TrustDomain, Bundle]) -> bytes:
    """GET a SPIFFE bundle endpoint and return the document (no deadline of its own: the caller sets one).

    Profiles (SPIFFE_Federation.md 5):

    - ``https_web``: ordinary Web PKI TLS; the server certificate must chain to the system CAs (or to
      `endpoint.ca_file`) and match the URL's host name.
    - ``https_spiffe``: the server presents an X.509-SVID. What is pinned is the endpoint's SPIFFE ID
      (`endpoint.endpoint_spiffe_id`), not a key or a certificate: the chain must validate against the X.509
      authorities of that ID's trust domain *as currently held* (so the trust anchors roll forward with each
      bundle update, as the spec intends), and the leaf's one URI SAN must be exactly that ID. The URL's host
      name is not checked; SVIDs need not carry DNS names.

    Redirects are not followed and bodies over 1 MiB are refused. The response is read with
    ``Connection: close``; its body is framed by Content-Length, chunked encoding or the end of the
    connection.

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
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"{endpoint.url}: cannot load ca_file {cafile}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    host = url.netloc.rpartition("@")[2]
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection(
            url.hostname, url.port or 443, ssl=context, limit=MAX_HEAD_BYTES
        )
        if expected_id is not None:
            _check_peer_spiffe_id(writer.get_extra_info("ssl_object"), expected_id, endpoint.url)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
            "User-Agent: svidgate\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        await writer.drain()
        status, reason, headers = await _read_head(reader, endpoint.url)
        if status != 200:
            raise SourceError(f"{endpoint.url}: HTTP {status} {reason}")
        return await _read_body(reader, headers, endpoint.url)
    except ssl.SSLError as exc:
        raise SourceError(f"{endpoint.url}: TLS failed: {exc.reason or exc}") from None
    except asyncio.IncompleteReadError:
        raise SourceError(f"{endpoint.url}: the connection closed before the response was complete") from None
    except (asyncio.LimitOverrunError, ValueError):
        raise SourceError(f"{endpoint.url}: a response line is longer than {MAX_HEAD_BYTES} bytes") from None
    except OSError as exc:
        raise SourceError(f"{endpoint.url}: {type(exc).__name__}: {exc}") from None
    finally:
        if writer is not None:
            # No graceful TLS close: the response is read (or abandoned), and a close_notify exchange with a
            # misbehaving peer is one more thing that could wait.
            writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader, url: str) -> tuple[int, str, dict[str, str]]:
    status_line = await reader.readuntil(b"\r\n")
    match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r\n", status_line)
    if match is None:
        raise SourceError(f"{url}: not an HTTP/1.1 response")
    headers: dict[str, str] = {}
    size = len(status_line)
    while True:
        line = await reader.readuntil(b"\r\n")
        size += len(line)
        if size > MAX_HEAD_BYTES:
            raise SourceError(f"{url}: response headers larger than {MAX_HEAD_BYTES} bytes")
        if line == b"\r\n":
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise SourceError(f"{url}: malformed response header")
        key = name.lower()
        value = value.strip()
        if key in headers and headers[key] != value:
            if key == "content-length":
                raise SourceError(f"{url}: conflicting Content-Length headers")
            value = f"{headers[key]}, {value}"
        headers[key] = value
    reason = (match.group(2) or b"").decode("latin-1")
    return int(match.group(1)), reason, headers


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str], url: str) -> bytes:
    too_large = SourceError(f"{url}: bundle larger than {MAX_BUNDLE_BYTES} bytes")
    transfer_encoding = headers.get("transfer-encoding")
    if transfer_encoding is not None:
        # RFC 9112 6.1: chunked must be the final (here: the only, we asked for no compression) coding.
        if transfer_encoding.lower() != "chunked":
            raise SourceError(f"{url}: unsupported Transfer-Encoding {transfer_encoding!r}")
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size_text = size_line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
                raise SourceError(f"{url}: malformed chunked body")
            size = int(size_text, 16)
            if size == 0:
                return bytes(body)  # trailers, if any, are not needed
            if len(body) + size > MAX_BUNDLE_BYTES:
                raise too_large
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise SourceError(f"{url}: malformed chunked body")
    length = headers.get("content-length")
    if length is not None:
        if not re.fullmatch(r"\d{1,12}", length):
            raise SourceError(f"{url}: malformed Content-Length {length[:20]!r}")
        if int(length) > MAX_BUNDLE_BYTES:
            raise too_large
        return await reader.readexactly(int(length))
    body = bytearray()
    while chunk := await reader.read(65536):
        body += chunk
        if len(body) > MAX_BUNDLE_BYTES:
            raise too_large
    return bytes(body)


def _check_peer_spiffe_id(ssl_object: ssl.SSLObject | None, expected: SpiffeId, url: str) -> None:
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
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
    config: FederationSettings
    file: WatchedFile | None
    health: SourceHealth
    bundle: Bundle | None = None
    next_file_check: float = 0.0
    next_fetch: float = 0.0
    failures: int = 0
    #: Set to make the trust domain's task look at its schedule now (`fetch_now`).
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Clock time of the last fetch asked for by an unknown key (the rate limit), -inf before the first.
    last_unknown_key_fetch: float = float("-inf")
    #: The fetch asked for by an unknown key and not yet started; resolved after the step that does it.
    pending: concurrent.futures.Future[bool] | None = None


class FederatedBundles:
    """The bundles of all federated trust domains, kept current from files and bundle endpoints.

    Args:
        federation: `Config.federation`.
        clock: the time source (schedules and health; HTTPS itself uses real time).
        poll_interval: seconds between checks of bundle files.
        fetch: the endpoint fetcher (tests may replace it); `fetch_bundle` by default. Each call runs under
            the endpoint's total deadline.
        on_rejected: told of every rejected bundle update (the runtime counts them), when given.
    """

    def __init__(
        self,
        federation: Mapping[TrustDomain, FederationSettings],
        clock: Clock,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        fetch: Fetcher = fetch_bundle,
        on_rejected: BundleRejectionSink | None = None,
    ) -> None:
        self._clock = clock
        self._poll_interval = poll_interval
        self._fetch = fetch
        self._on_rejected = on_rejected
        # Replaced whole (one assignment) by `set_federation`; Check threads read it in `request_fetch`.
        self._domains = {td: self._new_domain(td, cfg) for td, cfg in federation.items()}
        self._tasks: dict[TrustDomain, asyncio.Task[None]] = {}
        self._running: tuple[Callable[[], Mapping[TrustDomain, Bundle]], Callable[[], None]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Guards the unknown-key bookkeeping (`pending`, `last_unknown_key_fetch`) across Check threads.
        self._lock = threading.Lock()

    def _new_domain(self, trust_domain: TrustDomain, config: FederationSettings) -> _FederatedTrustDomain:
        return _FederatedTrustDomain(
            trust_domain=trust_domain,
            config=config,
            file=WatchedFile(config.bundle_file) if config.bundle_file is not None else None,
            health=SourceHealth("federation", trust_domain.name, self._clock),
        )

    def bundles(self) -> dict[TrustDomain, Bundle]:
        """The current bundle of every federated trust domain that has one yet."""
        return {td: d.bundle for td, d in self._domains.items() if d.bundle is not None}

    def statuses(self) -> list[SourceStatus]:
        """Per trust domain: the health of its endpoint (or of its file, when it has no endpoint)."""
        return [d.health.status() for d in self._domains.values()]

    def next_due(self) -> float:
        """The earliest clock time at which some trust domain has something to do (inf when never)."""
        return min((self._due(d) for d in self._domains.values()), default=float("inf"))

    def load_files(self) -> bool:
        """Read every bundle file once, now, in the calling thread (start-up: local files, no network).

        Returns:
            True when any federated bundle changed.
        """
        changed = False
        for domain in self._domains.values():
            if domain.file is not None:
                domain.next_file_check = self._clock() + self._poll_interval
                bundle = self._read_file(domain)
                if bundle is not None:
                    changed |= self._install(domain, bundle, f"file {domain.file.path}")
        return changed

    async def refresh(self, local_bundles: Mapping[TrustDomain, Bundle]) -> bool:
        """Do everything that is due now, every trust domain concurrently (each fetch under its deadline).

        For one-shot callers (``svidgate bundle``) and tests; a server runs `run()`.

        Args:
            local_bundles: bundles the owner holds besides the federated ones (its own trust domain's), used
                to authenticate https_spiffe endpoints whose ID is in that trust domain.

        Returns:
            True when any federated bundle changed.
        """
        results = await asyncio.gather(*(self._step(d, local_bundles) for d in self._domains.values()))
        return any(results)

    def fetch_now(self, trust_domain: TrustDomain) -> None:
        """Make `trust_domain`'s task fetch its endpoint (and check its file) at once, whatever its schedule.

        Raises:
            KeyError: the trust domain is not federated.
        """
        domain = self._domains[trust_domain]
        domain.next_fetch = domain.next_file_check = float("-inf")
        domain.wake.set()

    async def run(
        self,
        local_bundles: Callable[[], Mapping[TrustDomain, Bundle]],
        on_change: Callable[[], None],
    ) -> None:
        """Keep every trust domain's bundle current, one task per trust domain, until cancelled.

        Args:
            local_bundles: returns the owner's own bundles (for https_spiffe authentication), at each fetch.
            on_change: called on the event loop whenever a federated bundle changed.
        """
        self._running = (local_bundles, on_change)
        self._loop = asyncio.get_running_loop()
        for domain in self._domains.values():
            self._start(domain)
        try:
            await asyncio.Future()  # until cancelled; `set_federation` starts and stops the tasks meanwhile
        finally:
            self._running = None
            tasks = list(self._tasks.values())
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for domain in self._domains.values():
                self._resolve(domain, self._take_pending(domain), changed=False)

    async def run_beside(
        self,
        owner_loop: Coroutine[Any, Any, None],
        local_bundles: Callable[[], Mapping[TrustDomain, Bundle]],
        on_change: Callable[[], None],
    ) -> None:
        """Run the owner's own loop and `run()` side by side until either ends; whatever ended it (an error,
        a cancellation) reaches the caller, and the other is stopped.

        Federation runs even with no trust domain configured: a reload may add the first one.
        """
        federation = asyncio.ensure_future(self.run(local_bundles, on_change))
        owner = asyncio.ensure_future(owner_loop)
        try:
            done, _ = await asyncio.wait((federation, owner), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raises, CancelledError included
        finally:
            for task in (federation, owner):
                task.cancel()
            await asyncio.gather(federation, owner, return_exceptions=True)

    def set_federation(self, federation: Mapping[TrustDomain, FederationSettings]) -> bool:
        """Apply a reloaded ``federation`` section; call on the event loop.

        An unchanged trust domain keeps its bundle, schedule and task. A removed one is dropped: its task is
        cancelled and its bundle leaves `bundles()` now. A new or changed one starts from nothing (a changed
        source of a bundle is not vouched for by what the old source delivered), and its task, started at
        once, reads its file and fetches its endpoint at once and calls `on_change` when a bundle arrives.

        Returns:
            True when `bundles()` lost a bundle (the owner publishes a new snapshot now).
        """
        current = self._domains
        domains: dict[TrustDomain, _FederatedTrustDomain] = {}
        for td, cfg in federation.items():
            old = current.get(td)
            domains[td] = old if old is not None and old.config == cfg else self._new_domain(td, cfg)
        dropped = [d for td, d in current.items() if domains.get(td) is not d]
        self._domains = domains
        for domain in dropped:
            task = self._tasks.pop(domain.trust_domain, None)
            if task is not None:
                task.cancel()
            self._resolve(domain, self._take_pending(domain), changed=False)
            event = (
                "federation.trust_domain_changed"
                if domain.trust_domain in domains
                else "federation.trust_domain_removed"
            )
            log.info(event, extra={"fields": _fields(domain, had_bundle=domain.bundle is not None)})
        for td, domain in domains.items():
            if current.get(td) is not domain:
                if td not in current:
                    log.info("federation.trust_domain_added", extra={"fields": _fields(domain)})
                self._start(domain)
        return any(d.bundle is not None for d in dropped)

    def request_fetch(self, trust_domain: TrustDomain) -> concurrent.futures.Future[bool] | None:
        """Fetch `trust_domain`'s endpoint out of schedule, because a JWT-SVID named a key its bundle lacks.

        Callable from any thread (Check runs on grpcio's threaded server as well as on the event loop). The
        fetch runs in the trust domain's task; its future resolves once the owner was told of a changed bundle
        (``True``) or the fetch brought nothing new (``False``).

        Returns:
            The fetch (shared with every caller until it starts), or None: the trust domain is not federated
            or has no endpoint, `run()` is not running, or the last such fetch was less than
            `UNKNOWN_KEY_FETCH_INTERVAL` ago.
        """
        loop = self._loop
        domain = self._domains.get(trust_domain)
        if loop is None or domain is None or domain.config.bundle_endpoint is None:
            return None
        with self._lock:
            if domain.pending is not None:
                return domain.pending
            now = self._clock()
            if now < domain.last_unknown_key_fetch + UNKNOWN_KEY_FETCH_INTERVAL:
                return None
            domain.last_unknown_key_fetch = now
            fetch: concurrent.futures.Future[bool] = concurrent.futures.Future()
            domain.pending = fetch
        log.info("federation.unknown_key_fetch", extra={"fields": _fields(domain)})
        try:
            loop.call_soon_threadsafe(domain.wake.set)
        except RuntimeError:  # the loop closed in the meantime (shutdown): nothing will fetch
            self._resolve(domain, self._take_pending(domain), changed=False)
        return fetch

    def _start(self, domain: _FederatedTrustDomain) -> None:
        if self._running is None:
            return
        local_bundles, on_change = self._running
        self._tasks[domain.trust_domain] = asyncio.create_task(
            self._watch(domain, local_bundles, on_change), name=f"federation-{domain.trust_domain}"
        )

    def _take_pending(self, domain: _FederatedTrustDomain) -> concurrent.futures.Future[bool] | None:
        with self._lock:
            pending, domain.pending = domain.pending, None
        return pending

    @staticmethod
    def _resolve(
        domain: _FederatedTrustDomain, pending: concurrent.futures.Future[bool] | None, *, changed: bool
    ) -> None:
        if pending is not None and not pending.done():
            pending.set_result(changed)

    # -- internals -------------------------------------------------------------------------------------

    def _due(self, domain: _FederatedTrustDomain) -> float:
        times = [domain.next_file_check] if domain.file is not None else []
        if domain.config.bundle_endpoint is not None:
            times.append(domain.next_fetch)
        return min(times, default=float("inf"))

    async def _watch(
        self,
        domain: _FederatedTrustDomain,
        local_bundles: Callable[[], Mapping[TrustDomain, Bundle]],
        on_change: Callable[[], None],
    ) -> None:
        while True:
            domain.wake.clear()
            # A fetch asked for by an unknown key is done by this step, whatever the schedule says; asked for
            # during the step, it waits for the next one (this step's fetch may have started before it).
            pending = self._take_pending(domain)
            if pending is not None:
                domain.next_fetch = float("-inf")
            changed = False
            try:
                changed = await self._step(domain, local_bundles())
                if changed:
                    on_change()
                delay = min(max(self._due(domain) - self._clock(), 0.0), MAX_SLEEP)
            except Exception as exc:
                # A bug must not end this trust domain's updates for good (nor anybody else's).
                domain.health.failed("internal", f"{type(exc).__name__}: {exc}")
                log.exception("federation.watch_failed", extra={"fields": _fields(domain)})
                delay = FIRST_RETRY
            finally:
                # After on_change: the snapshot with the new bundle is published before a waiting Check
                # validates again.
                self._resolve(domain, pending, changed=changed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(domain.wake.wait(), delay)

    async def _step(self, domain: _FederatedTrustDomain, local_bundles: Mapping[TrustDomain, Bundle]) -> bool:
        now = self._clock()
        changed = False
        if domain.file is not None and now >= domain.next_file_check:
            domain.next_file_check = now + self._poll_interval
            bundle = await asyncio.to_thread(self._read_file, domain)
            if bundle is not None:
                changed |= self._install(domain, bundle, f"file {domain.file.path}")
        endpoint = domain.config.bundle_endpoint
        if endpoint is not None and now >= domain.next_fetch:
            anchors = {**local_bundles, **self.bundles()}
            changed |= await self._fetch_endpoint(domain, endpoint, anchors, now)
        return changed

    def _read_file(self, domain: _FederatedTrustDomain) -> Bundle | None:
        """Read and parse the bundle file when its content changed; None when unchanged or bad (logged)."""
        assert domain.file is not None
        # The file is the trust domain's upstream only when there is no endpoint (then it is the bootstrap).
        health = domain.health if domain.config.bundle_endpoint is None else None
        try:
            data = domain.file.poll()
        except FileTooLargeError as exc:
            if health is not None:
                health.failed("file", str(exc))
            self._reject(domain, BundleRejection("too_large", str(exc)), str(domain.file.path))
            return None
        except OSError as exc:
            domain.file.forget()
            error = exc.strerror or str(exc)
            if health is not None:
                health.failed("file", f"{domain.file.path}: {error}")
            if domain.failures == 0 or domain.bundle is None:
                log.warning(
                    "federation.bundle_file_unreadable",
                    extra={"fields": _fields(domain, path=str(domain.file.path), error=error)},
                )
            return None
        if data is None:
            if health is not None and domain.bundle is not None:
                health.succeeded()
            return None
        try:
            bundle = parse_bundle_document(domain.trust_domain, data)
        except BundleError as exc:
            if health is not None:
                health.failed("file", f"{domain.file.path}: {exc}")
            # The bad content stays "seen", so it is reported once; a new write is read again.
            self._reject(domain, BundleRejection("malformed", str(exc)), str(domain.file.path))
            return None
        if health is not None:
            health.succeeded()
        return bundle

    async def _fetch_endpoint(
        self,
        domain: _FederatedTrustDomain,
        endpoint: BundleEndpoint,
        anchors: Mapping[TrustDomain, Bundle],
        now: float,
    ) -> bool:
        try:
            try:
                async with asyncio.timeout(endpoint.timeout):
                    data = await self._fetch(endpoint, anchors)
            except TimeoutError:
                raise SourceError(
                    f"{endpoint.url}: no complete response within the {endpoint.timeout:g}s deadline"
                ) from None
            bundle = await asyncio.to_thread(parse_bundle_document, domain.trust_domain, data)
        except (SourceError, BundleError) as exc:
            domain.failures += 1
            domain.health.failed("fetch", str(exc))
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
        domain.health.succeeded()
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


#: Asks for a fetch of a trust domain's bundle because a JWT-SVID named a key it does not hold (any thread);
#: returns the fetch's future (True: a changed bundle was published), or None when no fetch is allowed.
BundleRefresher = Callable[[TrustDomain], "concurrent.futures.Future[bool] | None"]


def _fields(domain: _FederatedTrustDomain, **fields: object) -> dict[str, object]:
    return {"trust_domain": str(domain.trust_domain), **fields}
