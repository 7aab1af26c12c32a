"""The key tables of docs/configuration.md, generated from the model (`scripts/gen_config_docs.py`).

Each table lists a section's keys with their default and meaning: the default comes from the field (or, for
the few defaults the loader computes from the environment, from `LOADER_DEFAULTS`), the meaning is the
field's docstring. Between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` the page is this
module's output; everything else on the page is written by hand.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from svidgate.config import model
from svidgate.config.types import DocDefault
from svidgate.config.values import Address

#: Defaults that the loader fills in (they depend on the environment, or on a key being absent).
LOADER_DEFAULTS: Mapping[tuple[type, str], str] = {
    (model.Config, "trust_domain"): f"`{model.DEFAULT_TRUST_DOMAIN}`",
    (model.Config, "state_dir"): "`$XDG_STATE_HOME/svidgate`, else `~/.local/state/svidgate`",
    (model.Config, "listen"): "see below",
    (model.ListenConfig, "grpc"): "`unix://<runtime dir>/svidgate.sock`",
    (model.ListenConfig, "workload_api"): "`unix://<runtime dir>/workload.sock`",
    (model.ListenConfig, "http"): f"`{model.DEFAULT_HTTP_ADDRESS[0]}:{model.DEFAULT_HTTP_ADDRESS[1]}`",
    (model.ListenConfig, "check"): f"`{model.DEFAULT_CHECK_ADDRESS}`",
}

#: One generated table: its name in the page's markers, the section, the prefix its keys are shown with,
#: and the sub-sections listed in the same table (with a row of their own when the flag is set).
TABLES: tuple[tuple[str, type, str, Mapping[str, bool]], ...] = (
    ("top", model.Config, "", {}),
    ("listen", model.ListenConfig, "listen.", {}),
    ("ca", model.CaConfig, "ca.", {"upstream": True}),
    ("workloads", model.WorkloadEntry, "", {}),
    ("federation", model.FederationEntry, "federation.<td>.", {}),
    ("federation-bundle-endpoint", model.BundleEndpointEntry, "bundle_endpoint.", {}),
    ("bundle-endpoint", model.BundleEndpointServerEntry, "bundle_endpoint.", {}),
    ("sds", model.SdsConfig, "sds.", {}),
    ("authz", model.AuthzConfig, "authz.", {"decision_log": False}),
    ("policy", model.Policy, "", {}),
    ("match", model.PolicyMatch, "", {}),
    ("source", model.SourceConfig, "source.", {}),
    ("log", model.LogConfig, "log.", {}),
    ("server", model.ServerConfig, "server.", {}),
    ("kubernetes", model.KubernetesConfig, "kubernetes.", {}),
)

_SECTIONS = (
    model.ListenConfig,
    model.CaConfig,
    model.UpstreamConfig,
    model.SdsConfig,
    model.AuthzConfig,
    model.DecisionLogConfig,
    model.SourceConfig,
    model.LogConfig,
    model.ServerConfig,
    model.KubernetesConfig,
    model.PolicyMatch,
    model.BundleEndpointServerConfig,
)
_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0))


def duration_text(seconds: float) -> str:
    """``3600`` -> ``1h``, ``5400`` -> ``1h30m``, ``0.1`` -> ``100ms``, as a config file would say it."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    text, rest = "", seconds
    for unit, size in _UNITS:
        if rest >= size:
            count = int(rest // size)
            text, rest = text + f"{count}{unit}", rest - count * size
    return text or "0s"


def _default_text(cls: type, field: Any, info: Any) -> str:
    shown = [m.text for m in info.metadata if isinstance(m, DocDefault)]
    if shown:
        return shown[0]
    if (cls, field.name) in LOADER_DEFAULTS:
        return LOADER_DEFAULTS[(cls, field.name)]
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return "required"
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, _SECTIONS):
        return "see below"
    return f"`{_value_text(value, info.metadata)}`"


def _value_text(value: object, metadata: list[Any]) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float) and _schema_says(metadata, "250ms"):
        return duration_text(value)
    if isinstance(value, str):
        return value if value and value.strip() == value else f'"{value}"'
    if isinstance(value, tuple | list):
        return "[]" if not value else ", ".join(_value_text(v, []) for v in value)
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, int) and _schema_says(metadata, "[0-7]{3,4}"):
        return f"0{value:o}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _schema_says(metadata: list[Any], text: str) -> bool:
    """Whether the JSON Schema of a custom type (`svidgate.config.types`) mentions `text`."""
    return any(text in str(getattr(m, "json_schema", "")) for m in metadata)


def table(cls: type, prefix: str, expand: Mapping[str, bool]) -> str:
    """The Markdown table of one section: ``| key | default | meaning |``."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += _rows(cls, prefix, expand)
    return "\n".join(lines) + "\n"


def _rows(cls: type, prefix: str, expand: Mapping[str, bool]) -> list[str]:
    infos = cls.__pydantic_fields__  # type: ignore[attr-defined]
    rows: list[str] = []
    for field in dataclasses.fields(cls):
        info = infos[field.name]
        if field.name in expand:
            sub = _section_type(cls, field.name)
            if expand[field.name]:
                rows.append(_row(f"{prefix}{field.name}", _default_text(cls, field, info), info.description))
            rows += _rows(sub, f"{prefix}{field.name}.", {})
            continue
        rows.append(_row(f"{prefix}{field.name}", _default_text(cls, field, info), info.description))
    return rows


def _section_type(cls: type, name: str) -> type:
    return {  # the sub-sections that share their parent's table
        (model.CaConfig, "upstream"): model.UpstreamConfig,
        (model.AuthzConfig, "decision_log"): model.DecisionLogConfig,
    }[(cls, name)]


def _row(key: str, default: str, description: str | None) -> str:
    meaning = re.sub(r"\s*\n\s*", " ", description or "").strip()
    return f"| `{key}` | {default} | {meaning} |"


def render(page: str) -> str:
    """`page` (docs/configuration.md) with every generated table replaced by the model's."""
    for name, cls, prefix, expand in TABLES:
        begin, end = f"<!-- generated: {name} -->\n", "<!-- end generated -->\n"
        start = page.index(begin) + len(begin)
        stop = page.index(end, start)
        page = page[:start] + table(cls, prefix, expand) + page[stop:]
    return page


__all__ = ["LOADER_DEFAULTS", "TABLES", "duration_text", "render", "table"]
