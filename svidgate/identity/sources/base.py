"""The `IdentitySource` protocol: what the runtime and the services need from any source of identity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.snapshot import SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId


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
