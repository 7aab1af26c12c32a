"""Micro-benchmark: the cost of validating one JWT-SVID, and where it goes.

    .venv/bin/python bench/jwt_verify.py [--number 2000] [--repeat 7]

Prints a table of microseconds per operation (best of `repeat` runs of `number` calls each, one core). It
compares svidgate's validation per algorithm, its parse-only cost, its signature step against pyjwt's for the
same step (the reason svidgate does signatures with `cryptography` directly), and two looser references:
`jwt.decode` and py-spiffe's `JwtSvid.parse_and_validate`.
"""

from __future__ import annotations

import argparse
import platform
import time
import timeit
from collections.abc import Callable

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from jwt.algorithms import ECAlgorithm

from svidgate.identity import jwtsvid
from svidgate.identity.bundle import Bundle
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
SUB = SpiffeId.parse("spiffe://example.org/web")
AUD = "backend"


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    fn()  # warm up (and fail loudly before timing if the call is broken)
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    keys: dict[str, tuple[str, PrivateKeyTypes]] = {
        "ES256": ("k-p256", ec.generate_private_key(ec.SECP256R1())),
        "ES384": ("k-p384", ec.generate_private_key(ec.SECP384R1())),
        "ES512": ("k-p521", ec.generate_private_key(ec.SECP521R1())),
        "RS256": ("k-rsa", rsa.generate_private_key(65537, 2048)),
    }
    bundles = {TD: Bundle(TD, jwt_authorities={kid: k.public_key() for kid, k in keys.values()})}
    # time.time() and not a fixed instant: the py-spiffe reference checks exp against the wall clock.
    now = time.time()
    tokens = {
        alg: jwtsvid.mint_jwt_svid(SUB, [AUD], private_key, kid, ttl=3600, now=now)
        for alg, (kid, private_key) in keys.items()
    }
    es256 = tokens["ES256"]
    p256_key = keys["ES256"][1]
    assert isinstance(p256_key, ec.EllipticCurvePrivateKey)
    p256_public = p256_key.public_key()
    parsed = jwtsvid._parse(es256, jwtsvid.DEFAULT_MAX_TOKEN_BYTES)
    pyjwt_es256 = ECAlgorithm(ECAlgorithm.SHA256)

    rows: list[tuple[str, Callable[[], object]]] = [
        *(
            (
                f"svidgate validate_jwt_svid {alg}",
                lambda t=token: jwtsvid.validate_jwt_svid(t, bundles, [AUD], now),
            )
            for alg, token in tokens.items()
        ),
        ("svidgate parse only (no signature) ES256", lambda: jwtsvid.parse_jwt_svid_insecure(es256)),
        (
            "signature step: svidgate (cryptography) ES256",
            lambda: jwtsvid._verify_signature(parsed, p256_public),
        ),
        (
            "signature step: pyjwt ECAlgorithm.verify ES256",
            lambda: pyjwt_es256.verify(parsed.signing_input, p256_public, parsed.signature),
        ),
        (
            "reference: jwt.decode ES256 (looser)",
            lambda: pyjwt.decode(es256, p256_public, ["ES256"], audience=AUD),
        ),
    ]
    try:
        from spiffe import JwtBundle, JwtSvid
        from spiffe import TrustDomain as PyTrustDomain

        py_bundle = JwtBundle(PyTrustDomain("example.org"), {"k-p256": p256_public})
        rows.append(
            (
                "reference: py-spiffe parse_and_validate ES256",
                lambda: JwtSvid.parse_and_validate(es256, py_bundle, {AUD}),
            )
        )
    except ImportError:  # py-spiffe is a test dependency only
        pass

    print(f"# JWT-SVID validation, {platform.python_implementation()} {platform.python_version()}, ", end="")
    print(f"best of {args.repeat} x {args.number} calls")
    print(f"| {'operation':<50} | {'us/op':>8} |")
    print(f"|{'-' * 52}|{'-' * 10}|")
    for name, fn in rows:
        print(f"| {name:<50} | {best_us(fn, args.number, args.repeat):8.1f} |")


if __name__ == "__main__":
    main()
