"""The Secret Discovery Service: Envoy's X.509-SVIDs and trust bundles over SDS (SotW, delta and fetch).

`resources` turns an identity snapshot and requested resource names into Envoy `Secret` protos (pure);
`stream` holds the per-stream xDS state machines (pure: versions, nonces, ACK/NACK, subscriptions); `servicer`
is the thin grpc.aio layer that feeds requests and snapshots into them.

This package must never import `svidgate.runtime`, `svidgate.cli`, `svidgate.extauthz` or
`svidgate.workloadapi` (the runtime wires services together, not the other way round), and
`resources`/`stream` must never import `grpc`: they are tested as plain functions.
"""
