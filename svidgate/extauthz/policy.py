"""Policy matching: which `authz.policies[]` entry applies to a request, and whether a subject is allowed.

Pure: config values in, compiled matchers out; no gRPC, no I/O. Policies are compiled once per config load
(`compile_authz`) so that a Check does set lookups and string comparisons only.

Matching rules (documented for operators in the configuration reference):

- ``hosts``: exact names (``api.example.com``), ``*.suffix`` wildcards (``*.example.com`` matches any name
  that ends in ``.example.com``, at any depth, but not ``example.com`` itself, as Envoy's virtual host domains
  do) and ``*`` (any host). Case-insensitive; the request's port is stripped (``api.example.com:8443`` matches
  ``api.example.com``) and so is a trailing dot.
- ``path_prefix`` is a plain string prefix and ``path_exact`` an exact comparison, both over the path
  *without* its query string (Envoy sends the request target with the query in ``path``); ``path_regex`` must
  match the whole path (``fullmatch``, as Envoy's ``safe_regex`` does). Paths are compared as received,
  undecoded: enable Envoy's ``normalize_path`` and ``merge_slashes`` so that ``/admin/../x`` or ``//admin``
  cannot sidestep a prefix.
- ``methods``: case-insensitive set; ``context_extensions``: every configured key must be present with exactly
  the configured value (a route names its policy with ``context_extensions: {policy: payments}``).
- An empty ``match`` matches every request. The first policy that matches wins.

Subject rules (``allow``, parsed by `svidgate.config.AllowRule`, evaluated here with the same semantics as
`AllowRule.matches`): an exact SPIFFE ID; ``spiffe://td/a/*`` for every ID under ``/a/`` (one or more further
segments; ``*`` only as the whole last segment); ``spiffe://td`` for every identity of a trust domain; ``*``
for any SPIFFE ID whose token validated against a bundle svidgate holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from svidgate.errors import ConfigError

if TYPE_CHECKING:
    from svidgate.config import AllowRule, AuthzConfig, Policy

__all__ = [
    "CompiledAuthz",
    "CompiledPolicy",
    "SubjectMatcher",
    "compile_authz",
    "compile_policy",
    "normalize_host",
    "strip_query",
]

_SPIFFE = "spiffe://"
# Envoy sends the same few Host values over and over: normalising each once saves ~1 us per Check. A pure
# function's memo, so sharing it between configurations and threads is safe; bounded against junk hosts.
_HOSTS: dict[str, str] = {}
_HOSTS_LIMIT = 4096


def normalize_host(host: str) -> str:
    """Lower-case a Host/:authority value and strip its port and trailing dot (``[::1]:80`` -> ``::1``).

    Args:
        host: the request's host as Envoy sends it.

    Returns:
        The bare host name or address.
    """
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    colon = host.rfind(":")
    # One colon is a port; more than one is a bare IPv6 address, which carries no port without brackets.
    if colon >= 0 and host.find(":") == colon:
        host = host[:colon]
    return host.rstrip(".")


def strip_query(path: str) -> str:
    """The path of a request target without its query string and fragment."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return path


@dataclass(frozen=True, slots=True)
class SubjectMatcher:
    """A policy's ``allow`` rules, compiled: which authenticated SPIFFE IDs may pass.

    Attributes:
        any_id: ``*`` was allowed (any SPIFFE ID that validated).
        ids: exact SPIFFE IDs (as URIs).
        trust_domains: trust domain names whose every identity is allowed.
        prefixes: for each ``spiffe://td/a/*``, the prefix ``spiffe://td/a/`` an allowed ID extends.
    """

    any_id: bool
    ids: frozenset[str]
    trust_domains: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def compile(cls, rules: Sequence[AllowRule], where: str) -> SubjectMatcher:
        """Compile ``allow`` rules.

        Args:
            rules: the config's rules, in order (order does not matter for allow rules).
            where: the config path for error messages (``authz.policies[2].allow``).

        Returns:
            The matcher.

        Raises:
            ConfigError: a rule value is not a SPIFFE ID, trust domain ID, glob or ``*``.
        """
        any_id = False
        ids: set[str] = set()
        trust_domains: set[str] = set()
        prefixes: list[str] = []
        for index, rule in enumerate(rules):
            kind, value = rule.kind, rule.value
            if kind == "any":
                any_id = True
            elif not value.startswith(_SPIFFE):
                raise ConfigError(f"{where}[{index}]: {value!r} is not a SPIFFE ID, glob or '*'")
            elif kind == "glob":
                if not value.endswith("/*") or "*" in value[:-2]:
                    raise ConfigError(f"{where}[{index}]: {value!r}: '*' only as the whole last segment")
                prefixes.append(value[:-1])
            elif kind == "trust_domain":
                trust_domains.add(value[len(_SPIFFE) :])
            else:
                ids.add(value)
        return cls(any_id, frozenset(ids), frozenset(trust_domains), tuple(prefixes))

    def allows(self, spiffe_id: str) -> bool:
        """Whether the (already validated) SPIFFE ID URI is allowed.

        Args:
            spiffe_id: a valid SPIFFE ID such as ``spiffe://example.org/web``.

        Returns:
            True when any rule allows it.
        """
        if self.any_id or spiffe_id in self.ids:
            return True
        if self.trust_domains:
            rest = spiffe_id[len(_SPIFFE) :]
            slash = rest.find("/")
            if (rest if slash < 0 else rest[:slash]) in self.trust_domains:
                return True
        # SpiffeId forbids empty segments, so "longer than the prefix" means at least one more whole segment.
        return any(spiffe_id.startswith(p) and len(spiffe_id) > len(p) for p in self.prefixes)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """One policy with its match conditions compiled for fast evaluation.

    Attributes:
        policy: the configured policy (name, audiences, mode, flags).
        any_host: the policy matches every host (``*`` or no ``hosts``).
        exact_hosts: normalised exact host names.
        host_suffixes: ``.example.com`` for each ``*.example.com``.
        methods: upper-case methods; empty = any.
        context_extensions: required (key, value) pairs.
        audiences: the token must carry at least one of these.
        subjects: the compiled ``allow`` rules.
    """

    policy: Policy
    any_host: bool
    exact_hosts: frozenset[str]
    host_suffixes: tuple[str, ...]
    path_prefix: str | None
    path_exact: str | None
    path_regex: re.Pattern[str] | None
    methods: frozenset[str]
    context_extensions: tuple[tuple[str, str], ...]
    audiences: frozenset[str]
    subjects: SubjectMatcher

    @property
    def name(self) -> str:
        return self.policy.name

    def matches(self, host: str, path: str, method: str, context_extensions: Mapping[str, str]) -> bool:
        """Whether a request matches this policy.

        Args:
            host: the normalised host (`normalize_host`).
            path: the path without query (`strip_query`).
            method: the request method as sent (compared upper-case).
            context_extensions: the route's context extensions from the CheckRequest.

        Returns:
            True when every configured condition holds.
        """
        if (
            not self.any_host
            and host not in self.exact_hosts
            and not any(host.endswith(suffix) for suffix in self.host_suffixes)
        ):
            return False
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        if self.methods and method.upper() not in self.methods:
            return False
        return all(context_extensions.get(key) == value for key, value in self.context_extensions)


