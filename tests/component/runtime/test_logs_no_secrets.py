"""A full server with traffic that carries keys and tokens everywhere; its logs must contain none of them.

Traffic: SDS streams (SVID private keys pushed; a NACK whose error_detail quotes a key and a token), Workload
API calls (X.509-SVID keys, JWT-SVIDs issued, ValidateJWTSVID), Check calls with valid, tampered and missing
tokens and a token in the query string, a rejected reload. Logging runs at debug level, JSON and logfmt.
Then every captured line is searched for PEM private key markers, the exact tokens (and their signatures),
and the base64 (standard and URL-safe, whole and PEM-line) of every private key involved: the SVIDs' and the
CA's.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from svidgate._gen import workload_pb2, workload_pb2_grpc
from svidgate.logs import LogFormat, configure_logging
from tests.support.runtime import (
    AUDIENCE,
    WORKLOAD_HEADER,
    Layout,
    SdsStream,
    check,
    fetch_jwt_svid,
    sds_request,
    tcp_grpc_target,
    workload_channel,
    write_config,
)
from tests.support.server import running_server


@pytest.fixture
def layout(layout: Layout) -> Layout:
    """The shared layout (tests/component/conftest.py), logging at debug level."""
    write_config(layout, log_level="debug")
    return layout


def _key_der(pem_or_der: bytes) -> bytes:
    if pem_or_der.lstrip().startswith(b"-----"):
        key = serialization.load_pem_private_key(pem_or_der, None)
    else:
        key = serialization.load_der_private_key(pem_or_der, None)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _needles_for_key(der: bytes) -> set[str]:
    """Every way a key could show up in text: base64 and URL-safe base64 (whole, padded or not), and each
    full 64-character line of its PEM body."""
    b64 = base64.b64encode(der).decode()
    urlsafe = base64.urlsafe_b64encode(der).decode()
    needles = {b64, b64.rstrip("="), urlsafe, urlsafe.rstrip("="), der.hex()}
    pem = base64.encodebytes(der).decode().splitlines()
    needles.update(line for line in pem if len(line) >= 64)
    return needles


def _ca_keys(state_dir: Path) -> list[bytes]:
    state = json.loads((state_dir / "ca" / "ca.json").read_text())
    keys = []
    for authority in state["authorities"]:
        for name in ("private_key", "jwt_private_key"):
            if name in authority:
                keys.append(_key_der(authority[name].encode()))
    assert keys, "the CA state file format changed: update this test"
    return keys


@pytest.mark.parametrize("log_format", ["json", "logfmt"])
async def test_no_key_material_or_token_in_the_logs_of_a_full_run(
    layout: Layout, log_format: LogFormat
) -> None:
    captured = io.StringIO()
    handler = configure_logging(log_format, "debug", captured)
    keys: list[bytes] = []
    tokens: list[str] = []
    try:
        async with (
            running_server(layout.config) as server,
            grpc.aio.insecure_channel(f"unix:{layout.sds_socket}") as sds_channel,
            grpc.aio.insecure_channel(tcp_grpc_target(server)) as tcp_channel,
            workload_channel(layout) as wl_channel,
        ):
            # Workload API: a JWT-SVID per audience, the X.509-SVID with its key, and a validation.
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(wl_channel)
            tokens.append(await fetch_jwt_svid(wl_channel, AUDIENCE))
            tokens.append(await fetch_jwt_svid(wl_channel, "other-audience"))
            x509_call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=WORKLOAD_HEADER)
            x509 = await x509_call.read()
            x509_call.cancel()
            keys.append(_key_der(x509.svids[0].x509_svid_key))
            await stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid=tokens[0]),
                metadata=WORKLOAD_HEADER,
            )
            with pytest.raises(grpc.aio.AioRpcError):  # wrong audience: logged as a failure
                await stub.ValidateJWTSVID(
                    workload_pb2.ValidateJWTSVIDRequest(audience="nobody", svid=tokens[1]),
                    metadata=WORKLOAD_HEADER,
                )

            # SDS: the SVID with its private key; then a NACK that (adversarially) quotes the key and a token.
            stream = SdsStream(sds_channel)
            stream.send(sds_request("web", ["default", "ROOTCA"]))
            response = await stream.receive()
            for resource in response.resources:
                secret = secret_pb2.Secret()
                resource.Unpack(secret)
                if secret.HasField("tls_certificate"):
                    source = secret.tls_certificate.private_key
                    keys.append(_key_der(source.inline_bytes or source.inline_string.encode()))
            pem = serialization.load_der_private_key(keys[-1], None).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            stream.send(
                sds_request(
                    "web",
                    ["default", "ROOTCA"],
                    nonce=response.nonce,
                    error=f"cannot load {pem.decode()} with token {tokens[0]}",
                )
            )
            stream.send(sds_request("web", ["default", "ROOTCA", f"spiffe://example.org/{tokens[1][:40]}"]))

            # Check: valid, tampered, missing, oddly placed tokens.
            good = tokens[0]
            tampered = good[:-8] + ("A" * 8 if not good.endswith("A" * 8) else "B" * 8)
            assert (await check(tcp_channel, "/api/orders", good)).status.code == 0
            assert (await check(tcp_channel, "/api/orders", tampered)).status.code != 0
            assert (await check(tcp_channel, "/api/orders", tokens[1])).status.code != 0  # wrong audience
            assert (await check(tcp_channel, f"/api/orders?access_token={good}", None)).status.code != 0
            assert (await check(tcp_channel, "/nowhere", good)).status.code != 0
            tokens.append(tampered)

            # A reload that fails on a value that is a token.
            text = layout.config.read_text()
            layout.config.write_text(text.replace("audiences: [backend]", f"audiences: [{good}, 7]", 1))
            assert not await server.reload("test")
            layout.config.write_text(text)

            stream.close_requests()
            stream.call.cancel()

            keys.extend(_ca_keys(layout.state))
    finally:
        logging.getLogger().removeHandler(handler)

    text = captured.getvalue()
    lines = text.splitlines()
    # The run logged what it should (so the search below searched something).
    for event in ("server.started", "sds.nack", "authz.decision", "config.reload_rejected", "server.stopped"):
        assert event in text, f"no {event} line was logged"
    assert len(lines) > 20

    assert "PRIVATE KEY" not in text.replace("[REDACTED-PRIVATE-KEY]", "")
    for token in tokens:
        assert token not in text
        header, payload, signature = token.split(".")
        assert signature not in text
        assert f"{header}.{payload}" not in text
    for key in keys:
        for needle in _needles_for_key(key):
            assert needle not in text, "a private key (or a line of it) was logged"
    # Every line is one well-formed record.
    if log_format == "json":
        for line in lines:
            json.loads(line)
