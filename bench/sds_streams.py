"""SDS benchmark: N concurrent StreamSecrets streams on one svidgate process, and a rotation's fan-out.

    .venv/bin/python bench/sds_streams.py                      # 1k, 5k, 10k streams
    .venv/bin/python bench/sds_streams.py --streams 10000 --clients 2

One server process (the SDS servicer on grpc.aio with svidgate's server options and its two interceptors,
metrics and drain, wrapped once at registration as `svidgate serve` does; a built-in CA, 100 workloads) and
`--clients` client processes, each holding its share of the streams over several HTTP/2 connections (as a
node's Envoys would). Every stream subscribes to ``default`` and ``ALL`` with one of 100 node IDs and ACKs
what it gets. Measured:

- streams held: how many got their full state (and how many failed);
- RSS per stream: the server's resident memory growth from before the streams opened to when all are idle;
- rotation fan-out: new SVIDs are published in the server; the time from the publish to the last stream
  receiving its new ``default`` (and the median), using the machine's wall clock shared by the processes.
- rotation server CPU: the server process's CPU time (all threads) from before the publish to when every
  stream has its new SVID (less dependent on what else the machine runs than the wall-clock times).

Prints a table. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NODES = 100


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- server process ------------------------------------------------------------------------------------------


async def serve() -> None:
    import grpc

    from svidgate.config import SdsConfig, Selector, Workload
    from svidgate.identity.ca import BuiltinCa
    from svidgate.identity.clock import system_clock
    from svidgate.identity.keys import KeyType
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
    from svidgate.sds.servicer import SecretDiscoveryServicer

    td = TrustDomain("bench.test")
    partner = BuiltinCa.in_memory(TrustDomain("partner.test"), KeyType.EC_P256, system_clock)
    ca = BuiltinCa.in_memory(td, KeyType.EC_P256, system_clock)
    workloads = tuple(
        Workload(
            SpiffeId.parse(f"spiffe://bench.test/node-{i}"), (Selector.parse(f"envoy:node_id:node-{i}"),)
        )
        for i in range(NODES)
    )
    version = 0

    def snapshot() -> IdentitySnapshot:
        nonlocal version
        version += 1
        svids = {w.spiffe_id: ca.mint_x509_svid(w.spiffe_id, 3600) for w in workloads}
        return IdentitySnapshot(svids, {td: ca.bundle(), partner.trust_domain: partner.bundle()}, version)

    import gc

    gc_time = [0.0, 0]
    gc_start = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_start[0]
            gc_time[1] += 1

    gc.callbacks.append(on_gc)
    if int(os.environ.get("SDS_BENCH_GC_THRESHOLD", "0")):
        # What svidgate's runtime should do for large SDS fleets (see the report): with Python's default
        # threshold (700) a rotation's allocations trigger ~230 collections that each walk every open stream.
        gc.set_threshold(int(os.environ["SDS_BENCH_GC_THRESHOLD"]), 10, 10)
    feed = SnapshotFeed(snapshot())
    from prometheus_client import CollectorRegistry

    from svidgate.grpcutil import WrappingServer
    from svidgate.metrics import Metrics
    from svidgate.runtime.drain import DrainInterceptor
    from svidgate.runtime.listeners import grpc_server_options

    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    interceptor, drain = metrics.interceptor(), DrainInterceptor(asyncio.Event())
    # As `svidgate serve` builds listen.grpc: metrics and drain wrapped once at registration.
    server = WrappingServer(
        grpc.aio.server(options=grpc_server_options(), maximum_concurrent_rpcs=None),
        lambda method, handler: interceptor.wrap(method, drain.wrap(handler)),
    )
    SecretDiscoveryServicer(feed, workloads, SdsConfig(), td, metrics=metrics.sds).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"port": port, "rss": rss_bytes()}), flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    while line := (await reader.readline()).decode().strip():
        if line == "rss":
            print(json.dumps({"rss": rss_bytes()}), flush=True)
        elif line == "gcstats":
            # process_time: CPU of every thread of the server (grpc-core's included).
            print(
                json.dumps({"gc": gc_time[0], "collections": gc_time[1], "cpu": time.process_time()}),
                flush=True,
            )
        elif line == "rotate":
            next_snapshot = (
                snapshot()
            )  # minting is the source's work, not fan-out: done before the clock starts
            published = time.time()
            feed.publish(next_snapshot)
            print(json.dumps({"published": published}), flush=True)
        elif line == "profile":
            import cProfile

            profiler = cProfile.Profile()
            next_snapshot = snapshot()
            profiler.enable()
            published = time.time()
            feed.publish(next_snapshot)
            await asyncio.sleep(3)
            profiler.disable()
            profiler.dump_stats("/tmp/sds_fanout.prof")
            print(json.dumps({"published": published}), flush=True)
    await server.stop(None)


# -- client process ------------------------------------------------------------------------------------------


async def client(target: str, streams: int, channels: int, offset: int) -> None:
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc

    type_url = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [sds_pb2_grpc.SecretDiscoveryServiceStub(c) for c in chans]
    ready = asyncio.Event()
    go = asyncio.Event()
    state = {"ready": 0, "failed": 0}
    received: list[float] = []

    async def stream(i: int) -> None:
        call = stubs[i % channels].StreamSecrets()
        request = discovery_pb2.DiscoveryRequest(resource_names=["default", "ALL"], type_url=type_url)
        request.node.id = f"node-{(offset + i) % NODES}"
        try:
            await call.write(request)
            first = await call.read()
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    resource_names=["default", "ALL"],
                    type_url=type_url,
                    version_info=first.version_info,
                    response_nonce=first.nonce,
                )
            )
        except grpc.aio.AioRpcError:
            state["failed"] += 1
            if state["ready"] + state["failed"] == streams:
                ready.set()
            return
        state["ready"] += 1
        if state["ready"] + state["failed"] == streams:
            ready.set()
        second = await call.read()
        received.append(time.time())
        assert second.resources
        await go.wait()
        call.cancel()

    tasks = [asyncio.ensure_future(stream(i)) for i in range(streams)]
    await ready.wait()
    print(json.dumps({"ready": state["ready"], "failed": state["failed"]}), flush=True)
    expected = state["ready"]
    while len(received) < expected:
        await asyncio.sleep(0.01)
    print(
        json.dumps({"received": len(received), "last": max(received), "median": statistics.median(received)}),
        flush=True,
    )
    # Streams are closed only once the driver has read the server's CPU time: closing is not fan-out work.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    go.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for chan in chans:
        await chan.close(None)


# -- driver --------------------------------------------------------------------------------------------------


async def read_json(proc: asyncio.subprocess.Process, timeout: float = 600) -> dict[str, float]:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("child exited")
        try:
            return json.loads(line)  # type: ignore[no-any-return]
        except json.JSONDecodeError:
            continue  # grpc log noise


async def run(streams: int, clients: int, per_channel: int, gc_threshold: int) -> dict[str, float]:
    me = str(Path(__file__).resolve())
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR", "SDS_BENCH_GC_THRESHOLD": str(gc_threshold)}
    server = await asyncio.create_subprocess_exec(
        sys.executable, me, "server", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert server.stdin is not None
    hello = await read_json(server)
    target = f"127.0.0.1:{int(hello['port'])}"
    server.stdin.write(b"rss\n")
    rss_before = (await read_json(server))["rss"]
    shares = [streams // clients + (1 if i < streams % clients else 0) for i in range(clients)]
    started = time.time()
    procs = []
    for i, share in enumerate(shares):
        channels = max(1, share // per_channel)
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                me,
                "client",
                target,
                str(share),
                str(channels),
                str(sum(shares[:i])),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
            )
        )
    readies = [await read_json(p) for p in procs]
    open_seconds = time.time() - started
    held = sum(r["ready"] for r in readies)
    failed = sum(r["failed"] for r in readies)
    await asyncio.sleep(1.0)  # let the server settle (garbage, buffers) before reading its RSS
    server.stdin.write(b"rss\n")
    rss_after = (await read_json(server))["rss"]
    server.stdin.write(b"gcstats\n")
    gc_before = await read_json(server)
    server.stdin.write(b"profile\n" if os.environ.get("SDS_BENCH_PROFILE") else b"rotate\n")
    published = (await read_json(server))["published"]
    dones = [await read_json(p) for p in procs]
    server.stdin.write(b"gcstats\n")
    gc_after = await read_json(server)
    gc_seconds = gc_after["gc"] - gc_before["gc"]
    rotation_cpu = gc_after["cpu"] - gc_before["cpu"]
    last = max(d["last"] for d in dones)
    median = statistics.median(d["median"] for d in dones)
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"close\n")
    for p in procs:
        await p.wait()
    server.stdin.close()
    await server.wait()
    return {
        "streams": streams,
        "held": held,
        "failed": failed,
        "open_s": open_seconds,
        "rss_before_mb": rss_before / 2**20,
        "rss_after_mb": rss_after / 2**20,
        "kib_per_stream": (rss_after - rss_before) / max(held, 1) / 1024,
        "fanout_last_s": last - published,
        "fanout_median_s": median - published,
        "received": sum(d["received"] for d in dones),
        "gc_s": gc_seconds,
        "rotation_cpu_s": rotation_cpu,
        "gc_threshold": gc_threshold,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "server":
        asyncio.run(serve())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        target, streams, channels, offset = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        asyncio.run(client(target, streams, channels, offset))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="*", default=[1000, 5000, 10000])
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--per-channel", type=int, default=100, help="streams per HTTP/2 connection")
    parser.add_argument(
        "--gc-threshold",
        type=int,
        nargs="*",
        default=[50000],
        help="server gc generation-0 thresholds to compare (50000: what `svidgate serve` sets; 0: Python's "
        "default)",
    )
    args = parser.parse_args()
    print(f"SDS streams benchmark: 1 server process, {args.clients} client processes, {os.cpu_count()} cores")
    header = (
        f"{'streams':>8} {'held':>7} {'failed':>6} {'open s':>7} {'RSS MiB':>15} {'KiB/stream':>10} "
        f"{'rotation last s':>15} {'median s':>9} {'server CPU s':>12} {'gc thr':>7} {'gc s':>5}"
    )
    print(header)
    print("-" * len(header))
    for n in args.streams:
        for threshold in args.gc_threshold:
            r = asyncio.run(run(n, args.clients, args.per_channel, threshold))
            print(
                f"{r['streams']:>8} {r['held']:>7} {r['failed']:>6} {r['open_s']:>7.1f} "
                f"{r['rss_before_mb']:>6.1f} -> {r['rss_after_mb']:>5.1f} {r['kib_per_stream']:>10.1f} "
                f"{r['fanout_last_s']:>15.3f} {r['fanout_median_s']:>9.3f} {r['rotation_cpu_s']:>12.3f} "
                f"{threshold or 'default':>7} {r['gc_s']:>5.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
