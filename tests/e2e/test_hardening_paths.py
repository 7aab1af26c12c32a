"""Through a real Envoy (envoy-examples/ext-authz/envoy.yaml): the path svidgate judges is the path served.

Two ways a request reached a backend under a path no policy had looked at: `%2e%2e;` (Envoy passes it on
as `..;`, Tomcat and Spring strip the `;` and climb out of `/public/`) and `%2F` (the example rejected it; now
Envoy redirects to the unescaped path, which is checked in its turn).
"""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svidgate.config import parse_config
from svidgate.extauthz.reload import PolicyHolder
from svidgate.extauthz.servicer import AuthorizationServicer
from svidgate.identity.snapshot import IdentitySnapshot, SnapshotFeed
from tests.support.ca import NOW, TestCA
from tests.support.checkserver import Backend, aio_check_server, echo_backend
from tests.support.envoy import EXAMPLES, EnvoyProcess, shipped_config

pytestmark = pytest.mark.e2e

CONFIG = """
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
        feed, PolicyHolder(parse_config(CONFIG, "e2e").authz), None, clock=lambda: NOW
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
