"""ext_authz Check as users run it: the shipped `svidgate serve`, pinned, against a no-op Check server.

    .venv/bin/python bench/check_serve.py                  # ~3 minutes: the table of issue 11's targets
    .venv/bin/python bench/check_serve.py --processes      # adds server.check_processes 1 vs 2 (two cores)
    .venv/bin/python bench/check_serve.py --workers 2 4    # compares server.check_workers values

What runs: `svidgate serve` started by this script with the shipped defaults plus one validate policy (only
the addresses move: a free TCP port for `listen.check` and `listen.http`, the unix sockets in a temporary
directory, so that the run never collides with another svidgate on the machine), pinned to core 0 with
`taskset`; one load client pinned to core 1, grpc.aio, one channel, `--inflight` (64) Checks in flight in a
closed loop. In the same run and on the same core, the baseline is the cheapest no-op Check server grpcio
builds here (the threaded server with 4 workers answering a constant; `bench/check_bench.py --serve`).

Reported per case (median of `--rounds`, cases interleaved so that a busy machine hurts all alike):
- Checks/s and the ratio to the baseline's Checks/s;
- server CPU per Check (utime+stime of every process of the server, from /proc/<pid>/stat) and context
  switches per Check (voluntary + involuntary, summed over /proc/<pid>/task/*/status), over the middle 80%
  of the phase;
- p50/p99 at a fixed `--rate` (1,000) Checks/s, open loop (cached token on `listen.check`).

Cases: cached token on `listen.check` (the default listener, the decision fast path), unique ES256 tokens
(more than the token cache holds, cycled: every Check verifies a signature), and a cached token on
`listen.grpc` (the grpc.aio fallback listener, a unix socket). Not a test: nothing asserts on time. The
machine may be shared: check `uptime` first; the ratios (same run, same core) are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHOD = "/envoy.service.auth.v3.Authorization/Check"
TRUST_DOMAIN = "bench.test"
CLIENT_ID = "spiffe://bench.test/client"
AUDIENCE = "backend"
#: More than twice authz.cache_size's default (10,000), cycled in order: the token cache (LRU) never hits,
#: also with two check processes that each see part of the tokens.
UNIQUE_TOKENS = 25_000
SERVER_CORE = "0"
CLIENT_CORE = "1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the servers ---------------------------------------------------------------------------------------------


def config_text(
    directory: Path, state_dir: Path, check_port: int, http_port: int, workers: int | None, processes: int
) -> str:
    server = []
    if workers is not None:
        server.append(f"check_workers: {workers}")
    if processes != 1:
        server.append(f"check_processes: {processes}")
    server_section = "server: {" + ", ".join(server) + "}\n" if server else ""
    return f"""\
trust_domain: {TRUST_DOMAIN}
state_dir: {state_dir}
listen:
  grpc: unix://{directory}/run/sds.sock
  workload_api: unix://{directory}/run/workload.sock
  check: tcp://127.0.0.1:{check_port}
  http: 127.0.0.1:{http_port}
{server_section}authz:
  policies:
    - name: api
      audiences: [{AUDIENCE}]
      allow: ["spiffe://{TRUST_DOMAIN}/*"]
