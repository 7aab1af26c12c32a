"""The checks `svidgate serve` makes before it starts, shared word for word with `svidgate check-config`.

`load_config` validates the file itself (types, unknown keys, cross-references, TTL relations) for every
command and for every reload. `preflight` adds what needs the files and directories a configuration names --
the built-in CA's state, the files source's certificate, key and bundle, a bundle endpoint's ``ca_file``, the
unix sockets' directories and paths -- so that a configuration `check-config` accepts is one `serve` starts
with, and `serve` fails on such a problem with the same one line. It only reads: no CA is created, no
directory made.

What stays a run-time matter: binding listeners (an address in use, a second instance) and reaching a SPIRE
agent or a bundle endpoint.

This module imports the configuration, the identity domain and the pure bundle parser; never gRPC.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

from svidgate.config import Address, Config
from svidgate.errors import BundleError, CaError, ConfigError, X509SvidError
from svidgate.identity.bundle import bundle_update_rejection
from svidgate.identity.ca import BuiltinCa, UpstreamAuthority
from svidgate.identity.clock import Clock, system_clock
from svidgate.identity.x509svid import parse_x509_svid, verify_x509_svid
from svidgate.peercred import socket_dir_problem
from svidgate.sources.federation import FileTooLargeError, WatchedFile, parse_bundle_document

__all__ = ["preflight"]


def preflight(config: Config, origin: str | None = None, clock: Clock = system_clock) -> None:
    """Check what `config` names on disk the way `serve` will use it.

    Args:
        config: a configuration `load_config` accepted.
        origin: the config file's name, to start error messages with (as `load_config` does).
        clock: the time source (a files-source SVID must be valid now).

    Raises:
        ConfigError: ``"<origin>: <key path>: <problem>"`` for the first problem found.
    """
    try:
        _preflight(config, clock)
    except ConfigError as exc:
        if origin is None:
            raise
        raise ConfigError(f"{origin}: {exc}") from None


def _preflight(config: Config, clock: Clock) -> None:
    if config.source.kind == "builtin":
        _check_ca_state(config, clock)
    elif config.source.kind == "files":
        _check_source_files(config, clock)
    _check_listen_sockets(config)
    for trust_domain, federation in config.federation.items():
        endpoint = federation.bundle_endpoint
        if endpoint is not None and endpoint.ca_file is not None:
            _check_ca_file(endpoint.ca_file, f"federation.{trust_domain}.bundle_endpoint.ca_file")


def _check_listen_sockets(config: Config) -> None:
    """Each unix socket's directory must be safe for sockets (or creatable), and its path free of anything
    that is not a socket (serve never replaces such a file)."""
    listen = config.listen
    named: list[tuple[str, Address | None]] = [(f"listen.grpc[{i}]", a) for i, a in enumerate(listen.grpc)]
    named += [("listen.workload_api", listen.workload_api), ("listen.check", listen.check)]
    for where, address in named:
        if address is None or address.kind != "unix":
            continue
        path = Path(address.path)
        existing = _nearest_existing(path.parent, where)
        if existing != path.parent:
            if not stat.S_ISDIR(os.stat(existing).st_mode) or not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(f"{where}: cannot create the socket directory {path.parent} in {existing}")
            continue  # serve creates it, mode 0700
        problem = socket_dir_problem(path.parent)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"{where}: {path}: {exc.strerror or exc}") from None
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{where}: {path} exists and is not a socket; serve never replaces it")


def _nearest_existing(path: Path, where: str) -> Path:
    """`path` or its nearest ancestor that exists."""
    while True:
        try:
            os.stat(path)
        except FileNotFoundError:
            if path.parent == path:
                raise ConfigError(f"{where}: no part of {path} exists") from None
            path = path.parent
            continue
        except OSError as exc:
            raise ConfigError(f"{where}: {path}: {exc.strerror or exc}") from None
        return path


def _check_ca_state(config: Config, clock: Clock) -> None:
    """The CA state must load for this trust domain, or its directory must be creatable."""
    state_dir = config.state_dir
    existing = _nearest_existing(state_dir, "state_dir")
    if not stat.S_ISDIR(os.stat(existing).st_mode):
        raise ConfigError(f"state_dir: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        # serve creates the directory, locks it (serve.lock) and keeps the CA state in it.
        what = "" if existing == state_dir else f"cannot create {state_dir}: "
        raise ConfigError(f"state_dir: {what}{existing} is not writable")
    if existing != state_dir:
        return  # serve creates the directory and a new CA in it
    try:
        upstream = config.ca.upstream
        BuiltinCa.load_existing(
            state_dir,
            config.trust_domain,
            config.ca.key_type,
            clock,
            ca_ttl=config.ca.ca_ttl,
            # State issued under another root (or none) is refused by serve: say so here too.
            upstream=None
            if upstream is None
            else UpstreamAuthority.load(upstream.cert_file, upstream.key_file, clock()),
        )
    except CaError as exc:
        raise ConfigError(f"state_dir: {exc}") from None


def _check_source_files(config: Config, clock: Clock) -> None:
    """The files source's certificate, key and bundle must form an SVID of the trust domain, valid now.

    The same steps, with the same functions, as `FileSource` takes at its start: each file read up to its cap
    (`WatchedFile`), the bundle parsed and passed through the bundle acceptance rules, the SVID parsed and
    verified against it.
    """
    source = config.source
    files = {"cert_file": source.cert_file, "key_file": source.key_file, "bundle_file": source.bundle_file}
    contents: dict[str, bytes] = {}
    for key, path in files.items():
        assert path is not None  # load_config requires all three with kind: files
        try:
            data = WatchedFile(path).poll()
        except FileTooLargeError as exc:
            raise ConfigError(f"source.{key}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"source.{key}: cannot read {path}: {exc.strerror or exc}") from None
        contents[key] = data or b""
    try:
        bundle = parse_bundle_document(config.trust_domain, contents["bundle_file"])
    except BundleError as exc:
        raise ConfigError(f"source.bundle_file: {source.bundle_file}: {exc}") from None
    rejection = bundle_update_rejection(None, bundle)
    if rejection is not None:
        raise ConfigError(f"source.bundle_file: {source.bundle_file}: {rejection.detail}")
    try:
        svid = parse_x509_svid(contents["cert_file"], contents["key_file"])
        if not svid.spiffe_id.member_of(config.trust_domain):
            raise X509SvidError(f"{svid.spiffe_id} is not in the trust domain {config.trust_domain}")
        verify_x509_svid(svid.cert_chain, {config.trust_domain: bundle}, clock())
    except X509SvidError as exc:
        raise ConfigError(f"source.cert_file: {source.cert_file}: {exc}") from None


def _check_ca_file(path: Path, where: str) -> None:
    """The PEM roots an https_web bundle endpoint is verified with must load as they will at a fetch."""
    _read(path, where)
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {path}: not PEM CA certificates ({exc})") from None


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
