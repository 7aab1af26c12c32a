"""The SPIFFE domain: identifiers, SVIDs, bundles, the built-in CA, entitlements and snapshots.

Pure Python plus `cryptography`/`pyjwt`. This package must never import gRPC, protobuf or anything from
`svidgate.sources`, `svidgate.sds`, `svidgate.extauthz`, `svidgate.workloadapi` or `svidgate.server`
(sources live above identity in `svidgate.sources`).
"""
