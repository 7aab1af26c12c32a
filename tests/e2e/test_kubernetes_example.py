"""envoy-examples/kubernetes: the manifests are valid, and the DaemonSet's svidgate starts on a fresh node.

The node is simulated in private mount/net/PID namespaces: the hostPaths are what the kubelet makes of
``DirectoryOrCreate`` (root-owned, 0755), the Secret and the ConfigMap are files as the kubelet mounts them,
the init container's command (read from daemonset.yaml) runs as root, and svidgate runs as the DaemonSet's
uid/gid 10001 with the ConfigMap's configuration, unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from svidgate.config import parse_config, parse_duration
from svidgate.identity.entitlement import CallerInfo, KubernetesWorkload, entitle
from tests.support.ca import TestCA
from tests.support.examples import EXAMPLES, log_tail, run_in_namespaces

pytestmark = pytest.mark.e2e

K8S = EXAMPLES / "kubernetes"

# A fresh node: hostPaths as the kubelet creates them, the Secret and the ConfigMap as it mounts them.
_NODE = """\
set -e
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/lib
ip link set lo up
install -d -o 0 -g 0 -m 0755 /run/svidgate /var/lib/svidgate
install -d -m 0755 /run/secrets/svidgate/upstream /run/configmap
printf '%s' "$ROOT_CERT" > /run/secrets/svidgate/upstream/tls.crt
printf '%s' "$ROOT_KEY" > /run/secrets/svidgate/upstream/tls.key
chgrp 10001 /run/secrets/svidgate/upstream/tls.crt /run/secrets/svidgate/upstream/tls.key
chmod 0440 /run/secrets/svidgate/upstream/tls.crt /run/secrets/svidgate/upstream/tls.key
printf '%s' "$CONFIG" > /run/configmap/config.yaml
exec bash -e -c "$EXAMPLE_SCRIPT"
"""

_SVIDGATE = (
    'setpriv --reuid 10001 --regid 10001 --clear-groups -- "$EXAMPLE_VENV/bin/svidgate" serve '
    "--config /run/configmap/config.yaml"
)


def manifests(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def node_env() -> dict[str, str]:
    (daemonset,) = (d for d in manifests("daemonset.yaml") if d["kind"] == "DaemonSet")
    (init,) = daemonset["spec"]["template"]["spec"]["initContainers"]
    (configmap,) = manifests("configmap.yaml")
    now = time.time()
    root = TestCA("example.org", not_before=now - 60, not_after=now + 86400)
    return {
        "CONFIG": configmap["data"]["config.yaml"],
        # The init container's command, word for word, quoted for bash.
        "INIT": " ".join(f"'{word}'" for word in init["command"]),
        "ROOT_CERT": root.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        "ROOT_KEY": root.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    }


def test_manifests_validate_against_the_kubernetes_schema() -> None:
    files = sorted(str(path) for path in K8S.glob("*.yaml"))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_the_init_step_svidgate_cannot_use_the_root_owned_hostpath() -> None:
    # The crash loop this example used to ship: the reason the init container exists.
    run = run_in_namespaces(f"! {_SVIDGATE} 2>/tmp/err; cat /tmp/err", prelude=_NODE, env=node_env())
    assert run.returncode == 0, run.stdout + run.stderr
    # svidgate refuses to start (the `!` above) with one line naming the root-owned hostPath.
    (error,) = [line for line in run.stdout.splitlines() if line.startswith("svidgate: error:")]
    assert "/var/lib/svidgate" in error or "/run/svidgate" in error, error


def test_the_daemonset_starts_on_a_node_with_root_owned_hostpaths() -> None:
    script = f"""
