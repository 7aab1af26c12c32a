"""The `IdentitySource` protocol: what the runtime and the services need from any source of identity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.snapshot import SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId

if TYPE_CHECKING:
    from svidgate.config import Workload


class IdentitySource(Protocol):
    """A source of X.509-SVIDs and trust bundles (and, when it can, JWT-SVIDs).

    Attributes:
        feed: always holds the latest `IdentitySnapshot`; a source publishes its first snapshot before it is
            handed to anyone (its constructor or factory fails otherwise).
    """

    feed: SnapshotFeed

    async def run(self) -> None:
        """Keep the snapshot current (rotation, file watching, bundle fetching) until cancelled."""
        ...

    def mint_jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        """A JWT-SVID for `spiffe_id` (one of the source's identities) with the given audience.

        Raises:
            SourceError: the source cannot mint for this ID (unknown ID, no signing key, upstream failure).
        """
        ...

    def refresh(self) -> bool:
        """Do one step synchronously at the clock's current time; True when a new snapshot was published."""
        ...


class TemplatedSvids(Protocol):
    """Mints SVIDs of templated workloads on demand (the built-in source).

    A service holds the filled-in ID for as long as it serves it to a caller, and releases it after.
    """

    async def acquire(self, spiffe_id: SpiffeId, workload: Workload) -> None:
        """Hold `spiffe_id`; returns once the current snapshot has its SVID.

        Raises:
            SourceError: it cannot be minted now (the hold is kept; release it anyway).
        """
        ...

    def release(self, spiffe_id: SpiffeId) -> None:
        """Drop one hold taken with `acquire`."""
        ...