"""


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Check worker processes are children of the main one)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def usage(pid: int) -> tuple[float, int]:
    """CPU seconds and context switches of `pid` and its descendants, all threads."""
    cpu, switches = 0.0, 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{member}/task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except OSError:
            continue  # a thread or process that just ended
    return cpu, switches


@dataclass
class Target:
    label: str
    proc: subprocess.Popen[Any]
    address: str
    directory: Path | None = None
    http_port: int | None = None

    def cache_hits(self) -> float:
        """svidgate_authz_token_cache_hits_total from /metrics (0 for the baseline)."""
        import urllib.request

        if self.http_port is None:
            return 0.0
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("svidgate_authz_token_cache_hits_total")
        )

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_noop(state: Path, cores: str) -> Target:
    proc = subprocess.Popen(
        [
            *("taskset", "-c", cores, sys.executable, str(ROOT / "bench" / "check_bench.py")),
            *("--serve", "noop-sync:4", "--state", str(state)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Target("baseline no-op, threaded server (4 workers)", proc, f"127.0.0.1:{port}")


def wait_ready(http_port: int, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"svidgate serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("svidgate serve did not become ready")
        time.sleep(0.2)


def start_svidgate(
    cores: str, state_dir: Path, workers: int | None = None, processes: int = 1
) -> tuple[Target, Path]:
    """`svidgate serve` pinned to `cores`, its CA in `state_dir` (one CA for the whole run: the tokens are
    minted once); returns it and its config path."""
    directory = Path(tempfile.mkdtemp(prefix="sgbench-", dir="/tmp"))
    check_port, http_port = free_port(), free_port()
    config = directory / "svidgate.yaml"
    config.write_text(config_text(directory, state_dir, check_port, http_port, workers, processes))
    proc = subprocess.Popen(
        ["taskset", "-c", cores, sys.executable, "-m", "svidgate", "serve", "--config", str(config)],
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = Target("svidgate", proc, f"127.0.0.1:{check_port}", directory, http_port)
    try:
        wait_ready(http_port, proc)
    except BaseException:
        target.stop()
        raise
    return target, config


def mint_tokens(config: Path, count: int) -> list[str]:
    """JWT-SVIDs signed by the server's own CA (read from its state_dir, as `svidgate mint` does)."""
    from svidgate.config import load_config
    from svidgate.identity.ca import BuiltinCa
    from svidgate.identity.clock import system_clock
    from svidgate.identity.spiffe_id import SpiffeId

    loaded = load_config(config)
    ca = BuiltinCa.load_existing(loaded.state_dir, loaded.trust_domain, loaded.ca.key_type, system_clock)
    assert ca is not None
    subject = SpiffeId.parse(CLIENT_ID)
    # Distinct audiences lists would change the policy's view; a distinct ttl makes every token distinct.
    return [ca.mint_jwt_svid(subject, [AUDIENCE], 1800 + i) for i in range(count)]


def check_request(token: str) -> bytes:
    from envoy.service.auth.v3 import external_auth_pb2

    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.id = "3f1c2b7e-5a9d-4c1e-9b2a-7d6e5f4c3b2a"
    http.method = "GET"
    http.host = "backend.bench.test:8080"
    http.path = "/api/v1/orders?limit=10"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    for key, value in (
        (":authority", "backend.bench.test:8080"),
        (":method", "GET"),
        (":path", "/api/v1/orders?limit=10"),
        (":scheme", "http"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-request-id", "3f1c2b7e-5a9d-4c1e-9b2a-7d6e5f4c3b2a"),
        ("authorization", f"Bearer {token}"),
    ):
        http.headers[key] = value
    data: bytes = request.SerializeToString()
    return data


# -- the load client (its own process, pinned to the other core) ---------------------------------------------


async def _closed_loop(
    address: str, requests: list[bytes], seconds: float, inflight: int, connections: int
) -> dict[str, int]:
    import grpc

    # One connection per channel (a local subchannel pool each): with check_processes the kernel gives each
    # connection to one worker process, as it does with Envoy's connections (one per Envoy worker thread).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]
    try:
        calls = [channel.unary_unary(METHOD, None, None) for channel in channels]
        # Warm-up from the end of the cycle (evicted before the loop reaches it), distinct per connection.
        for i, call in enumerate(calls):
            for body in requests[len(requests) - 20 * (i + 1) :][:20]:
                await call(body)
        done = denied = index = 0
        deadline = time.monotonic() + seconds

        async def worker(call: Any) -> None:
            nonlocal done, denied, index
            while time.monotonic() < deadline:
                body = requests[index % len(requests)]
                index += 1
                reply = await call(body)
                done += 1
                # CheckResponse.status (field 1) is absent when the code is OK (0).
                if reply[:1] == b"\x0a" and reply[1:2] != b"\x00":
                    denied += 1

        await asyncio.gather(*(worker(calls[i % connections]) for i in range(inflight)))
    finally:
        for channel in channels:
            await channel.close()
    return {"done": done, "denied": denied}


async def _open_loop(address: str, requests: list[bytes], rate: float, seconds: float) -> list[float]:
    import grpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, None, None)
        for body in requests[:50]:
            await call(body)

        async def one(body: bytes) -> None:
            start = time.perf_counter()
            await call(body)
            latencies.append(time.perf_counter() - start)

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(requests[i % len(requests)])))
        await asyncio.gather(*tasks)
    return latencies


