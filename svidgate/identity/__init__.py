"""The SPIFFE domain: identifiers, SVIDs, bundles, the built-in CA, entitlements and snapshots.

Pure Python plus `cryptography`/`pyjwt`. This package must never import gRPC, protobuf or anything from
`svidgate.config`, `svidgate.sources`, `svidgate.sds`, `svidgate.extauthz`, `svidgate.workloadapi` or
`svidgate.runtime`: it is the bottom layer of the import contract in pyproject.toml (sources live above it, in
`svidgate.sources`; the configuration names identity types, never the other way round).
"""
