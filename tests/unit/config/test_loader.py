"""Configuration: YAML -> frozen Config, with every error naming the key's path."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svidgate.config import (
    Address,
    Config,
    ListenConfig,
    Selector,
    config_path_from_env,
    default_config_text,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)
from svidgate.errors import ConfigError
from svidgate.identity.keys import KeyType
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

ENV = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}

FULL = """\
trust_domain: example.org
state_dir: /var/lib/svidgate
listen:
  grpc: [unix:///run/svidgate/sds.sock, "tcp://[::1]:8081"]
  workload_api: unix:///run/svidgate/workload.sock
  http: 0.0.0.0:9090
  check: tcp://127.0.0.1:9001
ca: {key_type: ec-p384, x509_svid_ttl: 2h, jwt_svid_ttl: 90s, ca_ttl: 30d}
workloads:
  - spiffe_id: spiffe://example.org/frontend
    selectors: ["envoy:node_id:frontend", "unix:uid:1000"]
    dns_names: [frontend.example.org]
    hint: internal
  - spiffe_id: spiffe://example.org/backend
    selectors: ["envoy:cluster:backend:v2"]
federation:
  partner.org:
    bundle_file: partner.json
    bundle_endpoint:
      url: https://partner.org/bundle
      profile: https_spiffe
      endpoint_spiffe_id: spiffe://partner.org/spire/server
      refresh: 10m
  web.org:
    bundle_endpoint: {url: "https://web.org/b", profile: https_web}
sds: {default_svid_name: svid, validation: trusted_ca, istio_compat: true}
authz:
  token_header: X-Jwt
  token_prefix: ""
  default: deny
  leeway: 1m
  hide_details: true
  cache_size: 50
  decision_log: {sample_rate: 0.5, max_per_second: 10}
  policies:
    - name: api
      match:
        hosts: [API.example.org]
        path_prefix: /api
        methods: [GET, POST]
        context_extensions: {route: api}
      audiences: [spiffe://example.org/backend]
      allow: ["spiffe://example.org/frontend", "spiffe://partner.org/*", "spiffe://web.org", "*"]
      dry_run: true
    - name: egress
      mode: inject
      inject_audience: spiffe://partner.org/api
      inject_spiffe_id: spiffe://example.org/frontend
source: {kind: builtin, poll_interval: 2s}
log: {format: logfmt, level: DEBUG}
server: {drain_grace: 3s, reflection: true, config_poll_interval: 0, socket_mode: 0600}
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "test.yaml", base_dir=Path("/etc/svidgate"), env=ENV)


def test_full_config_round_trips_into_typed_values() -> None:
    config = parse(FULL)
    assert config.trust_domain == TrustDomain("example.org")
    assert config.state_dir == Path("/var/lib/svidgate")
    assert config.listen.grpc == (
        Address("unix", path="/run/svidgate/sds.sock"),
        Address("tcp", host="::1", port=8081),
    )
    assert [str(a) for a in config.listen.grpc] == ["unix:///run/svidgate/sds.sock", "tcp://[::1]:8081"]
    assert config.listen.grpc[1].grpc_target() == "[::1]:8081"
    assert config.listen.http == ("0.0.0.0", 9090)
    assert config.listen.check == Address("tcp", host="127.0.0.1", port=9001)
    assert config.ca.key_type is KeyType.EC_P384
    assert (config.ca.x509_svid_ttl, config.ca.jwt_svid_ttl, config.ca.ca_ttl) == (7200, 90, 30 * 86400)
    frontend, backend = config.workloads
    assert frontend.selectors == (Selector("envoy", "node_id", "frontend"), Selector("unix", "uid", "1000"))
    assert frontend.dns_names == ("frontend.example.org",)
    assert frontend.hint == "internal"
    assert backend.selectors == (Selector("envoy", "cluster", "backend:v2"),)
    partner = config.federation[TrustDomain("partner.org")]
    assert partner.bundle_file == Path("/etc/svidgate/partner.json")  # relative to the config file
    assert partner.bundle_endpoint is not None
    assert partner.bundle_endpoint.refresh == 600
    assert partner.bundle_endpoint.endpoint_spiffe_id == SpiffeId.parse("spiffe://partner.org/spire/server")
    assert config.sds.default_svid_name == "svid"
    assert config.sds.own_bundle_name == "ROOTCA"
    assert config.authz.token_header == "x-jwt"
    assert config.authz.leeway == 60
    api, egress = config.authz.policies
    assert api.match.hosts == ("api.example.org",)
    assert api.match.context_extensions == {"route": "api"}
    assert [r.kind for r in api.allow] == ["id", "glob", "trust_domain", "any"]
    assert api.dry_run
    assert egress.mode == "inject"
    assert egress.inject_spiffe_id == SpiffeId.parse("spiffe://example.org/frontend")
    assert config.source.poll_interval == 2
    assert config.log.level == "debug"
    assert config.server.socket_mode == 0o600
    assert config.server.config_poll_interval == 0
    assert "dry_run" in " ".join(config.warnings())


def test_config_is_frozen() -> None:
    config = parse(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.trust_domain = TrustDomain("x.org")  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.federation[TrustDomain("x.org")] = config.federation[TrustDomain("web.org")]  # type: ignore[index]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_an_empty_document_is_refused(text: str) -> None:
    # A truncated write or a failed mount would otherwise drop every workload and policy.
    with pytest.raises(ConfigError, match=r"^f: the file holds no YAML document .*write \{\} to run on"):
        parse_config(text, "f")


#: The listener contract's defaults: SDS and the Workload API on unix sockets only, Check on TCP.
DEFAULT_LISTEN = ListenConfig(
    grpc=(Address("unix", path="/run/user/1000/svidgate/svidgate.sock"),),
    workload_api=Address("unix", path="/run/user/1000/svidgate/workload.sock"),
    http=("127.0.0.1", 8082),
    check=Address("tcp", host="127.0.0.1", port=8081),
)


@pytest.mark.parametrize(
    "text",
    ["{}", "listen: {}\n", "listen: null\n", "listen: {http: 127.0.0.1:8082}\n"],
    ids=["empty-mapping", "empty-listen", "null-listen", "partial-listen"],
)
def test_default_listeners_serve_sds_and_workload_api_on_unix_only(text: str) -> None:
    # Issue 9 item 2: the old default served SDS on tcp://127.0.0.1:8081, where any local user fetched the
    # `any`-selected SVID and its key. Every way of not saying gets the same safe listeners.
    config = parse(text)
    assert config.listen == DEFAULT_LISTEN
    assert load_config(None, env=ENV).listen == DEFAULT_LISTEN
    assert [a for a in config.listen.check_listeners() if a.kind == "tcp"] == [DEFAULT_LISTEN.check]


def test_null_check_means_no_separate_check_listener_but_check_on_grpc() -> None:
    config = parse("listen: {check: null, grpc: [unix:///run/s.sock, tcp://127.0.0.1:9000]}\n")
    assert config.listen.check is None
    assert [str(a) for a in config.listen.check_listeners()] == [
        "unix:///run/s.sock",
        "tcp://127.0.0.1:9000",
        "unix:///run/user/1000/svidgate/workload.sock",
    ]


def test_old_default_sds_port_collides_with_the_default_check_listener_by_name() -> None:
    with pytest.raises(ConfigError) as err:
        parse("listen: {grpc: [tcp://127.0.0.1:8081]}\n")
    assert str(err.value) == (
        "test.yaml: listen.grpc[0]: tcp://127.0.0.1:8081 is already used by listen.check "
        "(default tcp://127.0.0.1:8081; set it to another address or null)"
    )


def test_an_empty_mapping_gives_defaults_without_workloads() -> None:
    config = parse("{}")
    assert config.trust_domain == TrustDomain("svidgate.local")
    assert config.state_dir == Path("/home/u/.local/state/svidgate")
    assert config.workloads == ()
    assert config.authz.policies == ()
    assert config.authz.default == "deny"
    assert config.source.kind == "builtin"


def test_embedded_default_is_explicitly_any_and_warns() -> None:
    config = load_config(None, env=ENV)
    (workload,) = config.workloads
    assert str(workload.spiffe_id) == "spiffe://svidgate.local/default"
    assert workload.selectors == (Selector("any"),)
    assert any("any" in w for w in config.warnings())
    assert "selectors: [any]" in default_config_text(ENV)


def test_default_dirs_without_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(None, env={"HOME": "/h"})
    assert config.state_dir == Path("/h/.local/state/svidgate")
    assert config.listen.grpc[0].path.startswith("/tmp/svidgate-")
    xdg = load_config(None, env={"HOME": "/h", "XDG_STATE_HOME": "/s"})
    assert xdg.state_dir == Path("/s/svidgate")


def test_config_path_from_env() -> None:
    assert config_path_from_env({"SVIDGATE_CONFIG": "/etc/s.yaml"}) == Path("/etc/s.yaml")
    assert config_path_from_env({"SVIDGATE_CONFIG": ""}) is None
    assert config_path_from_env({}) is None


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("authz:\n  policies:\n    - name: a\n      audiences: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value).startswith(f"{bad}: authz.policies[0].audiences: expected a list of strings")


def test_yaml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(ConfigError, match=r"^test\.yaml: line 2, column 5: mapping values are not allowed"):
        parse("trust_domain: a.org\n  ca: b\n")


def test_duplicate_yaml_keys_are_rejected() -> None:
    with pytest.raises(ConfigError, match="line 2, column 1: duplicate key 'trust_domain'"):
        parse("trust_domain: a.org\ntrust_domain: b.org\n")


WORKLOAD = "workloads: [{spiffe_id: 'spiffe://svidgate.local/w', selectors: ['envoy:node_id:n']}]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n", "expected a mapping"),
        ("bogus: 1\n", "bogus: unknown key"),
        ("listen: {grpcs: x}\n", "listen.grpcs: unknown key"),
        (
            "trust_domain: Example.org\n",
            "trust_domain: 'Example.org': trust domain has the invalid character",
        ),
        ("trust_domain: spiffe://a.org\n", "trust_domain: give the trust domain name"),
        (
            "listen: {grpc: unix:relative.sock}\n",
            "listen.grpc[0]: 'unix:relative.sock': a unix socket path must",
        ),
        ("listen: {grpc: 'tcp://h:99999'}\n", "listen.grpc[0]: 'tcp://h:99999': the port must be"),
        ("listen: {grpc: 'tcp://::1:80'}\n", "put an IPv6 address in brackets"),
        ("listen: {workload_api: 'tcp://127.0.0.1:1'}\n", "listen.workload_api: the Workload API is served"),
        (
            "listen: {grpc: ['tcp://a:1', 'tcp://a:1']}\n",
            "listen.grpc[1]: tcp://a:1 is already used by listen.grpc[0]",
        ),
        ("listen: {grpc: 5}\n", "listen.grpc: expected an address or a list, got an integer"),
        ("ca: {key_type: dsa}\n", "ca.key_type: expected one of ec-p256, ec-p384, rsa-2048, got 'dsa'"),
        ("ca: {x509_svid_ttl: -5m}\n", "ca.x509_svid_ttl: must not be negative"),
        ("ca: {x509_svid_ttl: 0}\n", "ca.x509_svid_ttl: must be greater than zero"),
        ("ca: {x509_svid_ttl: 5 minutes}\n", "ca.x509_svid_ttl: '5 minutes' is not a duration"),
        ("ca: {x509_svid_ttl: 30s}\n", "ca.x509_svid_ttl: must be at least 60s"),
        ("ca: {x509_svid_ttl: 1d, ca_ttl: 1d}\n", "ca.ca_ttl: must be at least twice"),
        ("workloads: {a: 1}\n", "workloads: expected a list of workloads, got a mapping"),
        ("workloads: [{selectors: [any]}]\n", "workloads[0].spiffe_id: required"),
        (
            "workloads: [{spiffe_id: 'spiffe://other.org/w', selectors: [any]}]\n",
            "workloads[0].spiffe_id: spiffe://other.org/w is not in the trust domain svidgate.local",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local', selectors: [any]}]\n",
            "workloads[0].spiffe_id: the trust domain ID itself",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/w'}]\n",
            "workloads[0].selectors: a workload needs at least one selector",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/w', selectors: ['docker:label:x']}]\n",
            "workloads[0].selectors[0]: 'docker:label:x': unknown selector type 'docker'",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/w', selectors: ['envoy:zone:a']}]\n",
            "workloads[0].selectors[0]: 'envoy:zone:a': unknown envoy selector key 'zone'",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/w', selectors: ['unix:uid:root']}]\n",
            "unix:uid takes a numeric id",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/w', selectors: ['envoy:node_id']}]\n",
            "is not a selector of the form type:key:value",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/w', selectors: [any, 'unix:uid:1']}]\n",
            "'any' cannot be combined",
        ),
        (
            "workloads: [{spiffe_id: 'spiffe://svidgate.local/w', selectors: [any],"
            " dns_names: [Bad_Name]}]\n",
            "workloads[0].dns_names[0]: 'Bad_Name' is not a lower-case DNS name",
        ),
        (
            "workloads:\n"
            "  - {spiffe_id: 'spiffe://svidgate.local/w', selectors: ['unix:uid:1'], hint: a}\n"
            "  - {spiffe_id: 'spiffe://svidgate.local/w', selectors: ['unix:uid:2'], hint: b}\n",
            "workloads[1]: spiffe://svidgate.local/w is also defined by workloads[0]",
        ),
        (
            "federation: {svidgate.local: {bundle_file: x}}\n",
            "federation.svidgate.local: cannot federate with the own",
        ),
        ("federation: {a.org: {}}\n", "federation.a.org: set bundle_file, bundle_endpoint or both"),
        (
            "federation: {a.org: {bundle_endpoint: {url: 'http://a.org/b', profile: https_web}}}\n",
            "must be https://",
        ),
        (
            "federation: {a.org: {bundle_endpoint: {url: 'https://a.org/b'}}}\n",
            "bundle_endpoint.profile: required",
        ),
        (
            "federation: {a.org: {bundle_endpoint: {url: 'https://a.org/b', profile: https_spiffe}}}\n",
            "federation.a.org.bundle_endpoint.endpoint_spiffe_id: required with profile https_spiffe",
        ),
        (
            "federation: {a.org: {bundle_endpoint: {url: 'https://a.org/b', profile: https_spiffe,"
            " endpoint_spiffe_id: 'spiffe://a.org/s'}}}\n",
            "bundle_file must provide the bootstrap bundle",
        ),
        (
            "federation: {a.org: {bundle_endpoint: {url: 'https://a.org/b', profile: https_spiffe,"
            " endpoint_spiffe_id: 'spiffe://c.org/s'}}}\n",
            "no bundle for c.org to authenticate the endpoint with",
        ),
        (
            "federation: {a.org: {bundle_endpoint: {url: 'https://a', profile: tls}}}\n",
            "profile: expected one of",
        ),
        ("sds: {own_bundle_name: ALL}\n", "sds.own_bundle_name: 'ALL' is already the"),
        ("sds: {default_svid_name: 'spiffe://x'}\n", "must not start with spiffe://"),
        ("sds: {istio_compat: yes please}\n", "sds.istio_compat: expected true or false"),
        (
            "authz: {token_header: 'bad header'}\n",
            "authz.token_header: 'bad header' is not an HTTP header name",
        ),
        ("authz: {default: maybe}\n", "authz.default: expected one of deny, allow, got 'maybe'"),
        ("authz: {cache_size: -1}\n", "authz.cache_size: must be at least 0"),
        (
            "authz: {decision_log: {sample_rate: 2}}\n",
            "authz.decision_log.sample_rate: must be between 0 and 1",
        ),
        ("authz: {policies: [{audiences: [a], allow: ['*']}]}\n", "authz.policies[0].name: required"),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['*']},"
            " {name: a, audiences: [x], allow: ['*']}]}\n",
            "authz.policies[1].name: 'a' is already the name of authz.policies[0]",
        ),
        (
            "authz: {policies: [{name: a, audiences: x, allow: ['*']}]}\n",
            "authz.policies[0].audiences: expected a list of strings",
        ),
        (
            "authz: {policies: [{name: a, audiences: [1], allow: ['*']}]}\n",
            "authz.policies[0].audiences: expected a list of strings "
            "(authz.policies[0].audiences[0] is an integer)",
        ),
        ("authz: {policies: [{name: a, allow: ['*']}]}\n", "authz.policies[0].audiences: required"),
        ("authz: {policies: [{name: a, audiences: [x]}]}\n", "authz.policies[0].allow: required"),
        (
            WORKLOAD + "authz: {policies: [{name: e, mode: inject, audiences: [up], dry_run: true}]}\n",
            "authz.policies[0].dry_run: inject mode has nothing to dry-run",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['spiffe://svidgate.local/a/*/b']}]}\n",
            "authz.policies[0].allow[0]: 'spiffe://svidgate.local/a/*/b': '*' is allowed only as the last",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['spiffe://svidgate.local/a*']}]}\n",
            "'*' is allowed only as the last path segment",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['spiffe://unknown.org/a']}]}\n",
            "authz.policies[0].allow[0]: trust domain unknown.org is neither svidgate.local nor federated",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['https://a']}]}\n",
            "authz.policies[0].allow[0]: 'https://a': the scheme must be 'spiffe://'",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['*'],"
            " match: {path_prefix: /a, path_exact: /b}}]}\n",
            "authz.policies[0].match.path_exact: set at most one of",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['*'], match: {path_regex: '('}}]}\n",
            "authz.policies[0].match.path_regex: invalid regular expression",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['*'], match: {methods: [get]}}]}\n",
            "authz.policies[0].match.methods[0]: 'get' is not an upper-case HTTP method",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['*'], match: {path_prefix: api}}]}\n",
            "authz.policies[0].match.path_prefix: must start with '/'",
        ),
        (
            "authz: {policies: [{name: a, audiences: [x], allow: ['*'], inject_audience: y}]}\n",
            "authz.policies[0].inject_audience: only meaningful with mode: inject",
        ),
        (
            WORKLOAD + "authz: {policies: [{name: a, mode: inject}]}\n",
            "authz.policies[0].inject_audience: required with mode: inject",
        ),
        (
            WORKLOAD + "authz: {policies: [{name: a, mode: inject, inject_audience: x, allow: ['*']}]}\n",
            "authz.policies[0].allow: has no effect with mode: inject",
        ),
        (
            "authz: {policies: [{name: a, mode: inject, inject_audience: x}]}\n",
            "authz.policies[0].inject_spiffe_id: required with mode: inject",
        ),
        (
            WORKLOAD + "authz: {policies: [{name: a, mode: inject, inject_audience: x,"
            " inject_spiffe_id: 'spiffe://svidgate.local/other'}]}\n",
            "inject_spiffe_id: spiffe://svidgate.local/other is not one of the configured workloads",
        ),
        (
            "authz: {policies: [{name: 'a b', audiences: [x], allow: ['*']}]}\n",
            "authz.policies[0].name: use 1-64",
        ),
        ("source: {kind: spire}\n", "source.spire_socket: required with kind: spire"),
        (
            "source: {kind: files, cert_file: c, key_file: k}\n",
            "source.bundle_file: required with kind: files",
        ),
        ("source: {cert_file: c}\n", "source.cert_file: only meaningful with kind: files"),
        ("log: {level: verbose}\n", "log.level: expected one of debug, info, warning, error"),
        ("server: {socket_mode: 660}\n", "server.socket_mode: must be permission bits that include 0o600"),
        ("server: {drain_grace: soon}\n", "server.drain_grace: 'soon' is not a duration"),
    ],
)
def test_bad_config_names_the_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value).startswith("test.yaml: ")
    assert message in str(info.value)


