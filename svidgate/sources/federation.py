"""Trust bundles of federated trust domains: watched files and SPIFFE bundle endpoints.

A `FederatedBundles` keeps one bundle per configured foreign trust domain. Under `run()` every trust domain
has its own task and schedule, independent of the owner's minting and CA rotation and of every other trust
domain: a partner whose endpoint hangs delays nothing but its own bundle. Each task re-reads its bundle file
when it changes and fetches its endpoint when the refresh time has come, then tells the owner (a source) that
a bundle changed; the source merges `bundles()` into its next snapshot. `fetch_now()` asks one trust domain's
task to fetch at once; adding or removing a trust domain is starting or cancelling one task.

Each step has two halves: getting the document (`fetch_bundle`, or reading the file) and applying it
(`_install`, which decides whether a parsed bundle replaces the one held). Fetching is aiohttp's client, so
it never blocks the event loop, and it runs under a **total deadline** (`bundle_endpoint.timeout`, default
10 s) covering connect, TLS, request, headers and body: a per-read timeout would let an endpoint that sends
one byte every few seconds hold the fetch for as long as it likes. Cancelling the task (SIGTERM) ends a fetch
at once. Loading TLS roots, file reads and document parsing run in a worker thread.

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

Why one module (over 600 lines): the per-trust-domain schedule, the bundle endpoint client and the update
rules are one state machine per partner (fetch, apply or reject, back off, refetch on an unknown key); the
client (`fetch_bundle`) is the seam along which it splits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, LineTooLong, TransferEncodingError
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
#: aiohttp's limits on a response head: the status line and each header field are at most this long, and
#: there are at most `MAX_RESPONSE_HEADERS` fields, so a head holds at most 2 MiB. A bundle endpoint sends a
#: handful of short headers (a CDN in front of an https_web endpoint, one or two dozen).
MAX_HEADER_LINE_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 32
RACY_SECONDS = 2.0
#: A trust domain's task looks at its schedule at least this often, so that a stepped clock is noticed soon.
MAX_SLEEP = 60.0
#: An unknown JWT-SVID ``kid`` fetches a trust domain's endpoint at most this often (seconds): tokens with
#: made-up key IDs must not turn into a flood of requests to the partner.
UNKNOWN_KEY_FETCH_INTERVAL = 10.0

#: Fetches a bundle endpoint: (endpoint, trust bundles to authenticate https_spiffe with) -> document bytes.
#: `FederatedBundles` runs every call under the endpoint's total deadline, whatever the fetcher does.
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
    """GET a SPIFFE bundle endpoint with aiohttp's client and return the document, within `endpoint.timeout`.

    Profiles (SPIFFE_Federation.md 5):

    - ``https_web``: ordinary Web PKI TLS; the server certificate must chain to the system CAs (or to
      `endpoint.ca_file`) and match the URL's host name.
    - ``https_spiffe``: the server presents an X.509-SVID. What is pinned is the endpoint's SPIFFE ID
      (`endpoint.endpoint_spiffe_id`), not a key or a certificate: the chain must validate against the X.509
      authorities of that ID's trust domain *as currently held* (so the trust anchors roll forward with each
      bundle update, as the spec intends), and the leaf's one URI SAN must be exactly that ID, checked as the
      handshake completes, before the request is sent. The URL's host name is not checked; SVIDs need not
      carry DNS names.

    Redirects are not followed: a 3xx fails the fetch, naming where it pointed. SPIFFE_Federation.md 5.2.1.4
    and 5.2.2.4 say clients SHOULD follow one (with the same TLS checks), and 7.5.1 calls that a default
    which operators who have vetted their endpoints may turn off so there are no surprises: a redirect moves
    the trust put in the configured URL to a host the configuration never named (with https_web, to anyone
    holding a Web PKI certificate for it). svidgate fetches exactly the URL it is configured with.

    The body is read up to 1 MiB (a larger Content-Length is refused before reading, any other body once it
    passes the cap); the status line and each header are at most `MAX_HEADER_LINE_BYTES`, and there are at
    most `MAX_RESPONSE_HEADERS` headers.

    Args:
        endpoint: the endpoint configuration.
        bundles: the bundles known now (own and federated), for https_spiffe.

    Returns:
        The response body.

    Raises:
        SourceError: one line naming the URL and what failed: the deadline, the connection, TLS or the
            endpoint's SPIFFE ID, the HTTP status, a body over 1 MiB or a malformed response.
    """
    url = urllib.parse.urlsplit(endpoint.url)
    if url.scheme != "https" or not url.hostname:
        raise SourceError(f"{endpoint.url}: not an https URL")
    # Loading roots (the system store: files read and parsed for some milliseconds) is no work for the loop.
    context = await asyncio.to_thread(_tls_context, endpoint, bundles)
    try:
        async with (
            _session(endpoint) as session,
            session.get(endpoint.url, ssl=context, allow_redirects=False) as response,
        ):
            return await _read_bundle(response, endpoint.url)
    except TimeoutError:  # aiohttp's total deadline (ClientTimeout), or a connect/read timeout beneath it
        raise SourceError(
            f"{endpoint.url}: no complete response within the {endpoint.timeout:g}s deadline"
        ) from None
    except aiohttp.ClientError as exc:
        raise _fetch_error(endpoint.url, exc) from None
    except OSError as exc:  # anything aiohttp let through unwrapped
        raise SourceError(f"{endpoint.url}: {type(exc).__name__}: {exc}") from None


def _session(endpoint: BundleEndpoint) -> aiohttp.ClientSession:
    """A session for one fetch.

    One per fetch, neither per trust domain nor shared: fetches are minutes apart and a connection is never
    reused (``Connection: close``; an https_spiffe connection was authenticated with the anchors held when
    it opened, which a later fetch must not inherit), so a longer-lived session would hold nothing useful,
    only state to close on cancellation and reload.

    aiohttp retries the GET once, within the same deadline, when a connection closes before any response
    (RFC 9112 9.3.1 allows it for idempotent requests).
    """
    return aiohttp.ClientSession(
        # The connection closes with the fetch, by abort (aiohttp's default without ssl_shutdown_timeout):
        # a close_notify exchange with a misbehaving peer would be one more thing that could wait.
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=endpoint.timeout),
        # No compression asked for, so none to undo; a JSON (or PEM) bundle is what is accepted.
        headers={"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "svidgate"},
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        max_line_size=MAX_HEADER_LINE_BYTES,
        max_field_size=MAX_HEADER_LINE_BYTES,
        max_headers=MAX_RESPONSE_HEADERS,
    )


async def _read_bundle(response: aiohttp.ClientResponse, url: str) -> bytes:
    if response.status != 200:
        message = f"{url}: HTTP {response.status} {response.reason or ''}".rstrip()
        location = response.headers.get("Location")
        if 300 <= response.status < 400 and location is not None:
            message += f"; the redirect to {location[:200]!r} is not followed (SPIFFE_Federation.md 7.5.1)"
        raise SourceError(message)
    transfer_encoding = ", ".join(response.headers.getall("Transfer-Encoding", ()))
    if transfer_encoding and transfer_encoding.lower() != "chunked":
        # RFC 9112 6.1: chunked must be the final coding; none other was asked for (Accept-Encoding).
        raise SourceError(f"{url}: unsupported Transfer-Encoding {transfer_encoding[:40]!r}")
    content_encoding = ", ".join(response.headers.getall("Content-Encoding", ()))
    if content_encoding and content_encoding.lower() != "identity":
        raise SourceError(f"{url}: unsupported Content-Encoding {content_encoding[:40]!r}")
    # llhttp (aiohttp's C parser) refuses a repeated Content-Length itself; its pure-Python parser (without
    # the C extension) takes one of them. Framing must be unambiguous whichever parser read the head.
    if len(set(response.headers.getall("Content-Length", ()))) > 1:
        raise SourceError(f"{url}: more than one Content-Length header (conflicting framing)")
    too_large = SourceError(f"{url}: bundle larger than {MAX_BUNDLE_BYTES} bytes")
    if response.content_length is not None and response.content_length > MAX_BUNDLE_BYTES:
        raise too_large
    body = bytearray()
    # Never asks for more than one byte past the cap: a body that does not end there is refused.
    while chunk := await response.content.read(MAX_BUNDLE_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_BUNDLE_BYTES:
            raise too_large
    return bytes(body)


def _fetch_error(url: str, exc: aiohttp.ClientError) -> SourceError:
    """One line for a failed fetch, from aiohttp's exception and, beneath it, its HTTP parser's."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        if isinstance(error, _EndpointIdMismatchError):
            return SourceError(f"{url}: {error}")
        return SourceError(f"{url}: TLS failed: {_tls_reason(error)}")
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return SourceError(f"{url}: TLS failed: {_tls_reason(exc.os_error)}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return SourceError(f"{url}: cannot resolve {exc.host}: {exc.os_error.strerror or exc.os_error}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        return SourceError(f"{url}: cannot connect: {type(error).__name__}: {error.strerror or error}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return SourceError(f"{url}: the connection closed before the response was complete")
    parser_error = _parser_error(exc)
    if parser_error is not None:
        return SourceError(f"{url}: {_malformed(parser_error)}")
    return SourceError(f"{url}: {type(exc).__name__}: {exc}")


def _tls_reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return str(error)


def _parser_error(exc: BaseException) -> HttpProcessingError | None:
    """The innermost HTTP parser error among `exc`'s causes (aiohttp re-wraps the parser's own)."""
    found: HttpProcessingError | None = None
    cause = exc.__cause__
    for _ in range(8):  # a bounded walk: a cause chain is short, and must not be a loop
        if cause is None:
            break
        if isinstance(cause, HttpProcessingError):
            found = cause
        cause = cause.__cause__
    return found


def _malformed(error: HttpProcessingError) -> str:
    """What was wrong with the response, in the words an operator reads in the log."""
    if isinstance(error, BadStatusLine):
        return "not an HTTP/1.1 response"
    if isinstance(error, LineTooLong):
        return f"a response line is longer than {MAX_HEADER_LINE_BYTES} bytes"
    # llhttp's reason comes first, then an excerpt of the offending bytes, which are the peer's and stay out
    # of the log line.
    reason = "".join(c if c.isprintable() else " " for c in error.message.split(":\n", 1)[0])[:120]
    lowered = reason.lower()
    if lowered.startswith("not enough data"):  # Content-Length or chunked framing cut short
        return "the connection closed before the response was complete"
    if "content-length" in lowered:
        if "duplicate" in lowered:
            return "more than one Content-Length header (conflicting framing)"
        return f"malformed Content-Length ({reason})"
    if "chunk" in lowered or isinstance(error, TransferEncodingError):
        return f"malformed chunked body ({reason})"
    if "too many headers" in lowered:
        return f"more than {MAX_RESPONSE_HEADERS} response headers"
    return f"malformed response ({reason})"


def _tls_context(endpoint: BundleEndpoint, bundles: Mapping[TrustDomain, Bundle]) -> ssl.SSLContext:
    """The client TLS context of one fetch (see `fetch_bundle` for what each profile checks).

    Raises:
        SourceError: https_spiffe without authorities for the endpoint ID's trust domain, or a bad ca_file.
    """
    context: ssl.SSLContext
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
        spiffe_context = _SpiffeEndpointContext(ssl.PROTOCOL_TLS_CLIENT)
        spiffe_context.endpoint_id = expected_id
        spiffe_context.check_hostname = False  # SPIFFE authenticates the URI SAN (`_SpiffeEndpointTLS`)
        spiffe_context.verify_mode = ssl.CERT_REQUIRED
        try:
            spiffe_context.load_verify_locations(cadata=pem_bundle(anchor).decode("ascii"))
        except ssl.SSLError as exc:
            raise SourceError(
                f"{endpoint.url}: cannot load the {expected_id.trust_domain} authorities: {exc}"
            ) from None
        context = spiffe_context
    else:
        cafile = str(endpoint.ca_file) if endpoint.ca_file is not None else None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"{endpoint.url}: cannot load ca_file {cafile}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _EndpointIdMismatchError(ssl.SSLCertVerificationError):
    """An https_spiffe endpoint's chain validated, but its leaf is not an X.509-SVID for the configured ID.

    A certificate verification error, so that asyncio and aiohttp treat it as the failed handshake it is.
    """

    def __str__(self) -> str:
        return str(self.args[0])  # SSLError's own str() shows the args tuple unless given an errno


def _check_peer_spiffe_id(der: bytes | None, expected: SpiffeId) -> None:
    if not der:
        raise _EndpointIdMismatchError("the server presented no certificate")
    try:
        actual = spiffe_id_of(x509.load_der_x509_certificate(der), "endpoint certificate")
    except (X509SvidError, ValueError) as exc:
        raise _EndpointIdMismatchError(str(exc)) from None
    if actual != expected:
        raise _EndpointIdMismatchError(f"the endpoint presented {actual}, expected {expected}")


class _SpiffeEndpointTLS(ssl.SSLObject):
    """The TLS state of an https_spiffe connection: the handshake completes only with the endpoint's SVID.

    OpenSSL validates the chain against the trust domain's authorities during the handshake, and Python has
    no certificate verify callback; so the SPIFFE ID (our strict X.509-SVID rules, `spiffe_id_of`) is checked
    here, the moment OpenSSL reports the handshake done and before a byte of HTTP is sent. asyncio's TLS
    transport drives every handshake through this method (`SSLContext.sslobject_class`), and an
    `ssl.SSLCertVerificationError` raised here fails the connection like any certificate error.
    """

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_peer_spiffe_id(
            self.getpeercert(binary_form=True), cast(_SpiffeEndpointContext, self.context).endpoint_id
        )


class _SpiffeEndpointContext(ssl.SSLContext):
    """A client context for an https_spiffe endpoint, holding the SPIFFE ID its server must present."""

    sslobject_class = _SpiffeEndpointTLS
    endpoint_id: SpiffeId


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
