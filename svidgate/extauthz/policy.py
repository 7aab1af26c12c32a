"""Policy matching: which `authz.policies[]` entry applies to a request, and whether a subject is allowed.

Pure: config values in, compiled matchers out; no gRPC, no I/O. Policies are compiled once per config load
(`compile_authz`) so that a Check does set lookups and string comparisons only.

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

Subject rules (``allow``, parsed by `svidgate.config.AllowRule`, evaluated here with the same semantics as
`AllowRule.matches`): an exact SPIFFE ID; ``spiffe://td/a/*`` for every ID under ``/a/`` (one or more further
segments; ``*`` only as the whole last segment); ``spiffe://td`` for every identity of a trust domain; ``*``
for any SPIFFE ID whose token validated against a bundle svidgate holds.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from svidgate.config import Policy
from svidgate.errors import ConfigError

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
_HOSTS: dict[str, str | None] = {}
_HOSTS_LIMIT = 4096
_UNSET: Final = object()

#: The name of the built-in policy that a request with an ambiguous host or path selects. Not a valid
#: configured policy name ('/'), so it cannot collide with one.
AMBIGUOUS_REQUEST: Final = "svidgate/ambiguous_request"

# RFC 3986 2.3 unreserved characters: percent-decoding them never changes what a URI means (6.2.2.2).
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
# Decoded or raw, these mean different things to different backends (a segment separator, a path parameter,
# a string terminator): a path containing them has no single reading.
_AMBIGUOUS_CHARS: Final = frozenset("/\\;")
# A path that is already canonical: segments of plain characters, none of them "." or "..". Most requests are
# like this, and a fullmatch is much cheaper than the general algorithm below.
_CANONICAL_PATH = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~!$&'()*+,=:@-]+)*/?")
_PORT = re.compile(r"[0-9]{0,5}")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalize_host(host: str) -> str:
    """Lower-case a Host/:authority value and strip its port and trailing dot (``[::1]:80`` -> ``::1``).

    Lenient, for display (``svidgate explain``); matching uses the strict `canonical_host`.

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


def canonical_host(host: str) -> str | None:
    """The host a Host/:authority value names, in the form policies are compared in, or None if unsafe.

    ASCII only, lower-cased, port and one trailing dot stripped, IPv6 literals in their compressed form.
    Non-ASCII is refused rather than case-folded: ``str.lower`` maps the Kelvin sign to ``k`` and leaves
    full-width dots alone, so a Unicode host could compare equal to a name it is not (IDNA 2008 maps such
    characters; Envoy does not, and neither do we). Anything that is not a DNS name or IP literal with an
    optional numeric port (``evil.com:80@good``, ``a..b``, ``host:port:x``) is refused too.

    Args:
        host: the request's host as Envoy sends it.

    Returns:
        The canonical host ("" when the request has none), or None when it has no single safe reading.
    """
    host = host.strip()
    if not host:
        return ""
    if not host.isascii():
        return None
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :]
        if end < 0 or (rest and (rest[0] != ":" or _PORT.fullmatch(rest[1:]) is None)):
            return None
        return _ipv6(host[1:end])
    if host.count(":") > 1:
        return _ipv6(host)  # a bare IPv6 address (no port without brackets)
    name, _, port = host.partition(":")
    if _PORT.fullmatch(port) is None:
        return None
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def _ipv6(text: str) -> str | None:
    if "%" in text:
        return None  # a zone ID ("fe80::1%eth0") names an interface of the client's host, not a server
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return None


def normalize_path(path: str) -> str | None:
    """A request target's path in canonical form (what Envoy routes on with ``normalize_path`` and
    ``merge_slashes``), or None when it has no single safe reading.

    Query and fragment are cut; percent-encoded unreserved characters are decoded and other escapes
    upper-cased (RFC 3986 6.2.2); runs of slashes become one; ``.`` and ``..`` segments are removed (RFC 3986
    5.2.4). An empty path is ``/``. Refused: an encoded ``/``, ``\\`` or ``;`` (``%2F``, ``%5C``, ``%3B``),
    a raw ``\\`` or ``;``, control characters (raw or encoded), raw spaces, non-ASCII, broken escapes, and
    a path that does not start with ``/`` (``*``, absolute-form).

    Args:
        path: the request target (``:path``) as Envoy sends it.

    Returns:
        The canonical path, or None.
    """
    path = strip_query(path)
    if _CANONICAL_PATH.fullmatch(path) is not None and "//" not in path:
        return path or "/"
    if not path.startswith("/") or not path.isascii():
        return None
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        char = path[i]
        if char == "%":
            digits = path[i + 1 : i + 3]
            if len(digits) != 2 or not _HEX.issuperset(digits):
                return None
            decoded = chr(int(digits, 16))
            if decoded in _UNRESERVED:
                out.append(decoded)
            elif decoded in _AMBIGUOUS_CHARS or decoded < " " or decoded == "\x7f":
                return None
            else:
                out.append("%" + digits.upper())
            i += 3
            continue
        if (char in _AMBIGUOUS_CHARS and char != "/") or char <= " " or char == "\x7f":
            return None
        out.append(char)
        i += 1
    merged = re.sub(r"/{2,}", "/", "".join(out))
    return _remove_dot_segments(merged)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path (starts with "/", no empty segments but a trailing one)."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    result = "/" + "/".join(kept)
    # "/a/b/.." is "/a/": a final dot segment leaves the directory, with its slash.
    if segments[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


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
            host: the canonical host (`canonical_host`).
            path: the canonical path (`normalize_path`).
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
    for key in ("path_prefix", "path_exact"):
        configured: str | None = getattr(match, key)
        if configured is not None and normalize_path(configured) != configured:
            # Requests are compared in canonical form: a value that is not could never match (or would
            # need an ambiguous request to).
            canonical = normalize_path(configured)
            hint = f"write {canonical!r}" if canonical else "it has no single reading"
            raise ConfigError(f"{where}.match.{key}: {configured!r} is not a canonical path ({hint})")
    any_host = not match.hosts
    exact: set[str] = set()
    suffixes: list[str] = []
    for index, host in enumerate(match.hosts):
        if host.strip() == "*":
            any_host = True
            continue
        wildcard = host.strip().startswith("*.")
        canonical = canonical_host(host.strip()[2:] if wildcard else host)
        if not canonical:
            raise ConfigError(
                f"{where}.match.hosts[{index}]: {host!r} is not a host name or IP address "
                "(ASCII only: write an internationalised name in its xn-- form)"
            )
        if wildcard:
            suffixes.append("." + canonical)
        else:
            exact.add(canonical)
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
            if len(_HOSTS) >= _HOSTS_LIMIT:
                _HOSTS.clear()
            canonical = _HOSTS[host] = canonical_host(host)
        canonical_path = normalize_path(path)
        if not isinstance(canonical, str) or canonical_path is None:
            return self.ambiguous
        for policy in self.policies:
            if policy.matches(canonical, canonical_path, method, context_extensions):
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
