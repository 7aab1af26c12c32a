"""The configuration's model: one frozen, typed `Config` and its sections, each key declared once.

Every section is a frozen pydantic dataclass that refuses unknown keys: a field's type
(`svidgate.config.types`), its default and its docstring are the key's whole declaration. The loader
validates the file against these classes; the JSON Schema (`svidgate config-schema`) and the key tables of
docs/configuration.md are generated from them; the services read the result. The values identity needs
(`Workload`, `Selector`, the federation settings) are domain types of `svidgate.identity`, built from the
``*Entry`` sections here and re-exported under the names the configuration has always used. Valid-but-risky
settings are reported by `Config.warnings`.

Over 600 lines on purpose: the docstrings of the fields are the reference documentation of every key (the
tables of docs/configuration.md are generated from them), so they are as long as the page's were.

This module imports only the identity domain types; never gRPC, never the services.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, GetCoreSchemaHandler, GetPydanticSchema, WithJsonSchema
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import core_schema

from svidgate.config.types import (
    PATH,
    AddressList,
    AddressValue,
    AllowList,
    AnyStr,
    Bool,
    Count,
    DocDefault,
    Duration,
    DurationOrZero,
    FilePath,
    Fraction,
    HttpHostPort,
    HttpsHostPort,
    PositiveCount,
    Rate,
    Regex,
    RequiredFilePath,
    SelectorList,
    SocketMode,
    SpiffeIdValue,
    Str,
    StringMap,
    StrList,
    TrustDomainValue,
    WorkloadId,
    fail,
)
from svidgate.config.values import (
    MAX_UNIX_PATH_BYTES,
    UNIX_TEMP_NAME_BYTES,
    Address,
    AllowRule,
    bracket,
    type_name,
)
from svidgate.errors import CaError
from svidgate.identity.ca import (
    BACKDATE_SECONDS,
    DEFAULT_CA_TTL,
    DEFAULT_JWT_SVID_TTL,
    DEFAULT_X509_SVID_TTL,
    UpstreamAuthority,
)
from svidgate.identity.entitlement import Workload
from svidgate.identity.federation import (
    DEFAULT_BUNDLE_REFRESH,
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_POLL_INTERVAL,
    BundleEndpoint,
    BundleEndpointServerSettings,
    FederationSettings,
)
from svidgate.identity.keys import KeyType
from svidgate.identity.selectors import KERNEL_VERIFIED_SELECTOR_TYPES, SELECTOR_TYPES, CallerLike, Selector
from svidgate.identity.spiffe_id import TrustDomain

#: The names the configuration has always used for the federation settings (`svidgate.identity.federation`).
FederationConfig = FederationSettings
BundleEndpointServerConfig = BundleEndpointServerSettings

#: Environment variable naming the config file when `--config` is not given.
CONFIG_ENV = "SVIDGATE_CONFIG"
#: Upper bound of `authz.unknown_key_wait`, seconds.
MAX_UNKNOWN_KEY_WAIT = 10.0
#: The trust domain of the embedded default configuration (and of any file that does not name one).
DEFAULT_TRUST_DOMAIN = "svidgate.local"

#: Where a pod's service account token is mounted (the `kubernetes.token_file` default).
DEFAULT_K8S_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
#: The cluster CA mounted next to it (the `kubernetes.kubelet_ca_file` default, as SPIRE's `kubelet_ca_path`).
DEFAULT_K8S_CA_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")

#: The built-in CA backdates every authority by `BACKDATE_SECONDS` and needs a lifetime beyond twice that.
MIN_CA_TTL_EXCLUSIVE = 2 * BACKDATE_SECONDS


#: Where the metrics and health HTTP listener is when a configuration does not say (``listen.http`` absent).
DEFAULT_HTTP_ADDRESS = ("127.0.0.1", 8082)
#: Where Check is served when a configuration does not say (``listen.check`` absent).
DEFAULT_CHECK_ADDRESS = "tcp://127.0.0.1:8081"


#: Every section of the file is a frozen pydantic dataclass that refuses unknown keys; a field's docstring is
#: the key's documentation (JSON Schema ``description``, the docs tables).
_SECTION = ConfigDict(extra="forbid", arbitrary_types_allowed=True, use_attribute_docstrings=True)


def _none_is_empty(value: object) -> object:
    # `ca:` with nothing under it (null) means "all defaults", as `ca: {}` does.
    return {} if value is None else value


#: A section whose null value means "all defaults".
_Section = BeforeValidator(_none_is_empty)


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


#: `log.level` values; the file may write them in any case (``DEBUG``).
LOG_LEVELS = ("debug", "info", "warning", "error")


def _any_case_schema(words: tuple[str, ...]) -> WithJsonSchema:
    """The JSON Schema of a choice the loader lower-cases first: any case passes (JSON Schema has no
    case-insensitive enum, so a pattern spells each letter both ways)."""
    alternatives = "|".join("".join(f"[{c.lower()}{c.upper()}]" for c in word) for word in words)
    return WithJsonSchema({"type": "string", "pattern": f"^({alternatives})$"})


def _built(schema: object, build: Callable[[Any], Any], is_built: Callable[[Any], bool]) -> GetPydanticSchema:
    """Validate a value against `schema` (the file's shape, which the JSON Schema shows) and `build` the
    domain value from it; a value that `is_built` already (set in code) is kept."""

    def get(_source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        inner = handler.generate_schema(schema)

        def wrap(value: Any, validate: core_schema.ValidatorFunctionWrapHandler) -> Any:
            return value if is_built(value) else build(validate(value))

        return core_schema.no_info_wrap_validator_function(wrap, inner)

    return GetPydanticSchema(get)


def _list_of(what: str) -> BeforeValidator:
    def check(value: object) -> object:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            fail(f"{PATH}: expected {what}, got {type_name(value)}")
        if isinstance(value, tuple):
            return value  # built in code (or copied by dataclasses.replace)
        # An entry with nothing under it (``- ``) is an empty mapping: its required keys are named.
        return [{} if item is None else item for item in value]

    return BeforeValidator(check)


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class ListenConfig:
    """Where svidgate listens (the listener contract; docs/configuration.md states the same).

    Every gRPC listener answers ext_authz Check with the same decision: an Envoy pointed at any of them with
    ``failure_mode_allow: true`` would turn an UNIMPLEMENTED into an allow. The defaults of `grpc` and
    `workload_api` depend on the environment (`svidgate.config.environment`); the loader fills them in.
    """

    grpc: AddressList
    """SDS listeners (grpc.aio); they **also answer Check**, with the same decision. One address or a
    list; `[]` for none. SDS over TCP is opt-in: list a `tcp://` address. Selectors of type `unix:` only
    match over unix sockets (TCP carries no peer credentials), and `serve`/`check-config` warn about every
    workload that a TCP SDS listener would hand out with no `unix:` selector constraining it."""
    workload_api: AddressValue | None
    """The SPIFFE Workload API socket; unix only (callers are identified by their peer credentials). It
    also answers Check, to calls carrying `workload.spiffe.io: true` like every call there (without it: a
    403 denial `missing_security_header`, never an RPC error). `null` = do not serve it."""
    http: HttpHostPort | None
    """`host:port` of the metrics (`/metrics`) and health (`/healthz`, `/readyz`) HTTP listener. `null` =
    off."""
    check: AddressValue | None = None
    """ext_authz Check on grpcio's threaded server: the fast path, where Envoy's ext_authz should point.
    Absent: this default. `null` = no separate Check listener (Check is still answered on `listen.grpc`
    and `listen.workload_api`, e.g. for inject mode, which needs callers on a unix socket)."""
    bundle_endpoint: HttpsHostPort | None = None
    """`host:port` of the SPIFFE bundle endpoint server (HTTPS; see `bundle_endpoint` below). `null` = not
    served. A partner's `bundle_endpoint.url` is `https://<this host>:<port>/`."""

    def check_listeners(self) -> tuple[Address, ...]:
        """Every address Check is answered on."""
        separate = () if self.check is None else (self.check,)
        workload_api = () if self.workload_api is None else (self.workload_api,)
        return (*separate, *self.grpc, *workload_api)


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class UpstreamConfig:
    """``ca.upstream``: a root shared by several svidgates; each one's CA becomes an intermediate under it."""

    cert_file: RequiredFilePath
    """PEM with exactly one certificate: the self-signed root (basicConstraints CA:TRUE, pathlen unset or
    >= 1, keyCertSign). Checked when the config is loaded (`check-config` too): it must be valid now. Read
    again at start-up; replacing it takes a restart."""
    key_file: RequiredFilePath
    """The root's unencrypted private key (PEM; EC P-256/P-384 or RSA); must match `cert_file`. Keep it
    readable by svidgate's user only (a Kubernetes Secret in `../envoy-examples/kubernetes/`)."""

    def __post_init__(self) -> None:
        # Validated as the file is read (before the keys after `ca`, as an operator reads the file), so that
        # check-config and serve refuse a bad root with the same one line; the CA reads it again when it
        # starts (the key is never kept in the configuration object).
        try:
            UpstreamAuthority.load(self.cert_file, self.key_file, time.time())
        except CaError as exc:
            fail(str(exc))  # a validation error in file order, like every other value's


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class CaConfig:
    """The built-in CA. All durations in seconds."""

    key_type: KeyType = KeyType.EC_P256
    """Key type of new CA authorities and SVIDs: `ec-p256`, `ec-p384`, `rsa-2048`."""
    x509_svid_ttl: Duration = DEFAULT_X509_SVID_TTL
    """Lifetime of X.509-SVIDs (at least `60s`). SVIDs are re-minted at half their actual lifetime."""
    jwt_svid_ttl: Duration = DEFAULT_JWT_SVID_TTL
    """Lifetime of JWT-SVIDs (at least `10s`); the default of `svidgate mint jwt --ttl`."""
    ca_ttl: Duration = DEFAULT_CA_TTL
    """Lifetime of a CA authority; more than `120s` (authorities are backdated by `60s`) and at least
    twice the longer SVID TTL. The next authority is prepared at 1/2 and takes over at 5/6 of this
    lifetime; nothing outlives its authority."""
    upstream: UpstreamConfig | None = None
    """A root CA shared by several svidgates (one trust domain across many nodes without SPIRE, as SPIRE's
    `disk` UpstreamAuthority). Each svidgate's CA authorities become intermediates signed by it: own key,
    kept in `state_dir`, rotated on the schedule above, never outliving the root. The bundle's X.509
    authority is the root alone; every served X.509-SVID chain is leaf + intermediate. JWT signing keys
    stay per node. The CA state of a `state_dir` belongs to one root: switching to or from `ca.upstream`
    or to another root is refused (use a fresh `state_dir`). See [README:
    Scaling](../README.md#scaling-one-svidgate-per-node)."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class SdsConfig:
    """SDS resource naming and the validation context flavour."""

    default_svid_name: Str = "default"
    """SDS resource name that means "the caller's (first entitled) SVID"."""
    own_bundle_name: Str = "ROOTCA"
    """Resource name of the own trust domain's bundle."""
    all_bundles_name: Str = "ALL"
    """Resource name of a validation context with every bundle (own and federated)."""
    validation: Literal["spiffe", "trusted_ca"] = "spiffe"
    """`spiffe`: validation contexts use Envoy's SPIFFE certificate validator (per-trust-domain bundles);
    `trusted_ca`: a plain `trusted_ca` for Envoys built without that extension — for one trust domain only
    (see below). A node can ask for either through its metadata `svidgate.validation`."""
    istio_compat: Bool = False
    """Istio agent semantics: `own_bundle_name` (`ROOTCA`) serves every bundle (own and federated), not
    just the own one — with federation, through the SPIFFE validator (below)."""
    pool_trust_domain_roots_unsafe: Bool = False
    """Serve the roots of several trust domains as one `trusted_ca` when `trusted_ca` is asked for.
    **Unsafe**: any federated CA can then issue certificates naming SPIFFE IDs of any trust domain, yours
    included, and Envoy accepts them. `serve` and `check-config` warn when it is set."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class PolicyMatch:
    """Which requests a policy applies to; all criteria must hold, an empty criterion matches everything."""

    hosts: Annotated[StrList, DocDefault("`[]` (any)")] = ()
    """Exact host names or IP addresses, `*.suffix` wildcards (any depth, not the bare suffix) or `*`;
    case-insensitive, the request's port and one trailing dot are ignored. ASCII only: write an
    internationalised name in its `xn--` form."""
    path_prefix: Str | None = None
    """Plain string prefix of the canonical path (below); must start with `/` and be canonical itself
    (`/a/../b` is refused: write `/b`). Case-sensitive."""
    path_exact: Str | None = None
    """The exact canonical path; must start with `/` and be canonical. Case-sensitive."""
    path_regex: Regex | None = None
    """Python regular expression that must match the whole canonical path. At most one of the three path
    keys."""
    methods: Annotated[StrList, DocDefault("`[]` (any)")] = ()
    """Upper-case HTTP methods."""
    context_extensions: StringMap = field(default_factory=dict)
    """Key/value pairs that must all be present in the route's ext_authz `context_extensions` (how a route
    names its policy: `{policy: payments}`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "context_extensions", MappingProxyType(dict(self.context_extensions)))


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class Policy:
    """One ext_authz policy. The first policy (in config order) whose `match` holds decides."""

    name: Str
    """Unique; 1-64 of letters, digits, `_ . : -` (it becomes a metric label)."""
    match: Annotated[PolicyMatch, _Section, DocDefault("`{}` (everything)")] = field(
        default_factory=PolicyMatch
    )
    """Which requests the policy applies to (below)."""
    audiences: StrList = ()
    """`validate` with `require_token: true`: required, non-empty; the token's `aud` must contain at least
    one of them. `inject`: the audiences a route may ask for with `context_extensions: {audience: ...}`; a
    single entry may stand in for `inject_audience`."""
    allow: AllowList = ()
    """`validate` with `require_token: true`: required, non-empty; who may pass (below). Not allowed in
    `inject` mode."""
    require_token: Bool = True
    """`false`: a public route; every request matching this policy passes without any token being looked
    at (`audiences` and `allow` may then be empty)."""
    dry_run: Bool = False
    """Decide and record (log, metrics) but never deny (warned about)."""
    keep_token: Bool = False
    """Forward the token header upstream (by default it is removed once validated)."""
    mode: Literal["validate", "inject"] = "validate"
    """`validate`: check the caller's JWT-SVID. `inject`: mint a JWT-SVID and add it to the request
    (egress)."""
    inject_audience: Str | None = None
    """`inject` only: the audience of the minted token (required unless `audiences` has exactly one
    entry). A route's `context_extensions: {audience: ...}` overrides it per route, but only with an
    audience listed in `audiences` (or equal to `inject_audience`); any other is denied with
    `audience_not_allowed`, so that a caller cannot mint tokens for services the policy does not name."""
    inject_spiffe_id: Annotated[SpiffeIdValue | None, DocDefault("the only workload")] = None
    """`inject` only: whose JWT-SVID to mint; must be one of `workloads[]`. Required when there is not
    exactly one workload ID."""
    inject_allow_unverified_callers: Bool = False
    """`inject` only. **Risky.** Also mint for a Check whose caller has no kernel-verified credentials (it
    came over TCP, not through svidgate's unix socket). By default such a Check is denied with
    `unverified_caller`, because everything in a CheckRequest, including `context_extensions`, is whatever
    the sender claims: with this on, *any* process that can connect to the Check listener obtains
    JWT-SVIDs of `inject_spiffe_id` for the policy's audiences. Turn it on only where the network path to
    the Check listener is itself the authentication. A configuration with an inject policy and Check on
    TCP is warned about either way."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class DecisionLogConfig:
    """``authz.decision_log``: which decisions are logged."""

    sample_rate: Fraction = 1.0
    """Fraction (0..1) of decisions logged."""
    max_per_second: Rate = 100.0
    """Upper bound on decision log lines per second."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class AuthzConfig:
    """ext_authz: where the token is, the policies, and what happens when none matches."""

    token_header: Annotated[Str, BeforeValidator(_lower)] = "authorization"  # noqa: S105 -- a header name
    """Request header carrying the JWT-SVID (lower-cased)."""
    token_prefix: AnyStr = "Bearer "  # noqa: S105 -- a scheme prefix
    """Prefix before the token in that header; `""` for none."""
    policies: Annotated[tuple[Policy, ...], _list_of("a list of policies")] = ()
    """Ordered policies; the first whose `match` holds decides."""
    default: Literal["deny", "allow"] = "deny"
    """What happens when no policy matches: `deny` or `allow` (warned about)."""
    leeway: DurationOrZero = 30.0
    """Clock skew tolerated on `exp`/`iat`; zero allowed."""
    hide_details: Bool = False
    """Deny responses carry only a generic reason (details still go to the log)."""
    cache_size: Count = 10000
    """Entries of the validated-token cache and, as many again, of the decision fast path (a repeated
    Check -- same token header, host, path, method and context extensions -- answered from its earlier
    decision while the configuration, the bundles and the token are unchanged and unexpired); `0` turns
    both off."""
    decision_log: Annotated[DecisionLogConfig, _Section] = field(default_factory=DecisionLogConfig)
    """Which decisions are logged."""
    # How long a Check waits for the bundle fetch an unknown JWT-SVID key triggers before its deny is final.
    # Half of Envoy's default ext_authz timeout (200 ms), so the answer still reaches Envoy in time.
    unknown_key_wait: DurationOrZero = 0.1
    """How long a Check waits for the bundle fetch that a JWT-SVID with an unknown `kid` triggers (see
    `federation`) before its deny is final; `0` = do not wait (the fetch still runs, later Checks
    benefit); at most `10s`. Keep it below Envoy's ext_authz `timeout` (default 200 ms). The threaded
    `listen.check` server blocks its thread that long at most; on the grpc.aio listeners (`listen.grpc`,
    `listen.workload_api`) the wait is awaited and blocks nothing."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class SourceConfig:
    """Where svidgate's own identities come from."""

    kind: Literal["builtin", "spire", "files"] = "builtin"
    """`builtin`: the built-in CA (in `state_dir`) mints an SVID per workload. `spire`: SVIDs and bundles
    from a SPIRE agent's Workload API. `files`: a watched SVID + bundle on disk."""
    spire_socket: Str | None = None
    """`spire` only, required: the agent's socket (`unix:///run/spire/agent.sock` or a bare absolute
    path)."""
    cert_file: FilePath | None = None
    """`files` only, required: the X.509-SVID chain, leaf first (PEM or DER)."""
    key_file: FilePath | None = None
    """`files` only, required: its private key (PKCS#8 PEM or DER)."""
    bundle_file: FilePath | None = None
    """`files` only, required: the own trust domain's bundle (PEM or SPIFFE JSON)."""
    poll_interval: Duration = DEFAULT_POLL_INTERVAL
    """How often watched files (the `files` source and federation `bundle_file`s) are checked."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class KubernetesConfig:
    """Kubernetes workload attestation (read by `svidgate.attest.k8s`); used when a workload has a `k8s:`
    selector."""

    kubelet_url: Str = "https://127.0.0.1:10250"
    """The kubelet's authenticated port, `https://host[:port]` only (plain HTTP would send the token in
    the clear). Its serving certificate must name this host."""
    token_file: FilePath = DEFAULT_K8S_TOKEN_FILE
    """Bearer token for the kubelet, re-read on every fetch (projected tokens rotate). Never logged."""
    kubelet_ca_file: FilePath | None = DEFAULT_K8S_CA_FILE
    """PEM roots that verify the kubelet's serving certificate (chain and host name). Cannot be combined
    with `kubelet_insecure_skip_verify`."""
    kubelet_insecure_skip_verify: Bool = False
    """`true` = do not verify the kubelet's certificate. Reported as a warning: whoever answers on
    `kubelet_url` then decides which pod a caller is, and receives the token."""
    proc_root: FilePath = Path("/proc")
    """Where `<pid>/cgroup` and `<pid>/stat` are read. The PIDs come from svidgate's PID namespace, so
    svidgate must share the host's (`hostPID: true`); `/host/proc` only if the host's /proc is mounted
    there in a container that shares the host PID namespace."""
    pod_cache_ttl: DurationOrZero = 5.0
    """How long a fetched pod list answers lookups; zero allowed (every attestation fetches)."""
    attest_timeout: Duration = 5.0
    """Total time one attestation may take, kubelet retries included."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class ServerConfig:
    """Process-level settings (read by `svidgate.server`)."""

    drain_grace: DurationOrZero = 10.0
    """On SIGTERM, how long in-flight calls may finish before the rest is cancelled; zero allowed. The
    process exits within `drain_grace` + 5 s in every state (also during start-up, e.g. while waiting for
    an absent SPIRE agent)."""
    reflection: Bool = False
    """Serve gRPC server reflection (debugging)."""
    config_poll_interval: DurationOrZero = 2.0
    """How often the config file is checked for changes; `0` = only on SIGHUP."""
    socket_mode: SocketMode = 0o660
    """Permission bits of the unix sockets svidgate creates; must include owner read/write. Write `0660`
    (YAML reads it as octal) or the string `"0o660"`."""
    # Check is CPU-bound under the GIL, so extra threads add contention: bench/check_bench.py measured cached
    # Checks at 90% of the fastest no-op baseline's throughput with 2 workers and 83% with 4. Raise it only
    # when inject mode mints through a SPIRE agent, where a cache miss blocks a worker on the agent.
    check_workers: PositiveCount = 2
    """Threads of the threaded Check server (`listen.check`). Check is CPU-bound under Python's GIL: 2
    measured fastest on 2 cores (`bench/check_bench.py`). Raise it when inject mode mints through a SPIRE
    agent, where a token-cache miss blocks a thread on the agent."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class LogConfig:
    """Log output."""

    format: Literal["json", "logfmt"] = "json"
    """`json` (one JSON object per line) or `logfmt`."""
    level: Annotated[
        Literal["debug", "info", "warning", "error"], BeforeValidator(_lower), _any_case_schema(LOG_LEVELS)
    ] = "info"
    """`debug`, `info`, `warning`, `error` (case-insensitive)."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class WorkloadEntry:
    """One ``workloads[]`` entry of the file; the config builds a `Workload` (identity) from it."""

    spiffe_id: WorkloadId
    """The SVID's SPIFFE ID; must be in `trust_domain` and have a path. May be a **template** with
    `{k8s:...}` placeholders in the path (see below)."""
    selectors: Annotated[SelectorList, DocDefault("required, non-empty")] = ()
    """SPIRE-style `type:key:value` strings; a caller is entitled when **all** of them match."""
    dns_names: StrList = ()
    """Extra DNS SANs on the X.509-SVID (lower-case DNS names, `*.` wildcard allowed)."""
    hint: AnyStr = ""
    """The Workload API `hint` of this SVID."""


