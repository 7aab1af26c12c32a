"""ext_authz Check benchmark: svidgate against the fastest no-op Check server grpcio can build here.

Run from the repository root:

    .venv/bin/python bench/check_bench.py            # ~5 minutes; prints two tables
    .venv/bin/python bench/check_bench.py --quick    # shorter phases, for a smoke run

Every server runs in its own process; the benchmark reads that process's CPU time from /proc before and after
each phase, so "server CPU per Check" does not depend on how much CPU the load generators took. Phases:

- throughput: a closed loop from several client processes (grpc.aio, pre-serialised requests, a fixed number
  of requests in flight each), for a fixed time; reports completed Checks per second and server CPU per Check.
  On a 2-core machine the clients compete with the server for the cores, so the CPU figure is the one to
  compare across machines; the percentage column compares like with like within one run.
- latency: an open loop at a fixed 1,000 Checks/s from one client process; p50/p99 of the round trip.

Cases: baselines (no-op Check on the threaded server, on grpc.aio, and on grpc.aio with uvloop when it is
installed), then svidgate's real Check with one cached token, unique ES256 tokens, unique RS256 tokens (more
distinct tokens than the cache holds, cycled, so every Check is a miss: the hit count is printed to prove it),
and denials (a valid cached token whose subject the policy does not allow: 403 with a body).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHOD = "/envoy.service.auth.v3.Authorization/Check"
STATE = Path(tempfile.gettempdir()) / "svidgate-check-bench"
TRUST_DOMAIN = "bench.test"
AUDIENCE = "backend"
CLIENT_ID = "spiffe://bench.test/client"
DENIED_ID = "spiffe://bench.test/intruder"


# -- keys and requests (the parent builds them; servers load the public keys) --------------------------------


def _keys(state: Path) -> dict[str, Any]:
    """EC P-256 and RSA-2048 signing keys, written once under `state` so that servers load the same ones."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    keys: dict[str, Any] = {}
    for alg, make in (
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ):
        path = state / f"{alg}.pem"
        if not path.exists():
            pem = make().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            path.write_bytes(pem)
        keys[alg] = serialization.load_pem_private_key(path.read_bytes(), None)
    return keys


def _bundle(state: Path) -> Any:
    from svidgate.identity.bundle import Bundle
    from svidgate.identity.keys import key_id
    from svidgate.identity.spiffe_id import TrustDomain

    keys = _keys(state)
    pubs = {key_id(k.public_key()): k.public_key() for k in keys.values()}
    return Bundle(TrustDomain(TRUST_DOMAIN), jwt_authorities=pubs)


def _mint(key: Any, subject: str, count: int, now: float) -> list[str]:
    from svidgate.identity.jwtsvid import mint_jwt_svid
    from svidgate.identity.keys import key_id
    from svidgate.identity.spiffe_id import SpiffeId

    sid = SpiffeId.parse(subject)
    kid = key_id(key.public_key())
    # A distinct `iat` (whole seconds) per token makes every token distinct, RS256 ones included (PKCS#1 v1.5
    # signatures are deterministic): the cache is keyed by the token bytes. The ttl grows with the age so that
    # every token expires an hour from now.
    return [mint_jwt_svid(sid, [AUDIENCE], key, kid, 3600 + i, now - i) for i in range(count)]


def _request(token: str | None) -> bytes:
    from envoy.service.auth.v3 import external_auth_pb2

    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "10.0.0.7"
    attributes.source.address.socket_address.port_value = 51234
    attributes.destination.address.socket_address.address = "10.0.0.9"
    attributes.destination.address.socket_address.port_value = 8080
    http = attributes.request.http
    http.id = "3f1c2b7e-5a9d-4c1e-9b2a-7d6e5f4c3b2a"
    http.method = "GET"
    http.host = "backend.bench.test:8080"
    http.path = "/api/v1/orders?limit=10"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    headers = http.headers
    for key, value in (
        (":authority", "backend.bench.test:8080"),
        (":method", "GET"),
        (":path", "/api/v1/orders?limit=10"),
        (":scheme", "http"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "3f1c2b7e-5a9d-4c1e-9b2a-7d6e5f4c3b2a"),
    ):
        headers[key] = value
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    attributes.context_extensions["policy"] = "orders"
    data: bytes = request.SerializeToString()
    return data


