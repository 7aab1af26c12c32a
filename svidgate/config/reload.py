"""Reload: what a running process can take over from a new configuration, and what waits for a restart."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from svidgate.config.model import (
    AuthzConfig,
    BundleEndpoint,
    CaConfig,
    Config,
    DecisionLogConfig,
    FederationConfig,
    ListenConfig,
    LogConfig,
    SdsConfig,
    ServerConfig,
    SourceConfig,
)

#: Top-level keys a reload cannot apply to a running process (listeners are bound, the CA and the source are
#: built, SDS streams hold their validation-context flavour, the bundle endpoint presents what it started
#: with). The one list: a section that becomes live on reload is removed here and applied in the runtime's
#: `prepare_reload`. Everything else (``authz``, ``workloads``, ``federation``, ``log``, ``kubernetes`` --
#: for connections attested after the reload) is applied live.
RESTART_REQUIRED_KEYS: tuple[str, ...] = (
    "trust_domain",
    "state_dir",
    "listen",
    "ca",
    "source",
    "bundle_endpoint",
    "sds",
    "server",
)


def restart_required_changes(old: Config, new: Config) -> tuple[str, ...]:
    """The key paths under `RESTART_REQUIRED_KEYS` whose values differ between `old` and `new`.

    Returns:
        Paths as written in the file (``ca.x509_svid_ttl``, ``listen.grpc``, ``federation.partner.org``), in
        config order; empty when a reload can apply everything.
    """
    changed: list[str] = []
    for key in RESTART_REQUIRED_KEYS:
        changed += _changed_paths(getattr(old, key), getattr(new, key), key)
    return tuple(changed)


def _changed_paths(old: object, new: object, path: str) -> list[str]:
    if old == new:
        return []
    # Descend into config sections (their fields are keys of the file); any other value -- an address, a
    # trust domain, a list -- is one key's value and is reported whole.
    if type(old) is type(new) and isinstance(old, _SECTION_TYPES):
        found: list[str] = []
        for name in (f.name for f in dataclasses.fields(old)):
            found += _changed_paths(getattr(old, name), getattr(new, name), f"{path}.{name}")
        return found
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found = []
        for key in [*old, *(k for k in new if k not in old)]:
            found += _changed_paths(old.get(key), new.get(key), f"{path}.{key}")
        return found
    return [path]


_SECTION_TYPES = (
    ListenConfig,
    CaConfig,
    FederationConfig,
    BundleEndpoint,
    SdsConfig,
    AuthzConfig,
    DecisionLogConfig,
    SourceConfig,
    ServerConfig,
    LogConfig,
)


__all__ = ["RESTART_REQUIRED_KEYS", "restart_required_changes"]
