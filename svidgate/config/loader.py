"""Loading: a file (or the embedded default) through strict YAML into a validated `Config`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from svidgate.config.environment import default_config_text
from svidgate.config.model import CONFIG_ENV, Config
from svidgate.config.parser import _Parser
from svidgate.config.strict_yaml import _StrictLoader
from svidgate.errors import ConfigError


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
    try:
        return _Parser(base_dir or Path.cwd(), env if env is not None else os.environ).config(data)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


__all__ = ["config_path_from_env", "load_config", "parse_config"]
