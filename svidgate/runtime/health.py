"""Readiness: whether this node should receive traffic, and why not (``/readyz``, ``svidgate_ready``).

Pure functions of the configuration, the current identity snapshot, the sources' health and the time, so
that every rule is testable without a server; the runtime adds what only it knows (draining, listeners
bound).

This module imports the config and identity types only.
"""

from __future__ import annotations

from collections.abc import Sequence

from svidgate.config import Config
from svidgate.identity.snapshot import IdentitySnapshot
from svidgate.sources.base import SourceStatus

__all__ = ["READY_MIN_LIFETIME_LEFT", "readiness", "source_document"]

#: `/readyz` turns unready when a served X.509-SVID has less than this fraction of its lifetime left. Every
#: source renews at half-life (SPIRE's agent too; cert-manager's csi-driver-spiffe at two thirds), so an SVID
#: this old means its upstream has not delivered for at least a quarter of the SVID's lifetime: time to route
#: callers elsewhere before the certificate expires under them.
READY_MIN_LIFETIME_LEFT = 0.25


def readiness(
    config: Config, snapshot: IdentitySnapshot, statuses: Sequence[SourceStatus], now: float
) -> tuple[bool, str]:
    """Ready when the own identity is loaded and fresh.

    Not ready before the own trust domain's bundle and (with workloads configured) an X.509-SVID are loaded,
    and whenever a served X.509-SVID has less than `READY_MIN_LIFETIME_LEFT` of its lifetime left (its
    source has stopped renewing it). A federated trust domain without a bundle is reported in the reason but
    keeps the node ready.

    Args:
        config: the configuration in force.
        snapshot: the current identity snapshot.
        statuses: every upstream's health, the own source first.
        now: epoch seconds.

    Returns:
        ``(ready, reason)``; the reason names what is missing.
    """
    if config.trust_domain not in snapshot.bundles:
        return False, f"no bundle for the own trust domain {config.trust_domain} yet"
    if any(not w.templated for w in config.workloads) and not snapshot.svids:
        return False, "no X.509-SVID loaded yet"
    stale = _stale_svid(snapshot, statuses, now)
    if stale is not None:
        return False, stale
    # A federated trust domain whose endpoint is down does not make this node useless for its own
    # workloads, so it is reported but does not hold readiness (a DaemonSet rollout would stall on it).
    missing = sorted(str(td) for td in config.federation if td not in snapshot.bundles)
    if missing:
        return True, "ok; no bundle yet for federated trust domain(s) " + ", ".join(missing)
    return True, "ok"


def _stale_svid(snapshot: IdentitySnapshot, statuses: Sequence[SourceStatus], now: float) -> str | None:
    for spiffe_id, svid in snapshot.svids.items():
        lifetime = svid.expires_at - svid.leaf.not_valid_before_utc.timestamp()
        left = svid.expires_at - now
        if left >= lifetime * READY_MIN_LIFETIME_LEFT:
            continue
        when = "has expired" if left <= 0 else f"expires in {left:.0f}s"
        own = statuses[:1]
        upstream = ""
        if own:
            state = "up" if own[0].up else f"down: {own[0].error}"
            upstream = f"; source {own[0].source} is {state}"
        return (
            f"X.509-SVID {spiffe_id} {when} (less than {READY_MIN_LIFETIME_LEFT:.0%} of its lifetime "
            f"left) and has not been renewed{upstream}"
        )
    return None


def source_document(status: SourceStatus) -> dict[str, object]:
    """One upstream's entry in the ``sources`` field of ``/readyz``."""
    return {
        "source": status.source,
        "trust_domain": status.trust_domain,
        "up": status.up,
        "last_success": status.last_success,
        **({"error": status.error} if status.error else {}),
    }