def test_inject_defaults_from_single_audience_and_single_workload() -> None:
    config = parse(
        WORKLOAD + "authz: {policies: [{name: e, mode: inject, audiences: [spiffe://svidgate.local/up]}]}\n"
    )
    (policy,) = config.authz.policies
    assert policy.inject_audience == "spiffe://svidgate.local/up"
    assert policy.inject_spiffe_id == SpiffeId.parse("spiffe://svidgate.local/w")


def test_spire_source_skips_unknown_trust_domain_check() -> None:
    config = parse(
        "source: {kind: spire, spire_socket: /run/spire/agent.sock}\n"
        "authz: {policies: [{name: a, audiences: [x], allow: ['spiffe://elsewhere.org']}]}\n"
    )
    assert config.source.spire_socket == "unix:///run/spire/agent.sock"


def test_files_source_paths_are_relative_to_the_config() -> None:
    config = parse("source: {kind: files, cert_file: c.pem, key_file: /k.pem, bundle_file: ~/b.pem}\n")
    assert config.source.cert_file == Path("/etc/svidgate/c.pem")
    assert config.source.key_file == Path("/k.pem")
    assert config.source.bundle_file is not None
    assert config.source.bundle_file.name == "b.pem"
    assert config.source.bundle_file.is_absolute()


