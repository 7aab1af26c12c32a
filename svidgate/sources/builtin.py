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

Templated workloads (``spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}``) have no SVID until a caller they entitle asks:
the services `acquire` the filled-in ID for as long as a stream serves it (the first acquire mints it, off the
event loop) and `release` it when the stream ends. An SVID that is held is rotated like every other; one that
no stream has held for `TEMPLATED_IDLE` seconds is dropped, so memory follows the pods that are actually
running on the node, not every pod that ever ran.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from svidgate.bounded import BoundedDict
from svidgate.errors import CaError, JwtSvidError, SourceError, SvidgateError
from svidgate.identity.bundle import Bundle
from svidgate.identity.ca import (
    ACTIVATE_AT,
    DEFAULT_JWT_SVID_TTL,
    DEFAULT_X509_SVID_TTL,
    PREPARE_AT,
    BuiltinCa,
)
from svidgate.identity.clock import Clock
from svidgate.identity.entitlement import Workload
from svidgate.identity.federation import FederationSettings
from svidgate.identity.jwtsvid import JwtSvid, parse_jwt_svid_insecure
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.x509svid import X509Svid
from svidgate.sources.base import SourceHealth, SourceStatus
from svidgate.sources.federation import FederatedBundles

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
#: A templated SVID that no stream holds is dropped after this long. Long enough that an Envoy restarting (or
#: reconnecting after a svidgate reload) gets the same SVID back instead of a fresh mint; short enough that a
#: node churning through thousands of short-lived pods holds only the recent ones.
TEMPLATED_IDLE = 300.0

Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class _Held:
    """A templated SVID that streams hold (`leases` > 0) or held until `idle_since`."""

    workload: Workload
    leases: int
    idle_since: float | None = None


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
        x509_svid_ttl: float = DEFAULT_X509_SVID_TTL,
        jwt_svid_ttl: float = DEFAULT_JWT_SVID_TTL,
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
        # Templated SVIDs in use (`acquire`/`release` on the event loop, read by steps in a worker thread).
        self._held: dict[SpiffeId, _Held] = {}
        self._held_lock = threading.Lock()
        self._pending_publish: asyncio.Future[None] | None = None
        self._svids: dict[SpiffeId, X509Svid] = {}
        self._due: dict[SpiffeId, float] = {}
        self._signing_cert = ca.current.certificate
        self._jwt_cache: BoundedDict[tuple[SpiffeId, tuple[str, ...]], tuple[float, JwtSvid]] = BoundedDict(
            JWT_CACHE_SIZE
        )
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
            with self._held_lock:
                held = set(self._held)
            # Templated SVIDs are not configured IDs: they go when their streams (re-evaluated against the new
            # workloads by the services) release them.
            removed = [i for i in self._svids if i not in updated and i not in held]
            for spiffe_id in removed:
                self._due.pop(spiffe_id, None)
            self._svids = {k: v for k, v in self._svids.items() if k in updated or k in held}
            for spiffe_id, workload in updated.items():
                old = previous.get(spiffe_id)
                if old is not None and (old.dns_names, old.hint) != (workload.dns_names, workload.hint):
                    self._due[spiffe_id] = float("-inf")
            with self._jwt_lock:
                kept = BoundedDict[tuple[SpiffeId, tuple[str, ...]], tuple[float, JwtSvid]](JWT_CACHE_SIZE)
                kept.update((k, v) for k, v in self._jwt_cache.items() if k[0] in updated or k[0] in held)
                self._jwt_cache = kept
        if self.refresh():
            return True
        if removed:
            self._publish()
            return True
        return False

    def set_federation(self, federation: Mapping[TrustDomain, FederationSettings]) -> None:
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
        # Templated workloads are not here: their IDs exist per caller, held through `acquire`.
        by_id: dict[SpiffeId, Workload] = {}
        for workload in workloads:
            if isinstance(workload.spiffe_id, SpiffeId):
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
        """The clock time of the next scheduled change (SVID half-life, CA rotation step or retry, a
        templated SVID's idle expiry)."""
        current = self._ca.current
        ca_due = current.lifetime_point(PREPARE_AT if self._ca.next is None else ACTIVATE_AT)
        with self._held_lock:
            idle_due = [
                h.idle_since + TEMPLATED_IDLE for h in self._held.values() if h.idle_since is not None
            ]
        return min([max(ca_due, self._ca_retry_at), *self._due.values(), *idle_due])

    @property
    def templated_svids(self) -> int:
        """How many templated SVIDs are held or idle (not yet dropped)."""
        with self._held_lock:
            return len(self._held)

    async def acquire(self, spiffe_id: SpiffeId, workload: Workload) -> None:
        """Hold the templated SVID `spiffe_id` (filled from `workload`'s template) until `release`.

        The first holder mints it in a worker thread and returns once a snapshot holding it is published, so
        the caller can resolve it at once. Call from the event loop.

        Raises:
            SourceError: it cannot be minted (the hold is kept: a later step retries, and `release` is
                still owed).
        """
        with self._held_lock:
            held = self._held.get(spiffe_id)
            if held is None:
                self._held[spiffe_id] = _Held(workload, 1)
            else:
                held.leases += 1
                held.idle_since = None
        if spiffe_id in self.feed.current().svids:
            return
        try:
            await asyncio.to_thread(self._mint_held, spiffe_id)
        except SvidgateError as exc:
            raise SourceError(f"cannot mint {spiffe_id}: {exc}") from None
        if spiffe_id not in self.feed.current().svids:
            await self._publish_soon()

    def release(self, spiffe_id: SpiffeId) -> None:
        """Drop one hold on a templated SVID (it stays for `TEMPLATED_IDLE` after the last). Event loop."""
        with self._held_lock:
            held = self._held.get(spiffe_id)
            if held is not None and held.leases > 0:
                held.leases -= 1
                if held.leases == 0:
                    held.idle_since = self._clock()

    def _mint_held(self, spiffe_id: SpiffeId) -> None:
        with self._step_lock:
            with self._held_lock:
                held = self._held.get(spiffe_id)
            if held is None or spiffe_id in self._svids:
                return
            svids = dict(self._svids)  # copy on write, as in `_step_locked`
            svids[spiffe_id] = self._mint(spiffe_id, held.workload, self._clock())
            self._svids = svids
            log.info("source.templated_svid_minted", extra={"fields": {"spiffe_id": str(spiffe_id)}})

    async def _publish_soon(self) -> None:
        """Publish once for every mint that finishes in the same loop iteration (a rollout of many pods
        wakes every stream once per snapshot, not once per pod), and wait for it."""
        if self._pending_publish is None:
            loop = asyncio.get_running_loop()
            self._pending_publish = loop.create_future()
            loop.call_soon(self._publish_pending)
        await asyncio.shield(self._pending_publish)

    def _publish_pending(self) -> None:
        pending, self._pending_publish = self._pending_publish, None
        self._publish()
        if pending is not None and not pending.done():
            pending.set_result(None)

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
        with self._held_lock:
            held = spiffe_id in self._held
        configured = spiffe_id in self._workloads and bool(self._workloads[spiffe_id].selectors)
        if not configured and not held:
            raise SourceError(
                f"{spiffe_id} is not a configured workload of the built-in source "
                "(nor a templated one in use)"
            )
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
            self._jwt_cache.put(key, (issued + (svid.expiry - issued) / 2, svid))
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
        with self._held_lock:
            idle = [
                spiffe_id
                for spiffe_id, held in self._held.items()
                if held.idle_since is not None and now >= held.idle_since + TEMPLATED_IDLE
            ]
            for spiffe_id in idle:
                del self._held[spiffe_id]
            held_workloads = {spiffe_id: held.workload for spiffe_id, held in self._held.items()}
        # Copy on write: the event loop reads `_svids` for a snapshot while this may run in a worker thread.
        svids = dict(self._svids)
        for spiffe_id in idle:
            if spiffe_id not in self._workloads and spiffe_id in svids:
                del svids[spiffe_id]
                self._due.pop(spiffe_id, None)
                changed = True
                log.info("source.templated_svid_dropped", extra={"fields": {"spiffe_id": str(spiffe_id)}})
        try:
            for spiffe_id, workload in itertools.chain(self._workloads.items(), held_workloads.items()):
                if spiffe_id in svids and now < self._due[spiffe_id]:
                    continue
                svid = svids[spiffe_id] = self._mint(spiffe_id, workload, now)
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

    def _mint(self, spiffe_id: SpiffeId, workload: Workload, now: float) -> X509Svid:
        """One X.509-SVID for `spiffe_id` with `workload`'s DNS names and hint; schedules its re-mint."""
        svid = self._ca.mint_x509_svid(spiffe_id, self._x509_ttl, workload.dns_names)
        if workload.hint:
            svid = replace(svid, hint=workload.hint)
        self._due[spiffe_id] = now + (svid.expires_at - now) / 2
        return svid

    def _own_bundles(self) -> Mapping[TrustDomain, Bundle]:
        return {self._ca.trust_domain: self._ca.bundle()}

    def _snapshot(self, version: int) -> IdentitySnapshot:
        bundles: dict[TrustDomain, Bundle] = {}
        if self._federation is not None:
            bundles.update(self._federation.bundles())
        bundles.update(self._own_bundles())
        return IdentitySnapshot(svids=dict(self._svids), bundles=bundles, version=version)
