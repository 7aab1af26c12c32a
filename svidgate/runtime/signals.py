"""Signals: SIGTERM/SIGINT stop (drain), SIGHUP reloads, and a watchdog bounds how long a stop may take.

This module imports nothing of svidgate; `svidgate.runtime.server.serve` installs the handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = ["arm_stop_watchdog", "install_signal_handlers"]


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop, on_stop: Callable[[str], None], on_reload: Callable[[], None]
) -> Callable[[], None]:
    """Route SIGTERM/SIGINT to `on_stop` and SIGHUP to `on_reload`.

    Returns:
        A function that removes the handlers again.
    """
    installed: list[int] = []
    for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        loop.add_signal_handler(signum, on_stop, name)
        installed.append(signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    installed.append(signal.SIGHUP)

    def remove() -> None:
        for signum in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)

    return remove


_watchdog_armed = threading.Event()


def arm_stop_watchdog(seconds: float) -> None:
    """End the process `seconds` from now unless it has exited by then (a backstop: no drain step is meant to
    take that long, but a thread stuck in the kernel -- a DNS lookup, a hung disk -- must not keep a process
    that was told to stop). Armed once."""
    if _watchdog_armed.is_set():
        return
    _watchdog_armed.set()

    def overrun() -> None:
        # The log line gets a second of its own: a handler lock held by a stuck thread must not keep us alive.
        reported = threading.Event()

        def report() -> None:
            log.error("server.stop_overrun", extra={"fields": {"bound_seconds": seconds}})
            reported.set()

        threading.Thread(target=report, daemon=True).start()
        reported.wait(1.0)
        os._exit(1)

    timer = threading.Timer(seconds, overrun)
    timer.daemon = True
    timer.start()