def test_null_listeners_turn_them_off() -> None:
    config = parse("listen: {workload_api: null, http: null, grpc: []}\n")
    assert config.listen.workload_api is None
    assert config.listen.http is None
    assert config.listen.grpc == ()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2d", 172800),
        ("250ms", 0.25),
        ("1m30s", 90),
        ("45", 45),
        (45, 45),
        (1.5, 1.5),
        (" 10s ", 10),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "m5", "5 m", "1h-5m", "5y", "-1s", True, None, [1], "nan"])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^ttl: "):
        parse_duration(value, "ttl")


def test_parse_duration_zero_only_where_allowed() -> None:
    assert parse_duration("0s", allow_zero=True) == 0
    with pytest.raises(ConfigError, match="greater than zero"):
        parse_duration("0s")


@given(hours=st.integers(0, 100), minutes=st.integers(0, 59), seconds=st.integers(1, 59))
def test_parse_duration_compound(hours: int, minutes: int, seconds: int) -> None:
    assert parse_duration(f"{hours}h{minutes}m{seconds}s") == hours * 3600 + minutes * 60 + seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:///run/a.sock", Address("unix", path="/run/a.sock")),
        ("unix:/run/a.sock", Address("unix", path="/run/a.sock")),
        ("tcp://127.0.0.1:0", Address("tcp", host="127.0.0.1", port=0)),
        ("localhost:8081", Address("tcp", host="localhost", port=8081)),
        ("[::]:1", Address("tcp", host="::", port=1)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


def test_address_grpc_target() -> None:
    assert Address("unix", path="/a.sock").grpc_target() == "unix:/a.sock"
    assert Address("tcp", host="127.0.0.1", port=5).grpc_target() == "127.0.0.1:5"


class Caller:
    def __init__(
        self,
        node_id: str | None = None,
        cluster: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        self.node_id, self.cluster, self.uid, self.gid = node_id, cluster, uid, gid


@pytest.mark.parametrize(
    ("selector", "caller", "matches"),
    [
        ("envoy:node_id:backend", Caller(node_id="backend"), True),
        ("envoy:node_id:backend", Caller(node_id="backend2"), False),
        ("envoy:node_id:backend", Caller(cluster="backend"), False),
        ("envoy:cluster:web", Caller(cluster="web"), True),
        ("unix:uid:1000", Caller(uid=1000), True),
        ("unix:uid:1000", Caller(uid=0), False),
        ("unix:uid:1000", Caller(), False),  # TCP: no peer credentials, never matches
        ("unix:gid:5", Caller(gid=5), True),
        ("any", Caller(), True),
    ],
)
def test_selector_matches(selector: str, caller: Caller, matches: bool) -> None:
    assert Selector.parse(selector).matches(caller) is matches


def test_workload_needs_all_selectors() -> None:
    config = parse(
        "workloads: [{spiffe_id: 'spiffe://svidgate.local/w',"
        " selectors: ['envoy:node_id:n', 'unix:uid:7']}]\n"
    )
    (workload,) = config.workloads
    assert workload.matches(Caller(node_id="n", uid=7))
    assert not workload.matches(Caller(node_id="n"))
    assert not workload.matches(Caller(uid=7))


def test_summary_mentions_the_essentials() -> None:
    summary = parse(FULL).summary()
    assert "trust domain example.org" in summary
    assert "2 workloads" in summary
    assert "2 federated trust domains" in summary
    assert "2 authz policies" in summary


def test_public_policy_needs_no_audiences_or_allow() -> None:
    config = parse(
        "authz: {policies: [{name: health, match: {path_exact: /healthz}, require_token: false}]}\n"
    )
    (policy,) = config.authz.policies
    assert not policy.require_token
    assert policy.audiences == ()
    assert policy.allow == ()


def test_documented_example_is_valid(tmp_path: Path) -> None:
    """The complete example in docs/configuration.md loads (so the reference cannot drift from the loader)."""
    doc = (Path(__file__).parents[3] / "docs" / "configuration.md").read_text()
    example = doc.split("## A complete example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse_config(example, "example", base_dir=tmp_path, env=ENV)
    assert config.trust_domain == TrustDomain("example.org")
    assert [p.name for p in config.authz.policies] == ["backend-api", "health", "egress-partner"]


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).parents[3] / "docs" / "configuration.md").read_text()
    import svidgate.config as module

    for cls in (
        module.Config,
        module.ListenConfig,
        module.CaConfig,
        module.UpstreamConfig,
        module.Workload,
        module.FederationConfig,
        module.BundleEndpoint,
        module.BundleEndpointServerConfig,
        module.SdsConfig,
        module.AuthzConfig,
        module.Policy,
        module.PolicyMatch,
        module.DecisionLogConfig,
        module.SourceConfig,
        module.LogConfig,
        module.ServerConfig,
        module.KubernetesConfig,
    ):
        for f in dataclasses.fields(cls):
            key = re.compile(rf"`[\w.<>]*\b{f.name}\b[\w.]*`")
            assert key.search(doc), f"{cls.__name__}.{f.name} is not documented"


@pytest.mark.parametrize(
    ("grpc", "selectors", "warned"),
    [
        ("[tcp://127.0.0.1:9000]", '["envoy:node_id:backend"]', True),
        ("[unix:///run/s.sock, tcp://127.0.0.1:9000]", '["envoy:node_id:backend", "envoy:cluster:b"]', True),
        ("[tcp://127.0.0.1:9000]", "[any]", True),
        ("[tcp://127.0.0.1:9000]", '["envoy:node_id:backend", "unix:uid:1001"]', False),
        ("[tcp://127.0.0.1:9000]", '["unix:gid:1001"]', False),
        ("[unix:///run/s.sock]", '["envoy:node_id:backend"]', False),
        ("[unix:///run/s.sock]", "[any]", False),
    ],
)
def test_tcp_sds_warns_when_no_kernel_verified_selector_constrains_a_workload(
    grpc: str, selectors: str, warned: bool
) -> None:
    config = parse(
        f"""\
        trust_domain: example.org
        listen: {{grpc: {grpc}}}
        workloads:
          - spiffe_id: spiffe://example.org/backend
            selectors: {selectors}
        """
    )
    found = [w for w in config.warnings() if "no kernel-verified selector" in w]
    assert bool(found) is warned
    if warned:
        (warning,) = found
        assert warning.startswith("workload spiffe://example.org/backend is selected by no kernel-verified")
        assert "any client of tcp://127.0.0.1:9000 can claim it and receive its private key" in warning


# -- hardening: inject-mode callers and the TCP warning ------------------------------------------------------

_INJECT = """\
trust_domain: example.org
listen: {{grpc: {grpc}{check}}}
workloads:
  - spiffe_id: spiffe://example.org/frontend
    selectors: ["unix:uid:1000"]
authz:
  policies:
    - name: egress
      mode: inject
      match: {{context_extensions: {{policy: egress}}}}
      audiences: [backend, payments]
      inject_audience: backend
{extra}"""


def _inject(grpc: str = "[unix:///run/s.sock]", check: str = "", extra: str = "") -> Config:
    return parse_config(
        _INJECT.format(grpc=grpc, check=f", check: {check}" if check else "", extra=extra), "test"
    )


def test_inject_allow_unverified_callers_defaults_off_and_parses() -> None:
    assert _inject().authz.policies[0].inject_allow_unverified_callers is False
    opted = _inject(extra="      inject_allow_unverified_callers: true\n")
    assert opted.authz.policies[0].inject_allow_unverified_callers is True
    with pytest.raises(ConfigError, match=r"policies\[0\]\.inject_allow_unverified_callers"):
        _inject(extra="      inject_allow_unverified_callers: maybe\n")


def test_inject_allow_unverified_callers_only_in_inject_mode() -> None:
    text = """\
trust_domain: example.org
authz:
  policies:
    - name: api
      audiences: [api]
      allow: ["*"]
      inject_allow_unverified_callers: false
"""
    with pytest.raises(ConfigError, match=r"policies\[0\]\.inject_allow_unverified_callers: only meaningful"):
        parse_config(text, "test")


@pytest.mark.parametrize(
    ("grpc", "check", "extra", "expected"),
    [
        ("[unix:///run/s.sock]", "null", "", None),
        ("[unix:///run/s.sock]", "unix:///run/check.sock", "", None),
        ("[unix:///run/s.sock, tcp://127.0.0.1:9000]", "null", "", "denied (unverified_caller)"),
        ("[tcp://127.0.0.1:9000]", "null", "      inject_allow_unverified_callers: true\n", "any client of"),
        # Every gRPC listener answers Check: a TCP SDS listener is a TCP Check listener too.
        ("[tcp://127.0.0.1:9000]", "unix:///run/check.sock", "", "denied (unverified_caller)"),
        ("[unix:///run/s.sock]", "tcp://127.0.0.1:9001", "", "denied (unverified_caller)"),
        # listen.check absent: its default, tcp://127.0.0.1:8081.
        ("[unix:///run/s.sock]", "", "", "denied (unverified_caller)"),
    ],
)
def test_inject_policy_with_check_over_tcp_warns(
    grpc: str, check: str, extra: str, expected: str | None
) -> None:
    found = [w for w in _inject(grpc, check, extra).warnings() if "'egress'" in w]
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1
        assert expected in found[0]
        assert "tcp://127.0.0.1:" in found[0]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("path_prefix", "/api/../admin", "write '/admin'"),
        ("path_exact", "//admin", "write '/admin'"),
        ("path_prefix", "/%61dmin", "write '/admin'"),
        ("path_prefix", "/a;b", "no single reading"),
        ("path_exact", "/a%2Fb", "no single reading"),
    ],
)
def test_non_canonical_policy_paths_are_refused(key: str, value: str, message: str) -> None:
    text = f"""\
trust_domain: example.org
authz:
  policies:
    - name: api
      match: {{{key}: "{value}"}}
      audiences: [api]
      allow: ["*"]
"""
    with pytest.raises(ConfigError, match=rf"policies\[0\]\.match\.{key}: .*{re.escape(message)}"):
        parse_config(text, "test")


