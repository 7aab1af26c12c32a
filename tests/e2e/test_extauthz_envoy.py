"""ext_authz through a real Envoy: svidgate's Check decides what reaches the backend.

One backend, one svidgate Check service served twice (grpc.aio as on ``listen.grpc``, threaded as on
``listen.check``), and two Envoys from envoy-examples/ext-authz/envoy.yaml: one fail-closed on the aio server,
one with ``failure_mode_allow: true`` on the threaded server (bad tokens must still be denied: svidgate
answers denials, it never fails the RPC).
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from svidgate.config import AuthzConfig, parse_config
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import AuthorizationServicer, new_sync_check_server
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from tests.support.ca import NOW, TestCA
from tests.support.checkserver import Backend, aio_check_server, echo_backend
from tests.support.envoy import EXAMPLES, EnvoyProcess, shipped_config

pytestmark = pytest.mark.e2e

CONFIG = """
trust_domain: example.org
federation:
  partner.test:
    bundle_file: /nonexistent/partner.json
authz:
  policies:
    - name: health
      match: {path_exact: /healthz}
      require_token: false
    - name: backend
      match: {context_extensions: {route: backend}}
      audiences: [backend]
      allow: [spiffe://example.org/frontend, 'spiffe://partner.test/payments/*']
"""


def authz(text: str = CONFIG) -> AuthzConfig:
    return parse_config(text, "e2e").authz


class World:
    def __init__(self, ca: TestCA, partner: TestCA, holder: PolicyHolder, backend: Backend) -> None:
        self.ca, self.partner, self.holder, self.backend = ca, partner, holder, backend
        self.ports: dict[str, int] = {}

    def get(
        self, envoy: str, path: str = "/orders", token: str | None = None, **headers: str
    ) -> tuple[int, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[envoy]}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        for key, value in headers.items():
            request.add_header(key.replace("_", "-"), value)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 -- loopback test
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, {"body": err.read().decode(), "headers": dict(err.headers)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("extauthz")
    ca, partner = TestCA("example.org"), TestCA("partner.test")
    feed = SnapshotFeed(IdentitySnapshot(bundles={**ca.bundles(), **partner.bundles()}, version=1))
    holder = PolicyHolder(authz())
    servicer = AuthorizationServicer(feed, holder, None, clock=lambda: NOW)

    stack = contextlib.ExitStack()
    backend = stack.enter_context(echo_backend())
    # listen.grpc flavour: grpc.aio on its own event loop thread.
    aio_port = stack.enter_context(aio_check_server(servicer))
    # listen.check flavour: the threaded server.
    sync_server = new_sync_check_server(servicer, max_workers=2)
    sync_port = sync_server.add_insecure_port("127.0.0.1:0")
    sync_server.start()

    w = World(ca, partner, holder, backend)
    envoys = []
    try:
        for name, port, fail_open in (("closed", aio_port, False), ("open", sync_port, True)):
            config = shipped_config(
                EXAMPLES / "ext-authz" / "envoy.yaml",
                listeners={"ingress": 0},
                clusters={"backend": backend.server_address[1], "svidgate": port},
                everywhere={"failure_mode_allow": fail_open},
            )
            envoy = EnvoyProcess(config, Path(tmp), name=name)
            envoys.append(envoy)
            envoy.start()
        for envoy in envoys:
            envoy.wait_ready()
            w.ports[envoy.name] = envoy.listener_port("ingress")
        yield w
    finally:
        for envoy in envoys:
            envoy.stop()
        sync_server.stop(None)
        stack.close()


FRONTEND = "spiffe://example.org/frontend"


@pytest.mark.parametrize("envoy", ["closed", "open"])
def test_valid_token_reaches_backend_as_x_spiffe_id(world: World, envoy: str) -> None:
    token = world.ca.create_jwt_svid(FRONTEND, ["backend"])
    status, seen = world.get(envoy, token=token, x_spiffe_id="spiffe://example.org/admin")
    assert status == 200
    # The client's forged copy was overwritten, not appended next to ours.
    assert json.loads(seen["x-spiffe-id-all"]) == [FRONTEND]
    assert "authorization" not in seen  # the token does not travel upstream


def test_federated_trust_domain_allowed_by_policy(world: World) -> None:
    token = world.partner.create_jwt_svid("spiffe://partner.test/payments/api", ["backend"])
    status, seen = world.get("closed", token=token)
    assert status == 200
    assert seen["x-spiffe-id"] == "spiffe://partner.test/payments/api"


BAD_TOKENS: dict[str, Callable[[World], str | None]] = {
    "missing_token": lambda w: None,
    "expired": lambda w: w.ca.create_jwt_svid(FRONTEND, ["backend"], now=NOW - 3600, ttl=300),
    "audience_mismatch": lambda w: w.ca.create_jwt_svid(FRONTEND, ["someone-else"]),
    "unknown_trust_domain": lambda w: TestCA("evil.test").create_jwt_svid(
        "spiffe://evil.test/frontend", ["backend"]
    ),
}


@pytest.mark.parametrize("envoy", ["closed", "open"])
@pytest.mark.parametrize("reason", sorted(BAD_TOKENS))
def test_bad_tokens_denied_401_even_when_failure_mode_allow(world: World, envoy: str, reason: str) -> None:
    before = len(world.backend.received)
    status, denied = world.get(envoy, token=BAD_TOKENS[reason](world))
    assert status == 401
    assert json.loads(denied["body"])["reason"] == reason
    challenge = denied["headers"]["www-authenticate"]
    assert challenge == ("Bearer" if reason == "missing_token" else 'Bearer error="invalid_token"')
    assert len(world.backend.received) == before  # nothing reached the backend


@pytest.mark.parametrize("envoy", ["closed", "open"])
def test_subject_not_allowed_is_403(world: World, envoy: str) -> None:
    token = world.ca.create_jwt_svid("spiffe://example.org/db", ["backend"])
    status, denied = world.get(envoy, token=token)
    assert status == 403
    assert json.loads(denied["body"])["reason"] == "subject_not_allowed"


def test_health_needs_no_token_and_strips_forged_identity(world: World) -> None:
    status, seen = world.get("closed", path="/healthz", x_spiffe_id="spiffe://example.org/admin")
    assert status == 200
    assert json.loads(seen["x-spiffe-id-all"]) == []


def test_path_is_normalised_before_policy_matching(world: World) -> None:
    # /healthz needs no token, but /healthz/../orders is /orders once Envoy normalises it (normalize_path in
    # envoy.yaml), so it gets the backend policy and its 401, not the health policy's free pass.
    status, _ = world.get("closed", path="/healthz/../orders")
    assert status == 401


def test_hot_reload_changes_a_decision_without_dropping_requests(world: World) -> None:
    token = world.ca.create_jwt_svid("spiffe://example.org/db", ["backend"])
    stop = threading.Event()
    statuses: list[int] = []

    def hammer() -> None:
        while not stop.is_set():
            statuses.append(world.get("closed", token=token)[0])

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer) for _ in range(4)]
        while len(statuses) < 40:
            threading.Event().wait(0.01)
        world.holder.swap(authz(CONFIG.replace("allow: [", "allow: [spiffe://example.org/db, ")))
        after = len(statuses)
        while len(statuses) < after + 40:
            threading.Event().wait(0.01)
        stop.set()
        for future in futures:
            future.result()
    world.holder.swap(authz())
    assert set(statuses) <= {200, 403}, f"unexpected statuses {set(statuses)}"  # no 5xx, no dropped request
    assert statuses[0] == 403
    assert statuses[-1] == 200


# Hardening: the path judged is the path served.
#
# Through a real Envoy (envoy-examples/ext-authz/envoy.yaml): the path svidgate judges is the path served.
# Two ways a request reached a backend under a path no policy had looked at: `%2e%2e;` (Envoy passes it on as
# `..;`, Tomcat and Spring strip the `;` and climb out of `/public/`) and `%2F` (the example rejected it; now
# Envoy redirects to the unescaped path, which is checked in its turn).


PATHS_CONFIG = """
trust_domain: example.org
authz:
  policies:
    - name: public
      match: {path_prefix: /public/}
      require_token: false
    - name: backend
      match: {context_extensions: {route: backend}}
      audiences: [backend]
      allow: [spiffe://example.org/frontend]
"""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class Ingress:
    def __init__(self, port: int, backend: Backend) -> None:
        self.port, self.backend = port, backend

    def get(self, path: str) -> tuple[int, dict[str, str]]:
        """GET `path` exactly as written (urllib does not normalise it); redirects are not followed."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        try:
            with _OPENER.open(request, timeout=5) as response:
                return response.status, dict(response.headers)
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers)


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingress]:
    tmp = tmp_path_factory.mktemp("hardening-paths")
    ca = TestCA("example.org")
    feed = SnapshotFeed(IdentitySnapshot(bundles=ca.bundles(), version=1))
    servicer = AuthorizationServicer(
        feed, PolicyHolder(parse_config(PATHS_CONFIG, "e2e").authz), None, clock=lambda: NOW
    )
    stack = contextlib.ExitStack()
    backend = stack.enter_context(echo_backend())
    port = stack.enter_context(aio_check_server(servicer))
    config = shipped_config(
        EXAMPLES / "ext-authz" / "envoy.yaml",
        listeners={"ingress": 0},
        clusters={"backend": backend.server_address[1], "svidgate": port},
    )
    envoy = EnvoyProcess(config, Path(tmp), name="paths")
    try:
        envoy.start()
        envoy.wait_ready()
        yield Ingress(envoy.listener_port("ingress"), backend)
    finally:
        envoy.stop()
        stack.close()