def _workloads(entries: tuple[WorkloadEntry, ...]) -> tuple[Workload, ...]:
    return tuple(Workload(e.spiffe_id, e.selectors, e.dns_names, e.hint) for e in entries)


def _are_workloads(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(w, Workload) for w in value)


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class BundleEndpointEntry:
    """``federation.<trust domain>.bundle_endpoint``: a SPIFFE bundle endpoint to fetch from."""

    url: Str
    """`https://` URL of the endpoint. Redirects are not followed; bodies over 1 MiB are refused."""
    profile: Literal["https_web", "https_spiffe"]
    """`https_web` or `https_spiffe`."""
    endpoint_spiffe_id: SpiffeIdValue | None = None
    """Required for (and only allowed with) `https_spiffe`: the SPIFFE ID the server must present."""
    refresh: Duration = DEFAULT_BUNDLE_REFRESH
    """Time between fetches when the bundle carries no `spiffe_refresh_hint`."""
    ca_file: FilePath | None = None
    """`https_web` only: PEM roots to trust instead of the system store (private PKI)."""
    timeout: Duration = DEFAULT_FETCH_TIMEOUT
    """Total deadline of one fetch: connect, TLS, request, headers and body together (at most `5m`). An
    endpoint that answers slowly (one byte every few seconds) fails at this deadline instead of holding
    the fetch."""


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class FederationEntry:
    """``federation.<trust domain>``: where that trust domain's bundle comes from."""

    bundle_file: FilePath | None = None
    """A bundle file, SPIFFE JSON (JWKS) or PEM certificates (detected from the content). Checked every
    `source.poll_interval`; applied when its bytes change."""
    bundle_endpoint: BundleEndpointEntry | None = None
    """A SPIFFE bundle endpoint (below)."""


