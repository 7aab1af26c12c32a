"""`k8s:` selectors, SPIFFE ID templates and `entitle` with both: pure, table-driven."""

from __future__ import annotations

import pytest

from svidgate.config import Selector, Workload
from svidgate.errors import ConfigError, SpiffeIdError
from svidgate.identity.entitlement import CallerInfo, KubernetesWorkload, entitle
from svidgate.identity.spiffe_id import SpiffeId
from svidgate.identity.template import SpiffeIdTemplate

POD = KubernetesWorkload(
    namespace="shop",
    service_account="frontend",
    pod_name="frontend-7d4b9-x2x",
    pod_uid="2c48913c-b29f-11e7-9350-020968147796",
    node_name="node-1",
    container_name="envoy",
    container_images=("envoyproxy/envoy:v1.31", "docker.io/envoyproxy/envoy@sha256:" + "ab" * 32),
    labels=(("app", "frontend"), ("app.kubernetes.io/part-of", "shop"), ("empty", "")),
)
IN_POD = CallerInfo(uid=1337, gid=1337, pid=42, k8s=POD)
NO_POD = CallerInfo(uid=1337, gid=1337, pid=43)


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("k8s:ns:shop", True),
        ("k8s:ns:default", False),
        ("k8s:sa:frontend", True),
        ("k8s:sa:backend", False),
        ("k8s:pod-name:frontend-7d4b9-x2x", True),
        ("k8s:pod-name:frontend", False),
        ("k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796", True),
        ("k8s:pod-label:app:frontend", True),
        ("k8s:pod-label:app.kubernetes.io/part-of:shop", True),
        ("k8s:pod-label:app:backend", False),
        ("k8s:pod-label:empty:", True),
        ("k8s:pod-label:frontend:app", False),
        ("k8s:container-name:envoy", True),
        ("k8s:container-name:app", False),
        ("k8s:container-image:envoyproxy/envoy:v1.31", True),
        ("k8s:container-image:docker.io/envoyproxy/envoy@sha256:" + "ab" * 32, True),
        ("k8s:container-image:envoyproxy/envoy", False),
        ("k8s:node-name:node-1", True),
        ("k8s:node-name:node-2", False),
    ],
)
def test_k8s_selector_matches_the_attested_pod_only(selector: str, matches: bool) -> None:
    parsed = Selector.parse(selector)
    assert parsed.matches(IN_POD) is matches
    assert parsed.matches(NO_POD) is False  # an unattested caller matches no k8s: selector
    assert str(parsed) == selector


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k8s:namespace:shop", "unknown k8s selector key 'namespace'"),
        ("k8s:ns:", "is not a selector of the form type:key:value"),
        ("k8s:pod-label::x", "k8s:pod-label takes <label key>:<label value>"),
    ],
)
def test_bad_k8s_selectors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Selector.parse(text)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}", "spiffe://example.org/ns/shop/sa/frontend"),
        (
            "spiffe://example.org/pod/{k8s:pod-uid}",
            "spiffe://example.org/pod/2c48913c-b29f-11e7-9350-020968147796",
        ),
        (
            "spiffe://example.org/{k8s:node-name}/{k8s:pod-name}",
            "spiffe://example.org/node-1/frontend-7d4b9-x2x",
        ),
        ("spiffe://example.org/c/{k8s:ns}-{k8s:container-name}", "spiffe://example.org/c/shop-envoy"),
    ],
)
def test_template_fill(template: str, expected: str) -> None:
    assert SpiffeIdTemplate.parse(template).fill(POD) == SpiffeId.parse(expected)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("spiffe://example.org/ns/{k8s:namespace}", "unknown placeholder {k8s:namespace}"),
        ("spiffe://example.org/ns/{k8s:ns", "unbalanced"),
        ("spiffe://{k8s:ns}.example.org/x", "placeholders are allowed in the path only"),
        ("spiffe://example.org/ns/{k8s:ns}/", "trailing '/'"),
        ("spiffe://example.org/ns/{}", "unknown placeholder {}"),
        ("spiffe://example.org/a b/{k8s:ns}", "invalid character"),
    ],
)
def test_bad_templates(template: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=message):
        SpiffeIdTemplate.parse(template)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"namespace": ""}, "{k8s:ns} is empty"),
        ({"service_account": ".."}, "'.' and '..' path segments are not allowed"),
        ({"service_account": "a/b"}, "contains '/'"),
        ({"namespace": "Shop Floor"}, "invalid character"),
    ],
)
def test_fill_refuses_values_that_make_no_valid_id(changes: dict[str, str], message: str) -> None:
    from dataclasses import replace

    with pytest.raises(SpiffeIdError, match=message):
        SpiffeIdTemplate.parse("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}").fill(replace(POD, **changes))


def _workload(spiffe_id: str, *selectors: str, hint: str = "") -> Workload:
    parsed = SpiffeIdTemplate.parse(spiffe_id) if "{" in spiffe_id else SpiffeId.parse(spiffe_id)
    return Workload(parsed, tuple(Selector.parse(s) for s in selectors), hint=hint)


TEMPLATED = _workload("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}", "k8s:ns:shop", hint="mesh")
STATIC = _workload("spiffe://example.org/static", "unix:uid:1337")


def test_entitle_fills_templates_in_configuration_order() -> None:
    entitlement = entitle([STATIC, TEMPLATED], IN_POD)
    mesh = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")
    assert entitlement.ids == (SpiffeId.parse("spiffe://example.org/static"), mesh)
    assert dict(entitlement.templated) == {mesh: TEMPLATED}
    assert entitlement.refused == ()
    assert entitle([TEMPLATED, STATIC], IN_POD).ids[0] == mesh  # the first entry is the default


def test_entitle_without_attestation_or_outside_the_namespace_gives_no_templated_id() -> None:
    assert entitle([TEMPLATED], NO_POD).ids == ()
    other = CallerInfo(pid=1, k8s=KubernetesWorkload("other", "frontend", "p", "u", "n", "c"))
    assert entitle([TEMPLATED], other).ids == ()


def test_entitle_reports_ids_that_cannot_be_issued_and_keeps_the_others() -> None:
    broken = CallerInfo(pid=1, k8s=KubernetesWorkload("shop", "..", "p", "u", "n", "c"))
    entitlement = entitle([TEMPLATED, STATIC], broken)
    assert entitlement.ids == ()  # STATIC needs uid 1337
    (refusal,) = entitlement.refused
    assert refusal[0] == str(TEMPLATED.spiffe_id)
    assert "'..'" in refusal[1]


def test_templated_id_that_a_static_workload_names_is_served_as_static() -> None:
    named = _workload("spiffe://example.org/ns/shop/sa/frontend", "k8s:sa:frontend")
    entitlement = entitle([TEMPLATED, named], IN_POD)
    assert entitlement.ids == (SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend"),)
    assert dict(entitlement.templated) == {}


def test_caller_describe_names_the_pod() -> None:
    fields = IN_POD.describe()
    assert fields["k8s_ns"] == "shop"
    assert fields["k8s_pod"] == "frontend-7d4b9-x2x"
    assert "k8s_ns" not in NO_POD.describe()
