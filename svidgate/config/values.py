"""Value readers: each checks one YAML value and names the key's path in its error.

The schema model (`svidgate.config.model`) calls them through `svidgate.config.types` with a placeholder
for the path, which `svidgate.config.errors` fills in from the library's error location. `parse_duration`
and `parse_address` are public: the CLI reads ``--ttl`` with the first.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Literal

from svidgate.errors import ConfigError, SpiffeIdError
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

#: `sockaddr_un.sun_path` holds 108 bytes on Linux, the terminating NUL included.
MAX_UNIX_PATH_BYTES = 107
#: A listening unix socket is bound under a temporary name in its directory (``.<8 hex digits>.tmp``, see
#: `svidgate.peercred.bind_unix_socket`), given its mode and renamed into place.
UNIX_TEMP_NAME_BYTES = len(".0123abcd.tmp")


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
        return f"{bracket(self.host)}:{self.port}"

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        return f"tcp://{bracket(self.host)}:{self.port}"


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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


_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")
METHOD_RE = re.compile(r"[A-Z]+\Z")
DNS_RE = re.compile(
    r"(?:\*\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z"
)
#: Upper bound of `bundle_endpoint.timeout`: a bundle is a few kilobytes.
MAX_FETCH_TIMEOUT = 300.0


def type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), type(value).__name__
    )


def read_str(value: object, path: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {type_name(value)}")
    if not value and not empty_ok:
        raise ConfigError(f"{path}: must not be empty")
    return value


def read_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {type_name(value)}")
    return value


def read_int(value: object, path: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer, got {type_name(value)}")
    if value < minimum:
        raise ConfigError(f"{path}: must be at least {minimum}")
    return value


def read_number(value: object, path: str, *, minimum: float = 0.0, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: expected a number, got {type_name(value)}")
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
        raise ConfigError(f"{path}: expected a duration like 90s, 5m or 1h30m, got {type_name(value)}")
    if seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"{path}: must be a finite duration")
    if seconds < 0:
        raise ConfigError(f"{path}: must not be negative")
    if seconds == 0 and not allow_zero:
        raise ConfigError(f"{path}: must be greater than zero")
    return seconds


def read_list(value: object, path: str, what: str = "a list") -> list[object]:
    """A YAML sequence (a tuple too, for values built in code); null reads as empty."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{path}: expected {what}, got {type_name(value)}")
    return list(value)


def read_str_list(value: object, path: str) -> tuple[str, ...]:
    items = read_list(value, path, "a list of strings")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            if not isinstance(item, str):
                raise ConfigError(f"{path}: expected a list of strings ({path}[{i}] is {type_name(item)})")
            raise ConfigError(f"{path}[{i}]: must not be empty")
    return tuple(str(item) for item in items)


def read_spiffe_id(value: object, path: str) -> SpiffeId:
    text = read_str(value, path)
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_trust_domain(value: object, path: str) -> TrustDomain:
    text = read_str(value, path)
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
    host, port = host_port(rest, f"{path}: {text!r}")
    return Address("tcp", host=host, port=port)


def host_port(text: str, where: str) -> tuple[str, int]:
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
