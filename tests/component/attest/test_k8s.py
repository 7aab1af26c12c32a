"""Kubernetes attestation for real: processes in kubelet-named cgroups, a kubelet over verified HTTPS.

Each test moves a real process into a cgroup named as the kubelet names a pod container's (both drivers,
cgroup v1 and v2), serves a PodList from `FakeKubelet` (bearer token checked, TLS verified through
`kubelet_ca_file`) and asks `KubernetesAttestor` who the process is.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from svidgate.attest.k8s import KubernetesAttestor
from svidgate.config import KubernetesConfig
from svidgate.identity.entitlement import CallerInfo
from svidgate.metrics import Metrics
from tests.support.k8s import V1_HIERARCHY, FakeKubelet, PodCgroup, pod, skip_reason_for, v2_hierarchy
from tests.support.tempdir import short_dir

V2 = v2_hierarchy()
_V1_SKIP = skip_reason_for(V1_HIERARCHY)
_V2_SKIP = skip_reason_for(V2)


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    with short_dir("sgk-") as directory, FakeKubelet(directory) as kubelet:
        yield kubelet


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def k8s_config(kubelet: FakeKubelet, **changes: object) -> KubernetesConfig:
    config = KubernetesConfig(
        kubelet_url=kubelet.url,
        token_file=kubelet.token_file,
        kubelet_ca_file=kubelet.ca_file,
        pod_cache_ttl=5.0,
        attest_timeout=3.0,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def attestor(kubelet: FakeKubelet, **changes: object) -> tuple[KubernetesAttestor, Metrics]:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    return KubernetesAttestor(k8s_config(kubelet, **changes), metrics.attest), metrics


def result_count(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("svidgate_k8s_attestations_total", {"result": result}) or 0.0


def caller_of(proc: subprocess.Popen[bytes]) -> CallerInfo:
    return CallerInfo(uid=0, gid=0, pid=proc.pid)


@pytest.mark.parametrize(
    ("hierarchy", "skip", "driver", "runtime"),
    [
        pytest.param(V1_HIERARCHY, _V1_SKIP, "cgroupfs", "containerd", id="v1-cgroupfs-containerd"),
        pytest.param(V2, _V2_SKIP, "systemd", "containerd", id="v2-systemd-containerd"),
        pytest.param(V1_HIERARCHY, _V1_SKIP, "systemd", "cri-o", id="v1-systemd-crio"),
    ],
)
async def test_process_in_a_pod_container_is_attested(
    kubelet: FakeKubelet,
    sleeper: subprocess.Popen[bytes],
    hierarchy: Path,
    skip: str | None,
    driver: str,
    runtime: str,
) -> None:
    if skip is not None:
        pytest.skip(skip)
    with PodCgroup(hierarchy, driver, runtime) as cgroup:
        cgroup.add(sleeper.pid)
        kubelet.pods = [
            pod(uid="0" * 8 + "-0000-0000-0000-" + "0" * 12, name="other", containers=[("c", "i", "f" * 64)]),
            pod(
                uid=cgroup.pod_uid,
                name="frontend-7d4b9",
                namespace="shop",
                service_account="frontend",
                labels={"app": "frontend"},
                containers=[("envoy", "envoyproxy/envoy:v1.31", cgroup.container_id)],
                runtime=runtime,
            ),
        ]
        attest, metrics = attestor(kubelet)
        caller = await attest.attest(caller_of(sleeper))
    assert caller.k8s is not None
    assert (caller.k8s.namespace, caller.k8s.service_account, caller.k8s.pod_name) == (
        "shop",
        "frontend",
        "frontend-7d4b9",
    )
    assert (caller.k8s.pod_uid, caller.k8s.container_name, caller.k8s.node_name) == (
        cgroup.pod_uid,
        "envoy",
        "node-1",
    )
    assert ("app", "frontend") in caller.k8s.labels
    assert "envoyproxy/envoy:v1.31" in caller.k8s.container_images
    assert caller.pid == sleeper.pid
    assert result_count(metrics, "attested") == 1


@pytest.mark.skipif(_V1_SKIP is not None, reason=_V1_SKIP or "")
async def test_init_container_is_matched_too(kubelet: FakeKubelet, sleeper: subprocess.Popen[bytes]) -> None:
    with PodCgroup(V1_HIERARCHY) as cgroup:
        cgroup.add(sleeper.pid)
        kubelet.pods = [
            pod(
                uid=cgroup.pod_uid,
                name="job",
                containers=[("main", "app:1", "e" * 64)],
                init_containers=[("setup", "setup:1", cgroup.container_id)],
            )
        ]
        caller = await attestor(kubelet)[0].attest(caller_of(sleeper))
    assert caller.k8s is not None
    assert caller.k8s.container_name == "setup"


async def test_process_outside_any_pod_is_not_attested(
    kubelet: FakeKubelet, sleeper: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    attest, metrics = attestor(kubelet)
    caller = await attest.attest(caller_of(sleeper))
    assert caller.k8s is None
    assert result_count(metrics, "not_in_pod") == 1
    assert kubelet.requests == 0  # nothing to look up
    assert any(getattr(r, "fields", {}).get("reason") == "not_in_pod" for r in caplog.records)


@pytest.mark.skipif(_V1_SKIP is not None, reason=_V1_SKIP or "")
async def test_pod_the_kubelet_does_not_list_is_not_attested(
    kubelet: FakeKubelet, sleeper: subprocess.Popen[bytes]
) -> None:
    with PodCgroup(V1_HIERARCHY) as cgroup:
        cgroup.add(sleeper.pid)
        kubelet.pods = [pod(uid="1" * 32, name="someone-else", containers=[("c", "i", "a" * 64)])]
        attest, metrics = attestor(kubelet, attest_timeout=1.2)
        caller = await attest.attest(caller_of(sleeper))
    assert caller.k8s is None
    assert result_count(metrics, "pod_not_listed") == 1
    assert kubelet.requests >= 2  # refreshed on the miss (rate-limited), not once per loop turn


@pytest.mark.skipif(_V1_SKIP is not None, reason=_V1_SKIP or "")
async def test_new_pod_is_found_by_refreshing_on_a_miss_and_hits_are_cached(
    kubelet: FakeKubelet, sleeper: subprocess.Popen[bytes]
) -> None:
    second = subprocess.Popen(["sleep", "60"])
    try:
        with PodCgroup(V1_HIERARCHY) as first_cgroup, PodCgroup(V1_HIERARCHY) as second_cgroup:
            first_cgroup.add(sleeper.pid)
            second_cgroup.add(second.pid)
            kubelet.pods = [
                pod(uid=first_cgroup.pod_uid, name="a", containers=[("c", "i", first_cgroup.container_id)])
            ]
            attest, _ = attestor(kubelet)
            assert (await attest.attest(caller_of(sleeper))).k8s is not None
            assert (await attest.attest(caller_of(sleeper))).k8s is not None
            assert kubelet.requests == 1  # the second answer came from the cached list
            kubelet.pods.append(
                pod(uid=second_cgroup.pod_uid, name="b", containers=[("c", "i", second_cgroup.container_id)])
            )
            caller = await attest.attest(caller_of(second))
            assert caller.k8s is not None
            assert caller.k8s.pod_name == "b"
            assert kubelet.requests == 2
    finally:
        second.kill()
        second.wait()


@pytest.mark.skipif(_V1_SKIP is not None, reason=_V1_SKIP or "")
@pytest.mark.parametrize("problem", ["wrong_token", "unverified_certificate", "unreachable"])
async def test_kubelet_problems_leave_the_caller_unattested(
    kubelet: FakeKubelet, sleeper: subprocess.Popen[bytes], problem: str, tmp_path: Path
) -> None:
    changes: dict[str, object] = {}
    expected = "kubelet_unreachable"
    if problem == "wrong_token":
        token = tmp_path / "token"
        token.write_text("not-the-token")
        changes["token_file"] = token
        expected = "kubelet_error"
    elif problem == "unverified_certificate":
        with short_dir("sgk-") as other_dir, FakeKubelet(other_dir) as other:
            changes["kubelet_ca_file"] = tmp_path / "other-ca.pem"
            (tmp_path / "other-ca.pem").write_bytes(other.ca_file.read_bytes())
    else:
        changes["kubelet_url"] = "https://localhost:1"
    with PodCgroup(V1_HIERARCHY) as cgroup:
        cgroup.add(sleeper.pid)
        kubelet.pods = [pod(uid=cgroup.pod_uid, name="a", containers=[("c", "i", cgroup.container_id)])]
        attest, metrics = attestor(kubelet, **changes)
        caller = await attest.attest(caller_of(sleeper))
    assert caller.k8s is None
    assert result_count(metrics, expected) == 1
    fetches = metrics.registry.get_sample_value("svidgate_k8s_pod_list_fetches_total", {"result": expected})
    assert fetches == 1


@pytest.mark.skipif(_V1_SKIP is not None, reason=_V1_SKIP or "")
async def test_caller_that_exits_during_attestation_is_not_attested(kubelet: FakeKubelet) -> None:
    """The PID-reuse check: whatever the kubelet says, a process that is no longer the caller gets nothing."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        with PodCgroup(V1_HIERARCHY) as cgroup:
            cgroup.add(proc.pid)
            kubelet.pods = [pod(uid=cgroup.pod_uid, name="a", containers=[("c", "i", cgroup.container_id)])]
            attest, metrics = attestor(kubelet)
            kubelet.release.clear()  # the kubelet answers only once the caller is gone
            task = asyncio.create_task(attest.attest(caller_of(proc)))
            while kubelet.requests == 0:
                await asyncio.sleep(0.01)
            proc.kill()
            proc.wait()
            kubelet.release.set()
            caller = await task
    finally:
        proc.kill()
        proc.wait()
    assert caller.k8s is None
    assert result_count(metrics, "process_gone") == 1


async def test_pid_zero_is_not_attested(kubelet: FakeKubelet) -> None:
    attest, metrics = attestor(kubelet)
    assert (await attest.attest(CallerInfo(uid=0, gid=0, pid=0))).k8s is None
    assert result_count(metrics, "no_pid") == 1


@pytest.mark.skipif(_V1_SKIP is not None, reason=_V1_SKIP or "")
async def test_a_hanging_kubelet_times_out_without_holding_the_event_loop(
    kubelet: FakeKubelet, sleeper: subprocess.Popen[bytes]
) -> None:
    with PodCgroup(V1_HIERARCHY) as cgroup:
        cgroup.add(sleeper.pid)
        kubelet.pods = [pod(uid=cgroup.pod_uid, name="a", containers=[("c", "i", cgroup.container_id)])]
        attest, metrics = attestor(kubelet, attest_timeout=0.5)
        kubelet.release.clear()  # the kubelet accepts and never answers (until the test ends)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        try:
            caller = await attest.attest(caller_of(sleeper))
        finally:
            ticker.cancel()
            kubelet.release.set()
    assert caller.k8s is None
    assert result_count(metrics, "timeout") == 1
    assert ticks > 5  # the loop kept running other work while the kubelet call waited
