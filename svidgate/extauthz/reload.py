"""The current ext_authz policies, replaced whole on reload.

A Check reads `PolicyHolder.current` once and uses that one `CompiledAuthz` for the whole decision, so a
reload in the middle of a request never mixes two configurations, and a reload is one reference assignment
(atomic under the GIL for readers on any thread). An invalid configuration is rejected before the assignment:
the last good one stays.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from svidgate.extauthz.policy import CompiledAuthz, compile_authz

if TYPE_CHECKING:
    from svidgate.config import AuthzConfig

__all__ = ["PolicyHolder"]

log = logging.getLogger(__name__)


class PolicyHolder:
    """Holds the compiled ``authz`` configuration in force.

    Args:
        config: the initial ``authz`` section.

    Raises:
        ConfigError: the initial configuration cannot be compiled.
    """

    def __init__(self, config: AuthzConfig) -> None:
        self.current: CompiledAuthz = compile_authz(config)
        self.generation = 0

    def swap(self, config: AuthzConfig) -> CompiledAuthz:
        """Compile `config` and make it current.

        Args:
            config: the new ``authz`` section (already validated by the config loader).

        Returns:
            The compiled configuration now in force.
        """
        return self.install(compile_authz(config))

    def install(self, compiled: CompiledAuthz) -> CompiledAuthz:
        """Make an already compiled configuration current (a reload compiles once, before it applies).

        Args:
            compiled: the compiled ``authz`` section.

        Returns:
            `compiled`.
        """
        config = compiled.config
        self.current = compiled
        self.generation += 1
        log.info(
            "authz.policies_reloaded",
            extra={
                "fields": {
                    "generation": self.generation,
                    "policies": [p.name for p in compiled.policies],
                    "default": config.default,
                }
            },
        )
        return compiled