eval "$INIT"                                    # the init container, as root
{_SVIDGATE} 2>/tmp/svidgate.log &
curl -sf --retry 30 --retry-connrefused --retry-delay 1 http://127.0.0.1:8082/readyz
stat -c '%n %u:%g %a' /run/svidgate/svidgate.sock /var/lib/svidgate/ca/ca.json
kill %1
wait %1
"""
    run = run_in_namespaces(script, prelude=_NODE, env=node_env())
    assert run.returncode == 0, run.stdout + log_tail(run.stderr)
    lines = run.stdout.splitlines()
    assert json.loads(lines[0])["ready"] is True, run.stdout
    assert lines[1:] == [
        "/run/svidgate/svidgate.sock 10001:10001 660",
        "/var/lib/svidgate/ca/ca.json 10001:10001 600",
    ]


def test_the_configmap_config_loads() -> None:
    # check-config on the ConfigMap's file, with the Secret's files where the DaemonSet mounts them.
    run = run_in_namespaces(
        'cd /tmp && "$EXAMPLE_VENV/bin/svidgate" check-config /run/configmap/config.yaml',
        prelude=_NODE,
        env=node_env(),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("OK: /run/configmap/config.yaml:"), run.stdout


def test_the_daemonset_mounts_what_the_configmap_names() -> None:
    config = yaml.safe_load(manifests("configmap.yaml")[0]["data"]["config.yaml"])
    (daemonset,) = (d for d in manifests("daemonset.yaml") if d["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["serve", "--config", "/etc/svidgate/config.yaml"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config["listen"]["grpc"] == ["unix:///run/svidgate/svidgate.sock"]
    assert {"/run/svidgate", config["state_dir"], "/etc/svidgate", "/tmp"} <= mounts
    upstream = config["ca"]["upstream"]
    assert {str(Path(upstream["cert_file"]).parent), str(Path(upstream["key_file"]).parent)} <= mounts
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert (
        parse_duration(config["server"]["drain_grace"], "drain_grace") < pod["terminationGracePeriodSeconds"]
    )
    # The init step owns exactly the hostPaths svidgate writes to.
    (init,) = pod["initContainers"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/run/svidgate", config["state_dir"]}


def test_the_daemonset_can_attest_pods() -> None:
    """hostPID (SO_PEERCRED PIDs and /proc/<pid>/cgroup are the node's), the host network (the kubelet on
    127.0.0.1:10250), and a service account allowed `get nodes/proxy` (the kubelet's GET /pods)."""
    documents = manifests("daemonset.yaml")
    (daemonset,) = (d for d in documents if d["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["hostNetwork"] is True
    account = pod["serviceAccountName"]
    namespace = daemonset["metadata"]["namespace"]
    assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == account for d in documents)
    roles = {d["metadata"]["name"]: d for d in documents if d["kind"] == "ClusterRole"}
    (binding,) = (d for d in documents if d["kind"] == "ClusterRoleBinding")
    assert {"kind": "ServiceAccount", "name": account, "namespace": namespace} in binding["subjects"]
    rules = roles[binding["roleRef"]["name"]]["rules"]
    assert any("nodes/proxy" in r["resources"] and "get" in r["verbs"] for r in rules)
    config = yaml.safe_load(manifests("configmap.yaml")[0]["data"]["config.yaml"])
    assert config["kubernetes"]["kubelet_url"] == "https://127.0.0.1:10250"
    assert config["listen"]["check"] is None  # no TCP port on the node's network


def test_the_configmap_gives_each_pod_in_default_its_mesh_identity() -> None:
    document = yaml.safe_load(manifests("configmap.yaml")[0]["data"]["config.yaml"])
    del document["ca"]  # its Secret's files exist on the node only; the workloads are what this is about
    config = parse_config(yaml.safe_dump(document))
    assert config.attests_kubernetes
    assert any("kubelet_insecure_skip_verify" in warning for warning in config.warnings())

    def ids(namespace: str, service_account: str) -> list[str]:
        pod = KubernetesWorkload(namespace, service_account, "p", "uid", "node-1", "envoy")
        return [str(i) for i in entitle(config.workloads, CallerInfo(uid=1337, pid=7, k8s=pod)).ids]

    assert ids("default", "frontend") == ["spiffe://example.org/ns/default/sa/frontend"]
    assert ids("default", "backend") == ["spiffe://example.org/ns/default/sa/backend"]
    assert ids("kube-system", "frontend") == []  # another namespace
    assert [str(i) for i in entitle(config.workloads, CallerInfo(uid=1337, pid=7)).ids] == []  # not attested
