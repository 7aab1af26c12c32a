"""Configuration edges: YAML the parser chokes on, empty documents, checks `serve` used to make alone, and the
key paths a reload cannot apply."""

from __future__ import annotations

import contextlib
import dataclasses
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svidgate.config import (
    MAX_UNIX_PATH_BYTES,
    MAX_YAML_DEPTH,
    RESTART_REQUIRED_KEYS,
    UNIX_TEMP_NAME_BYTES,
    Config,
    parse_config,
    restart_required_changes,
)
from svidgate.errors import ConfigError

ENV = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}
BASE = """\
trust_domain: example.org
workloads:
  - spiffe_id: spiffe://example.org/web
    selectors: [envoy:node_id:web]
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "f", env=ENV)


# -- YAML the parser chokes on: one ConfigError with the place and the reason, never a Python error --------


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a: " + "[" * 600 + "]" * 600, "line 1, column 67"),
        ("a:\n" + "".join("  " * (i + 1) + "b:\n" for i in range(600)), "line 64, column 127"),
        ("a: " + "{b: " * 600 + "1" + "}" * 600, "line 1, column 253"),
    ],
    ids=["flow-sequences", "block-mappings", "flow-mappings"],
)
def test_600_levels_of_nesting_are_a_config_error(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value) == f"f: {where}: nested deeper than {MAX_YAML_DEPTH} levels"


def test_nesting_up_to_the_limit_still_reads() -> None:
    deep = "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)
    with pytest.raises(ConfigError, match=r"^f: x: unknown key"):
        parse(f"x: {deep}\n")  # read, then refused as an unknown key: the depth itself was fine


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 2001-13-45\n", "f: line 1, column 4: cannot read this value: month must be in 1..12"),
        ("- 2001-02-30\n", "f: line 1, column 3: cannot read this value: day is out of range for month"),
        ("a: &x {b: *x}\n", "f: line 1, column 4: found unconstructable recursive node"),
    ],
)
def test_values_the_yaml_constructors_cannot_build(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value) == message


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="[]{}:-,&*!?|>'\"#%@`\n 0123456789abxyz.\t", max_size=80))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):  # anything else (RecursionError, ValueError, ...) fails the test
        parse_config(text, "f", env=ENV)


# -- an empty document ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n", "# all commented out\n", "---\n", "--- \n...\n"])
def test_an_empty_or_truncated_document_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^f: the file holds no YAML document"):
        parse_config(text, "f", env=ENV)


# -- checks the CA and the socket binding used to make only when serving -----------------------------------


def test_a_ca_ttl_the_ca_would_refuse_is_a_config_error() -> None:
    # Twice the shortest SVID TTLs, so the TTL relation holds -- but the CA backdates by 60s and needs more.
    ca = "ca: {ca_ttl: 120s, x509_svid_ttl: 60s, jwt_svid_ttl: 10s}\n"
    with pytest.raises(ConfigError, match=r"^f: ca.ca_ttl: must be more than 120s$"):
        parse(BASE + ca)
    assert parse(BASE + ca.replace("120s", "121s")).ca.ca_ttl == 121


def test_a_socket_whose_temporary_name_does_not_fit_is_a_config_error() -> None:
    # The socket is bound as <dir>/.<8 hex>.tmp first: that name must fit in sun_path too.
    longest_dir = "/" + "d" * (MAX_UNIX_PATH_BYTES - 1 - UNIX_TEMP_NAME_BYTES - 1)
    ok = parse(BASE + f"listen: {{grpc: unix://{longest_dir}/s.sock}}\n")
    assert ok.listen.grpc[0].path == f"{longest_dir}/s.sock"
    with pytest.raises(
        ConfigError, match=r"^f: listen.workload_api: unix:///d+/s.sock: the directory is too long"
    ):
        parse(BASE + f"listen: {{workload_api: unix://{longest_dir}d/s.sock}}\n")


# -- what a reload cannot apply, by key path ----------------------------------------------------------------


def test_every_config_section_is_either_live_or_restart_required() -> None:
    live = {
        "authz",
        "workloads",
        "federation",
        "log",
        "kubernetes",
    }  # applied by the runtime's prepare_reload
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(RESTART_REQUIRED_KEYS) | live == fields
    assert not set(RESTART_REQUIRED_KEYS) & live


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", ()),
        ("authz: {default: allow}\nlog: {level: debug}\n", ()),
        ("ca: {x509_svid_ttl: 30m}\n", ("ca.x509_svid_ttl",)),
        ("ca: {key_type: ec-p384, ca_ttl: 30d}\n", ("ca.key_type", "ca.ca_ttl")),
        ("listen: {check: tcp://127.0.0.1:9001, http: null}\n", ("listen.http", "listen.check")),
        ("federation: {partner.org: {bundle_file: /b.json}}\n", ()),  # live
        (
            "listen: {bundle_endpoint: '127.0.0.1:8443'}\nbundle_endpoint: {spiffe_id: spiffe://example.org/be}\n",
            ("listen.bundle_endpoint", "bundle_endpoint"),
        ),
        ("sds: {validation: trusted_ca}\n", ("sds.validation",)),
        ("server: {drain_grace: 3s}\nstate_dir: /srv/state\n", ("state_dir", "server.drain_grace")),
        ("trust_domain: other.org\nworkloads: []\n", ("trust_domain",)),
    ],
)
def test_restart_required_changes_name_each_key(extra: str, expected: tuple[str, ...]) -> None:
    old = parse(BASE)
    text = BASE if "trust_domain" not in extra else ""
    assert restart_required_changes(old, parse(text + extra)) == expected


def test_a_changed_federation_endpoint_is_applied_live() -> None:
    endpoint = "federation: {partner.org: {bundle_endpoint: {url: 'https://p/b', profile: https_web}}}\n"
    old, new = parse(BASE + endpoint), parse(BASE + endpoint.replace("https://p/b", "https://q/b"))
    assert restart_required_changes(old, new) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Found by comparing the schema model's messages with the hand parser's over ~8,000 mutated files.
        ("workloads: [null]\n", "f: workloads[0].spiffe_id: required"),
        ("authz: {policies: [null]}\n", "f: authz.policies[0].name: required"),
        (
            "federation: {a.org: {bundle_file: b, bogus: 1}}\n",
            "f: federation.a.org.bogus: unknown key (expected one of: bundle_file, bundle_endpoint)",
        ),
        (
            "federation: {a.org: {bundle_endpoint: {url: 'https://a.org/b'}}}\n",
            "f: federation.a.org.bundle_endpoint.profile: required (https_web or https_spiffe)",
        ),
        ("ca: {upstream: {cert_file: null, key_file: k}}\n", "f: ca.upstream.cert_file: required"),
        ("trust_domain: 'tcp://a:1'\n", "f: trust_domain: 'tcp://a:1': the scheme must be 'spiffe://'"),
        # An unknown key is reported before its own mapping's values, not before the keys ahead of it.
        ("trust_domain: 5\nsds: {bogus: 1}\n", "f: trust_domain: expected a string, got an integer"),
    ],
)
def test_messages_match_the_hand_parser(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f", env=ENV)
    assert str(caught.value) == message


def test_a_null_sds_listener_list_means_none() -> None:
    assert parse_config("listen: {grpc: null}\n", "f", env=ENV).listen.grpc == ()
