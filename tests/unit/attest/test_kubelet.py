"""The kubelet pod list: parsing (pure) and the cache's refresh-on-miss rules (fake fetch, clock, sleep)."""

from __future__ import annotations

import asyncio
import json

import pytest

from svidgate.attest.cgroup import PodContainer
from svidgate.attest.kubelet import MIN_REFRESH_INTERVAL, KubeletPods, PodIndex, container_id, parse_pod_list
from svidgate.errors import AttestationError
from tests.support.k8s import pod

A_UID, B_UID = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
A_CID, B_CID, INIT_CID = "a" * 64, "b" * 64, "c" * 64


def pod_list(*items: dict[str, object]) -> bytes:
    return json.dumps({"kind": "PodList", "items": list(items)}).encode()


def test_parse_indexes_every_started_container() -> None:
    document = pod_list(
        pod(
            uid=A_UID,
            name="a",
            namespace="shop",
            service_account="sa-a",
            labels={"app": "a"},
            containers=[("envoy", "envoy:1", A_CID)],
            init_containers=[("init", "busybox:1", INIT_CID)],
        ),
        pod(uid=B_UID, name="b", containers=[("app", "app:2", B_CID)], runtime="cri-o"),
    )
    index = parse_pod_list(document)
    assert index.pod_uids == {A_UID, B_UID}
    envoy = index.find(PodContainer(A_UID, A_CID))
    assert envoy is not None
    assert (envoy.namespace, envoy.service_account, envoy.pod_name, envoy.container_name) == (
        "shop",
        "sa-a",
        "a",
        "envoy",
    )
    assert envoy.labels == (("app", "a"),)
    assert envoy.container_images[0] == "envoy:1"
    init = index.find(PodContainer(A_UID, INIT_CID))
    assert init is not None
    assert init.container_name == "init"
    assert index.find(PodContainer(B_UID, B_CID)) is not None
    # A container ID is only good together with its own pod's UID.
    assert index.find(PodContainer(B_UID, A_CID)) is None


def test_parse_skips_malformed_items_and_containers_not_started() -> None:
    started = pod(uid=A_UID, name="a", containers=[("envoy", "envoy:1", A_CID)])
    waiting = pod(uid=B_UID, name="b", containers=[("app", "app:1", B_CID)])
    waiting["status"]["containerStatuses"][0]["containerID"] = ""  # type: ignore[index]
    no_uid = pod(uid="", name="c", containers=[("x", "x", "d" * 64)])
    document = pod_list(started, waiting, no_uid, "junk", {"metadata": []})  # type: ignore[arg-type]
    index = parse_pod_list(document)
    assert set(index.containers) == {(A_UID, A_CID)}
    assert index.pod_uids == {A_UID, B_UID}


@pytest.mark.parametrize("document", [b"not json", b"[]", b'{"items": {}}', b"\xff"])
def test_parse_refuses_what_is_not_a_pod_list(document: bytes) -> None:
    with pytest.raises(AttestationError) as info:
        parse_pod_list(document)
    assert info.value.reason == "kubelet_bad_response"


@pytest.mark.parametrize(
    ("runtime_id", "expected"),
    [
        ("containerd://abc", "abc"),
        ("cri-o://abc", "abc"),
        ("docker://abc", "abc"),
        ("abc", ""),
        ("://abc", ""),
    ],
)
def test_container_id(runtime_id: str, expected: str) -> None:
    assert container_id(runtime_id) == expected


class FakeKubeletList:
    """A fetch function over a list that the test changes, with a clock that sleeps advance."""

    def __init__(self, *containers: tuple[str, str]) -> None:
        self.containers = list(containers)
        self.fetches = 0
        self.now = 1000.0
        self.error: AttestationError | None = None

    def fetch(self) -> PodIndex:
        self.fetches += 1
        if self.error is not None:
            raise self.error
        items = [pod(uid=uid, name=uid[:1], containers=[("c", "i", cid)]) for uid, cid in self.containers]
        return parse_pod_list(pod_list(*items))

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def cache(kubelet: FakeKubeletList, ttl: float = 5.0) -> KubeletPods:
    return KubeletPods(kubelet.fetch, ttl, clock=kubelet.clock, sleep=kubelet.sleep)


async def test_hits_come_from_the_cached_list_until_the_ttl() -> None:
    kubelet = FakeKubeletList((A_UID, A_CID))
    pods = cache(kubelet)
    wanted = PodContainer(A_UID, A_CID)
    for _ in range(3):
        assert (await pods.lookup(wanted, kubelet.now + 5)).pod_uid == A_UID
    assert kubelet.fetches == 1
    kubelet.now += 5.1
    await pods.lookup(wanted, kubelet.now + 5)
    assert kubelet.fetches == 2


async def test_a_new_pod_is_found_by_refreshing_on_the_miss() -> None:
    kubelet = FakeKubeletList((A_UID, A_CID))
    pods = cache(kubelet)
    await pods.lookup(PodContainer(A_UID, A_CID), kubelet.now + 5)
    kubelet.containers.append((B_UID, B_CID))
    kubelet.now += MIN_REFRESH_INTERVAL
    assert (await pods.lookup(PodContainer(B_UID, B_CID), kubelet.now + 5)).pod_uid == B_UID
    assert kubelet.fetches == 2


async def test_misses_are_rate_limited_and_end_at_the_deadline() -> None:
    kubelet = FakeKubeletList((A_UID, A_CID))
    pods = cache(kubelet)
    start = kubelet.now
    with pytest.raises(AttestationError) as info:
        await pods.lookup(PodContainer(B_UID, B_CID), start + 3)
    assert info.value.reason == "pod_not_listed"
    # One fetch per MIN_REFRESH_INTERVAL of (fake) time, not one per loop turn.
    assert kubelet.fetches == pytest.approx(3 / MIN_REFRESH_INTERVAL, abs=1)
    with pytest.raises(AttestationError) as info:
        await pods.lookup(PodContainer(A_UID, B_CID), kubelet.now + 1)
    assert info.value.reason == "container_not_listed"


async def test_concurrent_misses_share_one_fetch() -> None:
    kubelet = FakeKubeletList((A_UID, A_CID), (B_UID, B_CID))
    pods = cache(kubelet)
    found = await asyncio.gather(
        *(pods.lookup(PodContainer(uid, cid), kubelet.now + 5) for uid, cid in kubelet.containers * 10)
    )
    assert len(found) == 20
    assert kubelet.fetches == 1


async def test_a_kubelet_failure_is_the_lookups_answer() -> None:
    kubelet = FakeKubeletList((A_UID, A_CID))
    kubelet.error = AttestationError("kubelet_unreachable", "connection refused")
    reported: list[str] = []
    pods = KubeletPods(kubelet.fetch, 5, clock=kubelet.clock, sleep=kubelet.sleep, on_fetch=reported.append)
    with pytest.raises(AttestationError) as info:
        await pods.lookup(PodContainer(A_UID, A_CID), kubelet.now + 5)
    assert info.value.reason == "kubelet_unreachable"
    kubelet.error = None
    kubelet.now += MIN_REFRESH_INTERVAL
    assert (await pods.lookup(PodContainer(A_UID, A_CID), kubelet.now + 5)).pod_uid == A_UID
    assert reported == ["kubelet_unreachable", "ok"]