def _federation_mapping(value: object) -> object:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str | TrustDomain):
                fail(f"{PATH}: keys must be trust domain names, got {key!r}")
        return {k: {} if v is None else v for k, v in value.items()}
    return fail(f"{PATH}: expected a mapping of trust domain names, got {type_name(value)}")


def _federation(entries: dict[TrustDomain, FederationEntry]) -> Mapping[TrustDomain, FederationSettings]:
    built: dict[TrustDomain, FederationSettings] = {}
    for trust_domain, entry in entries.items():
        endpoint = entry.bundle_endpoint
        built[trust_domain] = FederationSettings(
            bundle_file=entry.bundle_file,
            bundle_endpoint=None
            if endpoint is None
            else BundleEndpoint(
                endpoint.url,
                endpoint.profile,
                endpoint.endpoint_spiffe_id,
                endpoint.refresh,
                endpoint.ca_file,
                endpoint.timeout,
            ),
        )
    return built


def _is_federation(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, FederationSettings) for v in value.values())


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class BundleEndpointServerEntry:
    """``bundle_endpoint``: what the own SPIFFE bundle endpoint (``listen.bundle_endpoint``) presents."""

    profile: Literal["https_web", "https_spiffe"] = "https_spiffe"
    """`https_spiffe`: the server presents an X.509-SVID for `spiffe_id`, issued by the own identity
    source and rotated like every SVID (new TLS handshakes get the new certificate, no restart).
    `https_web`: it presents `cert_file`/`key_file`."""
    spiffe_id: SpiffeIdValue | None = None
    """Required with (and only allowed with) `https_spiffe`: the endpoint's SPIFFE ID, a path in the own
    trust domain (e.g. `spiffe://example.org/bundle-endpoint`). The built-in CA mints its SVID; no caller
    is entitled to it. With `source.kind: spire`/`files` the source must hold an SVID for it. Partners
    configure it as their `endpoint_spiffe_id`."""
    cert_file: FilePath | None = None
    """`https_web` only, required: PEM certificate chain (leaf first) from a Web PKI CA. Re-read within
    `source.poll_interval` when it changes; a pair that does not load (half-written renewal) is logged
    (`bundle_endpoint.certificate_rejected`) and the last good one stays."""
    key_file: FilePath | None = None
    """`https_web` only, required: the PEM private key of `cert_file`."""
    refresh_hint: Duration | None = None
    """The `spiffe_refresh_hint` served. `null`: the bundle's own hint — the built-in CA's is min(5 m,
    `ca.ca_ttl` / 12), so partners see the next authority well before it signs — else `5m`."""
    oidc_issuer: Str | None = None
    """An `https://` URL: also serve OpenID Connect discovery for JWT-SVID relying parties (cloud IAM,
    Vault), as SPIRE's OIDC discovery provider does: `<issuer path>/.well-known/openid-configuration`
    (`issuer`, `jwks_uri` = issuer + `/keys`, `authorization_endpoint: ""`, `response_types_supported:
    [id_token]`, `subject_types_supported: []`, `id_token_signing_alg_values_supported` = the algorithms
    of the keys held) and `<issuer path>/keys` (the JWT-SVID keys with `use: sig` and `alg`; never an
    X.509 authority). `null` = not served. OIDC relying parties check the server with Web PKI, so serve
    them with `profile: https_web` (a certificate for the issuer's host name)."""


