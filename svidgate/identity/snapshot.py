"""Immutable identity snapshots and the feed that hands them to subscribers.

A source publishes a whole new `IdentitySnapshot`; readers never see a half-updated state because the feed
swaps one reference. Subscribers (SDS streams, Workload API streams, the JWT validator) wait on the feed and
diff against what they last sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from svidgate.identity.bundle import Bundle
    from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
    from svidgate.identity.x509svid import X509Svid


_K = TypeVar("_K")
_V = TypeVar("_V")


def _frozen(mapping: Mapping[_K, _V]) -> Mapping[_K, _V]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True, eq=False)
class IdentitySnapshot:
    """Everything svidgate serves at one moment.

    Attributes:
        svids: the current X.509-SVID of every identity this process holds, by SPIFFE ID.
        bundles: the trust bundle of every trust domain it knows (its own and federated), by trust domain.
        version: increases with every published snapshot; for logs and metrics, not for xDS versions
            (those are content hashes per resource).
    """

    svids: Mapping[SpiffeId, X509Svid] = field(default_factory=dict)
    bundles: Mapping[TrustDomain, Bundle] = field(default_factory=dict)
    version: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "svids", _frozen(self.svids))
        object.__setattr__(self, "bundles", _frozen(self.bundles))


class SnapshotFeed:
    """Holds the latest snapshot and wakes every waiter when a newer one is published.

    One `asyncio.Event` per generation: publishing sets it and installs a fresh one, so waking 10k streams
    costs one `set()` and no per-subscriber bookkeeping. Must be used from one event loop.
    """

    def __init__(self, initial: IdentitySnapshot | None = None) -> None:
        self._current = initial if initial is not None else IdentitySnapshot()
        self._changed = asyncio.Event()

    def current(self) -> IdentitySnapshot:
        return self._current

    def publish(self, snapshot: IdentitySnapshot) -> None:
        """Replace the current snapshot whole and wake every waiter."""
        self._current = snapshot
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_newer(self, version: int) -> IdentitySnapshot:
        """Return the first snapshot whose version is not `version` (immediately if there already is one)."""
        while self._current.version == version:
            await self._changed.wait()
        return self._current
