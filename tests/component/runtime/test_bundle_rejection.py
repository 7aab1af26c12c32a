"""A rejected partner bundle update leaves a running server serving the last good bundle (issue 9 item 5).

A whole svidgate in-process (built-in CA, a federated trust domain from a bundle file, Check and SDS on real
gRPC listeners, `/metrics` over HTTP), driven by a FakeClock: the test advances it and steps the source.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from prometheus_client import CollectorRegistry

from svidgate.config import load_config
from svidgate.identity.bundle import public_key_to_jwk, spiffe_bundle_json
from svidgate.identity.clock import FakeClock
from svidgate.identity.spiffe_id import TrustDomain
from svidgate.runtime.server import Server
from tests.support.ca import NOW, TestCA
from tests.support.files import replace_file
from tests.support.runtime import (
    AUDIENCE,
    Layout,
    check,
    scrape,
    sds_request,
    tcp_grpc_target,
    value,
    write_config,
)

PARTNER = "partner.test"
PARTNER_CLIENT = "spiffe://partner.test/client"


async def test_rejected_partner_update_keeps_check_and_sds_on_the_last_good_bundle(layout: Layout) -> None:
    partner = TestCA(PARTNER)
    bundle_file = layout.root / "partner.json"
    replace_file(bundle_file, spiffe_bundle_json(partner.bundle()))
    write_config(
        layout,
        allow=(PARTNER_CLIENT,),
        extra=f"federation:\n  {PARTNER}: {{bundle_file: {bundle_file}}}\nsource: {{poll_interval: 5s}}\n",
    )
    clock = FakeClock(NOW)
    server = Server(load_config(layout.config), layout.config, registry=CollectorRegistry(), clock=clock)
    await server.start()
    try:
        assert server.source is not None
        port = server.http_port
        assert port is not None
        async with grpc.aio.insecure_channel(tcp_grpc_target(server)) as channel:
            token = partner.create_jwt_svid(PARTNER_CLIENT, AUDIENCE)
            assert (await check(channel, "/api/orders", token)).status.code == 0

            # The reported case: the partner's file now holds one RSA-1024 JWT key and nothing else. Applied,
            # it dropped the good keys (tokens 401 unknown_key) for a key that can never verify.
            weak = rsa.generate_private_key(65537, 1024).public_key()  # noqa: S505 - the weak key under test
            doc = {"keys": [{"use": "jwt-svid", "kid": "weak", **public_key_to_jwk(weak)}]}
            replace_file(bundle_file, json.dumps(doc).encode())
            clock.advance(5)
            # The partner's own task reads the file (now, rather than at its next poll); nothing is published.
            version = server.source.feed.current().version
            federation = getattr(server.source, "federation", None)
            assert federation is not None
            federation.fetch_now(TrustDomain(PARTNER))
            rejected = {"trust_domain": PARTNER, "reason": "no_usable_authority"}
            deadline = time.monotonic() + 10
            while ("svidgate_bundle_updates_rejected_total", tuple(sorted(rejected.items()))) not in (
                await scrape(port)
            ):
                assert time.monotonic() < deadline, "the rejected update was never counted"
                await asyncio.sleep(0.02)
            assert server.source.feed.current().version == version

            # A token the validated-token cache has never seen: checked against the bundle held now.
            fresh = partner.create_jwt_svid(PARTNER_CLIENT, AUDIENCE, ttl=600)
            response = await check(channel, "/api/orders", fresh)
            assert response.status.code == 0, response.denied_response
            # Envoys keep validating partner.test's X.509-SVIDs against its real root.
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            served = await stub.FetchSecrets(sds_request("web", [f"spiffe://{PARTNER}"]), timeout=10)
            assert _roots(served.resources[0]) == [partner.certificate]
            samples = await scrape(port)
            assert (
                value(
                    samples,
                    "svidgate_bundle_updates_rejected_total",
                    trust_domain=PARTNER,
                    reason="no_usable_authority",
                )
                == 1
            )
    finally:
        await server.stop("test")


def _roots(resource: object) -> list[x509.Certificate]:
    secret = secret_pb2.Secret()
    assert resource.Unpack(secret)  # type: ignore[attr-defined]
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert secret.validation_context.custom_validator_config.typed_config.Unpack(config)
    (trust_domain,) = config.trust_domains
    return x509.load_pem_x509_certificates(trust_domain.trust_bundle.inline_bytes)
