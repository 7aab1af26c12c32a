"""Policy matching: which `authz.policies[]` entry applies to a request, and whether a subject is allowed.

Pure: config values in, compiled matchers out; no gRPC, no I/O. Policies are compiled once per config load
(`compile_authz`) so that a Check does set lookups and string comparisons only. The configuration validated
every value (`svidgate.config`); compiling never rejects anything, it only prepares. Each rule is written
once: `CompiledPolicy.mismatch` is the only request-matching code (Check selects with it, ``svidgate
explain`` prints its reasons) and `SubjectMatcher.allows` the only subject-matching code.

Matching rules (documented for operators in the configuration reference):

- The request's host and path are first put in canonical form (`canonical_host`, `normalize_path`), the form
  Envoy routes on with ``normalize_path: true`` and ``merge_slashes: true``, so that ``//admin``,
  ``/public/../admin`` or ``/%61dmin`` cannot sidestep an ``/admin`` policy, nor ``API.Example.com.:443`` an
  ``api.example.com`` one. A request whose host or path has no single safe reading -- a host that is not a
  plain ASCII name or IP literal with an optional numeric port (``evil.com:80@good``, Unicode look-alikes),
  or a path with encoded slashes or backslashes (``%2F``, ``%5C``), a backslash, ``;`` path parameters,
  control characters or broken percent-encoding -- matches no configured policy: `CompiledAuthz.select`
  returns the built-in ``svidgate/ambiguous_request`` policy, which denies whatever the token and
  ``authz.default``. Backends disagree on what such requests mean, so whatever svidgate picked, one of
  them would see another path than the policy did.
- ``hosts``: exact names (``api.example.com``), ``*.suffix`` wildcards (``*.example.com`` matches any name
  that ends in ``.example.com``, at any depth, but not ``example.com`` itself, as Envoy's virtual host domains
  do) and ``*`` (any host). Case-insensitive (ASCII only: use the punycode ``xn--`` form of an
  internationalised name); the request's port is stripped (``api.example.com:8443`` matches
  ``api.example.com``) and so is one trailing dot.
- ``path_prefix`` is a plain string prefix and ``path_exact`` an exact comparison, both over the canonical
  path *without* its query string and fragment; ``path_regex`` must match the whole canonical path
  (``fullmatch``, as Envoy's ``safe_regex`` does). Paths are case-sensitive (RFC 3986 6.2.2.1: only the
  scheme and host are case-insensitive).
- ``methods``: case-insensitive set; ``context_extensions``: every configured key must be present with exactly
  the configured value (a route names its policy with ``context_extensions: {policy: payments}``).
- An empty ``match`` matches every request. The first policy that matches wins.

Subject rules (``allow``, parsed and validated by `svidgate.config.AllowRule`, evaluated here): an exact
SPIFFE ID; ``spiffe://td/a/*`` for every ID under ``/a/`` (one or more further segments; ``*`` only as the
whole last segment); ``spiffe://td`` for every identity of a trust domain; ``*`` for any SPIFFE ID whose token
validated against a bundle svidgate holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from svidgate.bounded import BoundedDict
from svidgate.canonical import canonical_host, normalize_host, normalize_path, strip_query
from svidgate.config import Policy

if TYPE_CHECKING:
    from svidgate.config import AllowRule, AuthzConfig

__all__ = [
    "AMBIGUOUS_REQUEST",
    "CompiledAuthz",
    "CompiledPolicy",
    "SubjectMatcher",
    "canonical_host",
    "compile_authz",
    "compile_policy",
    "normalize_host",
    "normalize_path",
    "strip_query",
]

_SPIFFE = "spiffe://"
# Envoy sends the same few Host values over and over: canonicalising each once saves ~1 us per Check. A pure
# function's memo, so sharing it between configurations and threads is safe; bounded against junk hosts.
_HOSTS: BoundedDict[str, str | None] = BoundedDict(4096)
_UNSET: Final = object()

#: The name of the built-in policy that a request with an ambiguous host or path selects. Not a valid
#: configured policy name ('/'), so it cannot collide with one.
AMBIGUOUS_REQUEST: Final = "svidgate/ambiguous_request"


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
    def compile(cls, rules: Sequence[AllowRule]) -> SubjectMatcher:
        """Compile ``allow`` rules (validated by `AllowRule.parse`).

        Args:
            rules: the config's rules, in order (order does not matter for allow rules).

        Returns:
            The matcher.
        """
        any_id = False
        ids: set[str] = set()
        trust_domains: set[str] = set()
        prefixes: list[str] = []
        for rule in rules:
            kind, value = rule.kind, rule.value
            if kind == "any":
                any_id = True
            elif kind == "glob":
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

    def mismatch(
        self, host: str, path: str, method: str, context_extensions: Mapping[str, str]
    ) -> str | None:
        """Why a request does not match this policy, or None when it matches: the one matching rule.

        Check tests the result against None; ``svidgate explain`` prints it. The words are built only for a
        miss, and a miss of the first criterion that fails (as go-spiffe's matchers return an error).

        Args:
            host: the canonical host (`canonical_host`).
            path: the canonical path (`normalize_path`).
            method: the request method as sent (compared upper-case).
            context_extensions: the route's context extensions from the CheckRequest.

        Returns:
            None when every configured condition holds, else the first condition that fails, in words.
        """
        if (
            not self.any_host
            and host not in self.exact_hosts
            and not any(host.endswith(suffix) for suffix in self.host_suffixes)
        ):
            return f"host {host!r} is not one of {sorted(self.policy.match.hosts)}"
        if self.path_exact is not None and path != self.path_exact:
            return f"path {path!r} is not {self.path_exact!r}"
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return f"path {path!r} does not start with {self.path_prefix!r}"
        if self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return f"path {path!r} does not match the regex {self.path_regex.pattern!r}"
        if self.methods and method.upper() not in self.methods:
            return f"method {method.upper()} is not one of {sorted(self.methods)}"
        for key, value in self.context_extensions:
            if context_extensions.get(key) != value:
                return f"context_extensions[{key!r}] is {context_extensions.get(key)!r}, not {value!r}"
        return None


def compile_policy(policy: Policy) -> CompiledPolicy:
    """Compile one configured policy (validated by the configuration: `svidgate.config`).

    Args:
        policy: the configured policy.

    Returns:
        The compiled policy.
    """
    match = policy.match
    any_host = not match.hosts
    exact: set[str] = set()
    suffixes: list[str] = []
    for host in match.hosts:
        if host == "*":
            any_host = True
            continue
        wildcard = host.startswith("*.")
        # The configuration refused hosts without a canonical form; None here could only come from a Policy
        # built in code, and then the host matches nothing (a policy that matches less fails closed).
        canonical = canonical_host(host[2:] if wildcard else host)
        if not canonical:
            continue
        if wildcard:
            suffixes.append("." + canonical)
        else:
            exact.add(canonical)
    return CompiledPolicy(
        policy=policy,
        any_host=any_host,
        exact_hosts=frozenset(exact),
        host_suffixes=tuple(suffixes),
        path_prefix=match.path_prefix,
        path_exact=match.path_exact,
        path_regex=match.path_regex,
        methods=frozenset(m.upper() for m in match.methods),
        context_extensions=tuple(sorted(match.context_extensions.items())),
        audiences=frozenset(policy.audiences),
        subjects=SubjectMatcher.compile(policy.allow),
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
        ambiguous: the built-in policy that a request with an ambiguous host or path selects: it requires a
            token and allows no subject, so it always denies (see the module docstring).
    """

    config: AuthzConfig
    policies: tuple[CompiledPolicy, ...]
    token_header: str
    token_prefix: str
    default_allow: bool
    ambiguous: CompiledPolicy

    def select(
        self, host: str, path: str, method: str, context_extensions: Mapping[str, str]
    ) -> CompiledPolicy | None:
        """The first policy that matches the request, or None.

        Args:
            host: the request's host as sent (canonicalised here).
            path: the request target as sent (canonicalised here).
            method: the request method.
            context_extensions: the route's context extensions.

        Returns:
            The first matching policy in configuration order; `ambiguous` when the host or path has no
            single safe reading (`canonical_host`, `normalize_path`); None when no policy matches (then
            `default_allow` decides).
        """
        canonical = _HOSTS.get(host, _UNSET)
        if canonical is _UNSET:
            canonical = canonical_host(host)
            _HOSTS.put(host, canonical)
        canonical_path = normalize_path(path)
        if not isinstance(canonical, str) or canonical_path is None:
            return self.ambiguous
        for policy in self.policies:
            if policy.mismatch(canonical, canonical_path, method, context_extensions) is None:
                return policy
        return None


def compile_authz(config: AuthzConfig) -> CompiledAuthz:
    """Compile an `AuthzConfig`.

    Args:
        config: the ``authz`` section of the configuration.

    Returns:
        The compiled configuration.
    """
    policies = tuple(compile_policy(p) for p in config.policies)
    header = config.token_header.strip().lower()
    return CompiledAuthz(
        config=config,
        policies=policies,
        token_header=header,
        token_prefix=config.token_prefix,
        default_allow=config.default == "allow",
        ambiguous=_AMBIGUOUS_POLICY,
    )


def _ambiguous_policy() -> CompiledPolicy:
    # Built directly, not through compile_policy: no audiences (any token's audience passes validation) and no
    # allowed subject, so the decision is 401 without a token and 403 with a valid one, never an allow.
    policy = Policy(name=AMBIGUOUS_REQUEST, require_token=True)
    return CompiledPolicy(
        policy=policy,
        any_host=False,
        exact_hosts=frozenset(),
        host_suffixes=(),
        path_prefix=None,
        path_exact=None,
        path_regex=None,
        methods=frozenset(),
        context_extensions=(),
        audiences=frozenset(),
        subjects=SubjectMatcher(False, frozenset(), frozenset(), ()),
    )


_AMBIGUOUS_POLICY: Final = _ambiguous_policy()