def _bundle_endpoint_server(entry: BundleEndpointServerEntry) -> BundleEndpointServerSettings:
    return BundleEndpointServerSettings(
        profile=entry.profile,
        spiffe_id=entry.spiffe_id,
        cert_file=entry.cert_file,
        key_file=entry.key_file,
        refresh_hint=entry.refresh_hint,
        oidc_issuer=entry.oidc_issuer,
    )


@pydantic_dataclass(frozen=True, slots=True, config=_SECTION)
class Config:
    """The whole configuration, validated. Build it with `load_config` or `parse_config`."""

    trust_domain: TrustDomainValue
    """The own trust domain **name** (lower case, no `spiffe://`). Every workload ID is in it."""
    state_dir: FilePath
    """Where the built-in CA keeps its state (`ca/ca.json`, mode 0600, directory 0700). `serve` locks it
    (`serve.lock`, whatever the source) so that two instances never share it. `mint`, `bundle` and
    `explain` only read the CA `serve` created and fail with one line naming the file when it is not there
    (run them as the server's user, with its configuration)."""
    listen: Annotated[ListenConfig, _Section]
    """Listening addresses."""
    ca: Annotated[CaConfig, _Section] = field(default_factory=CaConfig)
    """The built-in CA and SVID lifetimes."""
    workloads: Annotated[
        tuple[Workload, ...],
        _built(tuple[WorkloadEntry, ...], _workloads, _are_workloads),
        _list_of("a list of workloads"),
    ] = ()
    """The identities svidgate issues and who may receive them."""
    federation: Annotated[
        Mapping[TrustDomain, FederationSettings],
        _built(dict[TrustDomainValue, FederationEntry], _federation, _is_federation),
        BeforeValidator(_federation_mapping),
    ] = field(default_factory=dict)
    """Trust bundles of other trust domains (reloaded live)."""
    bundle_endpoint: Annotated[
        BundleEndpointServerSettings,
        _built(
            BundleEndpointServerEntry,
            _bundle_endpoint_server,
            lambda v: isinstance(v, BundleEndpointServerSettings),
        ),
        _Section,
    ] = field(default_factory=BundleEndpointServerSettings)
    """What the own SPIFFE bundle endpoint (`listen.bundle_endpoint`) presents and serves."""
    sds: Annotated[SdsConfig, _Section] = field(default_factory=SdsConfig)
    """SDS resource names."""
    authz: Annotated[AuthzConfig, _Section] = field(default_factory=AuthzConfig)
    """ext_authz token location and policies."""
    source: Annotated[SourceConfig, _Section] = field(default_factory=SourceConfig)
    """Where the own identities come from."""
    log: Annotated[LogConfig, _Section] = field(default_factory=LogConfig)
    """Log output."""
    server: Annotated[ServerConfig, _Section] = field(default_factory=ServerConfig)
    """Process-level settings."""
    kubernetes: Annotated[KubernetesConfig, _Section] = field(default_factory=KubernetesConfig)
    """Kubernetes workload attestation (used when a workload has a `k8s:` selector)."""

    @property
    def attests_kubernetes(self) -> bool:
        """True when some workload has a `k8s:` selector: callers on unix sockets are then attested."""
        return any(s.type == "k8s" for w in self.workloads for s in w.selectors)

    def __post_init__(self) -> None:
        object.__setattr__(self, "federation", MappingProxyType(dict(self.federation)))

    def warnings(self) -> tuple[str, ...]:
        """Valid but risky settings, one sentence each, for the runtime and `check-config` to report."""
        found = [
            f"workload {w.spiffe_id} uses the 'any' selector: every caller is entitled (development only)"
            for w in self.workloads
            if any(s.type == "any" for s in w.selectors)
        ]
        tcp_sds = [str(a) for a in self.listen.grpc if a.kind == "tcp"]
        if tcp_sds:
            # Envoy's node ID and cluster are claims, not credentials, and `any` asks for nothing: over TCP
            # any local process can send them and receive that workload's private key. Only a kernel-verified
            # selector (unix peer credentials, which a TCP caller never has) keeps a workload off TCP.
            found += [
                f"workload {w.spiffe_id} is selected by no kernel-verified selector "
                f"({', '.join(str(s) for s in w.selectors)}): any client of {', '.join(tcp_sds)} can claim "
                "it and receive its private key over SDS; add a unix:uid/unix:gid selector or serve SDS on "
                "unix sockets only"
                for w in self.workloads
                if not any(s.type in KERNEL_VERIFIED_SELECTOR_TYPES for s in w.selectors)
            ]
        # Over TCP there are no peer credentials, so an inject-mode policy either denies every Check that
        # arrives there (the default) or, opted in, mints its identity's tokens for anyone who can connect.
        check_tcp = ", ".join(str(a) for a in self.listen.check_listeners() if a.kind == "tcp")
        for p in self.authz.policies:
            if p.mode != "inject" or not check_tcp:
                continue
            if p.inject_allow_unverified_callers:
                found.append(
                    f"authz policy {p.name!r} sets inject_allow_unverified_callers: any client of "
                    f"{check_tcp} can obtain JWT-SVIDs of {p.inject_spiffe_id}; serve Check on a unix socket"
                )
            else:
                found.append(
                    f"authz policy {p.name!r} is in inject mode but Check is reachable over TCP "
                    f"({check_tcp}): Checks arriving there have no verified caller and are denied "
                    "(unverified_caller); serve Check to egress Envoys on a unix socket"
                )
        unix = [
            a for a in (*self.listen.grpc, self.listen.workload_api) if a is not None and a.kind == "unix"
        ]
        if self.attests_kubernetes and not unix:
            found.append(
                "k8s: selectors only match callers on unix sockets (attestation starts from the caller's "
                "PID), and neither listen.grpc nor listen.workload_api has one: they match nobody"
            )
        if self.attests_kubernetes and self.kubernetes.kubelet_insecure_skip_verify:
            found.append(
                "kubernetes.kubelet_insecure_skip_verify is true: the kubelet's certificate is not verified, "
                "so whoever can answer on kubelet_url decides which pod a caller is (and receives the token)"
            )
        if self.authz.default == "allow":
            found.append("authz.default is allow: requests that match no policy are let through")
        if self.sds.pool_trust_domain_roots_unsafe:
            found.append(
                "sds.pool_trust_domain_roots_unsafe is true: trusted_ca validation contexts pool the roots "
                "of several trust domains, so any federated trust domain's CA can issue certificates naming "
                "SPIFFE IDs of another trust domain (yours included) and Envoy accepts them: impersonation"
            )
        found += [
            f"authz policy {p.name!r} is dry_run: it never denies" for p in self.authz.policies if p.dry_run
        ]
        return tuple(found)

    def summary(self) -> str:
        """One line for humans: what this config does."""
        endpoints = sum(1 for f in self.federation.values() if f.bundle_endpoint is not None)
        sds = ", ".join(str(a) for a in self.listen.grpc) or "none"
        check = "" if self.listen.check is None else f", Check on {self.listen.check}"
        served = self.listen.bundle_endpoint
        bundle_endpoint = (
            ""
            if served is None
            else f", bundle endpoint on {bracket(served[0])}:{served[1]} ({self.bundle_endpoint.profile})"
        )
        return (
            f"trust domain {self.trust_domain}, source {self.source.kind}, "
            f"{_plural(len(self.workloads), 'workload')}, "
            f"{_plural(len(self.federation), 'federated trust domain')} ({endpoints} via bundle endpoint), "
            f"{_plural(len(self.authz.policies), 'authz policy', 'authz policies')} "
            f"(default {self.authz.default}), "
            f"SDS on {sds}{check}{bundle_endpoint}"
        )


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CHECK_ADDRESS",
    "DEFAULT_HTTP_ADDRESS",
    "DEFAULT_K8S_CA_FILE",
    "DEFAULT_K8S_TOKEN_FILE",
    "DEFAULT_TRUST_DOMAIN",
    "KERNEL_VERIFIED_SELECTOR_TYPES",
    "MAX_UNIX_PATH_BYTES",
    "MAX_UNKNOWN_KEY_WAIT",
    "MIN_CA_TTL_EXCLUSIVE",
    "SELECTOR_TYPES",
    "UNIX_TEMP_NAME_BYTES",
    "Address",
    "AllowRule",
    "AuthzConfig",
    "BundleEndpoint",
    "BundleEndpointEntry",
    "BundleEndpointServerConfig",
    "BundleEndpointServerEntry",
    "CaConfig",
    "CallerLike",
    "Config",
    "DecisionLogConfig",
    "FederationConfig",
    "FederationEntry",
    "KubernetesConfig",
    "ListenConfig",
    "LogConfig",
    "Policy",
    "PolicyMatch",
    "SdsConfig",
    "Selector",
    "ServerConfig",
    "SourceConfig",
    "UpstreamConfig",
    "Workload",
    "WorkloadEntry",
]
