"""The SPIFFE domain: identifiers, SVIDs, bundles, the built-in CA, identity sources and snapshots.

Pure Python plus `cryptography`/`pyjwt`. This package must never import gRPC, protobuf or anything from
`svidgate.sds`, `svidgate.extauthz`, `svidgate.workloadapi` or `svidgate.runtime`.
"""
