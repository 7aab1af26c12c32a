"""The files source: an X.509-SVID and the trust bundle from PEM files that something else keeps current.

For deployments where another agent (cert-manager's csi-driver-spiffe, a SPIFFE helper sidecar, a cron job)
writes the certificate chain, key and bundle to disk. The files are checked every `poll_interval`; they are
re-read when their metadata changes and applied when their bytes change. Writers rarely replace three files
atomically, so a combination that does not fit together (a new certificate with the old key, a chain that does
not verify against the bundle) is logged once and the last good snapshot stays until a later poll sees a good
combination. The bundle file passes the acceptance rules of a federated bundle (`bundle_update_rejection`,
read up to 1 MiB): an update that is malformed or leaves the trust domain without a usable authority is
reported and the last good combination stays. This source holds no JWT signing key, so it cannot mint
JWT-SVIDs. Federated bundles are kept current by their own tasks (`FederatedBundles.run`), never in the same
step as the files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from svidgate.errors import BundleError, SourceError, X509SvidError
from svidgate.identity.bundle import (
    Bundle,
    BundleRejection,
    BundleRejectionSink,
    bundle_update_rejection,
    report_bundle_rejection,
    report_rejected_authorities,
)
from svidgate.identity.clock import Clock
from svidgate.identity.federation import DEFAULT_POLL_INTERVAL, FederationSettings
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid, parse_x509_svid, verify_x509_svid
from svidgate.sources.base import SourceHealth, SourceStatus
from svidgate.sources.federation import (
    FederatedBundles,
    FileTooLargeError,
    WatchedFile,
    parse_bundle_document,
    same_bundle,
)

log = logging.getLogger(__name__)

MAX_SLEEP = 60.0

Sleep = Callable[[float], Awaitable[None]]


class FileSource:
    """Identity from watched PEM files.

    Args:
        cert_file: the X.509-SVID chain, leaf first (PEM or concatenated DER).
        key_file: its private key (PKCS#8 PEM or DER).
        bundle_file: the own trust domain's bundle (PEM certificates or a SPIFFE bundle document).
        trust_domain: the configured trust domain; the SVID must belong to it.
        federation: federated bundles to merge (None when there are none).
        clock: the time source.
        poll_interval: seconds between checks of the files.
        sleep: how `run()` waits (tests pass a fake).
        on_bundle_rejected: told of every rejected update of the own bundle (the runtime counts them).

    Raises:
        SourceError: the files cannot be read or do not form a valid SVID at start-up.
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        bundle_file: Path,
        trust_domain: TrustDomain,
        federation: FederatedBundles | None,
        clock: Clock,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        sleep: Sleep = asyncio.sleep,
        on_bundle_rejected: BundleRejectionSink | None = None,
    ) -> None:
        self._files = (WatchedFile(cert_file), WatchedFile(key_file), WatchedFile(bundle_file))
        self._on_bundle_rejected = on_bundle_rejected
        self._contents: list[bytes | None] = [None, None, None]
        self._trust_domain = trust_domain
        # Always present, possibly empty, so that a reload can add the first federated trust domain.
        self._federation = (
            federation if federation is not None else FederatedBundles({}, clock, poll_interval)
        )
        self._clock = clock
        self._poll_interval = poll_interval
        self._sleep = sleep
        self._next_check = 0.0
        self._rejected: bytes | None = None
        self._combination_bad = False
        # The SVID and the bundle that verifies it, replaced together by one assignment: the event loop reads
        # them for a snapshot while a worker thread may be reading the files.
        self._loaded: tuple[X509Svid, Bundle] | None = None
        self._health = SourceHealth("files", trust_domain.name, clock)
        error = self._read_files()
        self._next_check = clock() + poll_interval
        if error is not None:
            raise SourceError(f"files source: {error}")
        if federation is not None:
            federation.load_files()  # local bootstrap bundles; endpoints are fetched by `run()`
        self.feed = SnapshotFeed(self._snapshot(version=1))

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def federation(self) -> FederatedBundles | None:
        """The federated trust domains' watcher (e.g. to `fetch_now()` one of them), None without any."""
        return self._federation

    def statuses(self) -> list[SourceStatus]:
        """The files' health (down while they cannot be read or do not fit together), then federation's."""
        federated = self._federation.statuses() if self._federation is not None else []
        return [self._health.status(), *federated]

    def refresh(self) -> bool:
        """Check the files now; publish when the SVID or the bundle changed.

        Returns:
            True when a new snapshot was published.
        """
        changed = self._step()
        if changed:
            self._publish()
        return changed

    def next_due(self) -> float:
        return self._next_check

    async def run(self) -> None:
        """Poll the files, and keep federated bundles current (their own tasks), until cancelled."""
        await self._federation.run_beside(self._poll_files(), self._own_bundles, self._publish)

    async def _poll_files(self) -> None:
        # Reads run in a worker thread; publishing on the loop.
        while True:
            if await asyncio.to_thread(self._step):
                self._publish()
            await self._sleep(min(max(self.next_due() - self._clock(), 0.0), MAX_SLEEP))

    def set_federation(self, federation: Mapping[TrustDomain, FederationSettings]) -> None:
        """Apply a reloaded ``federation`` section (`FederatedBundles.set_federation`); call on the loop."""
        if self._federation.set_federation(federation):
            self._publish()

    def request_bundle_refresh(self, trust_domain: TrustDomain) -> concurrent.futures.Future[bool] | None:
        """Fetch a federated trust domain's bundle now, for an unknown JWT-SVID ``kid``; thread-safe."""
        return self._federation.request_fetch(trust_domain)

    def mint_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        """Always fails: files provide no JWT signing key.

        Raises:
            SourceError: always.
        """
        raise SourceError("the files source cannot mint JWT-SVIDs (it holds no JWT signing key)")

    # -- internals -------------------------------------------------------------------------------------

    def _step(self) -> bool:
        now = self._clock()
        if now < self._next_check:
            return False
        self._next_check = now + self._poll_interval
        before = self._loaded
        self._read_files()
        return self._loaded is not before

    def _read_files(self) -> str | None:
        """Re-read changed files; install them when they form a valid SVID. Returns the problem, if any."""
        any_new = False
        for index, watched in enumerate(self._files):
            try:
                data = watched.poll()
            except FileTooLargeError as exc:
                # Seen, so reported once per change; the last good combination stays.
                too_large = BundleRejection("too_large", str(exc)) if index == 2 else None
                self._combination_bad = True
                self._reject(str(exc), str(exc).encode(), too_large)
                return str(exc)
            except OSError as exc:
                watched.forget()
                problem = f"cannot read {watched.path}: {exc.strerror or exc}"
                self._reject(problem, problem.encode())
                return problem
            if data is not None:
                self._contents[index] = data
                any_new = True
        if not any_new:
            # Readable again and unchanged: what is loaded is still what the files hold.
            if not self._combination_bad:
                self._rejected = None
                self._health.succeeded()
            return None
        chain, key, bundle_data = self._contents
        assert chain is not None
        assert key is not None
        assert bundle_data is not None
        combined = hashlib.sha256(b"\0".join((chain, key, bundle_data))).digest()
        held = self._loaded[1] if self._loaded is not None else None
        try:
            bundle = parse_bundle_document(self._trust_domain, bundle_data)
        except BundleError as exc:
            self._combination_bad = True
            self._reject(str(exc), combined, BundleRejection("malformed", str(exc)))
            return str(exc)
        rejection = bundle_update_rejection(held, bundle)
        if rejection is not None:
            self._combination_bad = True
            self._reject(rejection.detail, combined, rejection)
            return rejection.detail
        try:
            svid = parse_x509_svid(chain, key)
            if not svid.spiffe_id.member_of(self._trust_domain):
                raise X509SvidError(f"{svid.spiffe_id} is not in the trust domain {self._trust_domain}")
            verify_x509_svid(svid.cert_chain, {self._trust_domain: bundle}, self._clock())
        except X509SvidError as exc:
            problem = str(exc)
            self._combination_bad = True
            self._reject(problem, combined)
            return problem
        self._rejected = None
        if held is None or not same_bundle(held, bundle):
            report_rejected_authorities(bundle, str(self._files[2].path))
        self._combination_bad = False
        self._loaded = (svid, bundle)
        self._health.succeeded()
        log.info(
            "source.files_loaded",
            extra={"fields": {"spiffe_id": str(svid.spiffe_id), "expires_at": int(svid.expires_at)}},
        )
        return None

    def _reject(self, problem: str, digest: bytes, bundle_rejection: BundleRejection | None = None) -> None:
        self._health.failed("files", problem)
        # Log each bad combination once, not on every poll.
        if digest == self._rejected:
            return
        self._rejected = digest
        if bundle_rejection is not None:
            report_bundle_rejection(
                self._trust_domain,
                bundle_rejection,
                str(self._files[2].path),
                kept_last=self._loaded is not None,
                sink=self._on_bundle_rejected,
            )
            return
        log.warning(
            "source.files_invalid",
            extra={
                "fields": {
                    "cert_file": str(self._files[0].path),
                    "error": problem,
                    "kept_last_good": self._loaded is not None,
                }
            },
        )

    def _own_bundles(self) -> dict[TrustDomain, Bundle]:
        loaded = self._loaded
        return {self._trust_domain: loaded[1]} if loaded is not None else {}

    def _snapshot(self, version: int) -> IdentitySnapshot:
        bundles: dict[TrustDomain, Bundle] = {}
        if self._federation is not None:
            bundles.update(self._federation.bundles())
        loaded = self._loaded
        if loaded is not None:
            bundles[self._trust_domain] = loaded[1]
        svids = {loaded[0].spiffe_id: loaded[0]} if loaded is not None else {}
        return IdentitySnapshot(svids=svids, bundles=bundles, version=version)

    def _publish(self) -> None:
        snapshot = self._snapshot(self.feed.current().version + 1)
        self.feed.publish(snapshot)
        log.info("source.published", extra={"fields": {"source": "files", "version": snapshot.version}})