# -- servers -------------------------------------------------------------------------------------------------


def _authz_config(cache_size: int) -> Any:
    from svidgate.config import AllowRule, AuthzConfig, Policy, PolicyMatch

    policy = Policy(
        name="orders",
        match=PolicyMatch(
            hosts=("backend.bench.test",), path_prefix="/api/", context_extensions={"policy": "orders"}
        ),
        audiences=(AUDIENCE,),
        allow=(AllowRule.parse(CLIENT_ID),),
    )
    return AuthzConfig(policies=(policy,), cache_size=cache_size)


def _serve(kind: str, state: Path, cache_size: int) -> None:
    """Run one server in this process and print its port; stops when stdin closes."""
    import logging

    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    # Decision log lines are written at INFO to a file, as in production (rate-limited to 100/s by config).
    logging.basicConfig(
        filename=os.devnull,
        level=logging.WARNING if os.environ.get("BENCH_DECISION_LOG") == "off" else logging.INFO,
    )

    async def serve_aio(register: Any) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(None)

    def serve_sync(register: Any, workers: int) -> None:
        from concurrent import futures

        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers), options=[("grpc.so_reuseport", 0)]
        )
        register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        sys.stdin.read()
        server.stop(None)

    kind, _, workers_text = kind.partition(":")
    from svidgate.config import ServerConfig  # svidgate's own default, so the bench measures what ships

    workers = int(workers_text) if workers_text else ServerConfig().check_workers
    if kind.startswith("noop"):
        ok = external_auth_pb2.CheckResponse()
        ok.ok_response.SetInParent()

        class Noop(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
            def Check(self, request: Any, context: Any) -> Any:
                return ok

        class NoopAio(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
            async def Check(self, request: Any, context: Any) -> Any:
                return ok

        if kind == "noop-sync":
            serve_sync(
                lambda s: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Noop(), s), workers
            )
        elif kind == "noop-aio":
            asyncio.run(
                serve_aio(lambda s: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAio(), s))
            )
        elif kind == "noop-uvloop":
            import uvloop  # type: ignore[import-not-found, unused-ignore]

            uvloop.run(
                serve_aio(lambda s: external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAio(), s))
            )
        return

    from prometheus_client import CollectorRegistry

    from svidgate.extauthz.reload import PolicyHolder
    from svidgate.extauthz.servicer import AuthorizationServicer, new_sync_check_server
    from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
    from svidgate.metrics import Metrics

    bundle = _bundle(state)
    feed = SnapshotFeed(IdentitySnapshot(bundles={bundle.trust_domain: bundle}, version=1))
    # Diagnostic variants: "-nometrics" (no Prometheus recording), "svidgate-const" (svidgate loaded and
    # registered on the threaded server, but Check answers a constant: the cost of the adapter alone).
    metrics = None if kind.endswith("-nometrics") else Metrics(CollectorRegistry())
    kind = kind.removesuffix("-nometrics")
    servicer = AuthorizationServicer(
        feed, PolicyHolder(_authz_config(cache_size)), metrics.authz if metrics is not None else None
    )
    if kind == "svidgate-const":
        constant = external_auth_pb2.CheckResponse()
        constant.ok_response.SetInParent()
        constant_wire = constant.SerializeToString()
        servicer.check_wire = lambda request, peer=None: constant_wire  # type: ignore[method-assign]
        kind = "svidgate-sync"

    if kind in ("svidgate-aio-interceptors", "svidgate-aio-serve", "svidgate-aio-serve-uvloop"):
        # listen.grpc as `svidgate serve` builds it: Check, SDS and health on one grpc.aio server, with
        # metrics and drain as per-call interceptors (before issue 11) or wrapped once at registration (now);
        # "-uvloop": the same on uvloop's event loop (to decide whether svidgate should use it).
        serving = serve_aio_like_serve(servicer, metrics, feed, kind.endswith("interceptors"))
        if kind.endswith("uvloop"):
            import uvloop  # type: ignore[import-not-found, unused-ignore]

            uvloop.run(serving)
        else:
            asyncio.run(serving)
        return

    if kind == "svidgate-sync":
        server = new_sync_check_server(servicer, max_workers=workers)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        sys.stdin.read()
        server.stop(None)
    else:
        asyncio.run(serve_aio(servicer.add_to_server))


