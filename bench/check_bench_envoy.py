"""The through-Envoy half of bench/check_bench.py: svidgate's ext_authz against Envoy's own jwt_authn.

Three Envoys (``--concurrency 1``) answer every request with a direct 200, so no backend limits the run:
no authorization at all, jwt_authn holding the same keys as an inline JWKS, and ext_authz asking svidgate's
threaded Check server. HTTP/1.1 load comes from raw-socket asyncio clients in separate processes. Reported per
case: requests/s (closed loop), CPU per request of Envoy and of svidgate, and p50/p99 at a fixed rate.

jwt_authn checks signature, ``exp`` and ``aud`` only: it has no notion of trust domains (any key in the JWKS
verifies any ``sub``), no SPIFFE ID policy and no bundle updates from a live source; the comparison is about
cost, not features.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _b64(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def jwks(keys: dict[str, Any]) -> str:
    """The public keys as a JWKS Envoy's jwt_authn reads (``use: sig``; the same `kid`s svidgate uses)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from svidgate.identity.keys import key_id

    entries = []
    for alg, key in keys.items():
        public = key.public_key()
        kid = key_id(public)
        if isinstance(public, ec.EllipticCurvePublicKey):
            nums = public.public_numbers()
            entries.append(
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "x": _b64(nums.x, 32),
                    "y": _b64(nums.y, 32),
                    "kid": kid,
                    "alg": alg,
                    "use": "sig",
                }
            )
        else:
            nums = public.public_numbers()
            entries.append(
                {
                    "kty": "RSA",
                    "n": _b64(nums.n, (nums.n.bit_length() + 7) // 8),
                    "e": _b64(nums.e, 3),
                    "kid": kid,
                    "alg": alg,
                    "use": "sig",
                }
            )
    return json.dumps({"keys": entries})


def http_request(token: str | None) -> bytes:
    lines = [
        "GET /api/v1/orders?limit=10 HTTP/1.1",
        "Host: backend.bench.test:8080",
        "User-Agent: bench",
        "Accept: */*",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _fetch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> int:
    writer.write(body)
    status = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return int(status[9:12])


async def _closed(port: int, requests: list[bytes], seconds: float, conns: int) -> tuple[int, dict[int, int]]:
    deadline = time.monotonic() + seconds
    done = 0
    statuses: dict[int, int] = {}
    index = 0

    async def worker() -> None:
        nonlocal done, index
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline:
            body = requests[index % len(requests)]
            index += 1
            status = await _fetch(reader, writer, body)
            statuses[status] = statuses.get(status, 0) + 1
            done += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return done, statuses


def _closed_main(args: tuple[int, list[bytes], float, int, Any]) -> None:
    port, requests, seconds, conns, queue = args
    queue.put(asyncio.run(_closed(port, requests, seconds, conns)))


async def _open(port: int, requests: list[bytes], rate: float, seconds: float) -> list[float]:
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []

    async def one(body: bytes) -> None:
        conn = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
        start = time.perf_counter()
        await _fetch(conn[0], conn[1], body)
        latencies.append(time.perf_counter() - start)
        idle.append(conn)

    for body in requests[:20]:
        await one(body)
    latencies.clear()
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(requests[i % len(requests)])))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return latencies


def _open_main(args: tuple[int, list[bytes], float, float, Any]) -> None:
    port, requests, rate, seconds, queue = args
    queue.put(asyncio.run(_open(port, requests, rate, seconds)))


def _cpu(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, pids: list[int], requests: list[bytes], args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    slices = (
        [requests[i :: args.clients] for i in range(args.clients)]
        if len(requests) >= args.clients
        else [requests] * args.clients
    )
    procs = [
        ctx.Process(target=_closed_main, args=((port, s, args.seconds, args.inflight, queue),))
        for s in slices
    ]
    for proc in procs:
        proc.start()
    time.sleep(min(1.0, args.seconds * 0.1))
    cpu0, t0 = [_cpu(p) for p in pids], time.monotonic()
    time.sleep(args.seconds * 0.8)
    cpu1, t1 = [_cpu(p) for p in pids], time.monotonic()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    done = sum(r[0] for r in results)
    statuses: dict[int, int] = {}
    for _, s in results:
        for k, v in s.items():
            statuses[k] = statuses.get(k, 0) + v
    rate = done / args.seconds
    cpu_us = [(b - a) / (rate * (t1 - t0)) * 1e6 for a, b in zip(cpu0, cpu1, strict=True)]
    proc = ctx.Process(target=_open_main, args=((port, requests, args.rate, args.latency_seconds, queue),))
    proc.start()
    samples = sorted(queue.get())
    proc.join()
    return {
        "rps": rate,
        "cpu_us": cpu_us,
        "statuses": statuses,
        "p50_ms": statistics.median(samples) * 1e3,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1e3,
    }


def run(args: Any, keys: dict[str, Any], tokens: dict[str, list[str]], server_factory: Any) -> None:
    """Run the through-Envoy cases and print their table."""
    sys.path.insert(0, str(ROOT))
    from tests.support.envoy import EnvoyProcess, render_template

    work = args.state / "envoy"
    work.mkdir(parents=True, exist_ok=True)
    cases = [
        ("no auth (floor)", "none", "cached"),
        ("jwt_authn: one token", "jwt", "cached"),
        ("jwt_authn: unique ES256 tokens", "jwt", "es"),
        ("jwt_authn: unique RS256 tokens", "jwt", "rs"),
        ("ext_authz->svidgate: one (cached) token", "svidgate", "cached"),
        ("ext_authz->svidgate: unique ES256 tokens", "svidgate", "es"),
        ("ext_authz->svidgate: unique RS256 tokens", "svidgate", "rs"),
    ]
    rows = []
    for label, kind, token_set in cases:
        print(f"envoy: {label} ...", file=sys.stderr, flush=True)
        requests = [http_request(t) for t in tokens[token_set]]
        server = None
        if kind == "none":
            config = (HERE / "envoy" / "none.yaml").read_text()
        elif kind == "jwt":
            config = render_template(HERE / "envoy" / "jwt-authn.yaml", jwks=jwks(keys))
        else:
            server = server_factory("svidgate-sync", 2000 if token_set != "cached" else 10000)
            config = render_template(HERE / "envoy" / "ext-authz.yaml", svidgate_port=server.port)
        envoy = EnvoyProcess(config, work, name=kind, log_level="warning")
        try:
            envoy.start()
            envoy.wait_ready()
            port = envoy.listener_port("ingress")
            pids = [envoy.pid] + ([server.proc.pid] if server is not None else [])
            rows.append((label, measure(port, pids, requests, args)))
        finally:
            envoy.stop()
            if server is not None:
                server.stop()
    print()
    print(
        f"Through Envoy (--concurrency 1, direct 200 response): {args.clients} clients x {args.inflight} "
        f"keep-alive connections, {args.seconds:g}s closed loop; latency at {args.rate:g}/s open loop"
    )
    header = (
        f"| {'case':<42} | {'req/s':>6} | {'Envoy CPU/req':>13} | {'svidgate CPU/req':>16} "
        f"| {'p50 ms':>6} | {'p99 ms':>6} | statuses |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for label, r in rows:
        svid_cpu = f"{r['cpu_us'][1]:>13.0f} us" if len(r["cpu_us"]) > 1 else f"{'-':>16}"
        print(
            f"| {label:<42} | {r['rps']:>6.0f} | {r['cpu_us'][0]:>10.0f} us | {svid_cpu} "
            f"| {r['p50_ms']:>6.2f} | {r['p99_ms']:>6.2f} | {r['statuses']} |"
        )
