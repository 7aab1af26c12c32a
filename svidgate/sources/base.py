"""The `IdentitySource` protocol, and the health every source reports (`SourceStatus`, `SourceHealth`)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from svidgate.identity.clock import Clock
from svidgate.identity.jwtsvid import JwtSvid
from svidgate.identity.snapshot import SnapshotFeed
from svidgate.identity.spiffe_id import SpiffeId

if TYPE_CHECKING:
    from svidgate.identity.entitlement import Workload


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """How one upstream of identity is doing, for `svidgate_source_*` metrics and the `/readyz` detail.

    Attributes:
        source: ``builtin``, ``files``, ``spire`` or ``federation``.
        trust_domain: the trust domain it delivers (the own one, or the federated one).
        up: whether its last attempt succeeded (for a stream: whether it is connected now).
        last_success: epoch seconds of its last success (a connected stream: now); None before the first.
        error: the last failure's message while not up (never key material).
        failures: failed attempts since start, by reason (``ca_state_write``, ``fetch``, ``stream_lost``...).
    """

    source: str
    trust_domain: str
    up: bool
    last_success: float | None
    error: str = ""
    failures: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "failures", MappingProxyType(dict(self.failures)))


class SourceHealth:
    """Records successes and failures of one upstream; thread-safe (a source may step in a worker thread).

    Args:
        source: the `SourceStatus.source` name.
        trust_domain: the `SourceStatus.trust_domain`.
        clock: stamps successes.
    """

    def __init__(self, source: str, trust_domain: str, clock: Clock) -> None:
        self._source = source
        self._trust_domain = trust_domain
        self._clock = clock
        self._lock = threading.Lock()
        self._up = False
        self._last_success: float | None = None
        self._error = "not tried yet"
        self._failures: dict[str, int] = {}

    def succeeded(self) -> None:
        with self._lock:
            self._up = True
            self._last_success = self._clock()
            self._error = ""

    def failed(self, reason: str, error: str) -> None:
        """Note one failed attempt: `reason` is a short stable label value, `error` the message."""
        with self._lock:
            self._up = False
            self._error = error
            self._failures[reason] = self._failures.get(reason, 0) + 1

    def status(self) -> SourceStatus:
        with self._lock:
            return SourceStatus(
                self._source, self._trust_domain, self._up, self._last_success, self._error, self._failures
            )


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
        """Do one step synchronously at the clock's current time; True when a new snapshot was published.

        Never waits on the network: federated bundles are fetched by their own tasks under `run()`.
        """
        ...

    def statuses(self) -> Sequence[SourceStatus]:
        """The health of the own identity's upstream, then of every federated trust domain's."""
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