def compile_policy(policy: Policy, where: str) -> CompiledPolicy:
    """Compile one configured policy.

    Args:
        policy: the configured policy.
        where: its config path (``authz.policies[2]``) for error messages.

    Returns:
        The compiled policy.

    Raises:
        ConfigError: a value the config loader let through cannot be used (a regex that does not compile, a
            validate-mode policy that requires a token but names no audience: JWT-SVID.md 3 makes the audience
            check mandatory, and an empty list would silently skip it).
    """
    match = policy.match
    any_host = not match.hosts
    exact: set[str] = set()
    suffixes: list[str] = []
    for host in match.hosts:
        host = host.strip().lower().rstrip(".")
        if host == "*":
            any_host = True
        elif host.startswith("*."):
            suffixes.append(host[1:])
        else:
            exact.add(normalize_host(host))
    regex: re.Pattern[str] | None
    raw_regex: object = match.path_regex
    if raw_regex is None or isinstance(raw_regex, re.Pattern):
        regex = raw_regex
    else:
        try:
            regex = re.compile(str(raw_regex))
        except re.error as err:
            raise ConfigError(f"{where}.match.path_regex: {err}") from None
    mode = getattr(policy, "mode", "validate")
    if mode == "validate" and policy.require_token and not policy.audiences:
        raise ConfigError(
            f"{where}.audiences: a policy that requires a token must name at least one audience"
        )
    if mode == "inject" and policy.dry_run:
        raise ConfigError(f"{where}.dry_run: inject mode has nothing to dry-run")
    return CompiledPolicy(
        policy=policy,
        any_host=any_host,
        exact_hosts=frozenset(exact),
        host_suffixes=tuple(suffixes),
        path_prefix=match.path_prefix,
        path_exact=match.path_exact,
        path_regex=regex,
        methods=frozenset(m.upper() for m in match.methods),
        context_extensions=tuple(sorted(match.context_extensions.items())),
        audiences=frozenset(policy.audiences),
        subjects=SubjectMatcher.compile(policy.allow, f"{where}.allow"),
    )


@dataclass(frozen=True, slots=True)
class CompiledAuthz:
    """An `AuthzConfig` with its policies compiled; replaced whole on reload, never mutated.

    Attributes:
        config: the configuration it was compiled from.
        policies: compiled policies, in configuration order.
        token_header: the lower-cased header that carries the token.
        token_prefix: the scheme prefix (``Bearer ``) or empty.
        default_allow: ``authz.default: allow`` (a request no policy matches passes).
    """

    config: AuthzConfig
    policies: tuple[CompiledPolicy, ...]
    token_header: str
    token_prefix: str
    default_allow: bool

    def select(
        self, host: str, path: str, method: str, context_extensions: Mapping[str, str]
    ) -> CompiledPolicy | None:
        """The first policy that matches the request, or None.

        Args:
            host: the request's host as sent (normalised here).
            path: the request target as sent (query stripped here).
            method: the request method.
            context_extensions: the route's context extensions.

        Returns:
            The first matching policy in configuration order, or None (then `default_allow` decides).
        """
        normalized = _HOSTS.get(host)
        if normalized is None:
            if len(_HOSTS) >= _HOSTS_LIMIT:
                _HOSTS.clear()
            normalized = _HOSTS[host] = normalize_host(host)
        host = normalized
        path = strip_query(path)
        for policy in self.policies:
            if policy.matches(host, path, method, context_extensions):
                return policy
        return None


def compile_authz(config: AuthzConfig) -> CompiledAuthz:
    """Compile an `AuthzConfig`.

    Args:
        config: the ``authz`` section of the configuration.

    Returns:
        The compiled configuration.

    Raises:
        ConfigError: a policy cannot be compiled (see `compile_policy`); the message names its path.
    """
    policies = tuple(compile_policy(p, f"authz.policies[{i}]") for i, p in enumerate(config.policies))
    header = config.token_header.strip().lower()
    if not header:
        raise ConfigError("authz.token_header: must not be empty")
    return CompiledAuthz(
        config=config,
        policies=policies,
        token_header=header,
        token_prefix=config.token_prefix,
        default_allow=config.default == "allow",
    )
