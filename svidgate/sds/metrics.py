"""The SDS metrics: open streams, pushes, ACKs and NACKs per resource name, refused names.

This module imports only prometheus_client; the SDS servicer receives `SdsMetrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["SdsMetrics"]


class SdsMetrics:
    """The collectors of the SDS service, registered on `registry`.

    Args:
        registry: where they are registered.
        templated_ids_refused: the ``svidgate_templated_spiffe_ids_refused_total`` series of this service
            (shared with the Workload API, one label value each).
    """

    def __init__(self, registry: CollectorRegistry, templated_ids_refused: Counter) -> None:
        self.templated_ids_refused = templated_ids_refused
        self.streams = Gauge(
            "svidgate_sds_streams",
            "SDS streams currently open.",
            ["api"],
            registry=registry,
        )
        self.pushes = Counter(
            "svidgate_sds_pushes_total",
            "SDS responses sent, per resource name in the response.",
            ["resource"],
            registry=registry,
        )
        self.acks = Counter(
            "svidgate_sds_acks_total",
            "SDS ACKs received, per resource name.",
            ["resource"],
            registry=registry,
        )
        self.nacks = Counter(
            "svidgate_sds_nacks_total",
            "SDS NACKs received (a request with error_detail), per resource name.",
            ["resource"],
            registry=registry,
        )
        self.rejected_names = Counter(
            "svidgate_sds_rejected_resource_names_total",
            "Requested SDS resource names that were not served.",
            ["reason"],
            registry=registry,
        )