def _client(job: tuple[str, str, list[bytes], float, float, int, Any]) -> None:
    os.sched_setaffinity(0, {int(c) for c in CLIENT_CORE.split(",")})
    kind, address, requests, seconds, knob, connections, queue = job
    if kind == "closed":
        queue.put(asyncio.run(_closed_loop(address, requests, seconds, int(knob), connections)))
    else:
        queue.put(asyncio.run(_open_loop(address, requests, knob, seconds)))


def throughput(
    target: Target, requests: list[bytes], seconds: float, inflight: int, connections: int = 1
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    job = ("closed", target.address, requests, seconds, inflight, connections, queue)
    client = ctx.Process(target=_client, args=(job,))
    client.start()
    time.sleep(1.0 + seconds * 0.1)  # spawn, warm-up
    (cpu0, sw0), t0 = usage(target.proc.pid), time.monotonic()
    time.sleep(seconds * 0.7)
    (cpu1, sw1), t1 = usage(target.proc.pid), time.monotonic()
    result = queue.get()
    client.join()
    rate = result["done"] / seconds
    checks = rate * (t1 - t0)
    return {
        "rps": rate,
        "cpu_us": (cpu1 - cpu0) / checks * 1e6 if checks else float("nan"),
        "switches": (sw1 - sw0) / checks if checks else float("nan"),
        "denied": result["denied"],
    }


def latency(target: Target, requests: list[bytes], rate: float, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    job = ("open", target.address, requests, seconds, rate, 1, queue)
    client = ctx.Process(target=_client, args=(job,))
    client.start()
    samples = sorted(queue.get())
    client.join()
    return {"p50_ms": statistics.median(samples) * 1e3, "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1e3}


# -- driver --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    label: str
    start: Any  # () -> Target
    requests: list[bytes]
    latency: bool = False
    connections: int = 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="closed-loop phase length per case")
    parser.add_argument("--inflight", type=int, default=64, help="Checks in flight on the one channel")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop Checks per second")
    parser.add_argument("--latency-seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--workers", type=int, nargs="*", default=[], help="server.check_workers to compare")
    parser.add_argument("--processes", action="store_true", help="server.check_processes 1 vs 2, two cores")
    parser.add_argument(
        "--connections", type=int, default=4, help="client connections in the check_processes cases"
    )
    parser.add_argument("--only-processes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        sys.exit("needs taskset and two cores")

    state = Path(tempfile.gettempdir()) / "svidgate-check-bench"
    state.mkdir(exist_ok=True)
    print("starting svidgate and minting tokens ...", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    state_dir = Path(tempfile.mkdtemp(prefix="sgbench-state-", dir="/tmp"))
    probe, config = start_svidgate(SERVER_CORE, state_dir)
    try:
        tokens = mint_tokens(config, UNIQUE_TOKENS)
    finally:
        probe.stop()
    cached = [check_request(tokens[0])]
    unique = [check_request(t) for t in tokens]

    def svidgate(workers: int | None = None, processes: int = 1, cores: str = SERVER_CORE) -> Any:
        def start() -> Target:
            return start_svidgate(cores, state_dir, workers, processes)[0]

        return start

    def on_grpc(start: Any) -> Any:
        def started() -> Target:
            target = start()
            assert target.directory is not None
            target.address = f"unix:{target.directory}/run/sds.sock"
            return target

        return started

    cases: list[Case] = []
    if not args.only_processes:
        cases += [
            Case(
                "baseline no-op, threaded server (4 workers)", lambda: start_noop(state, SERVER_CORE), cached
            ),
            Case("svidgate listen.check: cached token", svidgate(), cached, latency=True),
            Case("svidgate listen.check: unique ES256 tokens", svidgate(), unique),
            Case("svidgate listen.grpc (grpc.aio): cached token", on_grpc(svidgate()), cached),
        ]
        for workers in args.workers:
            cases.append(Case(f"svidgate check_workers={workers}: cached token", svidgate(workers), cached))
    if args.processes or args.only_processes:
        for processes in (1, 2):
            cases.append(
                Case(
                    f"svidgate check_processes={processes}, 2 cores: unique ES256",
                    svidgate(None, processes, f"{SERVER_CORE},{CLIENT_CORE}"),
                    unique,
                    connections=args.connections,
                )
            )

    results: dict[str, list[dict[str, float]]] = {c.label: [] for c in cases}
    latencies: dict[str, dict[str, float]] = {}
    for round_ in range(args.rounds):
        for case in cases:
            print(f"round {round_ + 1}/{args.rounds}: {case.label} ...", file=sys.stderr, flush=True)
            target = case.start()
            try:
                result = throughput(target, case.requests, args.seconds, args.inflight, case.connections)
                result["cache_hits"] = target.cache_hits() if len(case.requests) > 1 else 0.0
                results[case.label].append(result)
                if case.latency and round_ == args.rounds - 1:
                    latencies[case.label] = latency(target, case.requests, args.rate, args.latency_seconds)
            finally:
                target.stop()

    load = os.getloadavg()
    print(
        f"\nCheck, server pinned to core {SERVER_CORE}, one client on core {CLIENT_CORE} ({args.inflight} in "
        f"flight, one channel), {args.seconds:g} s closed loop, median of {args.rounds} rounds; p99 at "
        f"{args.rate:g}/s open loop; load average before {load_before:.2f}, after {load[0]:.2f}"
    )
    base_label = cases[0].label if not args.only_processes else None
    base = statistics.median(r["rps"] for r in results[base_label]) if base_label else float("nan")
    header = (
        f"| {'case':<52} | {'Checks/s':>8} | {'ratio':>5} | {'CPU us/Check':>12} | {'switches/Check':>14} "
        f"| {'p50 ms':>6} | {'p99 ms':>6} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    summary: dict[str, dict[str, float]] = {}
    for case in cases:
        rows = results[case.label]
        row = {k: statistics.median(r[k] for r in rows) for k in ("rps", "cpu_us", "switches", "denied")}
        summary[case.label] = row
        lat = latencies.get(case.label)
        p50 = f"{lat['p50_ms']:>6.2f}" if lat else f"{'':>6}"
        p99 = f"{lat['p99_ms']:>6.2f}" if lat else f"{'':>6}"
        print(
            f"| {case.label:<52} | {row['rps']:>8.0f} | {row['rps'] / base:>5.2f} | {row['cpu_us']:>12.0f} "
            f"| {row['switches']:>14.1f} | {p50} | {p99} |"
        )
    scaling = [summary[c.label]["rps"] for c in cases if "check_processes" in c.label]
    if len(scaling) == 2:
        print(f"\ncheck_processes 2 vs 1 (unique ES256): {scaling[1] / scaling[0]:.2f}x")
    shutil.rmtree(state_dir, ignore_errors=True)
    hits = {label: max(r["cache_hits"] for r in rows) for label, rows in results.items()}
    if any(hits.values()):
        print(f"WARNING: token cache hits in unique-token cases: {hits}")
    if any(r["denied"] for r in summary.values()):
        print(f"WARNING: denials in allow cases: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
