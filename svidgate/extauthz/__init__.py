"""ext_authz: svidgate's answer to Envoy's `envoy.service.auth.v3.Authorization/Check`.

An Envoy with the ext_authz HTTP filter asks, for each request, whether it may pass. This package extracts the
JWT-SVID from the request (`token`), selects the first matching policy (`policy`), validates the token against
the trust bundles of every trust domain svidgate knows (through a validated-token `cache`), decides
(`decision`, pure) and answers with a `CheckResponse` (`servicer`). Policies in *inject* mode instead add a
fresh JWT-SVID to an outgoing request (`inject`). `explain` runs the same decision offline for ``svidgate
explain``; `reload` holds the current policies so that a reload is one reference assignment.

The pure modules (`policy`, `token`, `decision`, `cache`, `inject`, `explain`, `reload`) must never import
gRPC or protobuf; only `servicer` does. Nothing here may import `svidgate.runtime`, `svidgate.cli`,
`svidgate.sds` or `svidgate.workloadapi`: the runtime wires this package, never the other way round.
"""