def test_public_prefix_still_public(ingress: Ingress) -> None:
    assert ingress.get("/public/x")[0] == 200
    assert ingress.get("/orders")[0] == 401


def test_dot_dot_semicolon_cannot_climb_out_of_a_public_prefix(ingress: Ingress) -> None:
    before = len(ingress.backend.received)
    # Envoy resolves a literal "..;" itself, but decodes "%2e%2e;" only after resolving dot segments, so
    # svidgate is asked about "/public/..;/orders": Tomcat and Spring strip ";" and serve /orders. It used to
    # match the public prefix (200, no token); it is ambiguous now, and denied.
    assert ingress.get("/public/%2e%2e;/orders")[0] == 401
    assert ingress.get("/public/..;/orders")[0] == 401
    assert ingress.get("/public;/x")[0] == 401
    assert len(ingress.backend.received) == before


def test_encoded_slash_is_redirected_to_the_unescaped_path(ingress: Ingress) -> None:
    before = len(ingress.backend.received)
    status, headers = ingress.get("/public/..%2Forders")
    # UNESCAPE_AND_REDIRECT: the client is sent to the path every party reads the same way...
    assert 300 <= status < 400, status
    location = headers["Location"] if "Location" in headers else headers["location"]
    assert location.endswith("/orders"), location
    # ...which is then checked like any other: no token, no entry.
    assert ingress.get("/orders")[0] == 401
    assert len(ingress.backend.received) == before


def test_dot_segments_are_resolved_before_matching(ingress: Ingress) -> None:
    assert ingress.get("/public/%2e%2e/orders")[0] == 401
    assert ingress.get("//public//x")[0] == 200
