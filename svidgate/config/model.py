"""The configuration's model: one frozen, typed `Config` and its sections.

The values identity needs (`Workload`, `Selector`, the federation settings) are domain types of
`svidgate.identity`, re-exported here under the names the configuration has always used; everything else
is a section of the file. Valid-but-risky settings are reported by `Config.warnings`.

This module imports only the identity domain types; never gRPC, never the services.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from svidgate.errors import ConfigError, SpiffeIdError
from svidgate.identity.ca import BACKDATE_SECONDS, DEFAULT_CA_TTL, DEFAULT_JWT_SVID_TTL, DEFAULT_X509_SVID_TTL
from svidgate.identity.entitlement import Workload
from svidgate.identity.federation import (
    DEFAULT_POLL_INTERVAL,
    BundleEndpoint,
    BundleEndpointServerSettings,
    FederationSettings,
)
from svidgate.identity.keys import KeyType
from svidgate.identity.selectors import KERNEL_VERIFIED_SELECTOR_TYPES, SELECTOR_TYPES, CallerLike, Selector
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

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

#: `sockaddr_un.sun_path` holds 108 bytes on Linux, the terminating NUL included.
MAX_UNIX_PATH_BYTES = 107
#: A listening unix socket is bound under a temporary name in its directory (``.<8 hex digits>.tmp``, see
#: `svidgate.peercred.bind_unix_socket`), given its mode and renamed into place.
UNIX_TEMP_NAME_BYTES = len(".0123abcd.tmp")

#: The built-in CA backdates every authority by `BACKDATE_SECONDS` and needs a lifetime beyond twice that.
MIN_CA_TTL_EXCLUSIVE = 2 * BACKDATE_SECONDS


@dataclass(frozen=True, slots=True)
class Address:
    """A listening address: a unix socket path or a TCP host and port.

    `str()` gives the canonical form used in the config and logs (``unix:///run/s.sock``, ``tcp://h:p``).
    """

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def grpc_target(self) -> str:
        """The address in gRPC's syntax for `add_insecure_port()`: ``unix:/p``, ``h:p`` or ``[::1]:p``."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"{_bracket(self.host)}:{self.port}"

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        return f"tcp://{_bracket(self.host)}:{self.port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


#: Where Check is served when a configuration does not say (``listen.check`` absent).
DEFAULT_CHECK_ADDRESS = "tcp://127.0.0.1:8081"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where svidgate listens (the listener contract; docs/configuration.md states the same).

    Every gRPC listener answers ext_authz Check with the same decision: an Envoy pointed at any of them with
    ``failure_mode_allow: true`` would turn an UNIMPLEMENTED into an allow.

    Attributes:
        grpc: SDS listeners (grpc.aio; they answer Check too). Unix sockets by default: SDS over TCP carries
            no peer credentials, so it is opt-in by listing a ``tcp://`` address.
        workload_api: the SPIFFE Workload API socket (unix only; it answers Check too, to requests carrying
            the Workload Endpoint's security header), or None to not serve it.
        http: ``(host, port)`` of the metrics/health HTTP listener, or None.
        check: Check's own listener on grpcio's threaded server (the fast path, `DEFAULT_CHECK_ADDRESS` unless
            the configuration says otherwise), or None (``null``) for no separate one: Check is then answered
            on the `grpc` (and `workload_api`) listeners only.
        bundle_endpoint: ``(host, port)`` of the SPIFFE bundle endpoint server (HTTPS), or None (the default:
            not served). What it presents and serves is `Config.bundle_endpoint`.
    """

    grpc: tuple[Address, ...]
    workload_api: Address | None
    http: tuple[str, int] | None
    check: Address | None = None
    bundle_endpoint: tuple[str, int] | None = None

    def check_listeners(self) -> tuple[Address, ...]:
        """Every address Check is answered on."""
        separate = () if self.check is None else (self.check,)
        workload_api = () if self.workload_api is None else (self.workload_api,)
        return (*separate, *self.grpc, *workload_api)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """``ca.upstream``: a root shared by several svidgates; each one's CA becomes an intermediate under it."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class CaConfig:
    """The built-in CA. All durations in seconds."""

    key_type: KeyType = KeyType.EC_P256
    x509_svid_ttl: float = DEFAULT_X509_SVID_TTL
    jwt_svid_ttl: float = DEFAULT_JWT_SVID_TTL
    ca_ttl: float = DEFAULT_CA_TTL
    upstream: UpstreamConfig | None = None


@dataclass(frozen=True, slots=True)
class SdsConfig:
    """SDS resource naming and the validation context flavour."""

    default_svid_name: str = "default"
    own_bundle_name: str = "ROOTCA"
    all_bundles_name: str = "ALL"
    validation: Literal["spiffe", "trusted_ca"] = "spiffe"
    istio_compat: bool = False
    pool_trust_domain_roots_unsafe: bool = False


@dataclass(frozen=True, slots=True)
class AllowRule:
    """Who a policy lets through, by the caller's JWT-SVID subject.

    Kinds: ``id`` (exactly this SPIFFE ID), ``glob`` (``spiffe://td/a/*``: any ID whose path starts with
    ``/a/`` and has at least one more segment; ``*`` is allowed only as the whole last segment),
    ``trust_domain`` (``spiffe://td``: every ID of that trust domain) and ``any`` (``*``: any SVID that
    validated).
    """

    kind: Literal["id", "glob", "trust_domain", "any"]
    value: str

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """Parse one `allow` entry.

        Raises:
            ConfigError: not one of the four forms (no path prefix; the caller adds it).
        """
        if text == "*":
            return cls("any", "*")
        try:
            if text.endswith("/*"):
                prefix = text[:-2]
                if "*" in prefix:
                    raise ConfigError(f"{text!r}: '*' is allowed only as the last path segment")
                SpiffeId.parse(prefix)
                return cls("glob", text)
            if "*" in text:
                raise ConfigError(
                    f"{text!r}: '*' is allowed only as the last path segment ('spiffe://td/a/*')"
                )
            spiffe_id = SpiffeId.parse(text)
        except SpiffeIdError as exc:
            raise ConfigError(str(exc)) from None
        if spiffe_id.path == "":
            return cls("trust_domain", str(spiffe_id))
        return cls("id", str(spiffe_id))

    @property
    def trust_domain(self) -> TrustDomain | None:
        """The trust domain this rule is about (None for ``*``)."""
        if self.kind == "any":
            return None
        return TrustDomain.parse(self.value[:-2] if self.kind == "glob" else self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class PolicyMatch:
    """Which requests a policy applies to; all criteria must hold, an empty criterion matches everything.

    Attributes:
        hosts: lower-case `:authority` values (with or without port; a leading ``*.`` matches any subdomain).
        path_prefix / path_exact / path_regex: at most one of them is set; the regex must match the whole
            path (without the query string).
        methods: upper-case HTTP methods.
        context_extensions: key/value pairs that must all be present in the Check request's
            `context_extensions` (set per route in Envoy).
    """

    hosts: tuple[str, ...] = ()
    path_prefix: str | None = None
    path_exact: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: tuple[str, ...] = ()
    context_extensions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "context_extensions", MappingProxyType(dict(self.context_extensions)))


@dataclass(frozen=True, slots=True)
class Policy:
    """One ext_authz policy. The first policy (in config order) whose `match` holds decides.

    Attributes:
        mode: ``validate`` checks the caller's JWT-SVID; ``inject`` mints a JWT-SVID for `inject_spiffe_id`
            with audience `inject_audience` and adds it to the request (egress).
        inject_spiffe_id: inject mode only; defaults to the only configured workload.
        inject_allow_unverified_callers: inject mode only; mint for a Check whose caller has no
            kernel-verified credentials (TCP). Off by default: then any client of the endpoint could obtain
            tokens for `inject_spiffe_id`.
    """

    name: str
    match: PolicyMatch = field(default_factory=PolicyMatch)
    audiences: tuple[str, ...] = ()
    allow: tuple[AllowRule, ...] = ()
    require_token: bool = True
    dry_run: bool = False
    keep_token: bool = False
    mode: Literal["validate", "inject"] = "validate"
    inject_audience: str | None = None
    inject_spiffe_id: SpiffeId | None = None
    inject_allow_unverified_callers: bool = False


@dataclass(frozen=True, slots=True)
class DecisionLogConfig:
    sample_rate: float = 1.0
    max_per_second: float = 100.0


@dataclass(frozen=True, slots=True)
class AuthzConfig:
    """ext_authz: where the token is, the policies, and what happens when none matches."""

    token_header: str = "authorization"  # noqa: S105 -- a header name
    token_prefix: str = "Bearer "  # noqa: S105 -- a scheme prefix
    policies: tuple[Policy, ...] = ()
    default: Literal["deny", "allow"] = "deny"
    leeway: float = 30.0
    hide_details: bool = False
    cache_size: int = 10000
    decision_log: DecisionLogConfig = field(default_factory=DecisionLogConfig)
    # How long a Check waits for the bundle fetch an unknown JWT-SVID key triggers before its deny is final.
    # Half of Envoy's default ext_authz timeout (200 ms), so the answer still reaches Envoy in time.
    unknown_key_wait: float = 0.1


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where svidgate's own identities come from.

    Attributes:
        kind: ``builtin`` (the built-in CA mints SVIDs for `workloads`), ``spire`` (an upstream SPIRE agent's
            Workload API at `spire_socket`) or ``files`` (watched PEM files).
        poll_interval: seconds between checks of watched files (files source and federation bundle files).
    """

    kind: Literal["builtin", "spire", "files"] = "builtin"
    spire_socket: str | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    bundle_file: Path | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """Kubernetes workload attestation (read by `svidgate.attest.k8s`); used when a workload has a `k8s:`
    selector.

    Attributes:
        kubelet_url: the kubelet's authenticated HTTPS port (``GET /pods``).
        token_file: bearer token for the kubelet (re-read on every pod list fetch: tokens are rotated).
        kubelet_ca_file: PEM roots that verify the kubelet's serving certificate; None only with
            `kubelet_insecure_skip_verify`.
        kubelet_insecure_skip_verify: do not verify the kubelet's certificate (explicit, warned).
        proc_root: where the caller's ``<pid>/cgroup`` and ``<pid>/stat`` are read (``/host/proc`` when the
            host's /proc is mounted into the container).
        pod_cache_ttl: seconds a fetched pod list answers before it is fetched again.
        attest_timeout: seconds one attestation may take in total, kubelet retries included.
    """

    kubelet_url: str = "https://127.0.0.1:10250"
    token_file: Path = DEFAULT_K8S_TOKEN_FILE
    kubelet_ca_file: Path | None = DEFAULT_K8S_CA_FILE
    kubelet_insecure_skip_verify: bool = False
    proc_root: Path = Path("/proc")
    pod_cache_ttl: float = 5.0
    attest_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Process-level settings (read by `svidgate.server`).

    Attributes:
        drain_grace: seconds SIGTERM waits for in-flight calls before cancelling what is left.
        reflection: serve gRPC server reflection (debugging only).
        config_poll_interval: seconds between checks of the config file for changes; 0 = off (SIGHUP still
            reloads).
        socket_mode: permission bits of the unix sockets svidgate creates.
        check_workers: threads of the threaded Check server (`listen.check`).
    """

    drain_grace: float = 10.0
    reflection: bool = False
    config_poll_interval: float = 2.0
    socket_mode: int = 0o660
    # Check is CPU-bound under the GIL, so extra threads add contention: bench/check_bench.py measured cached
    # Checks at 90% of the fastest no-op baseline's throughput with 2 workers and 83% with 4. Raise it only
    # when inject mode mints through a SPIRE agent, where a cache miss blocks a worker on the agent.
    check_workers: int = 2


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: Literal["json", "logfmt"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, validated. Build it with `load_config` or `parse_config`."""

    trust_domain: TrustDomain
    state_dir: Path
    listen: ListenConfig
    ca: CaConfig = field(default_factory=CaConfig)
    workloads: tuple[Workload, ...] = ()
    federation: Mapping[TrustDomain, FederationSettings] = field(default_factory=dict)
    bundle_endpoint: BundleEndpointServerSettings = field(default_factory=BundleEndpointServerSettings)
    sds: SdsConfig = field(default_factory=SdsConfig)
    authz: AuthzConfig = field(default_factory=AuthzConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    log: LogConfig = field(default_factory=LogConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

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
            else f", bundle endpoint on {_bracket(served[0])}:{served[1]} ({self.bundle_endpoint.profile})"
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
    "BundleEndpointServerConfig",
    "CaConfig",
    "CallerLike",
    "Config",
    "DecisionLogConfig",
    "FederationConfig",
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
]
