"""The own SPIFFE bundle endpoint (SPIFFE_Federation.md) and, beside it, OpenID Connect discovery.

A partner trust domain fetches ``GET /`` and receives the own trust domain's bundle in the SPIFFE bundle
format (SPIFFE_Trust_Domain_and_Bundle.md 4) with ``spiffe_sequence`` and ``spiffe_refresh_hint``. Relying
parties that speak OIDC (cloud IAM, Vault) read ``<issuer path>/.well-known/openid-configuration`` and the
JWKS of the JWT-SVID keys at ``<issuer path>/keys``, the two documents SPIRE's oidc-discovery-provider serves.

Both endpoint profiles of the spec (section 5):

- ``https_spiffe``: the server presents an X.509-SVID for `BundleEndpointServerSettings.spiffe_id` taken from
  the identity snapshot, so it rotates like every SVID; a new snapshot reloads the TLS context's
  certificate and new handshakes present the new one without a restart.
- ``https_web``: the server presents `cert_file`/`key_file`, re-read when their content changes (a certificate
  renewed by cert-manager or an ACME client).

What is served is exactly the own trust domain's bundle of the current snapshot (for the built-in CA, what the
CA publishes); nothing federated is ever re-served.

``spiffe_sequence`` never goes backwards, also across restarts: `BundleSequence` persists the last served
sequence together with a digest of the authorities in ``<state_dir>/bundle_endpoint/sequence.json`` and
increments it whenever the authorities differ (taking the source's own sequence when that is higher).

The HTTP/1.1 and TLS protocol work is aiohttp's (its low-level `aiohttp.web.Server`) and the stdlib's `ssl`;
this module only bounds what a client may cost: only ``GET``, request lines and headers of at most 8 KiB, at
most `MAX_CONNECTIONS` connections at once (more are closed on accept), a TLS handshake must finish within
`HANDSHAKE_TIMEOUT`, and no connection lives longer than `CONNECTION_LIFETIME` (a slow or idle client is cut
off; a bundle fetch takes milliseconds). Responses are pre-rendered bytes, so a request costs no signing or
encoding work on the event loop.

Never imports gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from svidgate.errors import BundleError, SourceError
from svidgate.identity.bundle import Bundle
from svidgate.identity.ca import DEFAULT_REFRESH_HINT
from svidgate.identity.federation import DEFAULT_POLL_INTERVAL, BundleEndpointServerSettings
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import TrustDomain
from svidgate.identity.x509svid import X509Svid
from svidgate.logs import aiohttp_server_logger
from svidgate.sources.bundle_documents import (
    authorities_digest,
    bundle_document,
    jwks_document,
    oidc_paths,
    openid_configuration,
)

log = logging.getLogger(__name__)

#: Connections served at once; more are closed as they are accepted (partners fetch every few minutes).
MAX_CONNECTIONS = 256
#: A TLS handshake that takes longer is aborted (asyncio's default is 60 s).
HANDSHAKE_TIMEOUT = 5.0
#: No connection lives longer than this: a slow-loris client cannot hold a slot, keep-alive clients reconnect.
CONNECTION_LIFETIME = 10.0
#: Idle time allowed between requests on a keep-alive connection.
KEEPALIVE_TIMEOUT = 5.0
#: Request line and each header field; aiohttp answers 400 beyond it.
MAX_LINE = 8190
MAX_HEADERS = 32
SEQUENCE_DIR = "bundle_endpoint"
SEQUENCE_FILE = "sequence.json"

_JSON = "application/json"
#: Instead of aiohttp's default, which names the Python and aiohttp versions to anyone who asks.
_HEADERS = {"Server": "svidgate"}


# ----------------------------------------------------------------------------------------------------------
# spiffe_sequence that survives restarts
# ----------------------------------------------------------------------------------------------------------


class BundleSequence:
    """The ``spiffe_sequence`` of the served bundle, persisted so that it never goes backwards.

    The file holds ``{"sequence": n, "digest": "<sha256 of the authorities>"}``. `for_bundle` returns the
    stored sequence while the authorities are unchanged and otherwise ``max(stored + 1, bundle.sequence)``,
    written (atomically, 0600) before it is returned. If the write fails the new number is still served
    (partners need the new keys) and an error is logged: after a restart the number could then repeat once,
    never decrease below what a partner saw last from a successful write.

    Args:
        path: the state file, or None to keep the sequence in memory only (tests, a read-only state dir).
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._sequence = 0
        self._digest = ""
        if path is not None:
            self._load(path)

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> BundleSequence:
        return cls(state_dir / SEQUENCE_DIR / SEQUENCE_FILE)

    @property
    def sequence(self) -> int:
        return self._sequence

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Unreadable: start over from the source's own sequence. Refusing to serve would cut partners off.
            log.error(
                "bundle_endpoint.sequence_unreadable",
                extra={"fields": {"path": str(path), "error": str(exc)}},
            )
            return
        sequence = doc.get("sequence") if isinstance(doc, dict) else None
        digest = doc.get("digest") if isinstance(doc, dict) else None
        if isinstance(sequence, int) and not isinstance(sequence, bool) and sequence >= 0:
            self._sequence = sequence
            self._digest = digest if isinstance(digest, str) else ""

    def for_bundle(self, bundle: Bundle) -> int:
        """The sequence to serve `bundle` with (incremented and persisted when its authorities changed)."""
        digest = authorities_digest(bundle)
        if digest == self._digest:
            return self._sequence
        self._sequence = max(self._sequence + 1, bundle.sequence or 0)
        self._digest = digest
        if self._path is not None:
            try:
                _write_private(
                    self._path, json.dumps({"sequence": self._sequence, "digest": digest}).encode()
                )
            except OSError as exc:
                log.error(
                    "bundle_endpoint.sequence_not_saved",
                    extra={"fields": {"path": str(self._path), "error": exc.strerror or str(exc)}},
                )
        return self._sequence


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


