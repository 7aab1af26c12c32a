"""The Dockerfile cannot be built here (no container engine), so check what can be checked without one: the
files it copies exist and are not excluded, its entry point is the console script the package installs, the
default command is a real subcommand, it runs as a non-root user, and its health check, volume and
environment agree with the embedded default configuration."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from svidgate.cli import build_parser
from svidgate.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return out


def _all(keyword: str) -> list[str]:
    return [rest for kw, rest in _instructions() if kw == keyword]


def _one(keyword: str) -> str:
    found = _all(keyword)
    assert len(found) >= 1, f"no {keyword}"
    return found[-1]


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list)
    return [str(v) for v in value]


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in _all("ENV"):
        for token in shlex.split(rest):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def test_multi_stage_build() -> None:
    stages = _all("FROM")
    assert len(stages) >= 2
    assert any(" AS " in stage.upper() for stage in stages[:-1])


def test_copied_files_exist_and_are_not_ignored() -> None:
    ignored = _dockerignore()
    copies = [rest for rest in _all("COPY") if not rest.startswith("--from")]
    assert copies
    for rest in copies:
        *sources, _destination = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            for pattern in ignored:
                assert not fnmatch.fnmatch(source, pattern), f"COPY {source} is excluded by .dockerignore"


def test_the_copied_files_are_what_the_package_build_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {s for rest in _all("COPY") if not rest.startswith("--from") for s in shlex.split(rest)[:-1]}
    assert "pyproject.toml" in copied
    readme = pyproject["project"].get("readme")
    if readme:
        assert readme in copied, "pyproject names a readme; the build stage must copy it"
    assert "svidgate" in copied


def test_entry_point_is_the_installed_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = _exec_form(_one("ENTRYPOINT"))
    assert entrypoint == ["svidgate"]
    assert scripts["svidgate"] == "svidgate.cli:main"
    command = _exec_form(_one("CMD"))
    assert command == ["serve"]
    # The default command is a subcommand the CLI really has.
    args = build_parser().parse_args(command)
    assert args.command == "serve"


def test_runs_as_a_non_root_user() -> None:
    user = _one("USER").split(":")[0]
    assert user not in ("root", "0")
    # The user is created with that uid.
    # useradd spans continuation lines in the Dockerfile; the joined RUN instruction has it on one line.
    runs = " ".join(_all("RUN"))
    assert re.search(r"useradd .*--uid " + re.escape(user) + r"\b", runs)


def test_state_dir_is_a_volume_and_matches_the_embedded_default() -> None:
    env = _env()
    volumes = _exec_form(_one("VOLUME"))
    config = load_config(
        None, env={"XDG_STATE_HOME": env["XDG_STATE_HOME"], "XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"]}
    )
    assert str(config.state_dir) in volumes
    assert config.listen.workload_api is not None
    assert config.listen.workload_api.path.startswith("/run/svidgate/")
    dirs = " ".join(_all("RUN"))
    assert "/var/lib/svidgate" in dirs
    assert "/run/svidgate" in dirs


def test_healthcheck_probes_healthz_on_the_default_http_listener() -> None:
    env = _env()
    healthcheck = _one("HEALTHCHECK")
    assert "--interval" in healthcheck
    _, _, command = healthcheck.partition("CMD")
    argv = _exec_form(command.strip())
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")  # valid Python
    assert "SVIDGATE_HEALTH_URL" in argv[2]
    config = load_config(
        None, env={"XDG_STATE_HOME": env["XDG_STATE_HOME"], "XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"]}
    )
    assert config.listen.http is not None
    host, port = config.listen.http
    assert env["SVIDGATE_HEALTH_URL"] == f"http://{host}:{port}/healthz"


@pytest.mark.parametrize("needed", ["svidgate", "pyproject.toml", "README.md"])
def test_dockerignore_keeps_what_the_build_copies(needed: str) -> None:
    for pattern in _dockerignore():
        assert not fnmatch.fnmatch(needed, pattern)
