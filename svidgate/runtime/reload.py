"""Reload: re-read the config file on SIGHUP or when its content changes, validate it, apply it all at once.

`ConfigReloader` owns the configuration in force. A reload never raises: bad YAML, an invalid key or a bug is
one log line (counted as ``rejected``) and the last good configuration stays. What can change live is applied
by the one function `Services.prepare_reload` returns; a change under `RESTART_REQUIRED_KEYS` is kept for
the next start and named in one warning line.

This module imports the config loader and the metrics; the runtime owns the reloader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from svidgate.config import RESTART_REQUIRED_KEYS, Config, load_config, restart_required_changes
from svidgate.errors import SvidgateError
from svidgate.identity.clock import Clock
from svidgate.logs import configure_logging
from svidgate.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["ConfigReloader", "file_fingerprint"]

#: Validates a new configuration (raising `ConfigError`) and returns the function that applies it.
PrepareReload = Callable[[Config], Callable[[], None]]


def file_fingerprint(path: Path) -> str | None:
    """A content hash of `path`, or None when it cannot be read (a reload then reports the error).

    Content, not mtime alone: editors and Kubernetes ConfigMap updates (a symlink swap) change mtimes without
    changing content, and a reload that changes nothing should not be logged as one.
    """
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def stat_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap's ..data swap shows as a new inode
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class ConfigReloader:
    """The configuration in force, and how a new one replaces it.

    Args:
        config: the configuration at start.
        path: its file (None: the embedded default; a reload then has nothing to re-read).
        metrics: counts reloads and stamps the last success.
        clock: epoch seconds, for that stamp.
    """

    def __init__(self, config: Config, path: Path | None, metrics: Metrics, clock: Clock) -> None:
        self.config = config
        self.path = path
        self._metrics = metrics
        self._clock = clock
        self._lock = asyncio.Lock()
        self._fingerprint = file_fingerprint(path) if path is not None else None
        #: Set by the runtime once the services exist (`Services.prepare_reload`); no reload before that.
        self.prepare: PrepareReload | None = None

    async def reload(self, trigger: str = "requested") -> bool:
        """Re-read, validate and apply the config file; keep the configuration in force on any error.

        What can change live: ``authz`` (policies swapped atomically), ``workloads`` (entitlements of SDS,
        Workload API and token injection), ``federation`` (a removed trust domain leaves the snapshot at
        once, a new one is fetched at once), ``kubernetes`` (for connections attested after the reload),
        ``log``. A change under `RESTART_REQUIRED_KEYS` is kept for the next start and named in one warning
        line. Never raises (except cancellation): whatever goes wrong -- bad YAML, a bug -- is logged and
        counted as ``rejected``, and the last good configuration stays.

        Args:
            trigger: ``SIGHUP``, ``file_change`` or ``requested`` (for the log line).

        Returns:
            True when a new configuration was applied.
        """
        async with self._lock:
            path = self.path
            if path is None:
                log.warning(
                    "config.reload_skipped",
                    extra={
                        "fields": {"trigger": trigger, "reason": "running on the embedded default; no file"}
                    },
                )
                return False
            if self.prepare is None:
                return False
            try:
                return self._reload_from(path, trigger, self.prepare)
            except Exception as exc:  # one bad reload must never end reloading for good
                self._reject(path, trigger, exc)
                return False

    def _reload_from(self, path: Path, trigger: str, prepare: PrepareReload) -> bool:
        self._fingerprint = file_fingerprint(path)
        new = load_config(path)
        apply = prepare(new)
        if new == self.config:
            self._metrics.config_reloads.labels(result="unchanged").inc()
            log.info("config.reload_unchanged", extra={"fields": {"trigger": trigger, "path": str(path)}})
            return False
        restart_required = restart_required_changes(self.config, new)
        apply()
        if new.log != self.config.log:
            configure_logging(new.log.format, new.log.level)
        kept = {key: getattr(self.config, key) for key in RESTART_REQUIRED_KEYS}
        self.config = dataclasses.replace(new, **kept)
        self._metrics.config_last_reload_success.set(self._clock())
        fields: dict[str, object] = {"trigger": trigger, "path": str(path), "summary": self.config.summary()}
        if not restart_required:
            self._metrics.config_reloads.labels(result="applied").inc()
            log.info("config.reloaded", extra={"fields": fields})
            return True
        self._metrics.config_reloads.labels(result="restart_required").inc()
        log.warning(
            "config.reload_partial",
            extra={
                "fields": {
                    **fields,
                    "restart_required": list(restart_required),
                    "reason": "these keys take effect on the next start; everything else was applied",
                }
            },
        )
        return True

    def _reject(self, path: Path, trigger: str, exc: Exception) -> None:
        self._metrics.config_reloads.labels(result="rejected").inc()
        error = str(exc) if isinstance(exc, SvidgateError) else f"{type(exc).__name__}: {exc}"
        log.error(
            "config.reload_rejected",
            extra={
                "fields": {
                    "trigger": trigger,
                    "path": str(path),
                    "error": error,
                    "kept": "the last good configuration stays in force",
                }
            },
            # Bad input is one line; anything else is a bug, and its traceback is what fixes it.
            exc_info=not isinstance(exc, SvidgateError),
        )

    async def watch(self, interval: float) -> None:
        """Reload whenever the file's content changes, looking every `interval` seconds (until cancelled)."""
        path = self.path
        if path is None:
            return
        # Polling, not inotify: it works on every filesystem and with Kubernetes ConfigMap symlink swaps, and
        # a stat every few seconds costs nothing. The first look compares contents with what was loaded: the
        # file may have changed between the start and this task's first step.
        last: tuple[int, int, int, int] | None = None
        while True:
            await asyncio.sleep(interval)
            try:
                key = stat_key(path)
                if key == last:
                    continue
                last = key
                fingerprint = file_fingerprint(path)
                if fingerprint is None or fingerprint == self._fingerprint:
                    continue
                await self.reload("file_change")
            except Exception as exc:  # the watcher outlives any one failed look at the file
                log.error(
                    "config.watch_failed",
                    extra={"fields": {"path": str(path), "error": f"{type(exc).__name__}: {exc}"}},
                    exc_info=True,
                )