# ----------------------------------------------------------------------------------------------------------
# TLS
# ----------------------------------------------------------------------------------------------------------


def server_tls_context() -> ssl.SSLContext:
    """A TLS server context (TLS 1.2+, no client certificates: a bundle endpoint is public, spec 5.2)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def load_svid(context: ssl.SSLContext, svid: X509Svid) -> None:
    """Make `context` present `svid` on every handshake from now on.

    OpenSSL copies the certificate and key into each connection when it is created, so handshakes in progress
    keep what they started with. `load_cert_chain` only reads files: the PEM goes through an anonymous memory
    file (memfd), so the private key never touches a file system.

    Raises:
        SourceError: the SVID cannot be loaded (a key type OpenSSL refuses).
    """
    key_pem = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.memfd_create("svidgate-bundle-endpoint", os.MFD_CLOEXEC)
    try:
        data = svid.cert_chain_pem() + key_pem
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        try:
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        except (ssl.SSLError, OSError) as exc:
            raise SourceError(
                f"bundle endpoint: cannot load the X.509-SVID of {svid.spiffe_id}: {exc}"
            ) from None
    finally:
        os.close(fd)


def load_cert_files(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Make `context` present the certificate chain and key in these files (https_web).

    Raises:
        SourceError: a file cannot be read or the key does not match the certificate.
    """
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as exc:
        raise SourceError(f"bundle endpoint: {cert_file} / {key_file}: {exc.reason or exc}") from None
    except OSError as exc:
        raise SourceError(f"bundle endpoint: {cert_file} / {key_file}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------


_http_log = aiohttp_server_logger(__name__ + ".http", "bundle_endpoint.bad_request")


class _Guarded(asyncio.Protocol):
    """An aiohttp connection holding one of the server's connection slots for at most `CONNECTION_LIFETIME`.

    The slot is taken when the connection is accepted (before the TLS handshake) and given back when the
    connection is lost or its lifetime ends, whichever is first: a handshake that never completes never
    reaches the application protocol, so the timer is what frees its slot.
    """

    def __init__(self, inner: asyncio.Protocol, slots: set[_Guarded], lifetime: float) -> None:
        self._inner = inner
        self._slots = slots
        self._transport: asyncio.BaseTransport | None = None
        slots.add(self)
        self._timer = asyncio.get_running_loop().call_later(lifetime, self._expire)

    def _release(self) -> None:
        self._slots.discard(self)
        self._timer.cancel()

    def _expire(self) -> None:
        self._release()
        if self._transport is not None and isinstance(self._transport, asyncio.Transport):
            self._transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Refused(asyncio.Protocol):
    """What an accepted connection beyond `MAX_CONNECTIONS` gets: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


@dataclasses.dataclass(frozen=True, slots=True)
class _Documents:
    """Everything served, rendered once per bundle change (one reference swap replaces it)."""

    routes: Mapping[str, bytes]
    sequence: int
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)


class BundleEndpointServer:
    """Serves the own trust domain's bundle (and the OIDC documents) over HTTPS.

    Args:
        host: address to bind.
        port: port to bind (0: the kernel picks; see `port` after `start`).
        settings: `Config.bundle_endpoint`.
        trust_domain: the own trust domain (whose bundle is served).
        feed: the identity feed (the bundle and, for https_spiffe, the endpoint's X.509-SVID).
        sequence: the persisted ``spiffe_sequence``.
        poll_interval: seconds between checks of https_web's certificate files.
        max_connections / connection_lifetime / handshake_timeout: the client bounds (module constants by
            default; tests shrink them).
        on_request: called with ``(document, status)`` for every answered request; `document` is
            ``bundle``, ``openid_configuration``, ``jwks`` or ``other`` (a bounded metric label).
    """

    def __init__(
        self,
        host: str,
        port: int,
        settings: BundleEndpointServerSettings,
        trust_domain: TrustDomain,
        feed: SnapshotFeed,
        sequence: BundleSequence,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_connections: int = MAX_CONNECTIONS,
        connection_lifetime: float = CONNECTION_LIFETIME,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        on_request: Callable[[str, int], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._settings = settings
        self._trust_domain = trust_domain
        self._feed = feed
        self._sequence = sequence
        self._poll_interval = poll_interval
        self._max_connections = max_connections
        self._connection_lifetime = connection_lifetime
        self._handshake_timeout = handshake_timeout
        self._on_request = on_request
        self._context = server_tls_context()
        self._documents = _Documents({}, 0, {})
        self._served_bundle: Bundle | None = None
        self._served_svid: X509Svid | None = None
        self._cert_files_key: tuple[tuple[int, int, int], ...] | None = None
        self._slots: set[_Guarded] = set()
        self._web: web.Server | None = None
        self._server: asyncio.Server | None = None
        self._follow: asyncio.Task[None] | None = None

    @property
    def sequence(self) -> int:
        """The ``spiffe_sequence`` served now."""
        return self._documents.sequence

    async def start(self) -> int:
        """Render the documents, load the certificate, bind and serve.

        Returns:
            The bound port.

        Raises:
            SourceError: nothing to present (no X.509-SVID for the endpoint's ID, unreadable certificate
                files) or no own bundle to serve.
            OSError: the address cannot be bound.
        """
        snapshot = self._feed.current()
        self._render(snapshot)
        if not self._documents.routes:
            raise SourceError(f"bundle endpoint: no bundle for the own trust domain {self._trust_domain}")
        if self._settings.profile == "https_spiffe":
            self._present_svid(snapshot, initial=True)
        else:
            self._reload_cert_files(initial=True)
        self._web = web.Server(
            self._handle,
            handler_cancellation=True,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            access_log=None,
            logger=_http_log,
        )
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self.host,
            self.port,
            ssl=self._context,
            ssl_handshake_timeout=self._handshake_timeout,
            ssl_shutdown_timeout=self._handshake_timeout,
            reuse_address=True,
            backlog=128,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._follow = asyncio.ensure_future(self._follow_changes())
        return self.port

    async def stop(self) -> None:
        """Stop accepting, cut every open connection, stop following the feed. Idempotent."""
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(BaseException):
                await self._follow
            self._follow = None
        if self._server is not None:
            self._server.close()
            for guarded in list(self._slots):
                guarded._expire()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        if self._web is not None:
            with contextlib.suppress(Exception):
                await self._web.shutdown(0.5)
            self._web = None

    # -- connections and requests ------------------------------------------------------------------------

    def _protocol(self) -> asyncio.Protocol:
        if len(self._slots) >= self._max_connections or self._web is None:
            return _Refused()
        return _Guarded(self._web(), self._slots, self._connection_lifetime)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        documents = self._documents
        name = documents.names.get(request.path, "other")
        if request.method != "GET":
            response = web.Response(status=405, text="only GET\n", headers={**_HEADERS, "Allow": "GET"})
        elif (body := documents.routes.get(request.path)) is None:
            response = web.Response(status=404, text="not found\n", headers=_HEADERS)
        else:
            # Partners must see a new bundle as soon as it is published: no HTTP caching in between.
            headers = {**_HEADERS, "Cache-Control": "no-store"}
            response = web.Response(body=body, content_type=_JSON, headers=headers)
        if self._on_request is not None:
            self._on_request(name, response.status)
        return response

    # -- following the identity source --------------------------------------------------------------------

    async def _follow_changes(self) -> None:
        version = self._feed.current().version
        web_profile = self._settings.profile == "https_web"
        while True:
            try:
                if web_profile:
                    snapshot = await asyncio.wait_for(self._feed.wait_newer(version), self._poll_interval)
                else:
                    snapshot = await self._feed.wait_newer(version)
            except TimeoutError:
                self._reload_cert_files(initial=False)
                continue
            version = snapshot.version
            try:
                self._render(snapshot)
                if not web_profile:
                    self._present_svid(snapshot, initial=False)
            except (SourceError, BundleError) as exc:
                log.error("bundle_endpoint.update_failed", extra={"fields": {"error": str(exc)}})

    def _render(self, snapshot: IdentitySnapshot) -> None:
        bundle = snapshot.bundles.get(self._trust_domain)
        if bundle is None or bundle is self._served_bundle:
            return
        sequence = self._sequence.for_bundle(bundle)
        hint = self._settings.refresh_hint
        refresh_hint = int(hint) if hint is not None else (bundle.refresh_hint or DEFAULT_REFRESH_HINT)
        routes = {"/": bundle_document(bundle, sequence, max(1, refresh_hint))}
        names = {"/": "bundle"}
        issuer = self._settings.oidc_issuer
        if issuer is not None:
            discovery, keys = oidc_paths(issuer)
            routes[discovery] = openid_configuration(issuer, bundle)
            routes[keys] = jwks_document(bundle)
            names.update({discovery: "openid_configuration", keys: "jwks"})
        changed = sequence != self._documents.sequence
        self._documents = _Documents(routes, sequence, names)
        self._served_bundle = bundle
        if changed:
            log.info(
                "bundle_endpoint.bundle_updated",
                extra={
                    "fields": {
                        "trust_domain": str(self._trust_domain),
                        "sequence": sequence,
                        "x509_authorities": len(bundle.x509_authorities),
                        "jwt_authorities": len(bundle.jwt_authorities),
                    }
                },
            )

    def _present_svid(self, snapshot: IdentitySnapshot, *, initial: bool) -> None:
        spiffe_id = self._settings.spiffe_id
        assert spiffe_id is not None  # the config loader requires it with https_spiffe
        svid = snapshot.svids.get(spiffe_id)
        if svid is None:
            if initial:
                raise SourceError(
                    f"bundle_endpoint.spiffe_id: the identity source holds no X.509-SVID for {spiffe_id}"
                )
            return  # keep presenting the last one until the source has a new one
        if svid is self._served_svid:
            return
        load_svid(self._context, svid)
        self._served_svid = svid
        if not initial:
            log.info(
                "bundle_endpoint.svid_rotated",
                extra={"fields": {"spiffe_id": str(spiffe_id), "expires_at": int(svid.expires_at)}},
            )

    def _reload_cert_files(self, *, initial: bool) -> None:
        cert_file, key_file = self._settings.cert_file, self._settings.key_file
        # Both are required with https_web (the config loader checks).
        assert cert_file is not None
        assert key_file is not None
        try:
            key = tuple(_stat_key(path) for path in (cert_file, key_file))
        except OSError as exc:
            if initial:
                raise SourceError(f"bundle endpoint: {exc.filename}: {exc.strerror}") from None
            return
        if key == self._cert_files_key:
            return
        try:
            load_cert_files(self._context, cert_file, key_file)
        except SourceError as exc:
            if initial:
                raise
            # A renewal caught half-written (certificate new, key old): keep the last good pair, retry later.
            log.warning("bundle_endpoint.certificate_rejected", extra={"fields": {"error": str(exc)}})
            return
        self._cert_files_key = key
        if not initial:
            log.info("bundle_endpoint.certificate_reloaded", extra={"fields": {"cert_file": str(cert_file)}})


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # follows symlinks: a Kubernetes Secret's ..data swap shows as a new inode
    return (st.st_mtime_ns, st.st_size, st.st_ino)


__all__ = [
    "BundleEndpointServer",
    "BundleSequence",
    "bundle_document",
    "jwks_document",
    "openid_configuration",
]
