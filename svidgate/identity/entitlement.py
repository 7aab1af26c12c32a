"""Who may receive which SVID: a caller's attributes matched against `workloads[].selectors`.

Pure and synchronous: the SDS servicer and the Workload API build a `CallerInfo` from what they know (the
Envoy node, kernel-verified unix peer credentials) and ask `entitled_ids`. No gRPC here.

Trust levels differ and the operator should know it: `unix:uid`/`unix:gid` come from SO_PEERCRED and cannot
be forged by the caller; `k8s:` attributes come from the caller's cgroup (kernel) and the kubelet's pod list
(`svidgate.attest`), looked up from that kernel-verified PID; `envoy:node_id`/`envoy:cluster` are whatever the
Envoy claims in its node, so they only mean something where the socket is protected (or combined with a
`unix:`/`k8s:` selector on the same workload).

A workload's SPIFFE ID may be a template (``spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}``): `entitle` fills it from
the caller's attested Kubernetes attributes and reports IDs it could not fill instead of issuing them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from svidgate.errors import SpiffeIdError
from svidgate.identity.selectors import CallerLike, Selector
from svidgate.identity.template import SpiffeIdTemplate

if TYPE_CHECKING:
    from svidgate.identity.spiffe_id import SpiffeId


@dataclass(frozen=True, slots=True)
class KubernetesWorkload:
    """What the kubelet says about the pod and container a caller's process runs in.

    Attributes:
        namespace: `metadata.namespace`.
        service_account: `spec.serviceAccountName`.
        pod_name: `metadata.name`.
        pod_uid: `metadata.uid` (the kubelet's list is matched on it, and on the container ID).
        node_name: `spec.nodeName`.
        container_name: the container's `name` (regular, init or ephemeral container).
        container_images: the container's image as the pod spec names it, as the status reports it, and the
            status `imageID` (a `k8s:container-image:` selector matches any of them).
        labels: `metadata.labels`, sorted `(key, value)` pairs.
    """

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str
    node_name: str
    container_name: str
    container_images: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def describe(self) -> dict[str, str]:
        """The attributes that name the workload, for log lines (labels and images left out: long)."""
        return {
            "k8s_ns": self.namespace,
            "k8s_sa": self.service_account,
            "k8s_pod": self.pod_name,
            "k8s_pod_uid": self.pod_uid,
            "k8s_container": self.container_name,
        }


@dataclass(frozen=True, slots=True)
class Workload:
    """An identity svidgate hands out, and who may receive it (one ``workloads[]`` entry of the config).

    Attributes:
        spiffe_id: the SVID's SPIFFE ID (always in the configured trust domain), or a template filled from
            each attested caller (`svidgate.identity.template`; the workload then has a `k8s:` selector).
        selectors: a caller is entitled when ALL of them match (never empty).
        dns_names: extra DNS SANs on the X.509-SVID.
        hint: the Workload API `hint` for this SVID ("" = none).
    """

    spiffe_id: SpiffeId | SpiffeIdTemplate
    selectors: tuple[Selector, ...]
    dns_names: tuple[str, ...] = ()
    hint: str = ""

    @property
    def templated(self) -> bool:
        return isinstance(self.spiffe_id, SpiffeIdTemplate)

    def matches(self, caller: CallerLike) -> bool:
        """True when every selector matches the caller."""
        return bool(self.selectors) and all(s.matches(caller) for s in self.selectors)


@dataclass(frozen=True, slots=True)
class CallerInfo:
    """What svidgate knows about a caller. None means "not known" and never matches a selector.

    Attributes:
        node_id: the Envoy node's `id` (claimed by the caller).
        cluster: the Envoy node's `cluster` (claimed by the caller).
        uid: the peer's user ID (SO_PEERCRED, kernel-verified; unix sockets through the peercred front only).
        gid: the peer's primary group ID (SO_PEERCRED).
        pid: the peer's process ID at connect time (SO_PEERCRED; logs only: PIDs are reused).
        k8s: the attested pod and container of that process (`svidgate.attest`), or None when attestation
            is off or found nothing; `k8s:` selectors never match None.
    """

    node_id: str | None = None
    cluster: str | None = None
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    k8s: KubernetesWorkload | None = None

    def with_node(self, node_id: str | None, cluster: str | None) -> CallerInfo:
        """A copy with the Envoy node's attributes set (empty strings count as unknown).

        Args:
            node_id: `Node.id`.
            cluster: `Node.cluster`.

        Returns:
            The new `CallerInfo`; peer credentials are kept.
        """
        return CallerInfo(node_id or None, cluster or None, self.uid, self.gid, self.pid, self.k8s)

    def describe(self) -> dict[str, object]:
        """The known attributes, for structured log lines."""
        described: dict[str, object] = {
            k: v
            for k, v in zip(_FIELDS, (self.node_id, self.cluster, self.uid, self.gid, self.pid), strict=True)
            if v is not None
        }
        if self.k8s is not None:
            described.update(self.k8s.describe())
        return described


_FIELDS = ("node_id", "cluster", "uid", "gid", "pid")


@dataclass(frozen=True, slots=True)
class Entitlement:
    """What one caller may receive under one set of workloads.

    Attributes:
        ids: the entitled SPIFFE IDs in configuration order, without duplicates; the first is the default.
        templated: the IDs in `ids` that were filled from a template, with the workload that produced them
            (its DNS names and hint apply; a source mints these on demand).
        refused: `(template, reason)` for every matching templated workload whose filled-in ID is not a valid
            SPIFFE ID (not issued: the caller gets the other IDs).
    """

    ids: tuple[SpiffeId, ...] = ()
    templated: Mapping[SpiffeId, Workload] = field(default_factory=dict)
    refused: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "templated", MappingProxyType(dict(self.templated)))


def entitle(workloads: Sequence[Workload], caller: CallerInfo) -> Entitlement:
    """The SPIFFE IDs `caller` may receive, in configuration order, without duplicates.

    A workload entitles the caller when all of its selectors match (a workload never has zero selectors; the
    `any` selector matches everyone and only exists where the configuration spells it out). A templated
    workload always has a `k8s:` selector, so a caller it matches has Kubernetes attributes to fill it with.
    An ID that a static workload also names is not "templated": it is served like any configured ID.

    Args:
        workloads: `Config.workloads`.
        caller: what is known about the caller.

    Returns:
        The entitlement; empty when the caller matches nothing.
    """
    seen: dict[SpiffeId, None] = {}
    templated: dict[SpiffeId, Workload] = {}
    refused: list[tuple[str, str]] = []
    static = {w.spiffe_id for w in workloads if not isinstance(w.spiffe_id, SpiffeIdTemplate)}
    for workload in workloads:
        if not workload.matches(caller):
            continue
        spiffe_id = workload.spiffe_id
        if isinstance(spiffe_id, SpiffeIdTemplate):
            if caller.k8s is None:  # unreachable with a valid config (a k8s: selector matched)
                continue
            template = spiffe_id
            try:
                spiffe_id = template.fill(caller.k8s)
            except SpiffeIdError as exc:
                refused.append((str(template), str(exc)))
                continue
            if spiffe_id.trust_domain != template.trust_domain:  # a value cannot reach the authority
                refused.append((str(template), f"{spiffe_id} left the trust domain"))
                continue
            if spiffe_id not in static and spiffe_id not in seen:
                templated[spiffe_id] = workload
        if spiffe_id not in seen:
            seen[spiffe_id] = None
    return Entitlement(tuple(seen), templated, tuple(refused))


def entitled_ids(workloads: Sequence[Workload], caller: CallerInfo) -> tuple[SpiffeId, ...]:
    """`entitle(workloads, caller).ids`: the SPIFFE IDs `caller` may receive, the default first."""
    return entitle(workloads, caller).ids
