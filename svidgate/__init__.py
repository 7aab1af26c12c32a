"""svidgate: SPIFFE identity for Envoy.

One process that streams X.509-SVIDs and trust bundles to Envoy over SDS, validates JWT-SVIDs for Envoy's
ext_authz filter, and serves the SPIFFE Workload API. See DESIGN.md for the architecture.
"""

__version__ = "0.1.0"
