"""Rules across keys: what the schema of one key cannot say on its own.

A workload's ID is in the own trust domain, an inject policy names a configured workload, a bundle
endpoint's profile decides which of its keys apply, and so on. `apply_rules` runs once the file matched the
schema (`svidgate.config.model`); it raises a `ConfigError` naming the key's path, or returns the config with
the few values that are completed from others (an inject policy's audience and SPIFFE ID, lower-case hosts,
a SPIRE socket path as ``unix://``, the kubelet URL without its trailing ``/``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from svidgate.canonical import canonical_host, normalize_path
from svidgate.config.model import (
    DEFAULT_CHECK_ADDRESS,
    MAX_UNKNOWN_KEY_WAIT,
    MIN_CA_TTL_EXCLUSIVE,
    AuthzConfig,
    CaConfig,
    Config,
    KubernetesConfig,
    ListenConfig,
    Policy,
    PolicyMatch,
    SdsConfig,
    SourceConfig,
)
from svidgate.config.values import (
    DNS_RE,
    HEADER_RE,
    MAX_FETCH_TIMEOUT,
    MAX_UNIX_PATH_BYTES,
    METHOD_RE,
    UNIX_TEMP_NAME_BYTES,
    Address,
    parse_address,
)
from svidgate.errors import ConfigError
from svidgate.identity.entitlement import Workload
from svidgate.identity.federation import BundleEndpoint, FederationSettings
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.template import SpiffeIdTemplate


def apply_rules(config: Config, raw: Mapping[str, Any]) -> Config:
    """Check the rules across keys and complete the values derived from others.

    Args:
        config: the configuration as the schema validated it.
        raw: the YAML document (which keys the file set, for messages that blame the right key).

    Returns:
        The configuration to use.

    Raises:
        ConfigError: ``<key path>: <problem>``.
    """
    listen_raw = raw.get("listen")
    _listen(config.listen, "check" in listen_raw if isinstance(listen_raw, Mapping) else False)
    _ca(config.ca)
    _workloads(config.workloads, config.trust_domain, config.source.kind)
    _federation(config.federation, config.trust_domain)
    _bundle_endpoint_server(config, "bundle_endpoint" in raw and bool(raw.get("bundle_endpoint")))
    sds_raw = raw.get("sds")
    _sds(config.sds, sds_raw if isinstance(sds_raw, Mapping) else {})
    authz = _authz(config.authz, config, _raw_policies(raw))
    source = _source(config.source)
    kubernetes_raw = raw.get("kubernetes")
    kubernetes = _kubernetes(config.kubernetes, kubernetes_raw if isinstance(kubernetes_raw, Mapping) else {})
    return dataclasses.replace(config, authz=authz, source=source, kubernetes=kubernetes)


def _listen(listen: ListenConfig, check_given: bool) -> None:
    if listen.workload_api is not None and listen.workload_api.kind != "unix":
        # The Workload API authenticates callers by their peer credentials; TCP has none.
        raise ConfigError("listen.workload_api: the Workload API is served on a unix socket only")
    check_where = "listen.check"
    if not check_given:
        check_where = f"listen.check (default {DEFAULT_CHECK_ADDRESS}; set it to another address or null)"
    named: list[tuple[str, Address | None]] = [(check_where, listen.check)]
    named += [(f"listen.grpc[{i}]", a) for i, a in enumerate(listen.grpc)]
    named.append(("listen.workload_api", listen.workload_api))
    if listen.http is not None:
        named.append(("listen.http", Address("tcp", host=listen.http[0], port=listen.http[1])))
    if listen.bundle_endpoint is not None:
        host, port = listen.bundle_endpoint
        named.append(("listen.bundle_endpoint", Address("tcp", host=host, port=port)))
    seen: dict[str, str] = {}
    for where, address in named:
        if address is None or (address.kind == "tcp" and address.port == 0):
            continue
        key = str(address)
        if key in seen:
            raise ConfigError(f"{where}: {key} is already used by {seen[key]}")
        seen[key] = where
    # A listening socket is bound under a temporary name in its directory first: that name must fit too.
    unix: list[tuple[str, Address | None]] = [(f"listen.grpc[{i}]", a) for i, a in enumerate(listen.grpc)]
    unix += [("listen.workload_api", listen.workload_api), ("listen.check", listen.check)]
    for where, address in unix:
        if address is None or address.kind != "unix":
            continue
        directory = os.fsencode(os.path.dirname(address.path))
        if len(directory) + 1 + UNIX_TEMP_NAME_BYTES > MAX_UNIX_PATH_BYTES:
            raise ConfigError(
                f"{where}: {address}: the directory is too long: the socket is bound under a temporary "
                f"name next to it first, so its directory may have at most "
                f"{MAX_UNIX_PATH_BYTES - 1 - UNIX_TEMP_NAME_BYTES} bytes"
            )


def _ca(ca: CaConfig) -> None:
    if ca.ca_ttl <= MIN_CA_TTL_EXCLUSIVE:
        # The CA refuses it too (`BuiltinCa.load_or_create`); checked here so that check-config, a reload and
        # serve agree.
        raise ConfigError(f"ca.ca_ttl: must be more than {MIN_CA_TTL_EXCLUSIVE:.0f}s")
    # An SVID must not outlive its CA, and the CA rotates ahead of expiry: keep room for a whole SVID
    # lifetime on both sides of the switch.
    if ca.ca_ttl < 2 * max(ca.x509_svid_ttl, ca.jwt_svid_ttl):
        raise ConfigError("ca.ca_ttl: must be at least twice the longest SVID TTL")
    if ca.x509_svid_ttl < 60:
        raise ConfigError("ca.x509_svid_ttl: must be at least 60s (SVIDs are re-minted at half TTL)")
    if ca.jwt_svid_ttl < 10:
        raise ConfigError("ca.jwt_svid_ttl: must be at least 10s")
    # ca.upstream's root is checked as the section is read (`UpstreamConfig.__post_init__`).


def _workloads(workloads: tuple[Workload, ...], trust_domain: TrustDomain, source_kind: str) -> None:
    first_seen: dict[SpiffeId | SpiffeIdTemplate, tuple[str, Workload]] = {}
    for i, workload in enumerate(workloads):
        where = f"workloads[{i}]"
        spiffe_id = workload.spiffe_id
        if isinstance(spiffe_id, SpiffeIdTemplate) and source_kind != "builtin":
            # The files source holds one SVID and a SPIRE agent issues what its registration entries say:
            # neither can mint an ID svidgate makes up per pod. (With SPIRE, register the pods in SPIRE with
            # its own k8s workload attestor instead.)
            raise ConfigError(
                f"{where}.spiffe_id: a templated SPIFFE ID needs source.kind: builtin (the built-in "
                f"CA mints each pod's SVID on demand); the {source_kind} source cannot mint it"
            )
        if not spiffe_id.trust_domain == trust_domain:
            raise ConfigError(
                f"{where}.spiffe_id: {spiffe_id} is not in the trust domain {trust_domain} "
                "(svidgate only issues identities of its own trust domain)"
            )
        if isinstance(spiffe_id, SpiffeId) and spiffe_id.path == "":
            raise ConfigError(f"{where}.spiffe_id: the trust domain ID itself cannot be a workload identity")
        selectors = workload.selectors
        if not selectors:
            raise ConfigError(
                f"{where}.selectors: a workload needs at least one selector "
                "(write [any] to match every caller, development only)"
            )
        if any(s.type == "any" for s in selectors) and len(selectors) > 1:
            raise ConfigError(f"{where}.selectors: 'any' cannot be combined with other selectors")
        if len(set(selectors)) != len(selectors):
            raise ConfigError(f"{where}.selectors: duplicate selector")
        if isinstance(spiffe_id, SpiffeIdTemplate) and not any(s.type == "k8s" for s in selectors):
            # The values come from the caller's attested pod: without a k8s: selector a caller that is not in
            # a pod (or not attested) could match, and there would be nothing to fill in.
            raise ConfigError(
                f"{where}.selectors: a templated spiffe_id needs at least one k8s: selector "
                "(e.g. k8s:ns:default)"
            )
        for j, name in enumerate(workload.dns_names):
            if len(name) > 253 or DNS_RE.match(name) is None:
                raise ConfigError(f"{where}.dns_names[{j}]: {name!r} is not a lower-case DNS name")
        # Several entries may share a SPIFFE ID (alternative selector sets), but there is one SVID per ID: its
        # DNS names and hint must agree.
        earlier = first_seen.get(spiffe_id)
        if earlier is not None and (earlier[1].dns_names, earlier[1].hint) != (
            workload.dns_names,
            workload.hint,
        ):
            raise ConfigError(
                f"{where}: {spiffe_id} is also defined by {earlier[0]} with other dns_names or hint "
                "(one SPIFFE ID has one SVID)"
            )
        first_seen.setdefault(spiffe_id, (where, workload))


def _federation(federation: Mapping[TrustDomain, FederationSettings], trust_domain: TrustDomain) -> None:
    for federated, fed in federation.items():
        where = f"federation.{federated}"
        if federated == trust_domain:
            raise ConfigError(f"{where}: cannot federate with the own trust domain {trust_domain}")
        if fed.bundle_endpoint is not None:
            _bundle_endpoint(fed.bundle_endpoint, f"{where}.bundle_endpoint")
        if fed.bundle_file is None and fed.bundle_endpoint is None:
            raise ConfigError(f"{where}: set bundle_file, bundle_endpoint or both")
    # https_spiffe authenticates the endpoint with a bundle we must already have.
    for federated, fed in federation.items():
        endpoint = fed.bundle_endpoint
        if endpoint is None or endpoint.endpoint_spiffe_id is None:
            continue
        where = f"federation.{federated}.bundle_endpoint.endpoint_spiffe_id"
        endpoint_td = endpoint.endpoint_spiffe_id.trust_domain
        if endpoint_td == federated and fed.bundle_file is None:
            raise ConfigError(
                f"{where}: {endpoint.endpoint_spiffe_id} is in {federated} itself, so "
                f"federation.{federated}.bundle_file must provide the bootstrap bundle"
            )
        if endpoint_td != trust_domain and endpoint_td not in federation:
            raise ConfigError(
                f"{where}: no bundle for {endpoint_td} to authenticate the endpoint with "
                "(use the own trust domain, a federated one, or this one with a bundle_file)"
            )


def _bundle_endpoint(endpoint: BundleEndpoint, path: str) -> None:
    if not endpoint.url.startswith("https://") or len(endpoint.url) <= len("https://"):
        raise ConfigError(f"{path}.url: a bundle endpoint URL must be https://")
    if endpoint.profile == "https_spiffe" and endpoint.endpoint_spiffe_id is None:
        raise ConfigError(f"{path}.endpoint_spiffe_id: required with profile https_spiffe")
    if endpoint.profile == "https_web" and endpoint.endpoint_spiffe_id is not None:
        raise ConfigError(f"{path}.endpoint_spiffe_id: only meaningful with profile https_spiffe")
    if endpoint.ca_file is not None and endpoint.profile != "https_web":
        raise ConfigError(f"{path}.ca_file: only meaningful with profile https_web")
    if endpoint.timeout > MAX_FETCH_TIMEOUT:
        raise ConfigError(
            f"{path}.timeout: at most {MAX_FETCH_TIMEOUT:g}s (a fetch that needs longer is a stuck one)"
        )


def _bundle_endpoint_server(config: Config, set_in_file: bool) -> None:
    path = "bundle_endpoint"
    if config.listen.bundle_endpoint is None:
        if set_in_file:
            # Settings that do nothing would let an operator believe partners can fetch the bundle.
            raise ConfigError(f"{path}: set listen.bundle_endpoint (host:port) to serve the bundle endpoint")
        return
    served = config.bundle_endpoint
    given = (("cert_file", served.cert_file), ("key_file", served.key_file))
    if served.profile == "https_spiffe":
        if served.spiffe_id is None:
            raise ConfigError(f"{path}.spiffe_id: required with profile https_spiffe")
        if not served.spiffe_id.member_of(config.trust_domain) or not served.spiffe_id.path:
            raise ConfigError(
                f"{path}.spiffe_id: {served.spiffe_id} must be a workload ID in the own trust domain "
                f"{config.trust_domain} (the endpoint presents an X.509-SVID of the own identity source)"
            )
        for key, value in given:
            if value is not None:
                raise ConfigError(f"{path}.{key}: only meaningful with profile https_web")
    else:
        if served.spiffe_id is not None:
            raise ConfigError(f"{path}.spiffe_id: only meaningful with profile https_spiffe")
        for key, value in given:
            if value is None:
                raise ConfigError(f"{path}.{key}: required with profile https_web")
    if served.refresh_hint is not None and served.refresh_hint < 1:
        raise ConfigError(f"{path}.refresh_hint: must be at least 1s")
    if served.oidc_issuer is not None:
        parts = urllib.parse.urlsplit(served.oidc_issuer)
        # OpenID Connect Discovery 1.0, 3: the issuer is an https URL without query or fragment.
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(
                f"{path}.oidc_issuer: must be an https:// URL without query or fragment, "
                f"got {served.oidc_issuer!r}"
            )


def _sds(sds: SdsConfig, raw: Mapping[str, Any]) -> None:
    seen: dict[str, str] = {}
    for key in ("default_svid_name", "own_bundle_name", "all_bundles_name"):
        name: str = getattr(sds, key)
        if name.startswith("spiffe://"):
            # Resource names of that form mean "the SVID / bundle for this ID"; an alias must not collide.
            raise ConfigError(f"sds.{key}: must not start with spiffe://")
        if name in seen:
            # Blame the key the file set, not the default it collides with.
            culprit, other = (seen[name], key) if key not in raw else (key, seen[name])
            raise ConfigError(f"sds.{culprit}: {name!r} is already the {other}")
        seen[name] = key


def _raw_policies(raw: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    authz = raw.get("authz")
    policies = authz.get("policies") if isinstance(authz, Mapping) else None
    return [p if isinstance(p, Mapping) else {} for p in policies] if isinstance(policies, list) else []


def _authz(authz: AuthzConfig, config: Config, raw_policies: list[Mapping[str, Any]]) -> AuthzConfig:
    # Envoy hands header names to ext_authz in lower case; HTTP/2 forbids upper case anyway.
    if HEADER_RE.match(authz.token_header) is None or authz.token_header.startswith(":"):
        raise ConfigError(f"authz.token_header: {authz.token_header!r} is not an HTTP header name")
    # A Check thread blocks this long at most: keep it bounded whatever the file says.
    if authz.unknown_key_wait > MAX_UNKNOWN_KEY_WAIT:
        raise ConfigError(f"authz.unknown_key_wait: must be at most {MAX_UNKNOWN_KEY_WAIT:g}s")
    known_tds: set[TrustDomain] | None = {config.trust_domain, *config.federation}
    if config.source.kind == "spire":
        known_tds = None  # the SPIRE agent delivers federated bundles we do not know about here
    policies: list[Policy] = []
    names: dict[str, int] = {}
    for i, policy in enumerate(authz.policies):
        path = f"authz.policies[{i}]"
        if policy.name in names:
            raise ConfigError(
                f"{path}.name: {policy.name!r} is already the name of authz.policies[{names[policy.name]}]"
            )
        names[policy.name] = i
        given = raw_policies[i] if i < len(raw_policies) else {}
        policies.append(_policy(policy, path, config, known_tds, given))
    return dataclasses.replace(authz, policies=tuple(policies))


def _policy(
    policy: Policy,
    path: str,
    config: Config,
    known_tds: set[TrustDomain] | None,
    given: Mapping[str, Any],
) -> Policy:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", policy.name):
        # The name becomes a Prometheus label value and a log field: keep it short and plain.
        raise ConfigError(f"{path}.name: use 1-64 letters, digits, '_', '.', ':' or '-'")
    match = _policy_match(policy.match, f"{path}.match")
    for j, rule in enumerate(policy.allow):
        rule_td = rule.trust_domain
        if known_tds is not None and rule_td is not None and rule_td not in known_tds:
            raise ConfigError(
                f"{path}.allow[{j}]: trust domain {rule_td} is neither {config.trust_domain} nor federated, "
                "so no token from it can validate"
            )
    inject_audience, inject_id = policy.inject_audience, policy.inject_spiffe_id
    if policy.mode == "validate":
        for key in ("inject_audience", "inject_spiffe_id", "inject_allow_unverified_callers"):
            if given.get(key) is not None:
                raise ConfigError(f"{path}.{key}: only meaningful with mode: inject")
        # With require_token: false the route is public: ext_authz lets it through without looking at a
        # token, so audiences and allow have nothing to check.
        if policy.require_token and not policy.audiences:
            # JWT-SVID.md 3: validators MUST check `aud`; an empty list would skip that check.
            raise ConfigError(f"{path}.audiences: required: at least one audience the token must carry")
        if policy.require_token and not policy.allow:
            raise ConfigError(
                f"{path}.allow: required: the SPIFFE IDs allowed through ('*' for any valid JWT-SVID)"
            )
    else:
        if policy.allow:
            raise ConfigError(f"{path}.allow: has no effect with mode: inject (the caller is local)")
        if policy.dry_run:
            raise ConfigError(f"{path}.dry_run: inject mode has nothing to dry-run")
        if inject_audience is None:
            if len(policy.audiences) != 1:
                raise ConfigError(
                    f"{path}.inject_audience: required with mode: inject "
                    "(or give exactly one entry in audiences)"
                )
            inject_audience = policy.audiences[0]
        # A templated ID is not one identity: inject mode names a fixed one.
        workloads = config.workloads
        ids = list(dict.fromkeys(w.spiffe_id for w in workloads if isinstance(w.spiffe_id, SpiffeId)))
        if inject_id is None:
            if len(ids) != 1:
                raise ConfigError(
                    f"{path}.inject_spiffe_id: required with mode: inject "
                    "when there is not exactly one workload"
                )
            inject_id = ids[0]
        elif not inject_id.member_of(config.trust_domain):
            raise ConfigError(
                f"{path}.inject_spiffe_id: {inject_id} is not in the trust domain {config.trust_domain}"
            )
        elif workloads and inject_id not in ids:
            raise ConfigError(f"{path}.inject_spiffe_id: {inject_id} is not one of the configured workloads")
    return dataclasses.replace(
        policy, match=match, inject_audience=inject_audience, inject_spiffe_id=inject_id
    )


def _policy_match(match: PolicyMatch, path: str) -> PolicyMatch:
    # Validating with the very functions a Check matches with (svidgate.canonical) means `check-config`
    # refuses what could never match.
    for j, host in enumerate(match.hosts):
        bare = host[2:] if host.startswith("*.") else host
        # Checked before lower-casing: str.lower() turns the Kelvin sign into an ASCII "k".
        if host != "*" and not canonical_host(bare):
            raise ConfigError(
                f"{path}.hosts[{j}]: {host!r} is not a host name or IP address "
                "(ASCII only: write an internationalised name in its xn-- form)"
            )
    paths = [
        key
        for key, value in (
            ("path_prefix", match.path_prefix),
            ("path_exact", match.path_exact),
            ("path_regex", match.path_regex),
        )
        if value is not None
    ]
    if len(paths) > 1:
        raise ConfigError(f"{path}.{paths[1]}: set at most one of path_prefix, path_exact, path_regex")
    for key, text in (("path_prefix", match.path_prefix), ("path_exact", match.path_exact)):
        if text is not None and not text.startswith("/"):
            raise ConfigError(f"{path}.{key}: must start with '/'")
        if text is not None and normalize_path(text) != text:
            # Requests are compared in canonical form (case-sensitive): this value could never match.
            canonical = normalize_path(text)
            hint = f"write {canonical!r}" if canonical else "it has no single reading"
            raise ConfigError(f"{path}.{key}: {text!r} is not a canonical path ({hint})")
    for j, method in enumerate(match.methods):
        if METHOD_RE.match(method) is None:
            raise ConfigError(f"{path}.methods[{j}]: {method!r} is not an upper-case HTTP method")
    return dataclasses.replace(match, hosts=tuple(h.lower() for h in match.hosts))


def _source(source: SourceConfig) -> SourceConfig:
    spire_socket = source.spire_socket
    if source.kind == "spire":
        if spire_socket is None:
            raise ConfigError("source.spire_socket: required with kind: spire")
        if spire_socket.startswith("/"):
            spire_socket = f"unix://{spire_socket}"
        parse_address(spire_socket, "source.spire_socket")
    elif spire_socket is not None:
        raise ConfigError("source.spire_socket: only meaningful with kind: spire")
    for key in ("cert_file", "key_file", "bundle_file"):
        file = getattr(source, key)
        if source.kind == "files" and file is None:
            raise ConfigError(f"source.{key}: required with kind: files")
        if source.kind != "files" and file is not None:
            raise ConfigError(f"source.{key}: only meaningful with kind: files")
    return dataclasses.replace(source, spire_socket=spire_socket)


def _kubernetes(kubernetes: KubernetesConfig, raw: Mapping[str, Any]) -> KubernetesConfig:
    url = kubernetes.kubelet_url
    if re.fullmatch(r"https://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?", url) is None:
        raise ConfigError(
            "kubernetes.kubelet_url: expected https://<host>[:<port>] (the kubelet's authenticated port; "
            f"plain http would send the token in the clear), got {url!r}"
        )
    ca_file = kubernetes.kubelet_ca_file
    ca_file_given = "kubelet_ca_file" in raw
    if ca_file_given and raw["kubelet_ca_file"] is None and not kubernetes.kubelet_insecure_skip_verify:
        # Absent means the pod's mounted cluster CA; null is no way to say "do not verify" (that is
        # kubelet_insecure_skip_verify, explicit and warned).
        raise ConfigError("kubernetes.kubelet_ca_file: expected a string, got null")
    if kubernetes.kubelet_insecure_skip_verify:
        if ca_file_given:
            raise ConfigError(
                "kubernetes.kubelet_ca_file: set either kubelet_ca_file or kubelet_insecure_skip_verify, "
                "not both"
            )
        ca_file = None
    return dataclasses.replace(kubernetes, kubelet_url=url.rstrip("/"), kubelet_ca_file=ca_file)
