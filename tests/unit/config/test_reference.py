"""The model is the schema: docs/configuration.md's key tables and the JSON Schema come from it, and every
shipped svidgate config matches that schema (and loads)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from svidgate.config import config_json_schema, parse_config
from svidgate.config.reference import duration_text, render

REPO = Path(__file__).resolve().parents[3]
PAGE = REPO / "docs" / "configuration.md"


def _is_svidgate_config(document: object) -> bool:
    return isinstance(document, dict) and "static_resources" not in document and "kind" not in document


def shipped_configs() -> list[tuple[str, dict[str, object]]]:
    """Every svidgate config the repository ships: the examples' files, the Kubernetes ConfigMap's
    ``config.yaml`` and the demo's."""
    found: list[tuple[str, dict[str, object]]] = []
    for path in sorted((REPO / "envoy-examples").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            name = str(path.relative_to(REPO))
            if isinstance(document, dict) and document.get("kind") == "ConfigMap":
                data = document.get("data") or {}
                found += [(f"{name}:{k}", yaml.safe_load(v)) for k, v in data.items() if k.endswith(".yaml")]
            elif _is_svidgate_config(document):
                found.append((name, document))
    for path in sorted((REPO / "svidgate" / "demo_files").glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if _is_svidgate_config(document):
            found.append((str(path.relative_to(REPO)), document))
    return found


SHIPPED = shipped_configs()


def test_every_example_and_the_demo_is_found() -> None:
    names = {name.split("/")[1] if name.startswith("envoy-") else name for name, _ in SHIPPED}
    assert {"ext-authz", "sds-mtls", "inject", "shared-root", "spire", "kubernetes"} <= names
    assert "svidgate/demo_files/svidgate.yaml" in names


def test_the_docs_tables_are_generated_from_the_model() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert render(page) == page, "docs/configuration.md is stale: run scripts/gen_config_docs.py"


def test_the_json_schema_is_a_valid_schema() -> None:
    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    json.dumps(schema)  # what `svidgate config-schema` prints
    assert schema["additionalProperties"] is False
    assert "required" not in schema  # every top-level key has a default


@pytest.mark.parametrize(("name", "document"), SHIPPED, ids=[n for n, _ in SHIPPED])
def test_shipped_config_matches_the_json_schema(name: str, document: dict[str, object]) -> None:
    jsonschema.validate(document, config_json_schema(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(
    ("name", "document"),
    # ca.upstream is checked against its files at load time: those configs are loaded by `check-config` in
    # tests/e2e/test_examples_load.py and tests/e2e/test_kubernetes_example.py, with their files.
    [(n, d) for n, d in SHIPPED if "upstream" not in str(d.get("ca"))],
    ids=[n for n, d in SHIPPED if "upstream" not in str(d.get("ca"))],
)
def test_shipped_config_loads(name: str, document: dict[str, object]) -> None:
    parse_config(yaml.safe_dump(document), name, base_dir=REPO / Path(name).parent)


@pytest.mark.parametrize(
    "document",
    [
        {"listen": {"grpcs": "unix:///run/s.sock"}},
        {"authz": {"policies": [{"name": "a", "audiences": "x"}]}},
        {"ca": {"key_type": "dsa"}},
        {"workloads": [{"selectors": ["any"]}]},
        {"log": {"level": "verbose"}},
        {"server": {"reflection": "yes"}},
    ],
)
def test_the_json_schema_refuses_what_the_loader_refuses(document: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, config_json_schema(), cls=jsonschema.Draft202012Validator)


def test_the_json_schema_takes_log_levels_in_any_case_as_the_loader_does() -> None:
    for level in ("debug", "DEBUG", "Warning"):
        jsonschema.validate({"log": {"level": level}}, config_json_schema())
        assert parse_config(f"log: {{level: {level}}}\n", "t").log.level == level.lower()


@pytest.mark.parametrize(
    ("seconds", "text"), [(3600, "1h"), (5400, "1h30m"), (0.1, "100ms"), (365 * 86400, "365d"), (90, "1m30s")]
)
def test_defaults_are_shown_as_a_config_file_would_write_them(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