async def serve_aio_like_serve(servicer: Any, metrics: Any, feed: Any, interceptors: bool) -> None:
    import grpc
    from grpc_health.v1 import _async as health_async
    from grpc_health.v1 import health_pb2_grpc

    from svidgate.config import SdsConfig
    from svidgate.grpcutil import WrappingServer
    from svidgate.identity.spiffe_id import TrustDomain
    from svidgate.runtime.drain import DrainInterceptor
    from svidgate.runtime.listeners import grpc_server_options
    from svidgate.sds.servicer import SecretDiscoveryServicer

    drain = DrainInterceptor(asyncio.Event())
    interceptor = metrics.interceptor()
    server: Any
    if interceptors:
        server = grpc.aio.server(interceptors=[interceptor, drain], options=grpc_server_options())
    else:
        server = WrappingServer(
            grpc.aio.server(options=grpc_server_options()),
            lambda method, handler: interceptor.wrap(method, drain.wrap(handler)),
        )
    servicer.add_to_server(server)
    SecretDiscoveryServicer(feed, (), SdsConfig(), TrustDomain(TRUST_DOMAIN)).add_to_server(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_async.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)


class Server:
    """A server subprocess: start, read its port, read its CPU time, stop."""

    def __init__(self, kind: str, state: Path, cache_size: int = 10000) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                kind,
                "--state",
                str(state),
                "--cache-size",
                str(cache_size),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- clients -------------------------------------------------------------------------------------------------


async def _closed_loop(port: int, requests: list[bytes], seconds: float, inflight: int) -> tuple[int, int]:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD, None, None)
        done = 0
        not_ok = 0
        index = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done, not_ok, index
            while time.monotonic() < deadline:
                body = requests[index % len(requests)]
                index += 1
                reply = await call(body)
                done += 1
                # CheckResponse.status (field 1) is absent when the code is OK (0): a cheap check that
                # allows really were allows, without parsing in the hot loop.
                if reply[:1] == b"\x0a" and reply[1:2] != b"\x00":
                    not_ok += 1

        await asyncio.gather(*(worker() for _ in range(inflight)))
        return done, not_ok


def _client_main(args: tuple[int, list[bytes], float, int, Any]) -> None:
    port, requests, seconds, inflight, queue = args
    queue.put(asyncio.run(_closed_loop(port, requests, seconds, inflight)))


def throughput(
    server: Server, requests: list[bytes], seconds: float, clients: int, inflight: int
) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    slices = (
        [requests[i::clients] for i in range(clients)] if len(requests) >= clients else [requests] * clients
    )
    procs = [
        ctx.Process(target=_client_main, args=((server.port, s, seconds, inflight, queue),)) for s in slices
    ]
    for proc in procs:
        proc.start()
    # Warm-up is the first 10% of the phase: measure CPU over the middle.
    time.sleep(min(1.0, seconds * 0.1))
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    time.sleep(seconds * 0.8)
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    done = sum(r[0] for r in results)
    rate = done / seconds
    return {
        "rps": rate,
        "cpu_us": (cpu1 - cpu0) / (rate * (t1 - t0)) * 1e6 if rate else float("nan"),
        "not_ok": sum(r[1] for r in results),
    }


