"""Loading: a file (or the embedded default) through strict YAML into a validated `Config`."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from svidgate.config.environment import default_config_text, default_runtime_dir, default_state_dir
from svidgate.config.errors import translate
from svidgate.config.model import (
    CONFIG_ENV,
    DEFAULT_CHECK_ADDRESS,
    DEFAULT_HTTP_ADDRESS,
    DEFAULT_TRUST_DOMAIN,
    Config,
)
from svidgate.config.rules import apply_rules
from svidgate.config.strict_yaml import _StrictLoader
from svidgate.config.values import Address, parse_address, type_name
from svidgate.errors import ConfigError


@functools.cache
def _adapter() -> TypeAdapter[Config]:
    return TypeAdapter(Config)


@functools.cache
def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of a configuration file (`svidgate config-schema`, editors, the key tables).

    Keys whose default depends on the environment (``state_dir``, ``listen.grpc``, ...) are filled in by
    the loader, so the schema requires none of them.
    """
    schema = _adapter().json_schema()
    schema.pop("required", None)
    schema["$defs"]["ListenConfig"].pop("required", None)
    schema["title"] = "svidgate configuration"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def config_path_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The config file named by ``$SVIDGATE_CONFIG``, or None when it is unset or empty."""
    env = os.environ if env is None else env
    value = env.get(CONFIG_ENV, "")
    return Path(value) if value else None


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load the configuration file at `path`, or the embedded default when `path` is None.

    Relative file paths inside the config (bundle files, certificates) are relative to the config file's
    directory.

    Args:
        path: the YAML file, or None for the embedded default.
        env: environment for the defaults that depend on it (``XDG_*``, ``HOME``); `os.environ` when None.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file cannot be read or is invalid; the message names the file and the key's path.
    """
    if path is None:
        return parse_config(default_config_text(env), "<embedded default>", env=env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, str(path), base_dir=path.parent, env=env)


def parse_config(
    text: str,
    origin: str = "<config>",
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Parse and validate a YAML configuration.

    Args:
        text: the YAML document.
        origin: the name shown in errors (a file name).
        base_dir: directory that relative paths are relative to (current directory when None).
        env: environment for environment-dependent defaults; `os.environ` when None.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: ``"<origin>: <key path>: <problem>"``; YAML syntax errors carry line and column.
    """
    data = _read_yaml(text, origin)
    env = os.environ if env is None else env
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping at the top level, got {type_name(data)}")
        try:
            config = _adapter().validate_python(
                _with_environment_defaults(data, env), context={"base_dir": base_dir or Path.cwd()}
            )
        except ValidationError as exc:
            raise ConfigError(translate(exc, config_json_schema())) from None
        return apply_rules(config, data)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def _with_environment_defaults(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """`data` with the defaults that depend on the environment (or on whether a key is absent) filled in."""
    data = dict(data)
    data.setdefault("trust_domain", DEFAULT_TRUST_DOMAIN)
    if "state_dir" not in data:
        data["state_dir"] = default_state_dir(env)
    listen = data.get("listen")
    if listen is None:
        listen = {}
    if isinstance(listen, dict):
        runtime = default_runtime_dir(env)
        listen = dict(listen)
        # SDS over TCP is opt-in: a TCP caller has no peer credentials, so only its claims would decide which
        # private keys it receives.
        listen.setdefault("grpc", (Address("unix", path=str(runtime / "svidgate.sock")),))
        listen.setdefault("workload_api", Address("unix", path=str(runtime / "workload.sock")))
        listen.setdefault("http", DEFAULT_HTTP_ADDRESS)
        # Absent: Check's own listener at its default address, as for every other key. `null`: no separate
        # Check listener; Check is still answered on every listen.grpc and listen.workload_api listener.
        listen.setdefault("check", parse_address(DEFAULT_CHECK_ADDRESS, "listen.check"))
        data["listen"] = listen
    return data


def _read_yaml(text: str, origin: str) -> object:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{origin}: {where}{problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: invalid YAML: {exc}") from None
    except RecursionError:
        # Unreachable while _StrictLoader bounds the nesting; kept so that no input ever escapes as a crash.
        raise ConfigError(f"{origin}: the YAML is nested too deeply to read") from None
    except Exception as exc:  # any other parser failure is still a config error, never a crash
        raise ConfigError(f"{origin}: cannot read the YAML: {type(exc).__name__}: {exc}") from None
    if data is None:
        # An empty file is far more often a truncated write or a failed ConfigMap mount than a wish for the
        # defaults, and applying it would drop every workload and policy. `{}` says "all defaults" on purpose.
        raise ConfigError(
            f"{origin}: the file holds no YAML document (it is empty or only comments); "
            "write {} to run on the defaults"
        )
    return data


__all__ = ["config_json_schema", "config_path_from_env", "load_config", "parse_config"]
