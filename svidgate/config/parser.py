"""The reader of the YAML document: each section's values checked and turned into the model's types.

Every error names the key's path (``authz.policies[2].audiences: expected a list of strings``); cross-key
rules (a workload's trust domain, an inject policy's workload, the bundle endpoint's profile) are checked
here too, so that the services downstream can trust the object they receive. Durations are ``90s``, ``5m``,
``1h30m``, ``2d``, ``250ms`` or plain numbers of seconds.

Over 600 lines: the value readers and the section readers are one unit (each reader is used by several
sections); the schema model that is to replace the hand-written section readers keeps them apart.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from svidgate.canonical import canonical_host, normalize_path
from svidgate.config.environment import default_runtime_dir, default_state_dir
from svidgate.config.model import (
    DEFAULT_CHECK_ADDRESS,
    DEFAULT_TRUST_DOMAIN,
    MAX_UNIX_PATH_BYTES,
    MAX_UNKNOWN_KEY_WAIT,
    MIN_CA_TTL_EXCLUSIVE,
    UNIX_TEMP_NAME_BYTES,
    Address,
    AllowRule,
    AuthzConfig,
    BundleEndpoint,
    BundleEndpointServerConfig,
    CaConfig,
    Config,
    DecisionLogConfig,
    FederationConfig,
    KubernetesConfig,
    ListenConfig,
    LogConfig,
    Policy,
    PolicyMatch,
    SdsConfig,
    Selector,
    ServerConfig,
    SourceConfig,
    UpstreamConfig,
    Workload,
)
from svidgate.errors import CaError, ConfigError, SpiffeIdError
from svidgate.identity.ca import UpstreamAuthority
from svidgate.identity.federation import DEFAULT_BUNDLE_REFRESH, DEFAULT_FETCH_TIMEOUT, DEFAULT_POLL_INTERVAL
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.template import SpiffeIdTemplate

_T = TypeVar("_T")

_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")
_METHOD_RE = re.compile(r"[A-Z]+\Z")
_DNS_RE = re.compile(
    r"(?:\*\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z"
)
_LEVELS: tuple[Literal["debug", "info", "warning", "error"], ...] = ("debug", "info", "warning", "error")
_PROFILES: tuple[Literal["https_web", "https_spiffe"], ...] = ("https_web", "https_spiffe")
#: Upper bound of `bundle_endpoint.timeout`: a bundle is a few kilobytes.
MAX_FETCH_TIMEOUT = 300.0
_MODES: tuple[Literal["validate", "inject"], ...] = ("validate", "inject")
_SOURCE_KINDS: tuple[Literal["builtin", "spire", "files"], ...] = ("builtin", "spire", "files")
_DEFAULTS: tuple[Literal["deny", "allow"], ...] = ("deny", "allow")
_FORMATS: tuple[Literal["json", "logfmt"], ...] = ("json", "logfmt")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), type(value).__name__
    )


def _mapping(value: object, path: str, keys: Sequence[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: keys must be strings, got {key!r}")
        if key not in keys:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(keys)})")
    return cast(dict[str, Any], value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _str(value: object, path: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {_type_name(value)}")
    if not value and not empty_ok:
        raise ConfigError(f"{path}: must not be empty")
    return value


def _opt_str(value: object, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {_type_name(value)}")
    return value


def _int(value: object, path: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer, got {_type_name(value)}")
    if value < minimum:
        raise ConfigError(f"{path}: must be at least {minimum}")
    return value


def _number(value: object, path: str, *, minimum: float = 0.0, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: expected a number, got {_type_name(value)}")
    number = float(value)
    if number != number or number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"at least {minimum:g}"
        raise ConfigError(f"{path}: must be {bound}")
    return number


def parse_duration(value: object, path: str = "duration", *, allow_zero: bool = False) -> float:
    """Parse a duration: ``250ms``, ``90s``, ``5m``, ``1h30m``, ``2d`` or a plain number of seconds.

    Args:
        value: the YAML value (string or number).
        path: the key's path for the error message.
        allow_zero: whether 0 is meaningful for this key.

    Returns:
        Seconds.

    Raises:
        ConfigError: not a duration, negative, or zero where zero is meaningless.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a duration like 90s, 5m or 1h30m, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ConfigError(f"{path}: must not be negative")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|d|h|m|s))+", text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))
        else:
            raise ConfigError(f"{path}: {value!r} is not a duration (use e.g. 90s, 5m, 1h30m, 2d or seconds)")
    else:
        raise ConfigError(f"{path}: expected a duration like 90s, 5m or 1h30m, got {_type_name(value)}")
    if seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"{path}: must be a finite duration")
    if seconds < 0:
        raise ConfigError(f"{path}: must not be negative")
    if seconds == 0 and not allow_zero:
        raise ConfigError(f"{path}: must be greater than zero")
    return seconds


def _list(value: object, path: str, what: str = "a list") -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected {what}, got {_type_name(value)}")
    return value


def _str_list(value: object, path: str) -> tuple[str, ...]:
    items = _list(value, path, "a list of strings")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            if not isinstance(item, str):
                raise ConfigError(f"{path}: expected a list of strings ({path}[{i}] is {_type_name(item)})")
            raise ConfigError(f"{path}[{i}]: must not be empty")
    return tuple(items)


def _choice(value: object, path: str, choices: Sequence[_T]) -> _T:
    for choice in choices:
        if value == choice and isinstance(value, str):
            return choice
    shown = ", ".join(str(c) for c in choices)
    raise ConfigError(f"{path}: expected one of {shown}, got {value!r}")


