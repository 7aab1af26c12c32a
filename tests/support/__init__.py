"""The one place for test helpers (tests/unit, tests/component and tests/e2e import from here, never from
each other).

Pure, no gRPC (unit tests may use these): `ca` (a test CA built in code), `ca_state` (built-in CA state
files), `sds` (SDS identities, workloads and requests), `files`, `tempdir`, `k8s` (pod cgroups, a fake
kubelet).

Real servers and processes (component and e2e tests): `sds_server` (the SDS servicer on grpc.aio),
`workloadapi` (the Workload API behind the peercred front), `server` (a whole svidgate in-process),
`runtime` (a whole server from a config on disk, as a subprocess, and small real clients), `bundle_endpoint`
(a dripping partner), `checkserver` (an echo backend and a Check server for Envoy), `envoy` (a real Envoy),
`examples` (an envoy-examples README run as written).
"""
