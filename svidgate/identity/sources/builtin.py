"""The built-in source: the built-in CA mints an X.509-SVID for every configured workload and keeps it fresh.

Every workload SPIFFE ID gets one SVID; each is re-minted when half of its actual lifetime has passed (the CA
may cap a lifetime at its own notAfter, so the half-life is computed from the certificate, not from the
configured TTL), and all of them are re-minted when the CA's signing authority changes. The CA's rotation is
driven from here (`BuiltinCa.rotate_if_due`). A new snapshot is published only when an SVID or a bundle
actually changed, so subscribers are never woken for nothing.
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
from svidgate.identity.sources.federation import FederatedBundles, LiveFederation
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid

log = logging.getLogger(__name__)

#: The background loop wakes at least this often (cheap: nothing is published unless something changed), so
#: that a suspended laptop or a stepped clock is noticed soon.
MAX_SLEEP = 60.0
#: After a failed step (e.g. the CA state cannot be written) retry after this long.
RETRY_AFTER = 5.0
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
        self._live = LiveFederation(self._federation, self._own_bundles, self._publish)
        self._x509_ttl = x509_svid_ttl
        self._jwt_ttl = jwt_svid_ttl
        self._sleep = sleep
        self._internal = tuple(internal_ids)
        # One SVID per SPIFFE ID; config guarantees that duplicate entries agree on DNS names and hint.
        self._workloads = self._by_id(workloads)
        self._svids: dict[SpiffeId, X509Svid] = {}
        self._due: dict[SpiffeId, float] = {}
        self._signing_cert = ca.current.certificate
        self._jwt_cache: dict[tuple[SpiffeId, tuple[str, ...]], tuple[float, JwtSvid]] = {}
        self._jwt_lock = threading.Lock()
        # `run()` steps in a worker thread while a reload may call `set_workloads()` on the event loop.
        self._step_lock = threading.RLock()
        try:
            self._step(initial=True)
        except SvidgateError as exc:
            raise SourceError(f"built-in source: cannot mint the first SVIDs: {exc}") from None
        self.feed = SnapshotFeed(self._snapshot(version=1))

    @property
    def trust_domain(self) -> TrustDomain:
        return self._ca.trust_domain

    def refresh(self) -> bool:
        """Rotate the CA if due, re-mint SVIDs that are due, re-read federated bundles; publish on change.

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
                del self._svids[spiffe_id]
                self._due.pop(spiffe_id, None)
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
        snapshot = self._snapshot(self.feed.current().version + 1)
        self.feed.publish(snapshot)
        log.info(
            "source.published",
            extra={
                "fields": {"source": "builtin", "version": snapshot.version, "svids": len(snapshot.svids)}
            },
        )

    def next_due(self) -> float:
        """The clock time of the next scheduled change (SVID half-life, CA rotation step, bundle check)."""
        current = self._ca.current
        ca_due = current.lifetime_point(PREPARE_AT if self._ca.next is None else ACTIVATE_AT)
        federation_due = self._federation.next_due() if self._federation is not None else float("inf")
        return min([ca_due, federation_due, *self._due.values()])

    async def run(self) -> None:
        """Call `refresh()` whenever something is due, until cancelled.

        Federated bundle fetches block on the network, so each step runs in a worker thread; the snapshot is
        published from the event loop (the feed is not thread-safe).
        """
        self._live.bind(asyncio.get_running_loop())
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
            await self._live.sleep(delay, self._sleep)

    def set_federation(self, federation: Mapping[TrustDomain, FederationConfig]) -> None:
        """Apply a reloaded ``federation`` section (`LiveFederation.reconfigure`); call on the loop."""
        self._live.reconfigure(federation)

    def request_bundle_refresh(self, trust_domain: TrustDomain) -> concurrent.futures.Future[bool] | None:
        """Fetch a federated trust domain's bundle now, for a JWT-SVID with an unknown ``kid``; thread-safe.

        Returns:
            The shared fetch (True once a changed bundle is published), or None when no fetch is allowed.
        """
        return self._live.request_fetch(trust_domain)

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
            return self._step_locked(initial=initial)

    def _step_locked(self, *, initial: bool) -> bool:
        changed = self._ca.rotate_if_due()
        if self._ca.current.certificate is not self._signing_cert:
            # Signing moved to the next authority: re-mint everything so that no SVID depends on the old root
            # (which leaves the bundle at its notAfter), and drop JWT-SVIDs signed with the old key.
            self._signing_cert = self._ca.current.certificate
            self._due = dict.fromkeys(self._due, float("-inf"))
            with self._jwt_lock:
                self._jwt_cache.clear()
        now = self._clock()
        for spiffe_id, workload in self._workloads.items():
            if spiffe_id in self._svids and now < self._due[spiffe_id]:
                continue
            svid = self._ca.mint_x509_svid(spiffe_id, self._x509_ttl, workload.dns_names)
            if workload.hint:
                svid = replace(svid, hint=workload.hint)
            self._svids[spiffe_id] = svid
            self._due[spiffe_id] = now + (svid.expires_at - now) / 2
            changed = True
            if not initial:
                log.info(
                    "source.svid_minted",
                    extra={"fields": {"spiffe_id": str(spiffe_id), "expires_at": int(svid.expires_at)}},
                )
        if self._federation is not None:
            changed |= self._federation.refresh(self._own_bundles())
        return changed

    def _own_bundles(self) -> Mapping[TrustDomain, Bundle]:
        return {self._ca.trust_domain: self._ca.bundle()}

    def _snapshot(self, version: int) -> IdentitySnapshot:
        bundles: dict[TrustDomain, Bundle] = {}
        if self._federation is not None:
            bundles.update(self._federation.bundles())
        bundles.update(self._own_bundles())
        return IdentitySnapshot(svids=dict(self._svids), bundles=bundles, version=version)
