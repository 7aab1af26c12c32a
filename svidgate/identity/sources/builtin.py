"""The built-in source: the built-in CA mints an X.509-SVID for every configured workload and keeps it fresh.

Every workload SPIFFE ID gets one SVID; each is re-minted when half of its actual lifetime has passed (the CA
may cap a lifetime at its own notAfter, so the half-life is computed from the certificate, not from the
configured TTL), and all of them are re-minted when the CA's signing authority changes. The CA's rotation is
driven from here (`BuiltinCa.rotate_if_due`). A new snapshot is published only when an SVID or a bundle
actually changed, so subscribers are never woken for nothing.

Minting never waits on anything but the CA: federated bundles are fetched by their own tasks
(`FederatedBundles.run`), and a CA state that cannot be written (a full or read-only disk when the next
authority is prepared or activated) does not stop minting from the current authority while it is valid -- the
rotation is retried with backoff (`CA_RETRY_FIRST` doubling to `CA_RETRY_MAX`), logged
(`ca.state_write_failed`) and counted
(`svidgate_source_failures_total{source="builtin",reason="ca_state_write"}`). Persisting a new authority
before using it stays the rule: a root that signed something but is lost at the next restart would cut off
every peer that trusts what it signed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace

from svidgate.config import FederationConfig, Workload
from svidgate.errors import CaError, JwtSvidError, SourceError, SvidgateError
from svidgate.identity.bundle import Bundle
from svidgate.identity.ca import ACTIVATE_AT, PREPARE_AT, BuiltinCa
from svidgate.identity.clock import Clock
from svidgate.identity.jwtsvid import JwtSvid, parse_jwt_svid_insecure
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.sources.base import SourceHealth, SourceStatus
from svidgate.identity.sources.federation import FederatedBundles
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid

log = logging.getLogger(__name__)

#: The background loop wakes at least this often (cheap: nothing is published unless something changed), so
#: that a suspended laptop or a stepped clock is noticed soon.
MAX_SLEEP = 60.0
#: After a failed step (e.g. the current authority expired and its successor cannot be persisted) retry after
#: this long.
RETRY_AFTER = 5.0
#: A CA rotation whose state could not be written is retried after this long, doubling up to `CA_RETRY_MAX`.
CA_RETRY_FIRST = 5.0
CA_RETRY_MAX = 300.0
#: JWT-SVIDs minted for the same (ID, audience) are reused until half their lifetime; bounded cache.
JWT_CACHE_SIZE = 1024

Sleep = Callable[[float], Awaitable[None]]


class BuiltinSource:
    """Identity from the built-in CA.

    Args:
        ca: the CA (already loaded).
        workloads: `Config.workloads`; one SVID per distinct SPIFFE ID.
        federation: federated bundles to merge into every snapshot (None when there are none).
        clock: the time source.
        x509_svid_ttl: requested lifetime of X.509-SVIDs, seconds.
        jwt_svid_ttl: lifetime of JWT-SVIDs, seconds.
        internal_ids: SPIFFE IDs svidgate itself presents (the bundle endpoint's); they get X.509-SVIDs like
            workloads, but no caller is entitled to them and no JWT-SVID is minted for them.
        sleep: how `run()` waits (tests pass a fake).

    Raises:
        SourceError: the first SVIDs cannot be minted.
    """

    def __init__(
        self,
        ca: BuiltinCa,
        workloads: Sequence[Workload],
        federation: FederatedBundles | None,
        clock: Clock,
        *,
        x509_svid_ttl: float = 3600.0,
        jwt_svid_ttl: float = 300.0,
        internal_ids: Sequence[SpiffeId] = (),
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._ca = ca
        self._clock = clock
        # Always present, possibly empty, so that a reload can add the first federated trust domain.
        self._federation = federation if federation is not None else FederatedBundles({}, clock)
        self._internal = tuple(internal_ids)
        self._x509_ttl = x509_svid_ttl
        self._jwt_ttl = jwt_svid_ttl
        self._sleep = sleep
        # One SVID per SPIFFE ID; config guarantees that duplicate entries agree on DNS names and hint.
        self._workloads = self._by_id(workloads)
        self._svids: dict[SpiffeId, X509Svid] = {}
        self._due: dict[SpiffeId, float] = {}
        self._signing_cert = ca.current.certificate
        self._jwt_cache: dict[tuple[SpiffeId, tuple[str, ...]], tuple[float, JwtSvid]] = {}
        self._jwt_lock = threading.Lock()
        # `run()` steps in a worker thread while a reload may call `set_workloads()` on the event loop. Only
        # the CA and minting happen under it, never network I/O.
        self._step_lock = threading.RLock()
        self._health = SourceHealth("builtin", ca.trust_domain.name, clock)
        self._ca_retry_at = float("-inf")
        self._ca_failures = 0
        try:
            self._step(initial=True)
        except SvidgateError as exc:
            raise SourceError(f"built-in source: cannot mint the first SVIDs: {exc}") from None
        if federation is not None:
            federation.load_files()  # local bootstrap bundles; endpoints are fetched by `run()`
        self.feed = SnapshotFeed(self._snapshot(version=1))

    @property
    def trust_domain(self) -> TrustDomain:
        return self._ca.trust_domain

    @property
    def federation(self) -> FederatedBundles | None:
        """The federated trust domains' watcher (e.g. to `fetch_now()` one of them), None without any."""
        return self._federation

    def statuses(self) -> list[SourceStatus]:
        """The built-in CA's health (down while a CA rotation cannot be persisted), then federation's."""
        federated = self._federation.statuses() if self._federation is not None else []
        return [self._health.status(), *federated]

    def refresh(self) -> bool:
        """Rotate the CA if due and re-mint SVIDs that are due, now; publish on change. Never waits on the
        network (federated bundles have their own tasks).

        Returns:
            True when a new snapshot was published. On failure the last snapshot stays and False is returned
            (the failure is logged); the next call retries.
        """
        try:
            changed = self._step(initial=False)
        except SvidgateError as exc:
            log.error("source.refresh_failed", extra={"fields": {"source": "builtin", "error": str(exc)}})
            return False
        if changed:
            self._publish()
        return changed

    def set_workloads(self, workloads: Sequence[Workload]) -> bool:
        """Apply a reloaded `workloads[]`: mint SVIDs for new SPIFFE IDs, re-mint those whose DNS names or
        hint changed, and stop serving the ones no longer configured. Call from the event loop.

        Returns:
            True when a new snapshot was published.
        """
        updated = self._by_id(workloads)
        with self._step_lock:
            previous, self._workloads = self._workloads, updated
            removed = [spiffe_id for spiffe_id in self._svids if spiffe_id not in updated]
            for spiffe_id in removed:
                self._due.pop(spiffe_id, None)
            self._svids = {k: v for k, v in self._svids.items() if k in updated}
            for spiffe_id, workload in updated.items():
                old = previous.get(spiffe_id)
                if old is not None and (old.dns_names, old.hint) != (workload.dns_names, workload.hint):
                    self._due[spiffe_id] = float("-inf")
            with self._jwt_lock:
                self._jwt_cache = {k: v for k, v in self._jwt_cache.items() if k[0] in updated}
        if self.refresh():
            return True
        if removed:
            self._publish()
            return True
        return False

    def set_federation(self, federation: Mapping[TrustDomain, FederationConfig]) -> None:
        """Apply a reloaded ``federation`` section (`FederatedBundles.set_federation`); call on the loop.

        A removed trust domain leaves the published snapshot before this returns; a new one is fetched at
        once by its own task and published when it arrives.
        """
        if self._federation.set_federation(federation):
            self._publish()

    def request_bundle_refresh(self, trust_domain: TrustDomain) -> concurrent.futures.Future[bool] | None:
        """Fetch a federated trust domain's bundle now, for a JWT-SVID with an unknown ``kid``; thread-safe.

        Returns:
            The shared fetch (True once a changed bundle is published), or None when no fetch is allowed.
        """
        return self._federation.request_fetch(trust_domain)

    def _by_id(self, workloads: Sequence[Workload]) -> dict[SpiffeId, Workload]:
        by_id: dict[SpiffeId, Workload] = {}
        for workload in workloads:
            by_id.setdefault(workload.spiffe_id, workload)
        for spiffe_id in self._internal:
            # No selectors: `Workload.matches` is False for every caller, so SDS and the Workload API never
            # hand this SVID out.
            by_id.setdefault(spiffe_id, Workload(spiffe_id, ()))
        return by_id

    def _publish(self) -> None:
        """Publish own SVIDs and bundle with the federated bundles as they are now (on the event loop)."""
        snapshot = self._snapshot(self.feed.current().version + 1)
        self.feed.publish(snapshot)
        log.info(
            "source.published",
            extra={
                "fields": {"source": "builtin", "version": snapshot.version, "svids": len(snapshot.svids)}
            },
        )

    def next_due(self) -> float:
        """The clock time of the next scheduled change (SVID half-life, CA rotation step or retry)."""
        current = self._ca.current
        ca_due = current.lifetime_point(PREPARE_AT if self._ca.next is None else ACTIVATE_AT)
        return min([max(ca_due, self._ca_retry_at), *self._due.values()])

    async def run(self) -> None:
        """Mint and rotate when due, and keep federated bundles current (their own tasks), until cancelled."""
        await self._federation.run_beside(self._keep_minting(), self._own_bundles, self._publish)

    async def _keep_minting(self) -> None:
        # Key generation and signing are CPU work, so each step runs in a worker thread; the snapshot is
        # published from the event loop (the feed is not thread-safe).
        while True:
            try:
                changed = await asyncio.to_thread(self._step_safely)
            except asyncio.CancelledError:
                raise
            if changed is None:
                delay = RETRY_AFTER
            else:
                if changed:
                    self._publish()
                delay = min(max(self.next_due() - self._clock(), 0.0), MAX_SLEEP)
            await self._sleep(delay)

    def mint_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        """A JWT-SVID for one of the configured workload IDs, reused until half its lifetime.

        Raises:
            SourceError: the ID is not a configured workload, the audience is empty, or minting fails.
        """
        if spiffe_id not in self._workloads or not self._workloads[spiffe_id].selectors:
            raise SourceError(f"{spiffe_id} is not a configured workload of the built-in source")
        if not audience:
            raise SourceError("a JWT-SVID needs at least one audience")
        key = (spiffe_id, tuple(audience))
        now = self._clock()
        with self._jwt_lock:
            cached = self._jwt_cache.get(key)
            if cached is not None and now < cached[0]:
                return cached[1]
        try:
            token = self._ca.mint_jwt_svid(spiffe_id, audience, self._jwt_ttl)
            svid = parse_jwt_svid_insecure(token)
        except (CaError, JwtSvidError) as exc:
            raise SourceError(f"cannot mint a JWT-SVID for {spiffe_id}: {exc}") from None
        issued = float(svid.issued_at) if svid.issued_at is not None else now
        with self._jwt_lock:
            if len(self._jwt_cache) >= JWT_CACHE_SIZE:
                self._jwt_cache.clear()
            self._jwt_cache[key] = (issued + (svid.expiry - issued) / 2, svid)
        return svid

    # -- internals -------------------------------------------------------------------------------------

    def _step_safely(self) -> bool | None:
        try:
            return self._step(initial=False)
        except SvidgateError as exc:
            log.error("source.refresh_failed", extra={"fields": {"source": "builtin", "error": str(exc)}})
            return None

    def _step(self, *, initial: bool) -> bool:
        with self._step_lock:
            try:
                return self._step_locked(initial=initial)
            except SvidgateError as exc:
                self._health.failed("mint", str(exc))
                raise

    def _rotate_ca(self) -> tuple[bool, bool]:
        """Advance the CA's rotation unless a failed write is waiting for its retry time.

        Returns:
            (whether the bundle or the signing authority changed, whether the CA state is persisted).
        """
        now = self._clock()
        # Once the current authority has expired nothing can be minted without the rotation: no backoff then.
        if now < self._ca_retry_at and now < self._ca.current.not_after:
            return False, False
        try:
            changed = self._ca.rotate_if_due()
        except CaError as exc:
            self._ca_failures += 1
            retry = min(CA_RETRY_FIRST * 2 ** (self._ca_failures - 1), CA_RETRY_MAX)
            self._ca_retry_at = now + retry
            self._health.failed("ca_state_write", str(exc))
            current = self._ca.current
            log.error(
                "ca.state_write_failed",
                extra={
                    "fields": {
                        "trust_domain": self._ca.trust_domain.name,
                        "error": str(exc),
                        "retry_seconds": retry,
                        "signing_with": "the current authority",
                        "current_valid_seconds": round(current.not_after - now),
                    }
                },
            )
            return False, False
        self._ca_failures = 0
        self._ca_retry_at = float("-inf")
        return changed, True

    def _step_locked(self, *, initial: bool) -> bool:
        # A rotation that cannot be persisted leaves the current authority signing; minting below fails
        # (closed) only once that authority has expired.
        changed, persisted = self._rotate_ca()
        if self._ca.current.certificate is not self._signing_cert:
            # Signing moved to the next authority: re-mint everything so that no SVID depends on the old root
            # (which leaves the bundle at its notAfter), and drop JWT-SVIDs signed with the old key.
            self._signing_cert = self._ca.current.certificate
            self._due = dict.fromkeys(self._due, float("-inf"))
            with self._jwt_lock:
                self._jwt_cache.clear()
        now = self._clock()
        # Copy on write: the event loop reads `_svids` for a snapshot while this may run in a worker thread.
        svids = dict(self._svids)
        try:
            for spiffe_id, workload in self._workloads.items():
                if spiffe_id in svids and now < self._due[spiffe_id]:
                    continue
                svid = self._ca.mint_x509_svid(spiffe_id, self._x509_ttl, workload.dns_names)
                if workload.hint:
                    svid = replace(svid, hint=workload.hint)
                svids[spiffe_id] = svid
                self._due[spiffe_id] = now + (svid.expires_at - now) / 2
                changed = True
                if not initial:
                    log.info(
                        "source.svid_minted",
                        extra={"fields": {"spiffe_id": str(spiffe_id), "expires_at": int(svid.expires_at)}},
                    )
        finally:
            self._svids = svids
        if persisted:
            self._health.succeeded()
        return changed

    def _own_bundles(self) -> Mapping[TrustDomain, Bundle]:
        return {self._ca.trust_domain: self._ca.bundle()}

    def _snapshot(self, version: int) -> IdentitySnapshot:
        bundles: dict[TrustDomain, Bundle] = {}
        if self._federation is not None:
            bundles.update(self._federation.bundles())
        bundles.update(self._own_bundles())
        return IdentitySnapshot(svids=dict(self._svids), bundles=bundles, version=version)
