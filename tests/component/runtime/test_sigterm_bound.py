"""SIGTERM ends a real `svidgate serve` within `server.drain_grace` + `STOP_MARGIN` in every state (issue 9,
item 6): while a federation partner drips its bundle one byte at a time, and while the SPIRE agent the source
waits for at start-up is absent."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from svidgate.runtime.server import STOP_MARGIN
from tests.support.bundle_endpoint import DrippingBundleEndpoint
from tests.support.runtime import Layout, ServeProcess, write_config

GRACE = 1.0
BOUND = GRACE + STOP_MARGIN


async def _exits_within_the_bound(process: ServeProcess) -> int:
    process.signal(signal.SIGTERM)
    try:
        return await process.wait_exit(timeout=BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"svidgate ignored SIGTERM for more than {BOUND:g}s:\n{process.log()}")


async def test_sigterm_while_a_partner_drips(layout: Layout) -> None:
    endpoint = DrippingBundleEndpoint(layout.root)
    write_config(
        layout,
        drain_grace=f"{GRACE:g}s",
        extra=f"""\
federation:
  partner.test:
    bundle_endpoint: {{url: "{endpoint.url}", profile: https_web, ca_file: "{endpoint.ca_file}"}}
""",
    )
    process = ServeProcess(layout.config)
    try:
        await process.start(wait_for=None)
        assert await asyncio.to_thread(endpoint.dripping.wait, 30), process.log()
        code = await _exits_within_the_bound(process)
    finally:
        process.kill()
        endpoint.stop()
    assert code == 0, process.log()
    assert process.events("server.stopped")


async def test_sigterm_while_the_spire_agent_is_absent(layout: Layout) -> None:
    write_config(
        layout,
        drain_grace=f"{GRACE:g}s",
        extra=f"source:\n  kind: spire\n  spire_socket: unix://{layout.root / 'agent.sock'}\n",
    )
    process = ServeProcess(layout.config)
    try:
        await process.start(wait_for="spire_source.connect_failed")
        code = await _exits_within_the_bound(process)
    finally:
        process.kill()
    assert code == 0, process.log()
    (stopped,) = process.events("server.stopped")
    assert (stopped["reason"], stopped["during"]) == ("SIGTERM", "start-up")
    assert not layout.sds_socket.exists()


def test_the_watchdog_ends_a_process_whose_stop_overruns() -> None:
    # The backstop behind the bound: a process still alive `bound` seconds after the stop signal (here: one
    # that sleeps in the main thread) is ended with exit 1 and one log line.
    script = (
        "import logging, sys, time\n"
        "from svidgate.logs import configure_logging\n"
        "from svidgate.runtime.signals import arm_stop_watchdog\n"
        "configure_logging('json', 'info')\n"
        "arm_stop_watchdog(0.2)\n"
        "time.sleep(60)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30, check=False)
    assert done.returncode == 1
    assert '"event":"server.stop_overrun"' in done.stderr.decode()