async def _open_loop(port: int, requests: list[bytes], rate: float, seconds: float) -> list[float]:
    import grpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD, None, None)
        for body in requests[:50]:  # warm the channel and the server's code paths
            await call(body)

        async def one(body: bytes) -> None:
            start = time.perf_counter()
            await call(body)
            latencies.append(time.perf_counter() - start)

        tasks = []
        interval = 1.0 / rate
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            target = start + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(requests[i % len(requests)])))
        await asyncio.gather(*tasks)
    return latencies


def _latency_main(args: tuple[int, list[bytes], float, float, Any]) -> None:
    port, requests, rate, seconds, queue = args
    queue.put(asyncio.run(_open_loop(port, requests, rate, seconds)))


def latency(server: Server, requests: list[bytes], rate: float, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_latency_main, args=((server.port, requests, rate, seconds, queue),))
    proc.start()
    # Server CPU at a fixed offered load: every case sees the same arrival pattern, so this compares the work
    # per Check without the batching effects a saturated server shows.
    time.sleep(1.0 + seconds * 0.1)
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    time.sleep(seconds * 0.7)
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    samples = sorted(queue.get())
    proc.join()
    return {
        "p50_ms": statistics.median(samples) * 1e3,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1e3,
        "cpu_us": (cpu1 - cpu0) / (rate * (t1 - t0)) * 1e6,
    }


