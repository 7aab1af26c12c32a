"""The configuration's value types for the schema library (pydantic v2): SPIFFE IDs, trust domains,
durations, addresses, file paths, string lists.

Each type is the runtime type (what `Config` holds) annotated with one validator, which reads a YAML value
with the readers of `svidgate.config.values`, and with the JSON Schema that editors see. A validator does
not know where its value sits in the file: messages carry `PATH` (a placeholder) where the key's path
goes, and `svidgate.config.errors` fills it in. A value that already has the runtime type (built in code,
or copied by `dataclasses.replace`) is taken as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

from pydantic import PlainValidator, ValidationInfo, WithJsonSchema
from pydantic_core import PydanticCustomError

from svidgate.config.values import (
    Address,
    AllowRule,
    host_port,
    parse_address,
    parse_duration,
    read_bool,
    read_int,
    read_number,
    read_spiffe_id,
    read_str,
    read_str_list,
    read_trust_domain,
    type_name,
)
from svidgate.errors import ConfigError, SpiffeIdError
from svidgate.identity.selectors import Selector
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.identity.template import SpiffeIdTemplate


@dataclass(frozen=True, slots=True)
class DocDefault:
    """How docs/configuration.md shows a key's default where the value alone would mislead (``[]`` for a
    list that must not stay empty, ``null`` for a value another key fills in)."""

    text: str


#: Stands for the key's path in a message (``PATH: expected a string``); never part of a YAML string.
PATH = "\x00"

#: The error type pydantic reports for every value our readers refuse; the message is already ours.
ERROR_TYPE = "svidgate"


def fail(message: str) -> NoReturn:
    """Raise `message` (with `PATH` placeholders) as a validation error of the schema library."""
    raise PydanticCustomError(ERROR_TYPE, "{message}", {"message": message})


def _reader(read: Callable[[Any], Any], schema: dict[str, Any]) -> tuple[PlainValidator, WithJsonSchema]:
    def validate(value: Any) -> Any:
        try:
            return read(value)
        except ConfigError as exc:
            fail(str(exc))

    return PlainValidator(validate), WithJsonSchema(schema)


def _passthrough(kind: type | tuple[type, ...], read: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: value if isinstance(value, kind) else read(value)


DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?|(\d+(\.\d+)?(ms|d|h|m|s))+)\s*$"},
        {"type": "number", "minimum": 0},
    ],
    "description": "A duration: 250ms, 90s, 5m, 1h30m, 2d, or a number of seconds.",
}
_STRING = {"type": "string", "minLength": 1}

#: Seconds, greater than zero (``90s``, ``5m``, ``1h30m``, ``2d``, ``250ms`` or a number of seconds).
Duration = Annotated[float, *_reader(lambda v: parse_duration(v, PATH), DURATION_SCHEMA)]
#: Seconds, zero allowed where it means "off" or "none".
DurationOrZero = Annotated[
    float, *_reader(lambda v: parse_duration(v, PATH, allow_zero=True), DURATION_SCHEMA)
]
#: A non-empty string.
Str = Annotated[str, *_reader(lambda v: read_str(v, PATH), _STRING)]
#: A string, empty allowed.
AnyStr = Annotated[str, *_reader(lambda v: read_str(v, PATH, empty_ok=True), {"type": "string"})]
#: true or false (never 1, "yes" or "on").
Bool = Annotated[bool, *_reader(lambda v: read_bool(v, PATH), {"type": "boolean"})]
#: An integer >= 0.
Count = Annotated[int, *_reader(lambda v: read_int(v, PATH), {"type": "integer", "minimum": 0})]
#: An integer >= 1.
PositiveCount = Annotated[
    int, *_reader(lambda v: read_int(v, PATH, minimum=1), {"type": "integer", "minimum": 1})
]
#: A number >= 0.
Rate = Annotated[float, *_reader(lambda v: read_number(v, PATH), {"type": "number", "minimum": 0})]
#: A number from 0 to 1.
Fraction = Annotated[
    float,
    *_reader(lambda v: read_number(v, PATH, maximum=1.0), {"type": "number", "minimum": 0, "maximum": 1}),
]
#: A list of non-empty strings.
StrList = Annotated[
    tuple[str, ...],
    *_reader(lambda v: read_str_list(v, PATH), {"type": "array", "items": _STRING}),
]
#: A SPIFFE ID (``spiffe://trust-domain/path``).
SpiffeIdValue = Annotated[
    SpiffeId,
    *_reader(
        _passthrough(SpiffeId, lambda v: read_spiffe_id(v, PATH)),
        {"type": "string", "pattern": "^spiffe://", "format": "uri"},
    ),
]
#: A trust domain name (lower case, no ``spiffe://``).
TrustDomainValue = Annotated[
    TrustDomain,
    *_reader(
        _passthrough(TrustDomain, lambda v: _trust_domain_name(v, PATH)),
        {"type": "string", "pattern": "^[a-z0-9._-]+$"},
    ),
]


def _trust_domain_name(value: object, path: str) -> TrustDomain:
    trust_domain = read_trust_domain(value, path)
    if isinstance(value, str) and "://" in value:  # spiffe://td parses, but the key takes the name
        raise ConfigError(f"{path}: give the trust domain name, without spiffe://")
    return trust_domain


def _address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    return parse_address(read_str(value, PATH), PATH)


_ADDRESS_SCHEMA = {
    "type": "string",
    "pattern": r"^(unix:(//)?/|tcp://)?.+",
    "description": "unix:///absolute/path.sock, tcp://host:port or host:port ([v6]:port for IPv6).",
}
#: A listening address: ``unix:///abs/path``, ``tcp://host:port`` or ``host:port``.
AddressValue = Annotated[Address, *_reader(_address, _ADDRESS_SCHEMA)]


def _addresses(value: object) -> tuple[Address, ...]:
    if isinstance(value, tuple) and all(isinstance(a, Address) for a in value):
        return value
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{PATH}: expected an address or a list, got {type_name(value)}")
    found: list[Address] = []
    for i, item in enumerate(value):
        where = f"{PATH}[{i}]"
        found.append(parse_address(read_str(item, where), where))
    return tuple(found)


#: One address or a list of them.
AddressList = Annotated[
    tuple[Address, ...],
    *_reader(_addresses, {"anyOf": [_ADDRESS_SCHEMA, {"type": "array", "items": _ADDRESS_SCHEMA}]}),
]


def _host_port_reader(scheme: str) -> Callable[[Any], tuple[str, int]]:
    def read(value: object) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value  # built in code: (host, port)
        text = read_str(value, PATH)
        text = text[len(scheme) :] if text.startswith(scheme) else text
        return host_port(text, f"{PATH}: {value!r}")

    return read


#: ``host:port`` of the HTTP listener (an ``http://`` prefix is allowed).
HttpHostPort = Annotated[
    tuple[str, int],
    *_reader(_host_port_reader("http://"), {"type": "string", "description": "host:port"}),
]
#: ``host:port`` of the bundle endpoint server (an ``https://`` prefix is allowed).
HttpsHostPort = Annotated[
    tuple[str, int],
    *_reader(_host_port_reader("https://"), {"type": "string", "description": "host:port"}),
]


def _path(value: object, info: ValidationInfo) -> Path:
    if isinstance(value, Path):
        return value
    text = read_str(value, PATH)
    if "\0" in text:
        raise ConfigError(f"{PATH}: NUL in a path")
    result = Path(os.path.expanduser(text))
    if result.is_absolute():
        return result
    context: Mapping[str, Any] = info.context or {}
    return Path(context.get("base_dir") or Path.cwd()) / result


def _path_validator(value: Any, info: ValidationInfo) -> Path:
    try:
        return _path(value, info)
    except ConfigError as exc:
        fail(str(exc))


def _required_path_validator(value: Any, info: ValidationInfo) -> Path:
    if value is None:
        fail(f"{PATH}: required")
    return _path_validator(value, info)


#: A file that must be named (null is "required"), read like `FilePath`.
RequiredFilePath = Annotated[
    Path, PlainValidator(_required_path_validator), WithJsonSchema({"type": "string", "minLength": 1})
]

#: A file or directory; relative paths are relative to the config file's directory, ``~`` is expanded.
FilePath = Annotated[
    Path, PlainValidator(_path_validator), WithJsonSchema({"type": "string", "minLength": 1})
]


def _selectors(value: object) -> tuple[Selector, ...]:
    if isinstance(value, tuple) and all(isinstance(s, Selector) for s in value):
        return value
    texts = read_str_list(value, PATH)
    found: list[Selector] = []
    for j, text in enumerate(texts):
        try:
            found.append(Selector.parse(text))
        except ConfigError as exc:
            raise ConfigError(f"{PATH}[{j}]: {exc}") from None
    return tuple(found)


#: ``workloads[].selectors``: SPIRE-style ``type:key:value`` strings, or ``any``.
SelectorList = Annotated[
    tuple[Selector, ...],
    *_reader(
        _selectors,
        {"type": "array", "items": {"type": "string", "pattern": r"^(any|(envoy|unix|k8s):[a-z_-]+:.+)$"}},
    ),
]


def _workload_id(value: object) -> SpiffeId | SpiffeIdTemplate:
    if isinstance(value, SpiffeId | SpiffeIdTemplate):
        return value
    text = read_str(value, PATH)
    if SpiffeIdTemplate.is_template(text):
        try:
            return SpiffeIdTemplate.parse(text)
        except SpiffeIdError as exc:
            raise ConfigError(f"{PATH}: {exc}") from None
    return read_spiffe_id(text, PATH)


#: A workload's SPIFFE ID, or a template with ``{k8s:...}`` placeholders in its path.
WorkloadId = Annotated[
    SpiffeId | SpiffeIdTemplate,
    *_reader(_workload_id, {"type": "string", "pattern": "^spiffe://"}),
]


def _allow_rules(value: object) -> tuple[AllowRule, ...]:
    if isinstance(value, tuple) and all(isinstance(r, AllowRule) for r in value):
        return value
    texts = read_str_list(value, PATH)
    rules: list[AllowRule] = []
    for j, text in enumerate(texts):
        try:
            rules.append(AllowRule.parse(text))
        except ConfigError as exc:
            raise ConfigError(f"{PATH}[{j}]: {exc}") from None
    return tuple(rules)


#: ``authz.policies[].allow``: SPIFFE IDs, ``spiffe://td/a/*``, ``spiffe://td`` or ``*``.
AllowList = Annotated[
    tuple[AllowRule, ...],
    *_reader(_allow_rules, {"type": "array", "items": {"type": "string", "minLength": 1}}),
]


def _regex(value: object) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    text = read_str(value, PATH)
    try:
        return re.compile(text)
    except re.error as exc:
        raise ConfigError(f"{PATH}: invalid regular expression: {exc}") from None


#: A regular expression (Python syntax) that must match the whole value.
Regex = Annotated[re.Pattern[str], *_reader(_regex, {"type": "string", "format": "regex"})]


def _string_map(value: object) -> Mapping[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{PATH}: expected a mapping of strings to strings")
    return dict(value)


#: A mapping of strings to strings.
StringMap = Annotated[
    Mapping[str, str],
    *_reader(_string_map, {"type": "object", "additionalProperties": {"type": "string"}}),
]


def _socket_mode(value: object) -> int:
    mode = value
    if isinstance(mode, str):
        # YAML 1.1 reads 0660 as octal (432) already; a string spells the bits out: "0o660" or "0660".
        text = mode.removeprefix("0o")
        if not re.fullmatch(r"[0-7]{3,4}", text):
            raise ConfigError(f"{PATH}: expected octal permission bits like 0o660, got {mode!r}")
        mode = int(text, 8)
    mode = read_int(mode, PATH)
    if mode > 0o777 or mode & 0o600 != 0o600:
        raise ConfigError(
            f"{PATH}: must be permission bits that include 0o600 (owner rw); write 0660 or '0o660'"
        )
    return mode


#: Permission bits of a unix socket: an integer (YAML reads 0660 as octal) or a string ("0o660", "0660").
SocketMode = Annotated[
    int,
    *_reader(
        _socket_mode, {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^(0o)?[0-7]{3,4}$"}]}
    ),
]