@pytest.mark.parametrize(
    "host", ["evil.com:80@good", "\u212a8s.io", "api\uff0eexample.com", "a..b", "bad host", "*.a@b"]
)
def test_unusable_policy_hosts_are_refused(host: str) -> None:
    text = f"""\
trust_domain: example.org
authz:
  policies:
    - name: api
      match: {{hosts: ["{host}"]}}
      audiences: [api]
      allow: ["*"]
"""
    with pytest.raises(ConfigError, match=r"policies\[0\]\.match\.hosts\[0\]: .*not a host name"):
        parse_config(text, "test")


def test_check_processes_default_bounds_and_listener() -> None:
    assert parse("trust_domain: example.org\n").server.check_processes == 1
    assert parse("server: {check_processes: 2}\n").server.check_processes == 2
    with pytest.raises(ConfigError, match=r"server\.check_processes"):
        parse("server: {check_processes: 0}\n")
    with pytest.raises(ConfigError, match=r"server\.check_processes: 2 processes share listen\.check"):
        parse("server: {check_processes: 2}\nlisten: {check: null}\n")


def test_check_workers_default_and_bounds() -> None:
    assert parse("trust_domain: example.org\n").server.check_workers == 4
    assert parse("server: {check_workers: 6}\n").server.check_workers == 6
    with pytest.raises(ConfigError, match=r"server\.check_workers"):
        parse("server: {check_workers: 0}\n")