# -- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    # Outside the repository: the state holds private signing keys, which must never be committed.
    parser.add_argument("--state", type=Path, default=STATE)
    parser.add_argument("--cache-size", type=int, default=10000, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=4.0, help="closed-loop phase length per case")
    parser.add_argument("--latency-seconds", type=float, default=3.0, help="open-loop phase length per case")
    parser.add_argument("--clients", type=int, default=3, help="closed-loop client processes")
    parser.add_argument("--inflight", type=int, default=8, help="requests in flight per client process")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop Checks per second")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    parser.add_argument("--only", default="", help="comma-separated case names to run")
    parser.add_argument("--no-envoy", action="store_true", help="skip the through-Envoy comparison")
    parser.add_argument("--envoy-only", action="store_true", help="only the through-Envoy comparison")
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    if args.serve:
        _serve(args.serve, args.state, args.cache_size)
        return
    if args.quick:
        args.seconds, args.latency_seconds, args.rounds = 2.0, 2.0, 1

    keys = _keys(args.state)
    now = time.time()
    # Unique-token cases: more distinct tokens than the server's cache holds, cycled in order: LRU never hits.
    unique_cache = 2000
    print("minting tokens ...", file=sys.stderr, flush=True)
    es_tokens = _mint(keys["ES256"], CLIENT_ID, 6000, now)
    rs_tokens = _mint(keys["RS256"], CLIENT_ID, 4000, now)
    cached_token = _mint(keys["ES256"], CLIENT_ID, 1, now)[0]
    cached = [_request(cached_token)]
    denied = [_request(_mint(keys["ES256"], DENIED_ID, 1, now)[0])]
    es = [_request(t) for t in es_tokens]
    rs = [_request(t) for t in rs_tokens]

    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]  # noqa: F401

        have_uvloop = True
    except ImportError:
        have_uvloop = False

    cases: list[tuple[str, str, list[bytes], int]] = [
        ("baseline no-op, threaded server (2 workers)", "noop-sync:2", cached, 10000),
        ("baseline no-op, threaded server (4 workers)", "noop-sync:4", cached, 10000),
        ("baseline no-op, grpc.aio", "noop-aio", cached, 10000),
    ]
    if have_uvloop:
        cases.append(("baseline no-op, grpc.aio + uvloop", "noop-uvloop", cached, 10000))
    cases += [
        ("svidgate threaded (listen.check): cached token", "svidgate-sync", cached, 10000),
        ("svidgate threaded, 4 workers: cached token", "svidgate-sync:4", cached, 10000),
        ("svidgate threaded: unique ES256 tokens", "svidgate-sync", es, unique_cache),
        ("svidgate threaded: unique RS256 tokens", "svidgate-sync", rs, unique_cache),
        ("svidgate threaded: denials (403)", "svidgate-sync", denied, 10000),
        ("svidgate grpc.aio (listen.grpc): cached token", "svidgate-aio", cached, 10000),
        ("svidgate grpc.aio: unique ES256 tokens", "svidgate-aio", es, unique_cache),
    ]
    if args.envoy_only:
        cases = []
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    cases = [c for c in cases if not only or any(o in c[0] for o in only)]
    # Other processes on a small machine make single runs noisy: every case runs `--rounds` times, the cases
    # interleaved, and the table shows medians (latency is measured in the last round).
    tps: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in cases}
    lats: dict[str, dict[str, float]] = {}
    for round_ in range(args.rounds):
        for label, kind, requests, cache_size in cases:
            print(f"round {round_ + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
            server = Server(kind, args.state, cache_size)
            try:
                tps[label].append(throughput(server, requests, args.seconds, args.clients, args.inflight))
                if round_ == args.rounds - 1:
                    lats[label] = latency(server, requests, args.rate, args.latency_seconds)
            finally:
                server.stop()
    rows = [
        (
            label,
            kind,
            {k: statistics.median(t[k] for t in tps[label]) for k in ("rps", "cpu_us", "not_ok")},
            lats[label],
        )
        for label, kind, *_ in cases
    ]
    base_rows = [tp for _, kind, tp, _ in rows if kind.startswith("noop")]
    base = max((tp["rps"] for tp in base_rows), default=float("nan"))
    base_cpu = min((tp["cpu_us"] for tp in base_rows), default=float("nan"))
    print()
    print(
        f"ext_authz Check, {os.cpu_count()} CPUs, {args.clients} clients x {args.inflight} in flight, "
        f"{args.seconds:g}s closed loop, median of {args.rounds} rounds; latency at {args.rate:g}/s "
        f"open loop for {args.latency_seconds:g}s"
    )
    header = (
        f"| {'case':<48} | {'Checks/s':>9} | {'% base':>6} | {'srv CPU/Check':>13} | {'% base CPU':>10} "
        f"| {'p50 ms':>6} | {'p99 ms':>6} | {'CPU/Check @rate':>15} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, _, tp, lat in rows:
        print(
            f"| {label:<48} | {tp['rps']:>9.0f} | {tp['rps'] / base * 100:>5.0f}% | {tp['cpu_us']:>10.0f} us "
            f"| {base_cpu / tp['cpu_us'] * 100:>9.0f}% | {lat['p50_ms']:>6.2f} | {lat['p99_ms']:>6.2f} "
            f"| {lat['cpu_us']:>12.0f} us |"
        )
    print(
        f"\n% base = Checks/s relative to the fastest baseline ({base:.0f}/s); % base CPU = the cheapest "
        f"baseline's server CPU per Check ({base_cpu:.0f} us) relative to this case's (the capacity ratio, "
        "independent of how much CPU the load generators took). CPU/Check = server process, all threads; "
        "@rate: measured during the fixed-rate latency phase."
    )
    bad = [label for label, _, tp, _ in rows if "denials" not in label and tp["not_ok"]]
    if bad:
        print(f"WARNING: non-OK responses in allow cases: {bad}")
    if not args.no_envoy:
        import check_bench_envoy

        tokens = {"cached": [cached_token], "es": es_tokens, "rs": rs_tokens}
        check_bench_envoy.run(args, keys, tokens, lambda kind, size: Server(kind, args.state, size))


if __name__ == "__main__":
    main()
