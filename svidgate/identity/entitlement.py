"""Who may receive which SVID: a caller's attributes matched against `workloads[].selectors`.

Pure and synchronous: the SDS servicer and the Workload API build a `CallerInfo` from what they know (the
Envoy node, kernel-verified unix peer credentials) and ask `entitled_ids`. No gRPC here.

Trust levels differ and the operator should know it: `unix:uid`/`unix:gid` come from SO_PEERCRED and cannot
be forged by the caller; `envoy:node_id`/`envoy:cluster` are whatever the Envoy claims in its node, so they
only mean something where the socket is protected (or combined with a `unix:` selector on the same workload).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svidgate.config import Workload
    from svidgate.identity.spiffe_id import SpiffeId


@dataclass(frozen=True, slots=True)
class CallerInfo:
    """What svidgate knows about a caller. None means "not known" and never matches a selector.

    Attributes:
        node_id: the Envoy node's `id` (claimed by the caller).
        cluster: the Envoy node's `cluster` (claimed by the caller).
        uid: the peer's user ID (SO_PEERCRED, kernel-verified; unix sockets through the peercred front only).
        gid: the peer's primary group ID (SO_PEERCRED).
        pid: the peer's process ID at connect time (SO_PEERCRED; logs only: PIDs are reused).
    """

    node_id: str | None = None
    cluster: str | None = None
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None

    def with_node(self, node_id: str | None, cluster: str | None) -> CallerInfo:
        """A copy with the Envoy node's attributes set (empty strings count as unknown).

        Args:
            node_id: `Node.id`.
            cluster: `Node.cluster`.

        Returns:
            The new `CallerInfo`; peer credentials are kept.
        """
        return CallerInfo(node_id or None, cluster or None, self.uid, self.gid, self.pid)

    def describe(self) -> dict[str, object]:
        """The known attributes, for structured log lines."""
        return {
            k: v
            for k, v in zip(_FIELDS, (self.node_id, self.cluster, self.uid, self.gid, self.pid), strict=True)
            if v is not None
        }


_FIELDS = ("node_id", "cluster", "uid", "gid", "pid")


def entitled_ids(workloads: Sequence[Workload], caller: CallerInfo) -> tuple[SpiffeId, ...]:
    """The SPIFFE IDs `caller` may receive, in configuration order, without duplicates.

    A workload entitles the caller when all of its selectors match (a workload never has zero selectors; the
    `any` selector matches everyone and only exists where the configuration spells it out). The first ID is
    the caller's default SVID (SDS resource `default`).

    Args:
        workloads: `Config.workloads`.
        caller: what is known about the caller.

    Returns:
        The entitled SPIFFE IDs; empty when the caller matches nothing.
    """
    seen: dict[SpiffeId, None] = {}
    for workload in workloads:
        if workload.spiffe_id not in seen and workload.matches(caller):
            seen[workload.spiffe_id] = None
    return tuple(seen)
