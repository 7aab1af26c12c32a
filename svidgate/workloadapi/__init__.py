"""The SPIFFE Workload API (SPIFFE_Workload_API.md, SPIFFE_Workload_Endpoint.md): server and client.

- `messages`: pure conversions between identity snapshots and the Workload API's protobuf messages, both ways
  (what the server sends, what the client and the SPIRE source parse).
- `server`: `WorkloadApiServicer`, the grpc.aio servicer of the five RPCs. Callers are identified by the
  kernel-verified peer credentials of `svidgate.peercred` and receive only what `workloads[]` entitles them
  to.
- `client`: a small grpc.aio Workload API client returning svidgate's domain types.

The SPIRE source that streams identities from an upstream agent through `client` is `svidgate.sources.spire`.

The generated messages live in `svidgate._gen` (see scripts/gen_protos.py). This package may import
`svidgate.identity`, `svidgate.peercred`, `svidgate.config` and `svidgate.metrics`; it must never import
`svidgate.server`, `svidgate.cli`, `svidgate.sds` or `svidgate.extauthz`. `client` and `messages` sit below
`svidgate.sources` (the SPIRE source uses them) and must not import it.
"""

#: The gRPC service name. The standard's proto has no package: the wire paths are /SpiffeWorkloadAPI/<Method>.
SERVICE_NAME = "SpiffeWorkloadAPI"

#: The metadata every request must carry (SPIFFE_Workload_Endpoint.md section 3, an SSRF guard).
SECURITY_HEADER = ("workload.spiffe.io", "true")