def test_bundle_endpoint_server_keys() -> None:
    config = parse(
        """\
        trust_domain: example.org
        listen: {bundle_endpoint: "0.0.0.0:8443"}
        bundle_endpoint:
          spiffe_id: spiffe://example.org/bundle-endpoint
          refresh_hint: 2m
          oidc_issuer: https://oidc.example.org
        """
    )
    assert config.listen.bundle_endpoint == ("0.0.0.0", 8443)
    assert config.bundle_endpoint.profile == "https_spiffe"
    assert config.bundle_endpoint.spiffe_id == SpiffeId.parse("spiffe://example.org/bundle-endpoint")
    assert config.bundle_endpoint.refresh_hint == 120
    assert config.bundle_endpoint.oidc_issuer == "https://oidc.example.org"
    assert config.summary().endswith(", bundle endpoint on 0.0.0.0:8443 (https_spiffe)")
    web = parse(
        """\
        listen: {bundle_endpoint: "127.0.0.1:8443"}
        bundle_endpoint: {profile: https_web, cert_file: tls.crt, key_file: tls.key}
        """
    )
    assert web.bundle_endpoint.cert_file == Path("/etc/svidgate/tls.crt")
    assert parse("trust_domain: example.org").listen.bundle_endpoint is None


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("bundle_endpoint: {spiffe_id: spiffe://example.org/b}", "set listen.bundle_endpoint"),
        ("listen: {bundle_endpoint: '127.0.0.1:1'}", "bundle_endpoint.spiffe_id: required with profile"),
        (
            "listen: {bundle_endpoint: '127.0.0.1:1'}\nbundle_endpoint: {spiffe_id: spiffe://other.org/b}",
            "must be a workload ID in the own trust domain",
        ),
        (
            "listen: {bundle_endpoint: '127.0.0.1:1'}\nbundle_endpoint: {profile: https_web, cert_file: c}",
            "bundle_endpoint.key_file: required with profile https_web",
        ),
        (
            "listen: {bundle_endpoint: '127.0.0.1:1'}\n"
            "bundle_endpoint: {spiffe_id: spiffe://example.org/b, cert_file: c}",
            "bundle_endpoint.cert_file: only meaningful with profile https_web",
        ),
        (
            "listen: {bundle_endpoint: '127.0.0.1:1'}\n"
            "bundle_endpoint: {spiffe_id: spiffe://example.org/b, oidc_issuer: 'http://x'}",
            "bundle_endpoint.oidc_issuer: must be an https:// URL",
        ),
        ("listen: {http: '127.0.0.1:9', bundle_endpoint: '127.0.0.1:9'}", "is already used by listen.http"),
        ("authz: {unknown_key_wait: 11s}", "authz.unknown_key_wait: must be at most 10s"),
    ],
)
def test_bundle_endpoint_server_errors(yaml_text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse("trust_domain: example.org\n" + yaml_text)
    assert message in str(err.value)


def test_pooling_trust_domain_roots_is_an_explicit_opt_in_with_a_warning(tmp_path: Path) -> None:
    base = "trust_domain: example.org\nsds: {validation: trusted_ca, istio_compat: true}\n"
    default = parse_config(base, "t", base_dir=tmp_path, env=ENV)
    assert default.sds.pool_trust_domain_roots_unsafe is False
    assert not [w for w in default.warnings() if "pool_trust_domain_roots_unsafe" in w]
    opted = parse_config(
        base.replace("istio_compat: true", "istio_compat: true, pool_trust_domain_roots_unsafe: true"),
        "t",
        base_dir=tmp_path,
        env=ENV,
    )
    assert opted.sds.pool_trust_domain_roots_unsafe is True
    (warning,) = [w for w in opted.warnings() if "pool_trust_domain_roots_unsafe" in w]
    assert "impersonation" in warning
    bad = base.replace("}", ", pool_trust_domain_roots_unsafe: 1}")
    with pytest.raises(ConfigError, match=r"sds\.pool_trust_domain_roots_unsafe: expected true or false"):
        parse_config(bad, "t", base_dir=tmp_path, env=ENV)
