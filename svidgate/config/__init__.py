"""svidgate's configuration: YAML in, one frozen, typed `Config` out.

Every key is documented (with its default) in docs/configuration.md. Everything is validated once, at load
time: an unknown key, a value of the wrong type or a cross-reference that cannot work is a `ConfigError`
whose message starts with the file and the key's path (``<file>: authz.policies[2].audiences: expected a
list of strings``).

Modules: `model` (each key declared once: the frozen sections and `Config`, pydantic dataclasses), `types`
(SPIFFE IDs, durations, addresses, paths for the schema library), `values` (the value readers), `rules`
(rules across keys), `errors` (the library's errors in svidgate's form), `loader` (file → `Config`, the JSON
Schema), `strict_yaml`, `environment` (defaults that depend on ``XDG_*``/``HOME``), `reload` (what a reload
can apply), `reference` (docs/configuration.md's key tables).

Adding a key: one field with its docstring in `model` (and a rule in `rules` if it depends on other keys),
then ``python scripts/gen_config_docs.py``.

This package imports only the identity domain types; never gRPC, never the services; and nothing under
`svidgate.identity` imports it.
"""

from svidgate.config.environment import default_config_text, default_runtime_dir, default_state_dir
from svidgate.config.loader import config_json_schema, config_path_from_env, load_config, parse_config
from svidgate.config.model import (
    CONFIG_ENV,
    DEFAULT_CHECK_ADDRESS,
    DEFAULT_K8S_CA_FILE,
    DEFAULT_K8S_TOKEN_FILE,
    DEFAULT_TRUST_DOMAIN,
    KERNEL_VERIFIED_SELECTOR_TYPES,
    MAX_UNIX_PATH_BYTES,
    MAX_UNKNOWN_KEY_WAIT,
    SELECTOR_TYPES,
    UNIX_TEMP_NAME_BYTES,
    Address,
    AllowRule,
    AuthzConfig,
    BundleEndpoint,
    BundleEndpointServerConfig,
    CaConfig,
    CallerLike,
    Config,
    DecisionLogConfig,
    FederationConfig,
    KubernetesConfig,
    ListenConfig,
    LogConfig,
    Policy,
    PolicyMatch,
    SdsConfig,
    Selector,
    ServerConfig,
    SourceConfig,
    UpstreamConfig,
    Workload,
)
from svidgate.config.reload import RESTART_REQUIRED_KEYS, restart_required_changes
from svidgate.config.strict_yaml import MAX_YAML_DEPTH
from svidgate.config.values import MAX_FETCH_TIMEOUT, parse_address, parse_duration
from svidgate.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CHECK_ADDRESS",
    "DEFAULT_K8S_CA_FILE",
    "DEFAULT_K8S_TOKEN_FILE",
    "DEFAULT_TRUST_DOMAIN",
    "KERNEL_VERIFIED_SELECTOR_TYPES",
    "MAX_FETCH_TIMEOUT",
    "MAX_UNIX_PATH_BYTES",
    "MAX_UNKNOWN_KEY_WAIT",
    "MAX_YAML_DEPTH",
    "RESTART_REQUIRED_KEYS",
    "SELECTOR_TYPES",
    "UNIX_TEMP_NAME_BYTES",
    "Address",
    "AllowRule",
    "AuthzConfig",
    "BundleEndpoint",
    "BundleEndpointServerConfig",
    "CaConfig",
    "CallerLike",
    "Config",
    "ConfigError",
    "DecisionLogConfig",
    "FederationConfig",
    "KubernetesConfig",
    "ListenConfig",
    "LogConfig",
    "Policy",
    "PolicyMatch",
    "SdsConfig",
    "Selector",
    "ServerConfig",
    "SourceConfig",
    "UpstreamConfig",
    "Workload",
    "config_json_schema",
    "config_path_from_env",
    "default_config_text",
    "default_runtime_dir",
    "default_state_dir",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
    "restart_required_changes",
]
