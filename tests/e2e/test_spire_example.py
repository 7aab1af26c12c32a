"""envoy-examples/spire/svidgate.yaml as shipped, before a stand-in SPIRE agent that goes away and returns.

The stand-in is a second svidgate: its Workload API speaks the protocol svidgate's SPIRE source consumes
(FetchX509SVID, FetchJWTBundles) and hands this test's uid the two SVIDs the example's workloads name. It
serves it on the agent socket path the example expects, in a private mount namespace (tmpfs on /run), so the
example's file runs unchanged. What the README promises when the agent restarts: svidgate keeps serving
(ready), reports `svidgate_source_up{source="spire"}` 0 while the agent is away, and reconnects on its own
when it is back.
"""

from __future__ import annotations

import json

import pytest

from tests.support.examples import log_tail, run_in_namespaces

pytestmark = pytest.mark.e2e

STAND_IN_AGENT = """\
trust_domain: example.org
state_dir: /tmp/agent/state
listen:
  grpc: unix:///tmp/agent/svidgate.sock
  check: null
  workload_api: unix:///run/spire/sockets/agent.sock
  http: 127.0.0.1:9790
workloads:
  - spiffe_id: spiffe://example.org/ns/default/sa/frontend
    selectors: ["unix:uid:0"]
  - spiffe_id: spiffe://example.org/ns/default/sa/backend
    selectors: ["unix:uid:0"]
"""

_PRELUDE = """\
set -e
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
ip link set lo up
mkdir /tmp/repo
ln -s "$EXAMPLE_VENV" /tmp/repo/.venv
ln -s "$EXAMPLE_DIR" /tmp/repo/envoy-examples
cd /tmp/repo
printf '%s' "$AGENT_CONFIG" > /tmp/agent.yaml
exec bash -e -c "$EXAMPLE_SCRIPT"
"""

_SCRIPT = """\
up() { curl -s http://127.0.0.1:8682/metrics | grep '^svidgate_source_up{source="spire"'; }
wait_up() { for i in $(seq 100); do up | grep -q "} $1" && return 0; sleep 0.1; done; return 1; }
.venv/bin/svidgate serve --config /tmp/agent.yaml 2>/tmp/agent.log & AGENT=$!
curl -sf -o /dev/null --retry 30 --retry-connrefused --retry-delay 1 http://127.0.0.1:9790/readyz
.venv/bin/svidgate serve --config envoy-examples/spire/svidgate.yaml 2>/tmp/svidgate.log & SVIDGATE=$!
curl -sf --retry 30 --retry-connrefused --retry-delay 1 http://127.0.0.1:8682/readyz
up
kill $AGENT; wait $AGENT || true                              # the agent restarts...
wait_up 0
up
curl -sf http://127.0.0.1:8682/readyz                         # ...svidgate keeps serving what it has
.venv/bin/svidgate serve --config /tmp/agent.yaml 2>>/tmp/agent.log & AGENT=$!
wait_up 1                                                     # ...and reconnects by itself
up
grep -c '"event":"spire_source.stream_lost"' /tmp/svidgate.log
kill $SVIDGATE $AGENT; wait
"""


def test_the_spire_example_rides_out_an_agent_restart() -> None:
    run = run_in_namespaces(_SCRIPT, prelude=_PRELUDE, env={"AGENT_CONFIG": STAND_IN_AGENT})
    assert run.returncode == 0, run.stdout + log_tail(run.stderr)
    lines = run.stdout.splitlines()
    assert len(lines) == 6, run.stdout
    first, up, down, still, back, lost = lines
    assert json.loads(first)["ready"] is True
    assert up == 'svidgate_source_up{source="spire",trust_domain="example.org"} 1.0'
    assert down == 'svidgate_source_up{source="spire",trust_domain="example.org"} 0.0'
    readiness = json.loads(still)
    assert readiness["ready"] is True, readiness  # the SVIDs it holds are far from expiry
    assert readiness["sources"][0]["up"] is False
    assert back == 'svidgate_source_up{source="spire",trust_domain="example.org"} 1.0'
    assert int(lost) >= 1