def _spiffe_id(value: object, path: str) -> SpiffeId:
    text = _str(value, path)
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _trust_domain(value: object, path: str) -> TrustDomain:
    text = _str(value, path)
    try:
        return TrustDomain.parse(text)
    except SpiffeIdError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_address(text: str, path: str = "address") -> Address:
    """Parse ``unix:///abs/path`` (also ``unix:/abs/path``), ``tcp://host:port`` or ``host:port``.

    Raises:
        ConfigError: relative unix path, missing or out-of-range port, bad host.
    """
    if text.startswith("unix:"):
        rest = text[len("unix:") :]
        sock = rest[2:] if rest.startswith("//") else rest
        if not sock.startswith("/"):
            raise ConfigError(f"{path}: {text!r}: a unix socket path must be absolute (unix:///run/x.sock)")
        if "\0" in sock:
            raise ConfigError(f"{path}: {text!r}: NUL in a socket path")
        if len(os.fsencode(sock)) > MAX_UNIX_PATH_BYTES:
            raise ConfigError(
                f"{path}: {text!r}: unix socket paths are limited to {MAX_UNIX_PATH_BYTES} bytes"
            )
        return Address("unix", path=os.path.normpath(sock))
    rest = text[len("tcp://") :] if text.startswith("tcp://") else text
    if "://" in rest:
        raise ConfigError(f"{path}: {text!r}: expected unix:///path, tcp://host:port or host:port")
    host, port = _host_port(rest, f"{path}: {text!r}")
    return Address("tcp", host=host, port=port)


def _check_unix_listen_paths(listen: ListenConfig) -> None:
    """Refuse a listening socket whose temporary sibling name would not fit in `sun_path`.

    Raises:
        ConfigError: naming the listener's key.
    """
    named: list[tuple[str, Address | None]] = [(f"listen.grpc[{i}]", a) for i, a in enumerate(listen.grpc)]
    named += [("listen.workload_api", listen.workload_api), ("listen.check", listen.check)]
    for where, address in named:
        if address is None or address.kind != "unix":
            continue
        directory = os.fsencode(os.path.dirname(address.path))
        if len(directory) + 1 + UNIX_TEMP_NAME_BYTES > MAX_UNIX_PATH_BYTES:
            raise ConfigError(
                f"{where}: {address}: the directory is too long: the socket is bound under a temporary "
                f"name next to it first, so its directory may have at most "
                f"{MAX_UNIX_PATH_BYTES - 1 - UNIX_TEMP_NAME_BYTES} bytes"
            )


