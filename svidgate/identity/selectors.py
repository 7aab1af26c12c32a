"""Selectors: the SPIRE-style ``type:key:value`` attributes a caller must have to receive a workload's SVID.

A value type with one validating constructor (`Selector.parse`, in the spirit of go-spiffe's
``spiffeid.FromString``) and its matching against what svidgate knows about a caller (`CallerLike`, the
attributes of `svidgate.identity.entitlement.CallerInfo`). The configuration builds selectors from
``workloads[].selectors``; this module never imports the configuration, gRPC or the services.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from svidgate.errors import ConfigError

if TYPE_CHECKING:
    from svidgate.identity.entitlement import KubernetesWorkload

#: Selector types and the keys each one has.
SELECTOR_TYPES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "envoy": frozenset({"node_id", "cluster"}),
        "unix": frozenset({"uid", "gid"}),
        # Attested from the caller's PID (svidgate.attest.k8s): cgroup -> pod UID + container ID -> kubelet.
        "k8s": frozenset(
            {
                "ns",
                "sa",
                "pod-name",
                "pod-uid",
                "pod-label",
                "container-name",
                "container-image",
                "node-name",
            }
        ),
    }
)

#: Selector types whose value the kernel verified (peer credentials of a unix socket connection). A caller
#: over TCP has none of them, so a workload with at least one such selector is never handed out over TCP;
#: every other type (``envoy:`` node claims, ``any``) is whatever the client says.
KERNEL_VERIFIED_SELECTOR_TYPES = frozenset({"unix"})


class CallerLike(Protocol):
    """What a selector looks at: the attributes of `svidgate.identity.entitlement.CallerInfo`."""

    @property
    def node_id(self) -> str | None: ...
    @property
    def cluster(self) -> str | None: ...
    @property
    def uid(self) -> int | None: ...
    @property
    def gid(self) -> int | None: ...
    @property
    def k8s(self) -> KubernetesWorkload | None: ...


@dataclass(frozen=True, slots=True)
class Selector:
    """One SPIRE-style selector, ``type:key:value`` (``envoy:node_id:backend``, ``unix:uid:1000``).

    The special selector ``any`` (type ``any``, empty key and value) matches every caller. It exists so that
    "match everyone" is spelled out on purpose in a config (development only); a workload with no selectors
    is a config error rather than a silent match-all.
    """

    type: str
    key: str = ""
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse ``type:key:value`` (the value may itself contain ``:``) or ``any``.

        Raises:
            ConfigError: unknown type or key, missing value, or a non-integer uid/gid (no path prefix; the
                configuration adds the key's path).
        """
        if text == "any":
            return cls("any")
        parts = text.split(":", 2)
        if len(parts) != 3 or not parts[2]:
            raise ConfigError(f"{text!r} is not a selector of the form type:key:value (or 'any')")
        type_, key, value = parts
        keys = SELECTOR_TYPES.get(type_)
        if keys is None:
            known = ", ".join([*sorted(SELECTOR_TYPES), "any"])
            raise ConfigError(f"{text!r}: unknown selector type {type_!r} (known: {known})")
        if key not in keys:
            raise ConfigError(
                f"{text!r}: unknown {type_} selector key {key!r} (known: {', '.join(sorted(keys))})"
            )
        if type_ == "unix" and not (value.isascii() and value.isdigit()):
            raise ConfigError(f"{text!r}: unix:{key} takes a numeric id")
        if key == "pod-label" and (":" not in value or not value.partition(":")[0]):
            raise ConfigError(f"{text!r}: k8s:pod-label takes <label key>:<label value>")
        return cls(type_, key, value)

    def matches(self, caller: CallerLike) -> bool:
        """True when the caller has this selector's attribute with exactly this value.

        A caller attribute that is unknown (None, e.g. uid on a TCP connection) never matches.
        """
        if self.type == "any":
            return True
        if self.type == "envoy":
            actual: object = caller.node_id if self.key == "node_id" else caller.cluster
            return actual is not None and actual == self.value
        if self.type == "unix":
            number = caller.uid if self.key == "uid" else caller.gid
            return number is not None and str(number) == self.value
        if self.type == "k8s":
            return caller.k8s is not None and _k8s_matches(self.key, self.value, caller.k8s)
        return False

    def __str__(self) -> str:
        return "any" if self.type == "any" else f"{self.type}:{self.key}:{self.value}"


def _k8s_matches(key: str, value: str, workload: KubernetesWorkload) -> bool:
    if key == "pod-label":
        label, _, label_value = value.partition(":")
        return (label, label_value) in workload.labels
    if key == "container-image":
        return value in workload.container_images
    actual = {
        "ns": workload.namespace,
        "sa": workload.service_account,
        "pod-name": workload.pod_name,
        "pod-uid": workload.pod_uid,
        "container-name": workload.container_name,
        "node-name": workload.node_name,
    }.get(key)
    return actual == value


__all__ = ["KERNEL_VERIFIED_SELECTOR_TYPES", "SELECTOR_TYPES", "CallerLike", "Selector"]
