"""`kubernetes:`, `k8s:` selectors and templated workload IDs in the configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from svidgate.config import DEFAULT_K8S_CA_FILE, DEFAULT_K8S_TOKEN_FILE, parse_config
from svidgate.errors import ConfigError
from svidgate.identity.template import SpiffeIdTemplate

TEMPLATED = """\
trust_domain: example.org
workloads:
  - spiffe_id: "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}"
    selectors: [k8s:ns:default]
"""


def test_defaults_are_the_in_cluster_ones() -> None:
    config = parse_config(TEMPLATED)
    k8s = config.kubernetes
    assert config.attests_kubernetes
    assert k8s.kubelet_url == "https://127.0.0.1:10250"
    assert k8s.token_file == DEFAULT_K8S_TOKEN_FILE
    assert k8s.kubelet_ca_file == DEFAULT_K8S_CA_FILE
    assert k8s.kubelet_insecure_skip_verify is False
    assert k8s.proc_root == Path("/proc")
    assert isinstance(config.workloads[0].spiffe_id, SpiffeIdTemplate)
    assert config.workloads[0].templated
    assert not parse_config("trust_domain: example.org\n").attests_kubernetes


def test_kubernetes_section(tmp_path: Path) -> None:
    config = parse_config(
        TEMPLATED
        + "kubernetes:\n  kubelet_url: https://node-1:10250/\n  token_file: t\n  kubelet_ca_file: ca.pem\n"
        "  proc_root: /host/proc\n  pod_cache_ttl: 2s\n  attest_timeout: 500ms\n",
        base_dir=tmp_path,
    )
    k8s = config.kubernetes
    assert (k8s.kubelet_url, k8s.token_file, k8s.kubelet_ca_file) == (
        "https://node-1:10250",
        tmp_path / "t",
        tmp_path / "ca.pem",
    )
    assert (k8s.proc_root, k8s.pod_cache_ttl, k8s.attest_timeout) == (Path("/host/proc"), 2.0, 0.5)
    assert config.warnings() == ()


def test_k8s_selectors_without_a_unix_listener_are_warned() -> None:
    config = parse_config(TEMPLATED + "listen: {grpc: [tcp://127.0.0.1:0], workload_api: null}\n")
    assert any("only match callers on unix sockets" in w for w in config.warnings())


def test_skipping_kubelet_verification_is_explicit_and_warned() -> None:
    config = parse_config(TEMPLATED + "kubernetes: {kubelet_insecure_skip_verify: true}\n")
    assert config.kubernetes.kubelet_ca_file is None
    assert any("kubelet_insecure_skip_verify" in w for w in config.warnings())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/ns/{k8s:ns}', selectors: ['unix:uid:1']}]\n",
            "workloads[0].selectors: a templated spiffe_id needs at least one k8s: selector",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/ns/{k8s:namespace}', "
            "selectors: ['k8s:ns:a']}]\n",
            "workloads[0].spiffe_id: 'spiffe://svidgate.local/ns/{k8s:namespace}': unknown placeholder",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://other.org/ns/{k8s:ns}', selectors: ['k8s:ns:a']}]\n",
            "is not in the trust domain svidgate.local",
        ),
        (
            "source: {kind: spire, spire_socket: /run/spire.sock}\n"
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/ns/{k8s:ns}', selectors: ['k8s:ns:a']}]\n",
            "workloads[0].spiffe_id: a templated SPIFFE ID needs source.kind: builtin",
        ),
        (
            "source: {kind: files, cert_file: c, key_file: k, bundle_file: b}\n"
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/ns/{k8s:ns}', selectors: ['k8s:ns:a']}]\n",
            "the files source cannot mint it",
        ),
        (
            "kubernetes: {kubelet_url: 'http://127.0.0.1:10255'}\n",
            "kubernetes.kubelet_url: expected https://",
        ),
        (
            "kubernetes: {kubelet_ca_file: ca.pem, kubelet_insecure_skip_verify: true}\n",
            "kubernetes.kubelet_ca_file: set either kubelet_ca_file or kubelet_insecure_skip_verify",
        ),
        ("kubernetes: {pod_cache_ttl: soon}\n", "kubernetes.pod_cache_ttl: 'soon' is not a duration"),
        ("kubernetes: {attest_timeout: 0}\n", "kubernetes.attest_timeout"),
        ("kubernetes: {kubelet: x}\n", "kubernetes.kubelet"),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/a', selectors: ['k8s:pod-label:app']}]\n",
            "k8s:pod-label takes <label key>:<label value>",
        ),
    ],
)
def test_bad_kubernetes_config_names_the_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)


def test_inject_mode_names_a_static_identity_only() -> None:
    text = """\
trust_domain: example.org
listen: {grpc: [unix:///run/s.sock]}
workloads:
  - spiffe_id: "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}"
    selectors: [k8s:ns:default]
authz:
  policies:
    - name: out
      mode: inject
      match: {path_prefix: /}
      audiences: [x]
"""
    with pytest.raises(ConfigError, match="inject_spiffe_id: required with mode: inject"):
        parse_config(text)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        # Absent is the mounted cluster CA; null does not turn verification off (as before the schema model).
        ("{kubelet_ca_file: null}", "kubernetes.kubelet_ca_file: expected a string, got null"),
        ("{kubelet_ca_file: null, kubelet_insecure_skip_verify: true}", "set either kubelet_ca_file or"),
    ],
)
def test_kubelet_ca_file_null_is_refused(section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(TEMPLATED + f"kubernetes: {section}\n")
