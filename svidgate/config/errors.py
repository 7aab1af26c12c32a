"""The one place where the schema library's errors become svidgate's: ``<key path>: <problem>``.

pydantic reports where a value sits as a location tuple (``("authz", "policies", 2, "audiences")``) and what
is wrong as an error type; this module writes the path the way the file spells it
(``authz.policies[2].audiences``) and the problem the way svidgate always has (``required``, ``unknown key
(expected one of: ...)``, ``expected one of deny, allow, got 'maybe'``). Messages of svidgate's own value
readers (`svidgate.config.types`) carry a placeholder where the path goes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from svidgate.config.types import ERROR_TYPE, PATH
from svidgate.config.values import type_name

_UNKNOWN_KEY = frozenset({"unexpected_keyword_argument", "extra_forbidden"})
_MISSING = frozenset({"missing", "missing_argument", "missing_keyword_only_argument"})
_NOT_A_MAPPING = frozenset({"dataclass_type", "dataclass_args_type", "dict_type", "model_type"})


def key_path(loc: Sequence[str | int]) -> str:
    """``("authz", "policies", 2, "audiences")`` -> ``authz.policies[2].audiences``."""
    path = ""
    for part in loc:
        if part == "[key]":  # the error is about a mapping key, which `path` already names
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def translate(error: ValidationError, schema: Mapping[str, Any]) -> str:
    """The one message svidgate reports for `error`: its first problem in file order, unknown keys first.

    A mapping's unknown keys are reported before the problems of its values (an operator fixes a misspelt key
    before anything else), not before the problems of the keys that come before that mapping.

    Args:
        error: what pydantic raised.
        schema: the JSON Schema of the validated type (the keys a mapping may have, for "unknown key").

    Returns:
        ``<key path>: <problem>``.
    """
    details = error.errors(include_url=False)
    first = details[0]
    for detail in details:
        mapping = tuple(detail["loc"][:-1])
        if detail["type"] in _UNKNOWN_KEY and tuple(first["loc"][: len(mapping)]) == mapping:
            first = detail
            break
    return _message(first, schema)


def _message(detail: ErrorDetails, schema: Mapping[str, Any]) -> str:
    path = key_path(detail["loc"])
    kind = detail["type"]
    ctx = detail.get("ctx") or {}
    value = detail.get("input")
    if kind == ERROR_TYPE:
        return str(ctx["message"]).replace(PATH, path)
    if kind in _MISSING:
        choices = _node_at(schema, detail["loc"]).get("enum")
        return f"{path}: required ({' or '.join(choices)})" if choices else f"{path}: required"
    if kind in _UNKNOWN_KEY:
        keys = ", ".join(_keys_at(schema, detail["loc"][:-1]))
        return f"{path}: unknown key (expected one of: {keys})"
    if kind in _NOT_A_MAPPING:
        if not path:
            return f"expected a mapping at the top level, got {type_name(value)}"
        return f"{path}: expected a mapping, got {type_name(value)}"
    if kind in ("literal_error", "enum"):
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        return f"{path}: expected one of {choices}, got {value!r}"
    if kind == "invalid_key":
        return f"{path}: keys must be strings, got {value!r}"
    return f"{path}: {detail['msg']}"


def _keys_at(schema: Mapping[str, Any], loc: Sequence[str | int]) -> list[str]:
    """The keys the mapping at `loc` may have, in declaration order."""
    return list(_node_at(schema, loc).get("properties", {}))


def _node_at(schema: Mapping[str, Any], loc: Sequence[str | int]) -> Mapping[str, Any]:
    """The JSON Schema of the value at `loc`."""
    defs: Mapping[str, Any] = schema.get("$defs", {})
    node: Mapping[str, Any] = schema
    for part in (*loc, None):
        node = _resolve(node, defs)
        if part is None:
            break
        if isinstance(part, int):
            node = node.get("items", {})
        elif "properties" in node and part in node["properties"]:
            node = node["properties"][part]
        else:  # a mapping of names (federation's trust domains): its value schema
            values = [*node.get("patternProperties", {}).values(), node.get("additionalProperties", {})]
            node = values[0]
    return node


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    while True:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        elif "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            node = options[0] if options else {}
        else:
            return node
