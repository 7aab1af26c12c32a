"""The Workload API metrics: open streams per method.

Calls by method and status code are the gRPC interceptor's ``svidgate_grpc_server_handled_total``
(``service="SpiffeWorkloadAPI"``); a Workload API counter of its own would repeat it.

This module imports only prometheus_client; the Workload API servicer receives `WorkloadApiMetrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["WorkloadApiMetrics"]


class WorkloadApiMetrics:
    """The collectors of the Workload API service, registered on `registry`.

    Args:
        registry: where they are registered.
        templated_ids_refused: the ``svidgate_templated_spiffe_ids_refused_total`` series of this service.
    """

    def __init__(self, registry: CollectorRegistry, templated_ids_refused: Counter) -> None:
        self.templated_ids_refused = templated_ids_refused
        self.streams = Gauge(
            "svidgate_workload_api_streams",
            "Workload API streams currently open.",
            ["method"],
            registry=registry,
        )
