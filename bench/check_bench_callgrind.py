"""Instructions per Check, counted by callgrind: a measurement other processes on the machine cannot disturb.

    .venv/bin/python bench/check_bench_callgrind.py [CASE-SUBSTRING ...]     # ~3 minutes for all cases

Each server of bench/check_bench.py runs under ``valgrind --tool=callgrind`` with instrumentation off; after a
warm-up, instrumentation is switched on for exactly N sequential Checks and off again, so the count covers the
whole server process (gRPC core, protobuf, Python, svidgate) for those Checks and nothing else. Instructions
are not time, but they are repeatable, and the ratio to the no-op baseline is the quantity the throughput
target is about.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import check_bench as cb  # noqa: E402

N = 300


def count(kind: str, requests: list[bytes], state: Path, cache_size: int, log: bool = True) -> float:
    out = state / f"callgrind.{kind.replace(':', '_')}.out"
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(HERE / "check_bench.py"),
            "--serve",
            kind,
            "--state",
            str(state),
            "--cache-size",
            str(cache_size),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "BENCH_DECISION_LOG": "on" if log else "off"},
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    port = int(proc.stdout.readline())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(cb.METHOD, None, None)
        for body in requests[:50]:
            call(body, timeout=60)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        for i in range(N):
            call(requests[(50 + i) % len(requests)], timeout=60)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
    proc.stdin.close()
    proc.wait(120)
    text = out.read_text(errors="replace")
    totals = [int(m) for m in re.findall(r"^(?:summary|totals):\s+(\d+)", text, flags=re.M)]
    return max(totals) / N


def main() -> None:
    state = cb.STATE
    state.mkdir(exist_ok=True)
    keys = cb._keys(state)
    now = time.time()
    cached = [cb._request(cb._mint(keys["ES256"], cb.CLIENT_ID, 1, now)[0])]
    es = [cb._request(t) for t in cb._mint(keys["ES256"], cb.CLIENT_ID, N + 60, now)]
    rs = [cb._request(t) for t in cb._mint(keys["RS256"], cb.CLIENT_ID, N + 60, now)]
    denied = [cb._request(cb._mint(keys["ES256"], cb.DENIED_ID, 1, now)[0])]
    cases = [
        ("baseline no-op, threaded server (4 workers)", "noop-sync:4", cached, 10000),
        ("baseline no-op, grpc.aio", "noop-aio", cached, 10000),
        ("svidgate threaded: cached token", "svidgate-sync:4", cached, 10000),
        ("svidgate threaded: unique ES256 tokens", "svidgate-sync:4", es, 10000),
        ("svidgate threaded: unique RS256 tokens", "svidgate-sync:4", rs, 10000),
        ("svidgate threaded: denials (403)", "svidgate-sync:4", denied, 10000),
        ("svidgate grpc.aio: cached token", "svidgate-aio", cached, 10000),
        ("listen.grpc as served: cached, interceptors", "svidgate-aio-interceptors", cached, 10000),
        ("listen.grpc as served: cached, wrapped once", "svidgate-aio-serve", cached, 10000),
    ]
    # Under valgrind a Check takes milliseconds, so the decision log's 100 lines/s limit lets every Check log,
    # which a server answering thousands of Checks a second never does: count those cases both ways.
    # Diagnostics (run only when named): the adapter alone, and the core without Prometheus recording.
    diagnostics = [
        ("svidgate threaded: adapter only (constant)", "svidgate-const:4", cached, 10000),
        ("svidgate threaded: cached, no metrics, log off", "svidgate-sync-nometrics:4", cached, 10000),
    ]
    quiet = [
        ("svidgate threaded: cached token, log off", "svidgate-sync:4", cached, 10000),
        ("svidgate threaded: unique ES256, log off", "svidgate-sync:4", es, 10000),
    ]
    only = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in only):
        print(__doc__ or "usage: check_bench_callgrind.py [CASE-SUBSTRING ...]")
        return
    cases = [c for c in cases if not only or any(o in c[0] for o in only)]
    quiet = [c for c in quiet if not only or any(o in c[0] for o in only)]
    quiet += [c for c in diagnostics if any(o in c[0] for o in only)]
    rows = []
    for label, kind, requests, size in cases:
        print(f"{label} ...", file=sys.stderr, flush=True)
        rows.append((label, count(kind, requests, state, size)))
    for label, kind, requests, size in quiet:
        print(f"{label} ...", file=sys.stderr, flush=True)
        rows.append((label, count(kind, requests, state, size, log=False)))
    if not rows:
        sys.exit("no case matches " + ", ".join(repr(o) for o in only))
    base = rows[0][1]
    print(f"\nInstructions per Check (callgrind, whole server process, {N} sequential Checks)")
    print(f"| {'case':<44} | {'instructions':>12} | {'baseline/case':>13} |")
    print(f"|{'-' * 46}|{'-' * 14}|{'-' * 15}|")
    for label, ir in rows:
        print(f"| {label:<44} | {ir:>12,.0f} | {base / ir * 100:>12.0f}% |")


if __name__ == "__main__":
    main()