def _host_port(text: str, where: str) -> tuple[str, int]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigError(f"{where}: expected [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"{where}: expected host:port")
        if ":" in host:
            raise ConfigError(f"{where}: put an IPv6 address in brackets ([::1]:8081)")
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ConfigError(f"{where}: {host!r} is not a host name or IP address")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: the port must be a number from 0 to 65535")
    return host, int(port_text)


class _Parser:
    def __init__(self, base_dir: Path, env: Mapping[str, str]) -> None:
        self._base_dir = base_dir
        self._env = env

    def _path(self, value: object, path: str) -> Path:
        text = _str(value, path)
        if "\0" in text:
            raise ConfigError(f"{path}: NUL in a path")
        result = Path(os.path.expanduser(text))
        return result if result.is_absolute() else self._base_dir / result

    def _opt_path(self, value: object, path: str) -> Path | None:
        return None if value is None else self._path(value, path)

    def config(self, data: object) -> Config:
        top = _mapping(
            data,
            "",
            (
                "trust_domain",
                "state_dir",
                "listen",
                "ca",
                "workloads",
                "federation",
                "bundle_endpoint",
                "sds",
                "authz",
                "source",
                "log",
                "server",
                "kubernetes",
            ),
        )
        if not isinstance(data, dict):
            raise ConfigError("expected a mapping at the top level")
        trust_domain = _trust_domain(top.get("trust_domain", DEFAULT_TRUST_DOMAIN), "trust_domain")
        if "trust_domain" in top and "://" in str(top["trust_domain"]):
            raise ConfigError("trust_domain: give the trust domain name, without spiffe://")
        state_dir = (
            self._path(top["state_dir"], "state_dir") if "state_dir" in top else default_state_dir(self._env)
        )
        listen = self.listen(top.get("listen"), "listen")
        _check_unix_listen_paths(listen)
        ca = self.ca(top.get("ca"), "ca")
        source = self.source(top.get("source"), "source")
        workloads = self.workloads(top.get("workloads"), "workloads", trust_domain, source.kind)
        federation = self.federation(top.get("federation"), "federation", trust_domain)
        bundle_endpoint = self.bundle_endpoint_server(
            top.get("bundle_endpoint"), "bundle_endpoint", trust_domain, listen, "bundle_endpoint" in top
        )
        sds = self.sds(top.get("sds"), "sds")
        authz = self.authz(top.get("authz"), "authz", trust_domain, workloads, federation, source)
        log_config = self.log(top.get("log"), "log")
        server = self.server(top.get("server"), "server")
        kubernetes = self.kubernetes(top.get("kubernetes"), "kubernetes")
        return Config(
            trust_domain=trust_domain,
            state_dir=state_dir,
            listen=listen,
            ca=ca,
            workloads=workloads,
            federation=federation,
            bundle_endpoint=bundle_endpoint,
            sds=sds,
            authz=authz,
            source=source,
            log=log_config,
            server=server,
            kubernetes=kubernetes,
        )

    # -- listen ----------------------------------------------------------------------------------------

    def listen(self, value: object, path: str) -> ListenConfig:
        section = _mapping(value, path, ("grpc", "workload_api", "http", "check", "bundle_endpoint"))
        runtime = default_runtime_dir(self._env)
        if "grpc" in section:
            raw = section["grpc"]
            items = [raw] if isinstance(raw, str) else _list(raw, _join(path, "grpc"), "an address or a list")
            grpc = tuple(
                parse_address(_str(item, f"{path}.grpc[{i}]"), f"{path}.grpc[{i}]")
                for i, item in enumerate(items)
            )
        else:
            # SDS over TCP is opt-in: a TCP caller has no peer credentials, so only its claims would decide
            # which private keys it receives.
            grpc = (Address("unix", path=str(runtime / "svidgate.sock")),)
        if "workload_api" in section:
            raw_wl = section["workload_api"]
            workload_api = (
                None
                if raw_wl is None
                else parse_address(_str(raw_wl, f"{path}.workload_api"), f"{path}.workload_api")
            )
            if workload_api is not None and workload_api.kind != "unix":
                # The Workload API authenticates callers by their peer credentials; TCP has none.
                raise ConfigError(f"{path}.workload_api: the Workload API is served on a unix socket only")
        else:
            workload_api = Address("unix", path=str(runtime / "workload.sock"))
        http: tuple[str, int] | None
        if "http" in section:
            raw_http = section["http"]
            if raw_http is None:
                http = None
            else:
                text = _str(raw_http, f"{path}.http")
                text = text[len("http://") :] if text.startswith("http://") else text
                http = _host_port(text, f"{path}.http: {raw_http!r}")
        else:
            http = ("127.0.0.1", 8082)
        # Absent: Check's own listener at its default address, as for every other key. `null`: no separate
        # Check listener; Check is still answered on every listen.grpc and listen.workload_api listener.
        check_where = f"{path}.check"
        if "check" in section:
            check_raw = section["check"]
            check = None if check_raw is None else parse_address(_str(check_raw, check_where), check_where)
        else:
            check = parse_address(DEFAULT_CHECK_ADDRESS, check_where)
            check_where = f"{path}.check (default {DEFAULT_CHECK_ADDRESS}; set it to another address or null)"
        bundle_endpoint: tuple[str, int] | None = None
        if section.get("bundle_endpoint") is not None:
            raw_be = section["bundle_endpoint"]
            text = _str(raw_be, f"{path}.bundle_endpoint")
            text = text[len("https://") :] if text.startswith("https://") else text
            bundle_endpoint = _host_port(text, f"{path}.bundle_endpoint: {raw_be!r}")
        seen: dict[str, str] = {}
        named: list[tuple[str, Address | None]] = [(check_where, check)]
        named += [(f"{path}.grpc[{i}]", a) for i, a in enumerate(grpc)]
        named.append((f"{path}.workload_api", workload_api))
        if http is not None:
            named.append((f"{path}.http", Address("tcp", host=http[0], port=http[1])))
        if bundle_endpoint is not None:
            named.append(
                (f"{path}.bundle_endpoint", Address("tcp", host=bundle_endpoint[0], port=bundle_endpoint[1]))
            )
        for where, address in named:
            if address is None or (address.kind == "tcp" and address.port == 0):
                continue
            key = str(address)
            if key in seen:
                raise ConfigError(f"{where}: {key} is already used by {seen[key]}")
            seen[key] = where
        return ListenConfig(
            grpc=grpc, workload_api=workload_api, http=http, check=check, bundle_endpoint=bundle_endpoint
        )

    # -- ca --------------------------------------------------------------------------------------------

    def ca(self, value: object, path: str) -> CaConfig:
        section = _mapping(value, path, ("key_type", "x509_svid_ttl", "jwt_svid_ttl", "ca_ttl", "upstream"))
        defaults = CaConfig()
        key_type = defaults.key_type
        if "key_type" in section:
            raw = section["key_type"]
            try:
                key_type = KeyType(raw)
            except ValueError:
                known = ", ".join(k.value for k in KeyType)
                raise ConfigError(f"{path}.key_type: expected one of {known}, got {raw!r}") from None
        x509_ttl = parse_duration(
            section.get("x509_svid_ttl", defaults.x509_svid_ttl), f"{path}.x509_svid_ttl"
        )
        jwt_ttl = parse_duration(section.get("jwt_svid_ttl", defaults.jwt_svid_ttl), f"{path}.jwt_svid_ttl")
        ca_ttl = parse_duration(section.get("ca_ttl", defaults.ca_ttl), f"{path}.ca_ttl")
        if ca_ttl <= MIN_CA_TTL_EXCLUSIVE:
            # The CA refuses it too (`BuiltinCa.load_or_create`); checked here so that check-config, a reload
            # and serve agree.
            raise ConfigError(f"{path}.ca_ttl: must be more than {MIN_CA_TTL_EXCLUSIVE:.0f}s")
        # An SVID must not outlive its CA, and the CA rotates ahead of expiry: keep room for a whole SVID
        # lifetime on both sides of the switch.
        if ca_ttl < 2 * max(x509_ttl, jwt_ttl):
            raise ConfigError(f"{path}.ca_ttl: must be at least twice the longest SVID TTL")
        if x509_ttl < 60:
            raise ConfigError(f"{path}.x509_svid_ttl: must be at least 60s (SVIDs are re-minted at half TTL)")
        if jwt_ttl < 10:
            raise ConfigError(f"{path}.jwt_svid_ttl: must be at least 10s")
        upstream = None
        if section.get("upstream") is not None:
            upstream = self.ca_upstream(section["upstream"], f"{path}.upstream")
        return CaConfig(
            key_type=key_type, x509_svid_ttl=x509_ttl, jwt_svid_ttl=jwt_ttl, ca_ttl=ca_ttl, upstream=upstream
        )

    def ca_upstream(self, value: object, path: str) -> UpstreamConfig:
        section = _mapping(value, path, ("cert_file", "key_file"))
        for key in ("cert_file", "key_file"):
            if section.get(key) is None:
                raise ConfigError(f"{path}.{key}: required")
        upstream = UpstreamConfig(
            cert_file=self._path(section["cert_file"], f"{path}.cert_file"),
            key_file=self._path(section["key_file"], f"{path}.key_file"),
        )
        # Validated here, so that check-config and serve refuse a bad root with the same one line; the CA
        # reads it again when it starts (the key is never kept in the configuration object).
        try:
            UpstreamAuthority.load(upstream.cert_file, upstream.key_file, time.time())
        except CaError as exc:
            raise ConfigError(str(exc)) from None
        return upstream

    # -- workloads -------------------------------------------------------------------------------------

    def workloads(
        self, value: object, path: str, trust_domain: TrustDomain, source_kind: str
    ) -> tuple[Workload, ...]:
        result: list[Workload] = []
        first_seen: dict[SpiffeId | SpiffeIdTemplate, tuple[str, Workload]] = {}
        for i, item in enumerate(_list(value, path, "a list of workloads")):
            where = f"{path}[{i}]"
            section = _mapping(item, where, ("spiffe_id", "selectors", "dns_names", "hint"))
            if "spiffe_id" not in section:
                raise ConfigError(f"{where}.spiffe_id: required")
            raw_id = _str(section["spiffe_id"], f"{where}.spiffe_id")
            spiffe_id: SpiffeId | SpiffeIdTemplate
            if SpiffeIdTemplate.is_template(raw_id):
                try:
                    spiffe_id = SpiffeIdTemplate.parse(raw_id)
                except SpiffeIdError as exc:
                    raise ConfigError(f"{where}.spiffe_id: {exc}") from None
                if source_kind != "builtin":
                    # The files source holds one SVID and a SPIRE agent issues what its registration entries
                    # say: neither can mint an ID svidgate makes up per pod. (With SPIRE, register the pods
                    # in SPIRE with its own k8s workload attestor instead.)
                    raise ConfigError(
                        f"{where}.spiffe_id: a templated SPIFFE ID needs source.kind: builtin (the built-in "
                        f"CA mints each pod's SVID on demand); the {source_kind} source cannot mint it"
                    )
            else:
                spiffe_id = _spiffe_id(raw_id, f"{where}.spiffe_id")
            if not spiffe_id.trust_domain == trust_domain:
                raise ConfigError(
                    f"{where}.spiffe_id: {spiffe_id} is not in the trust domain {trust_domain} "
                    "(svidgate only issues identities of its own trust domain)"
                )
            if isinstance(spiffe_id, SpiffeId) and spiffe_id.path == "":
                raise ConfigError(
                    f"{where}.spiffe_id: the trust domain ID itself cannot be a workload identity"
                )
            selectors_path = f"{where}.selectors"
            texts = _str_list(section.get("selectors"), selectors_path)
            if not texts:
                raise ConfigError(
                    f"{selectors_path}: a workload needs at least one selector "
                    "(write [any] to match every caller, development only)"
                )
            selectors: list[Selector] = []
            for j, text in enumerate(texts):
                try:
                    selectors.append(Selector.parse(text))
                except ConfigError as exc:
                    raise ConfigError(f"{selectors_path}[{j}]: {exc}") from None
            if any(s.type == "any" for s in selectors) and len(selectors) > 1:
                raise ConfigError(f"{selectors_path}: 'any' cannot be combined with other selectors")
            if len(set(selectors)) != len(selectors):
                raise ConfigError(f"{selectors_path}: duplicate selector")
            if isinstance(spiffe_id, SpiffeIdTemplate) and not any(s.type == "k8s" for s in selectors):
                # The values come from the caller's attested pod: without a k8s: selector a caller that is
                # not in a pod (or not attested) could match, and there would be nothing to fill in.
                raise ConfigError(
                    f"{selectors_path}: a templated spiffe_id needs at least one k8s: selector "
                    "(e.g. k8s:ns:default)"
                )
            dns_names = _str_list(section.get("dns_names"), f"{where}.dns_names")
            for j, name in enumerate(dns_names):
                if len(name) > 253 or _DNS_RE.match(name) is None:
                    raise ConfigError(f"{where}.dns_names[{j}]: {name!r} is not a lower-case DNS name")
            hint = _str(section.get("hint", ""), f"{where}.hint", empty_ok=True)
            workload = Workload(spiffe_id, tuple(selectors), dns_names, hint)
            # Several entries may share a SPIFFE ID (alternative selector sets), but there is one SVID per ID:
            # its DNS names and hint must agree.
            earlier = first_seen.get(spiffe_id)
            if earlier is not None and (earlier[1].dns_names, earlier[1].hint) != (dns_names, hint):
                raise ConfigError(
                    f"{where}: {spiffe_id} is also defined by {earlier[0]} with other dns_names or hint "
                    "(one SPIFFE ID has one SVID)"
                )
            first_seen.setdefault(spiffe_id, (where, workload))
            result.append(workload)
        return tuple(result)

    # -- federation ------------------------------------------------------------------------------------

    def federation(
        self, value: object, path: str, trust_domain: TrustDomain
    ) -> dict[TrustDomain, FederationConfig]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of trust domain names, got {_type_name(value)}")
        result: dict[TrustDomain, FederationConfig] = {}
        for key, item in value.items():
            where = f"{path}.{key}"
            if not isinstance(key, str):
                raise ConfigError(f"{path}: keys must be trust domain names, got {key!r}")
            federated = _trust_domain(key, where)
            if federated == trust_domain:
                raise ConfigError(f"{where}: cannot federate with the own trust domain {trust_domain}")
            if federated in result:
                raise ConfigError(f"{where}: trust domain {federated} is listed twice")
            section = _mapping(item, where, ("bundle_file", "bundle_endpoint"))
            bundle_file = self._opt_path(section.get("bundle_file"), f"{where}.bundle_file")
            endpoint = None
            if section.get("bundle_endpoint") is not None:
                endpoint = self.bundle_endpoint(section["bundle_endpoint"], f"{where}.bundle_endpoint")
            if bundle_file is None and endpoint is None:
                raise ConfigError(f"{where}: set bundle_file, bundle_endpoint or both")
            result[federated] = FederationConfig(bundle_file=bundle_file, bundle_endpoint=endpoint)
        # https_spiffe authenticates the endpoint with a bundle we must already have.
        for federated, fed in result.items():
            endpoint = fed.bundle_endpoint
            if endpoint is None or endpoint.endpoint_spiffe_id is None:
                continue
            where = f"{path}.{federated}.bundle_endpoint.endpoint_spiffe_id"
            endpoint_td = endpoint.endpoint_spiffe_id.trust_domain
            if endpoint_td == federated and fed.bundle_file is None:
                raise ConfigError(
                    f"{where}: {endpoint.endpoint_spiffe_id} is in {federated} itself, so "
                    f"{path}.{federated}.bundle_file must provide the bootstrap bundle"
                )
            if endpoint_td != trust_domain and endpoint_td not in result:
                raise ConfigError(
                    f"{where}: no bundle for {endpoint_td} to authenticate the endpoint with "
                    "(use the own trust domain, a federated one, or this one with a bundle_file)"
                )
        return result

    def bundle_endpoint(self, value: object, path: str) -> BundleEndpoint:
        section = _mapping(
            value, path, ("url", "profile", "endpoint_spiffe_id", "refresh", "ca_file", "timeout")
        )
        if "url" not in section:
            raise ConfigError(f"{path}.url: required")
        url = _str(section["url"], f"{path}.url")
        if not url.startswith("https://") or len(url) <= len("https://"):
            raise ConfigError(f"{path}.url: a bundle endpoint URL must be https://")
        if "profile" not in section:
            raise ConfigError(f"{path}.profile: required (https_web or https_spiffe)")
        profile = _choice(section["profile"], f"{path}.profile", _PROFILES)
        endpoint_id = None
        if section.get("endpoint_spiffe_id") is not None:
            endpoint_id = _spiffe_id(section["endpoint_spiffe_id"], f"{path}.endpoint_spiffe_id")
        if profile == "https_spiffe" and endpoint_id is None:
            raise ConfigError(f"{path}.endpoint_spiffe_id: required with profile https_spiffe")
        if profile == "https_web" and endpoint_id is not None:
            raise ConfigError(f"{path}.endpoint_spiffe_id: only meaningful with profile https_spiffe")
        ca_file = self._opt_path(section.get("ca_file"), f"{path}.ca_file")
        if ca_file is not None and profile != "https_web":
            raise ConfigError(f"{path}.ca_file: only meaningful with profile https_web")
        refresh = parse_duration(section.get("refresh", DEFAULT_BUNDLE_REFRESH), f"{path}.refresh")
        timeout = parse_duration(section.get("timeout", DEFAULT_FETCH_TIMEOUT), f"{path}.timeout")
        if timeout > MAX_FETCH_TIMEOUT:
            raise ConfigError(
                f"{path}.timeout: at most {MAX_FETCH_TIMEOUT:g}s (a fetch that needs longer is a stuck one)"
            )
        return BundleEndpoint(url, profile, endpoint_id, refresh, ca_file, timeout)

    # -- bundle_endpoint (the server) -------------------------------------------------------------------

    def bundle_endpoint_server(
        self, value: object, path: str, trust_domain: TrustDomain, listen: ListenConfig, present: bool
    ) -> BundleEndpointServerConfig:
        section = _mapping(
            value, path, ("profile", "spiffe_id", "cert_file", "key_file", "refresh_hint", "oidc_issuer")
        )
        if listen.bundle_endpoint is None:
            if present and section:
                # Settings that do nothing would let an operator believe partners can fetch the bundle.
                raise ConfigError(
                    f"{path}: set listen.bundle_endpoint (host:port) to serve the bundle endpoint"
                )
            return BundleEndpointServerConfig()
        profile = _choice(section.get("profile", "https_spiffe"), f"{path}.profile", _PROFILES)
        spiffe_id = None
        if section.get("spiffe_id") is not None:
            spiffe_id = _spiffe_id(section["spiffe_id"], f"{path}.spiffe_id")
        cert_file = self._opt_path(section.get("cert_file"), f"{path}.cert_file")
        key_file = self._opt_path(section.get("key_file"), f"{path}.key_file")
        if profile == "https_spiffe":
            if spiffe_id is None:
                raise ConfigError(f"{path}.spiffe_id: required with profile https_spiffe")
            if not spiffe_id.member_of(trust_domain) or not spiffe_id.path:
                raise ConfigError(
                    f"{path}.spiffe_id: {spiffe_id} must be a workload ID in the own trust domain "
                    f"{trust_domain} (the endpoint presents an X.509-SVID of the own identity source)"
                )
            for key, given in (("cert_file", cert_file), ("key_file", key_file)):
                if given is not None:
                    raise ConfigError(f"{path}.{key}: only meaningful with profile https_web")
        else:
            if spiffe_id is not None:
                raise ConfigError(f"{path}.spiffe_id: only meaningful with profile https_spiffe")
            for key, given in (("cert_file", cert_file), ("key_file", key_file)):
                if given is None:
                    raise ConfigError(f"{path}.{key}: required with profile https_web")
        refresh_hint = None
        if section.get("refresh_hint") is not None:
            refresh_hint = parse_duration(section["refresh_hint"], f"{path}.refresh_hint")
            if refresh_hint < 1:
                raise ConfigError(f"{path}.refresh_hint: must be at least 1s")
        oidc_issuer = None
        if section.get("oidc_issuer") is not None:
            oidc_issuer = _str(section["oidc_issuer"], f"{path}.oidc_issuer")
            parts = urllib.parse.urlsplit(oidc_issuer)
            # OpenID Connect Discovery 1.0, 3: the issuer is an https URL without query or fragment.
            if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
                raise ConfigError(
                    f"{path}.oidc_issuer: must be an https:// URL without query or fragment, "
                    f"got {oidc_issuer!r}"
                )
        return BundleEndpointServerConfig(
            profile=profile,
            spiffe_id=spiffe_id,
            cert_file=cert_file,
            key_file=key_file,
            refresh_hint=refresh_hint,
            oidc_issuer=oidc_issuer,
        )

    # -- sds -------------------------------------------------------------------------------------------

    def sds(self, value: object, path: str) -> SdsConfig:
        section = _mapping(
            value,
            path,
            (
                "default_svid_name",
                "own_bundle_name",
                "all_bundles_name",
                "validation",
                "istio_compat",
                "pool_trust_domain_roots_unsafe",
            ),
        )
        d = SdsConfig()
        names = {
            key: _str(section.get(key, getattr(d, key)), f"{path}.{key}")
            for key in ("default_svid_name", "own_bundle_name", "all_bundles_name")
        }
        seen: dict[str, str] = {}
        for key, name in names.items():
            if name.startswith("spiffe://"):
                # Resource names of that form mean "the SVID / bundle for this ID"; an alias must not collide.
                raise ConfigError(f"{path}.{key}: must not start with spiffe://")
            if name in seen:
                # Blame the key the file set, not the default it collides with.
                culprit, other = (seen[name], key) if key not in section else (key, seen[name])
                raise ConfigError(f"{path}.{culprit}: {name!r} is already the {other}")
            seen[name] = key
        return SdsConfig(
            default_svid_name=names["default_svid_name"],
            own_bundle_name=names["own_bundle_name"],
            all_bundles_name=names["all_bundles_name"],
            validation=_choice(
                section.get("validation", d.validation), f"{path}.validation", ("spiffe", "trusted_ca")
            ),
            istio_compat=_bool(section.get("istio_compat", d.istio_compat), f"{path}.istio_compat"),
            pool_trust_domain_roots_unsafe=_bool(
                section.get("pool_trust_domain_roots_unsafe", d.pool_trust_domain_roots_unsafe),
                f"{path}.pool_trust_domain_roots_unsafe",
            ),
        )

    # -- authz -----------------------------------------------------------------------------------------

    def authz(
        self,
        value: object,
        path: str,
        trust_domain: TrustDomain,
        workloads: tuple[Workload, ...],
        federation: Mapping[TrustDomain, FederationConfig],
        source: SourceConfig,
    ) -> AuthzConfig:
        section = _mapping(
            value,
            path,
            (
                "token_header",
                "token_prefix",
                "policies",
                "default",
                "leeway",
                "hide_details",
                "cache_size",
                "decision_log",
                "unknown_key_wait",
            ),
        )
        d = AuthzConfig()
        header = _str(section.get("token_header", d.token_header), f"{path}.token_header").lower()
        # Envoy hands header names to ext_authz in lower case; HTTP/2 forbids upper case anyway.
        if _HEADER_RE.match(header) is None or header.startswith(":"):
            raise ConfigError(f"{path}.token_header: {header!r} is not an HTTP header name")
        prefix = _str(section.get("token_prefix", d.token_prefix), f"{path}.token_prefix", empty_ok=True)
        known_tds: set[TrustDomain] | None = {trust_domain, *federation}
        if source.kind == "spire":
            known_tds = None  # the SPIRE agent delivers federated bundles we do not know about here
        policies: list[Policy] = []
        names: dict[str, int] = {}
        for i, item in enumerate(_list(section.get("policies"), f"{path}.policies", "a list of policies")):
            policy = self.policy(item, f"{path}.policies[{i}]", trust_domain, workloads, known_tds)
            if policy.name in names:
                raise ConfigError(
                    f"{path}.policies[{i}].name: {policy.name!r} is already the name of "
                    f"{path}.policies[{names[policy.name]}]"
                )
            names[policy.name] = i
            policies.append(policy)
        dl = _mapping(section.get("decision_log"), f"{path}.decision_log", ("sample_rate", "max_per_second"))
        decision_log = DecisionLogConfig(
            sample_rate=_number(dl.get("sample_rate", 1.0), f"{path}.decision_log.sample_rate", maximum=1.0),
            max_per_second=_number(dl.get("max_per_second", 100), f"{path}.decision_log.max_per_second"),
        )
        return AuthzConfig(
            token_header=header,
            token_prefix=prefix,
            policies=tuple(policies),
            default=_choice(section.get("default", d.default), f"{path}.default", _DEFAULTS),
            leeway=parse_duration(section.get("leeway", d.leeway), f"{path}.leeway", allow_zero=True),
            hide_details=_bool(section.get("hide_details", d.hide_details), f"{path}.hide_details"),
            cache_size=_int(section.get("cache_size", d.cache_size), f"{path}.cache_size"),
            decision_log=decision_log,
            unknown_key_wait=self.unknown_key_wait(section.get("unknown_key_wait", d.unknown_key_wait), path),
        )

    def unknown_key_wait(self, value: object, path: str) -> float:
        wait = parse_duration(value, f"{path}.unknown_key_wait", allow_zero=True)
        # A Check thread blocks this long at most: keep it bounded whatever the file says.
        if wait > MAX_UNKNOWN_KEY_WAIT:
            raise ConfigError(f"{path}.unknown_key_wait: must be at most {MAX_UNKNOWN_KEY_WAIT:g}s")
        return wait

    def policy(
        self,
        value: object,
        path: str,
        trust_domain: TrustDomain,
        workloads: tuple[Workload, ...],
        known_tds: set[TrustDomain] | None,
    ) -> Policy:
        section = _mapping(
            value,
            path,
            (
                "name",
                "match",
                "audiences",
                "allow",
                "require_token",
                "dry_run",
                "keep_token",
                "mode",
                "inject_audience",
                "inject_spiffe_id",
                "inject_allow_unverified_callers",
            ),
        )
        if "name" not in section:
            raise ConfigError(f"{path}.name: required")
        name = _str(section["name"], f"{path}.name")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
            # The name becomes a Prometheus label value and a log field: keep it short and plain.
            raise ConfigError(f"{path}.name: use 1-64 letters, digits, '_', '.', ':' or '-'")
        match = self.policy_match(section.get("match"), f"{path}.match")
        mode = _choice(section.get("mode", "validate"), f"{path}.mode", _MODES)
        audiences = _str_list(section.get("audiences"), f"{path}.audiences")
        allow_texts = _str_list(section.get("allow"), f"{path}.allow")
        allow: list[AllowRule] = []
        for j, text in enumerate(allow_texts):
            where = f"{path}.allow[{j}]"
            try:
                rule = AllowRule.parse(text)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            rule_td = rule.trust_domain
            if known_tds is not None and rule_td is not None and rule_td not in known_tds:
                raise ConfigError(
                    f"{where}: trust domain {rule_td} is neither {trust_domain} nor federated, "
                    "so no token from it can validate"
                )
            allow.append(rule)
        inject_audience = _opt_str(section.get("inject_audience"), f"{path}.inject_audience")
        inject_id = None
        if section.get("inject_spiffe_id") is not None:
            inject_id = _spiffe_id(section["inject_spiffe_id"], f"{path}.inject_spiffe_id")
        require_token = _bool(section.get("require_token", True), f"{path}.require_token")
        allow_unverified = _bool(
            section.get("inject_allow_unverified_callers", False), f"{path}.inject_allow_unverified_callers"
        )
        if mode == "validate":
            for key in ("inject_audience", "inject_spiffe_id", "inject_allow_unverified_callers"):
                if section.get(key) is not None:
                    raise ConfigError(f"{path}.{key}: only meaningful with mode: inject")
            # With require_token: false the route is public: ext_authz lets it through without looking at a
            # token, so audiences and allow have nothing to check.
            if require_token and not audiences:
                # JWT-SVID.md 3: validators MUST check `aud`; an empty list would skip that check.
                raise ConfigError(f"{path}.audiences: required: at least one audience the token must carry")
            if require_token and not allow:
                raise ConfigError(
                    f"{path}.allow: required: the SPIFFE IDs allowed through ('*' for any valid JWT-SVID)"
                )
        else:
            if allow:
                raise ConfigError(f"{path}.allow: has no effect with mode: inject (the caller is local)")
            if section.get("dry_run"):
                raise ConfigError(f"{path}.dry_run: inject mode has nothing to dry-run")
            if inject_audience is None:
                if len(audiences) != 1:
                    raise ConfigError(
                        f"{path}.inject_audience: required with mode: inject "
                        "(or give exactly one entry in audiences)"
                    )
                inject_audience = audiences[0]
            # A templated ID is not one identity: inject mode names a fixed one.
            ids = list(dict.fromkeys(w.spiffe_id for w in workloads if isinstance(w.spiffe_id, SpiffeId)))
            if inject_id is None:
                if len(ids) != 1:
                    raise ConfigError(
                        f"{path}.inject_spiffe_id: required with mode: inject "
                        "when there is not exactly one workload"
                    )
                inject_id = ids[0]
            elif not inject_id.member_of(trust_domain):
                raise ConfigError(
                    f"{path}.inject_spiffe_id: {inject_id} is not in the trust domain {trust_domain}"
                )
            elif workloads and inject_id not in ids:
                raise ConfigError(
                    f"{path}.inject_spiffe_id: {inject_id} is not one of the configured workloads"
                )
        return Policy(
            name=name,
            match=match,
            audiences=audiences,
            allow=tuple(allow),
            require_token=require_token,
            dry_run=_bool(section.get("dry_run", False), f"{path}.dry_run"),
            keep_token=_bool(section.get("keep_token", False), f"{path}.keep_token"),
            mode=mode,
            inject_audience=inject_audience,
            inject_spiffe_id=inject_id,
            inject_allow_unverified_callers=allow_unverified,
        )

    def policy_match(self, value: object, path: str) -> PolicyMatch:
        section = _mapping(
            value, path, ("hosts", "path_prefix", "path_exact", "path_regex", "methods", "context_extensions")
        )
        # Validating with the very functions a Check matches with (svidgate.canonical) means `check-config`
        # refuses what could never match.
        raw_hosts = _str_list(section.get("hosts"), f"{path}.hosts")
        for j, host in enumerate(raw_hosts):
            bare = host[2:] if host.startswith("*.") else host
            # Checked before lower-casing: str.lower() turns the Kelvin sign into an ASCII "k".
            if host != "*" and not canonical_host(bare):
                raise ConfigError(
                    f"{path}.hosts[{j}]: {host!r} is not a host name or IP address "
                    "(ASCII only: write an internationalised name in its xn-- form)"
                )
        hosts = tuple(h.lower() for h in raw_hosts)
        paths = [k for k in ("path_prefix", "path_exact", "path_regex") if section.get(k) is not None]
        if len(paths) > 1:
            raise ConfigError(f"{path}.{paths[1]}: set at most one of path_prefix, path_exact, path_regex")
        path_prefix = _opt_str(section.get("path_prefix"), f"{path}.path_prefix")
        path_exact = _opt_str(section.get("path_exact"), f"{path}.path_exact")
        for key, text in (("path_prefix", path_prefix), ("path_exact", path_exact)):
            if text is not None and not text.startswith("/"):
                raise ConfigError(f"{path}.{key}: must start with '/'")
            if text is not None and normalize_path(text) != text:
                # Requests are compared in canonical form (case-sensitive): this value could never match.
                canonical = normalize_path(text)
                hint = f"write {canonical!r}" if canonical else "it has no single reading"
                raise ConfigError(f"{path}.{key}: {text!r} is not a canonical path ({hint})")
        regex = None
        if section.get("path_regex") is not None:
            text = _str(section["path_regex"], f"{path}.path_regex")
            try:
                regex = re.compile(text)
            except re.error as exc:
                raise ConfigError(f"{path}.path_regex: invalid regular expression: {exc}") from None
        methods = _str_list(section.get("methods"), f"{path}.methods")
        for j, method in enumerate(methods):
            if _METHOD_RE.match(method) is None:
                raise ConfigError(f"{path}.methods[{j}]: {method!r} is not an upper-case HTTP method")
        raw_ext = section.get("context_extensions")
        if raw_ext is None:
            raw_ext = {}
        if not isinstance(raw_ext, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw_ext.items()
        ):
            raise ConfigError(f"{path}.context_extensions: expected a mapping of strings to strings")
        return PolicyMatch(
            hosts=hosts,
            path_prefix=path_prefix,
            path_exact=path_exact,
            path_regex=regex,
            methods=methods,
            context_extensions=raw_ext,
        )

    # -- source, log -----------------------------------------------------------------------------------

    def source(self, value: object, path: str) -> SourceConfig:
        section = _mapping(
            value, path, ("kind", "spire_socket", "cert_file", "key_file", "bundle_file", "poll_interval")
        )
        kind = _choice(section.get("kind", "builtin"), f"{path}.kind", _SOURCE_KINDS)
        spire_socket = _opt_str(section.get("spire_socket"), f"{path}.spire_socket")
        files = {
            k: self._opt_path(section.get(k), f"{path}.{k}") for k in ("cert_file", "key_file", "bundle_file")
        }
        if kind == "spire":
            if spire_socket is None:
                raise ConfigError(f"{path}.spire_socket: required with kind: spire")
            if spire_socket.startswith("/"):
                spire_socket = f"unix://{spire_socket}"
            parse_address(spire_socket, f"{path}.spire_socket")
        elif spire_socket is not None:
            raise ConfigError(f"{path}.spire_socket: only meaningful with kind: spire")
        for key, file in files.items():
            if kind == "files" and file is None:
                raise ConfigError(f"{path}.{key}: required with kind: files")
            if kind != "files" and file is not None:
                raise ConfigError(f"{path}.{key}: only meaningful with kind: files")
        return SourceConfig(
            kind=kind,
            spire_socket=spire_socket,
            cert_file=files["cert_file"],
            key_file=files["key_file"],
            bundle_file=files["bundle_file"],
            poll_interval=parse_duration(
                section.get("poll_interval", DEFAULT_POLL_INTERVAL), f"{path}.poll_interval"
            ),
        )

    def server(self, value: object, path: str) -> ServerConfig:
        section = _mapping(
            value, path, ("drain_grace", "reflection", "config_poll_interval", "socket_mode", "check_workers")
        )
        d = ServerConfig()
        mode = section.get("socket_mode", d.socket_mode)
        if isinstance(mode, str):
            # YAML 1.1 reads 0660 as octal (432) already; a string spells the bits out: "0o660" or "0660".
            text = mode.removeprefix("0o")
            if not re.fullmatch(r"[0-7]{3,4}", text):
                raise ConfigError(
                    f"{path}.socket_mode: expected octal permission bits like 0o660, got {mode!r}"
                )
            mode = int(text, 8)
        mode = _int(mode, f"{path}.socket_mode")
        if mode > 0o777 or mode & 0o600 != 0o600:
            raise ConfigError(
                f"{path}.socket_mode: must be permission bits that include 0o600 (owner rw); "
                "write 0660 or '0o660'"
            )
        return ServerConfig(
            drain_grace=parse_duration(
                section.get("drain_grace", d.drain_grace), f"{path}.drain_grace", allow_zero=True
            ),
            reflection=_bool(section.get("reflection", d.reflection), f"{path}.reflection"),
            config_poll_interval=parse_duration(
                section.get("config_poll_interval", d.config_poll_interval),
                f"{path}.config_poll_interval",
                allow_zero=True,
            ),
            socket_mode=mode,
            check_workers=_int(
                section.get("check_workers", d.check_workers), f"{path}.check_workers", minimum=1
            ),
        )

    def kubernetes(self, value: object, path: str) -> KubernetesConfig:
        section = _mapping(
            value,
            path,
            (
                "kubelet_url",
                "token_file",
                "kubelet_ca_file",
                "kubelet_insecure_skip_verify",
                "proc_root",
                "pod_cache_ttl",
                "attest_timeout",
            ),
        )
        d = KubernetesConfig()
        url = _str(section.get("kubelet_url", d.kubelet_url), f"{path}.kubelet_url")
        match = re.fullmatch(r"https://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?/?", url)
        if match is None:
            raise ConfigError(
                f"{path}.kubelet_url: expected https://<host>[:<port>] (the kubelet's authenticated port; "
                f"plain http would send the token in the clear), got {url!r}"
            )
        skip = _bool(
            section.get("kubelet_insecure_skip_verify", d.kubelet_insecure_skip_verify),
            f"{path}.kubelet_insecure_skip_verify",
        )
        ca_file: Path | None = d.kubelet_ca_file
        if "kubelet_ca_file" in section:
            if skip:
                raise ConfigError(
                    f"{path}.kubelet_ca_file: set either kubelet_ca_file or kubelet_insecure_skip_verify, "
                    "not both"
                )
            ca_file = self._path(section["kubelet_ca_file"], f"{path}.kubelet_ca_file")
        elif skip:
            ca_file = None
        return KubernetesConfig(
            kubelet_url=url.rstrip("/"),
            token_file=self._path(section.get("token_file", str(d.token_file)), f"{path}.token_file"),
            kubelet_ca_file=ca_file,
            kubelet_insecure_skip_verify=skip,
            proc_root=self._path(section.get("proc_root", str(d.proc_root)), f"{path}.proc_root"),
            pod_cache_ttl=parse_duration(
                section.get("pod_cache_ttl", d.pod_cache_ttl), f"{path}.pod_cache_ttl", allow_zero=True
            ),
            attest_timeout=parse_duration(
                section.get("attest_timeout", d.attest_timeout), f"{path}.attest_timeout"
            ),
        )

    def log(self, value: object, path: str) -> LogConfig:
        section = _mapping(value, path, ("format", "level"))
        level = section.get("level", "info")
        if isinstance(level, str):
            level = level.lower()
        return LogConfig(
            format=_choice(section.get("format", "json"), f"{path}.format", _FORMATS),
            level=_choice(level, f"{path}.level", _LEVELS),
        )
