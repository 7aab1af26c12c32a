"""Per-stream xDS state machines for SDS: state of the world (`SotwStream`) and incremental (`DeltaStream`).

Pure: requests and snapshots go in (as plain values and a `SecretResolver`), planned responses and protocol
events come out; the servicer does the I/O, the logging and the metrics. The rules (xDS protocol,
envoyproxy.io "xDS REST and gRPC protocol"), and what each guards against:

- Versions are content hashes per resource (`SecretResource.version`); a SotW response's `version_info` is a
  hash over the (name, version) pairs the stream has been sent, so it changes exactly when content does.
- Only resources whose content changed are sent. For SDS this is legal in SotW too: Envoy's SotW mux hands
  each secret watch only the resources named in the response and leaves the other watches alone (only
  Listener and Cluster responses must carry the full state).
- A new stream starts empty: whatever `version_info` (SotW) the first request carries, the full current
  state of the subscribed names is sent, because we cannot know what an old version meant (it may come
  from another svidgate process). Delta is different by design: `initial_resource_versions` names content by
  hash, so a reconnecting Envoy that already holds the current content is not sent it again.
- SotW: a request whose `response_nonce` is not the last nonce sent is stale (Envoy has not seen our latest
  response yet) and is ignored; Envoy sends a fresh one after processing the latest. Delta: ACK/NACK is per
  nonce and subscription changes are deltas that must never be dropped, so a stale nonce only skips the
  ACK/NACK accounting.
- A NACK (a request carrying `error_detail`) is reported once and the rejected content is remembered: it is
  never pushed again unless its content changes or Envoy re-subscribes to the name. Replying to a NACK with
  the same content is how NACK loops happen.
- An unknown or unentitled name is reported once per stream (and again only if the reason changes); the other
  names keep being served. In SotW the name is simply left out: Envoy keeps waiting for it (a listener or
  cluster using it stays warming until `initial_fetch_timeout`, 15 s by default, then starts without it and
  its TLS handshakes fail), which is why the servicer logs it at warning level with the Envoy node. In delta,
  a name the client holds but that disappeared is sent in `removed_resources`.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from svidgate.sds.resources import Rejection, SecretResolver, SecretResource, Subscriber

#: Unacknowledged delta responses remembered per stream for ACK/NACK accounting (Envoy answers in order, so
#: anything older than a handful of responses is stale).
MAX_IN_FLIGHT = 16

R = TypeVar("R")


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SotwResponse:
    """A planned `DiscoveryResponse`."""

    version_info: str
    nonce: str
    resources: tuple[SecretResource, ...]


@dataclass(frozen=True, slots=True)
class DeltaResponse:
    """A planned `DeltaDiscoveryResponse`."""

    system_version_info: str
    nonce: str
    resources: tuple[SecretResource, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Envoy applied the response `nonce`; `resources` are its (name, version) pairs."""

    nonce: str
    resources: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Nack:
    """Envoy rejected the response `nonce` (`error_detail` of the request; never contains key material)."""

    nonce: str
    resources: tuple[tuple[str, str], ...]
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class StaleNonce:
    """A request answered an older response than the last one sent."""

    nonce: str
    expected: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A subscribed name that cannot be served (first report, or its reason changed)."""

    rejection: Rejection
    previously_served: bool


@dataclass(frozen=True, slots=True)
class Removed:
    """A name the client held was sent in `removed_resources` (delta only)."""

    name: str


Event = Ack | Nack | StaleNonce | Rejected | Removed


@dataclass(frozen=True, slots=True)
class Step(Generic[R]):
    """The outcome of one input: a response to send (or None) and what to log and count."""

    response: R | None
    events: tuple[Event, ...] = ()


def state_version(pairs: Iterable[tuple[str, str]]) -> str:
    """A version string for a set of (name, content version) pairs, independent of their order.

    Args:
        pairs: resource names and their content versions.

    Returns:
        A short hex digest; equal sets give equal versions.
    """
    digest = hashlib.sha256()
    for name, version in sorted(pairs):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(version.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:20]


def counter_nonces() -> Callable[[], str]:
    """Nonces 1, 2, 3... in hex: unique per stream, which is all xDS asks of them, and cheap."""
    counter = itertools.count(1)
    return lambda: format(next(counter), "x")


def _dedupe(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for n in names if n))


class _Reporter:
    """Remembers what was reported per name so that each problem is logged and counted once per stream."""

    __slots__ = ("_reasons",)

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def rejected(self, rejection: Rejection, served: bool, events: list[Event]) -> None:
        if self._reasons.get(rejection.name) != rejection.reason:
            self._reasons[rejection.name] = rejection.reason
            events.append(Rejected(rejection, served))

    def resolved(self, name: str) -> None:
        self._reasons.pop(name, None)

    def forget(self, name: str) -> None:
        self._reasons.pop(name, None)


# ---------------------------------------------------------------------------------------------------------
# State of the world
# ---------------------------------------------------------------------------------------------------------


class SotwStream:
    """The state of one `StreamSecrets` stream.

    Args:
        subscriber: the caller's entitlement and validation flavour (fixed for the stream: the node is taken
            from the first request, peer credentials from the connection).
        nonces: the nonce generator (default: a per-stream counter).
    """

    __slots__ = (
        "_in_flight",
        "_nacked",
        "_names",
        "_nonce",
        "_nonces",
        "_reporter",
        "_sent",
        "_started",
        "_wildcard",
        "acked",
        "subscriber",
    )

    def __init__(self, subscriber: Subscriber, nonces: Callable[[], str] | None = None) -> None:
        self.subscriber = subscriber
        self._nonces = nonces or counter_nonces()
        self._started = False
        self._wildcard = False
        self._names: tuple[str, ...] = ()
        # name -> content version last sent on this stream (what Envoy holds, or was offered and rejected).
        self._sent: dict[str, str] = {}
        self._nonce: str | None = None
        self._in_flight: tuple[tuple[str, str], ...] = ()
        self._nacked: set[tuple[str, str]] = set()
        self._reporter = _Reporter()
        #: name -> content version Envoy acknowledged last.
        self.acked: dict[str, str] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """The subscribed resource names (for a wildcard stream: those of the last plan)."""
        return self._names

    @property
    def last_nonce(self) -> str | None:
        return self._nonce

    def on_request(
        self,
        resource_names: Sequence[str],
        version_info: str,
        response_nonce: str,
        error: tuple[int, str] | None,
        resolver: SecretResolver,
    ) -> Step[SotwResponse]:
        """Process one `DiscoveryRequest`.

        Args:
            resource_names: the request's `resource_names` (the full subscription, SotW style).
            version_info: the version Envoy last applied (informational: see the module docstring).
            response_nonce: the nonce of the response this request answers ("" on the first request).
            error: `(code, message)` of `error_detail` when the request is a NACK, else None.
            resolver: the resolver of the current snapshot.

        Returns:
            The response to send, if any, and the events to report.
        """
        events: list[Event] = []
        if not self._started:
            self._started = True
            # Legacy wildcard (xDS): a first request without names subscribes to everything the caller may
            # have.
            self._wildcard = not resource_names
        elif self._nonce is not None:
            if response_nonce != self._nonce:
                return Step(None, (StaleNonce(response_nonce, self._nonce),))
            # Only the first answer to a response is its ACK/NACK; later requests with the same nonce are
            # subscription changes (or Envoy repeating itself) and must not be counted again.
            if self._in_flight and error is not None:
                self._nacked.update(self._in_flight)
                events.append(Nack(response_nonce, self._in_flight, error[0], error[1]))
            elif self._in_flight:
                self.acked.update(self._in_flight)
                events.append(Ack(response_nonce, self._in_flight))
            self._in_flight = ()
        if not self._wildcard:
            self._subscribe(_dedupe(resource_names))
        return Step(self._plan(resolver, events), tuple(events))

    def on_snapshot(self, resolver: SecretResolver) -> Step[SotwResponse]:
        """A new snapshot was published: plan a push of the subscribed resources whose content changed."""
        if not self._started:
            return Step(None)
        events: list[Event] = []
        return Step(self._plan(resolver, events), tuple(events))

    def _subscribe(self, names: tuple[str, ...]) -> None:
        keep = set(names)
        for name in self._names:
            if name not in keep:
                # Unsubscribed: forget it, so that a later re-subscription gets the content again (Envoy
                # dropped its copy), NACKed or not.
                self._sent.pop(name, None)
                self.acked.pop(name, None)
                self._nacked = {pair for pair in self._nacked if pair[0] != name}
                self._reporter.forget(name)
        self._names = names

    def _plan(self, resolver: SecretResolver, events: list[Event]) -> SotwResponse | None:
        if self._wildcard:
            self._names = resolver.wildcard_names(self.subscriber)
        to_send: list[SecretResource] = []
        for name in self._names:
            resolved = resolver.resolve(name, self.subscriber)
            if isinstance(resolved, Rejection):
                # SotW cannot withdraw a secret: Envoy keeps the last one it has (if any) until it
                # unsubscribes.
                self._reporter.rejected(resolved, name in self._sent, events)
                continue
            self._reporter.resolved(name)
            if self._sent.get(name) == resolved.version or (name, resolved.version) in self._nacked:
                continue
            to_send.append(resolved)
        if not to_send:
            return None
        for resource in to_send:
            self._sent[resource.name] = resource.version
        nonce = self._nonces()
        self._nonce = nonce
        self._in_flight = tuple((r.name, r.version) for r in to_send)
        return SotwResponse(state_version(self._sent.items()), nonce, tuple(to_send))


# ---------------------------------------------------------------------------------------------------------
# Incremental (delta)
# ---------------------------------------------------------------------------------------------------------


class DeltaStream:
    """The state of one `DeltaSecrets` stream.

    Args:
        subscriber: the caller's entitlement and validation flavour.
        nonces: the nonce generator (default: a per-stream counter).
    """

    __slots__ = (
        "_client",
        "_in_flight",
        "_nacked",
        "_nonces",
        "_reporter",
        "_started",
        "_subscribed",
        "_wildcard",
        "acked",
        "subscriber",
    )

    def __init__(self, subscriber: Subscriber, nonces: Callable[[], str] | None = None) -> None:
        self.subscriber = subscriber
        self._nonces = nonces or counter_nonces()
        self._started = False
        self._wildcard = False
        self._subscribed: dict[str, None] = {}
        # name -> content version the client holds (from initial_resource_versions, then from what we sent).
        self._client: dict[str, str] = {}
        self._in_flight: OrderedDict[str, tuple[tuple[str, str], ...]] = OrderedDict()
        self._nacked: set[tuple[str, str]] = set()
        self._reporter = _Reporter()
        #: name -> content version Envoy acknowledged last.
        self.acked: dict[str, str] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._subscribed)

    def on_request(
        self,
        subscribe: Sequence[str],
        unsubscribe: Sequence[str],
        initial_resource_versions: Mapping[str, str],
        response_nonce: str,
        error: tuple[int, str] | None,
        resolver: SecretResolver,
    ) -> Step[DeltaResponse]:
        """Process one `DeltaDiscoveryRequest`.

        Args:
            subscribe: `resource_names_subscribe`.
            unsubscribe: `resource_names_unsubscribe`.
            initial_resource_versions: what a reconnecting client already holds (first request only).
            response_nonce: the nonce of the response this request answers ("" if none).
            error: `(code, message)` of `error_detail` when the request is a NACK, else None.
            resolver: the resolver of the current snapshot.

        Returns:
            The response to send, if any, and the events to report.
        """
        events: list[Event] = []
        if not self._started:
            self._started = True
            # Legacy wildcard: a first request that subscribes to nothing means "everything" (xDS spec).
            self._wildcard = not subscribe
            self._client = {k: v for k, v in initial_resource_versions.items() if k}
        if response_nonce:
            pairs = self._in_flight.pop(response_nonce, None)
            if pairs is None:
                events.append(StaleNonce(response_nonce, next(reversed(self._in_flight), "")))
            elif error is not None:
                self._nacked.update(pairs)
                events.append(Nack(response_nonce, pairs, error[0], error[1]))
            else:
                self.acked.update(pairs)
                events.append(Ack(response_nonce, pairs))
        for name in subscribe:
            if name == "*":
                self._wildcard = True
            elif name:
                self._subscribed[name] = None
        for name in unsubscribe:
            if name == "*":
                self._wildcard = False
                continue
            self._subscribed.pop(name, None)
            self._client.pop(name, None)
            self.acked.pop(name, None)
            self._nacked = {pair for pair in self._nacked if pair[0] != name}
            self._reporter.forget(name)
        return Step(self._plan(resolver, events), tuple(events))

    def on_snapshot(self, resolver: SecretResolver) -> Step[DeltaResponse]:
        """A new snapshot was published: plan a push of what changed (and removals of what disappeared)."""
        if not self._started:
            return Step(None)
        events: list[Event] = []
        return Step(self._plan(resolver, events), tuple(events))

    def _plan(self, resolver: SecretResolver, events: list[Event]) -> DeltaResponse | None:
        names: Iterable[str] = self._subscribed
        if self._wildcard:
            names = dict.fromkeys([*self._subscribed, *resolver.wildcard_names(self.subscriber)])
        wanted = set(names)
        to_send: list[SecretResource] = []
        removed: list[str] = []
        for name in names:
            resolved = resolver.resolve(name, self.subscriber)
            if isinstance(resolved, Rejection):
                self._reporter.rejected(resolved, name in self._client, events)
                # "unavailable" is transient (the source has not delivered yet): keep the client's copy.
                if resolved.reason != "unavailable" and name in self._client:
                    del self._client[name]
                    removed.append(name)
                    events.append(Removed(name))
                continue
            self._reporter.resolved(name)
            if self._client.get(name) == resolved.version or (name, resolved.version) in self._nacked:
                continue
            to_send.append(resolved)
        # Versions the client claimed (initial_resource_versions) for names it no longer subscribes to.
        for name in [n for n in self._client if n not in wanted]:
            del self._client[name]
        if not to_send and not removed:
            return None
        for resource in to_send:
            self._client[resource.name] = resource.version
        nonce = self._nonces()
        self._in_flight[nonce] = tuple((r.name, r.version) for r in to_send)
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._in_flight.popitem(last=False)
        return DeltaResponse(state_version(self._client.items()), nonce, tuple(to_send), tuple(removed))
