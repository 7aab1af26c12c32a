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
- Withdrawal: a name the client holds that stops being servable for good (a config reload took the caller's
  entitlement away, or a federated trust domain left the snapshot; not ``unavailable``, which is transient).
  Delta says so in `removed_resources`. SotW has no way to say it: Envoy's SDS ignores a secret left out of a
  response, and an empty response is NACKed ("Missing SDS resources"). So the SotW stream plans its end
  (`Step.end_stream`, a `Withdrawn` event) and the servicer closes it with OK. Why this is the safest choice
  rather than carrying on silently: svidgate's view and Envoy's would otherwise diverge with no trace;
  ending the stream makes Envoy reconnect and re-subscribe, the name is then refused on the new stream (a
  ``not_entitled``/``unknown`` warning and metric every time Envoy asks again, and no loop: a new stream
  never held the name), an Envoy that restarts never gets it, and the withdrawal is one clear log line. What
  neither delta nor SotW can do is make a running Envoy drop a secret it already holds (its SdsApi ACKs and
  ignores a delta removal of a singleton secret, and keeps its secret across reconnects): the copy it has
  is simply never rotated again, so a withdrawn SVID stops working when it expires (`ca.x509_svid_ttl`).
  Revoking faster than that needs the Envoy restarted or its listener/cluster config changed.
- Entitlement is re-evaluated on open streams (`on_entitlement`): a reload that grants a name pushes it, one
  that takes it away withdraws it as above, and a stream whose entitlement did not change sends nothing.
- Size: a request carrying more than `MAX_RESOURCE_NAMES` names (in any one list), or one that would leave a
  stream subscribed to more, is refused whole (`ResourceLimitError`, before any state changes); the servicer
  ends the stream with INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from svidgate.errors import SvidgateError
from svidgate.sds.resources import Rejection, SecretResolver, SecretResource, Subscriber

#: Most resource names one request may carry in any one list (SotW `resource_names`; delta
#: `resource_names_subscribe`, `resource_names_unsubscribe`, `initial_resource_versions`), and most names one
#: stream may be subscribed to. Why: every name is resolved, tracked and reported on the event loop that also
#: answers ext_authz Check; one SotW request with 150k junk names held that loop for 20-40 s (security review,
#: with one warning line per name), long enough for an Envoy with `failure_mode_allow` to let requests through
#: unchecked. A real Envoy subscribes to a handful of names (one per distinct SDS secret its listeners and
#: clusters use), so 1000 leaves a wide margin; a request at the cap is bounded to a few milliseconds of work.
MAX_RESOURCE_NAMES = 1000

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


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """SotW only: names the client holds can no longer be served (module docstring); the stream ends."""

    rejections: tuple[Rejection, ...]


Event = Ack | Nack | StaleNonce | Rejected | Removed | Withdrawn


class InvalidRequestError(SvidgateError):
    """A request refused whole: the servicer ends the stream (or the fetch) with INVALID_ARGUMENT."""


class ResourceLimitError(InvalidRequestError):
    """A request names more resources than `MAX_RESOURCE_NAMES` allows (in one list, or on the stream).

    Raised before the stream's state changes; the servicer ends the stream with INVALID_ARGUMENT.

    Attributes:
        field: the request field over the cap (``resource_names``, ``resource_names_subscribe``, ...), or
            ``subscriptions`` for the stream-wide total.
        count: how many names it had (or the stream would have had).
        limit: the cap.
    """

    def __init__(self, field: str, count: int, limit: int = MAX_RESOURCE_NAMES) -> None:
        where = "the stream would be subscribed to" if field == "subscriptions" else f"{field} has"
        super().__init__(f"{where} {count} resource names; at most {limit} are allowed")
        self.field = field
        self.count = count
        self.limit = limit


def check_resource_names(field: str, count: int) -> None:
    """Refuse a list of `count` resource names longer than `MAX_RESOURCE_NAMES`.

    Args:
        field: the request field, for the message.
        count: its length (taken before anything iterates over it).

    Raises:
        ResourceLimitError: `count` is over the cap.
    """
    if count > MAX_RESOURCE_NAMES:
        raise ResourceLimitError(field, count)


@dataclass(frozen=True, slots=True)
class Step(Generic[R]):
    """The outcome of one input: a response to send (or None), what to log and count, and whether the
    stream must now end (with OK; SotW withdrawal, see the module docstring)."""

    response: R | None
    events: tuple[Event, ...] = ()
    end_stream: bool = False


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
# What both flavours share
# ---------------------------------------------------------------------------------------------------------


class StreamState(ABC, Generic[R]):
    """The state both flavours keep: the caller, what the client holds, ACK/NACK accounting, reports.

    Subclasses plan responses (`_plan`); everything here behaves the same in SotW and delta.
    """

    __slots__ = ("_held", "_nacked", "_nonces", "_reporter", "_started", "_wildcard", "acked", "subscriber")

    def __init__(self, subscriber: Subscriber, nonces: Callable[[], str] | None) -> None:
        self.subscriber = subscriber
        self._nonces = nonces or counter_nonces()
        self._started = False
        self._wildcard = False
        # name -> content version the client holds as far as this stream knows: what was sent (or offered and
        # rejected), and in delta also what `initial_resource_versions` claimed.
        self._held: dict[str, str] = {}
        self._nacked: set[tuple[str, str]] = set()
        self._reporter = _Reporter()
        #: name -> content version Envoy acknowledged last.
        self.acked: dict[str, str] = {}

    def on_snapshot(self, resolver: SecretResolver) -> Step[R]:
        """A new snapshot was published: plan a push of the subscribed resources whose content changed (and,
        for what can no longer be served, a delta removal or the SotW stream's end)."""
        if not self._started:
            return Step(None)
        return self._plan(resolver, [])

    def on_entitlement(self, subscriber: Subscriber, resolver: SecretResolver) -> Step[R]:
        """The caller's entitlement was re-evaluated (config reload): plan what it changes on this stream.

        Args:
            subscriber: the caller's entitlement under the new rules (validation: the stream's own).
            resolver: the resolver of the current snapshot.

        Returns:
            Newly granted names pushed, withdrawn ones removed (delta) or the stream's end (SotW), and any
            content change of `resolver`'s snapshot; nothing when neither changed.
        """
        self.subscriber = subscriber
        return self.on_snapshot(resolver)

    @abstractmethod
    def _plan(self, resolver: SecretResolver, events: list[Event]) -> Step[R]:
        """The response (if any) that brings the client up to date with `resolver`'s snapshot."""

    def _answered(
        self,
        nonce: str,
        pairs: tuple[tuple[str, str], ...],
        error: tuple[int, str] | None,
        events: list[Event],
    ) -> None:
        """Record Envoy's ACK or NACK of the response `nonce`, which carried `pairs`."""
        if error is not None:
            self._nacked.update(pairs)
            events.append(Nack(nonce, pairs, error[0], error[1]))
        else:
            self.acked.update(pairs)
            events.append(Ack(nonce, pairs))

    def _forget(self, name: str) -> None:
        # Unsubscribed: Envoy dropped its copy, so a re-subscription gets the content again, NACKed or not.
        self._held.pop(name, None)
        self.acked.pop(name, None)
        self._nacked = {pair for pair in self._nacked if pair[0] != name}
        self._reporter.forget(name)

    def _changed(self, resolved: SecretResource) -> bool:
        """True when the client should be sent `resolved` (it holds other content that it did not reject)."""
        pair = (resolved.name, resolved.version)
        return self._held.get(pair[0]) != pair[1] and pair not in self._nacked


def _withdrawn(rejection: Rejection) -> bool:
    # "unavailable" is transient (the source has not delivered yet, or an SVID is being re-minted): the client
    # keeps its copy. Anything else is for good until the configuration or the snapshot changes again.
    return rejection.reason != "unavailable"


# ---------------------------------------------------------------------------------------------------------
# State of the world
# ---------------------------------------------------------------------------------------------------------


class SotwStream(StreamState[SotwResponse]):
    """The state of one `StreamSecrets` stream.

    Args:
        subscriber: the caller's entitlement and validation flavour (the node is taken from the first request,
            peer credentials from the connection; the entitlement changes on a config reload).
        nonces: the nonce generator (default: a per-stream counter).
    """

    __slots__ = ("_in_flight", "_names", "_nonce")

    def __init__(self, subscriber: Subscriber, nonces: Callable[[], str] | None = None) -> None:
        super().__init__(subscriber, nonces)
        self._names: tuple[str, ...] = ()
        self._nonce: str | None = None
        self._in_flight: tuple[tuple[str, str], ...] = ()

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

        Raises:
            ResourceLimitError: more than `MAX_RESOURCE_NAMES` names (the stream's state is unchanged).
        """
        # SotW requests carry the whole subscription, so this one check bounds the stream too.
        check_resource_names("resource_names", len(resource_names))
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
            if self._in_flight:
                self._answered(response_nonce, self._in_flight, error, events)
            self._in_flight = ()
        if not self._wildcard:
            self._subscribe(_dedupe(resource_names))
        return self._plan(resolver, events)

    def _subscribe(self, names: tuple[str, ...]) -> None:
        keep = set(names)
        for name in self._names:
            if name not in keep:
                self._forget(name)
        self._names = names

    def _plan(self, resolver: SecretResolver, events: list[Event]) -> Step[SotwResponse]:
        names: Iterable[str] = self._names
        if self._wildcard:
            self._names = resolver.wildcard_names(self.subscriber)
            # What the client got through the wildcard but that left it (entitlement or trust domain gone).
            names = dict.fromkeys([*self._names, *self._held])
        to_send: list[SecretResource] = []
        withdrawn: list[Rejection] = []
        for name in names:
            resolved = resolver.resolve(name, self.subscriber)
            if isinstance(resolved, Rejection):
                held = name in self._held
                self._reporter.rejected(resolved, held, events)
                if held and _withdrawn(resolved):
                    withdrawn.append(resolved)
                continue
            self._reporter.resolved(name)
            if self._changed(resolved):
                to_send.append(resolved)
        if withdrawn:
            # SotW cannot withdraw a secret (module docstring): end the stream; the reconnecting Envoy gets
            # the full current state on a new one.
            events.append(Withdrawn(tuple(withdrawn)))
            return Step(None, tuple(events), end_stream=True)
        if not to_send:
            return Step(None, tuple(events))
        for resource in to_send:
            self._held[resource.name] = resource.version
        nonce = self._nonces()
        self._nonce = nonce
        self._in_flight = tuple((r.name, r.version) for r in to_send)
        return Step(SotwResponse(state_version(self._held.items()), nonce, tuple(to_send)), tuple(events))


# ---------------------------------------------------------------------------------------------------------
# Incremental (delta)
# ---------------------------------------------------------------------------------------------------------


class DeltaStream(StreamState[DeltaResponse]):
    """The state of one `DeltaSecrets` stream.

    Args:
        subscriber: the caller's entitlement and validation flavour.
        nonces: the nonce generator (default: a per-stream counter).
    """

    __slots__ = ("_in_flight", "_subscribed")

    def __init__(self, subscriber: Subscriber, nonces: Callable[[], str] | None = None) -> None:
        super().__init__(subscriber, nonces)
        self._subscribed: dict[str, None] = {}
        self._in_flight: OrderedDict[str, tuple[tuple[str, str], ...]] = OrderedDict()

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

        Raises:
            ResourceLimitError: a list over `MAX_RESOURCE_NAMES`, or a subscription that would grow past it
                (the stream's state is unchanged).
        """
        self._check_limits(subscribe, unsubscribe, initial_resource_versions)
        events: list[Event] = []
        if not self._started:
            self._started = True
            # Legacy wildcard: a first request that subscribes to nothing means "everything" (xDS spec).
            self._wildcard = not subscribe
            self._held = {k: v for k, v in initial_resource_versions.items() if k}
        if response_nonce:
            pairs = self._in_flight.pop(response_nonce, None)
            if pairs is None:
                events.append(StaleNonce(response_nonce, next(reversed(self._in_flight), "")))
            else:
                self._answered(response_nonce, pairs, error, events)
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
            self._forget(name)
        return self._plan(resolver, events)

    def _check_limits(
        self,
        subscribe: Sequence[str],
        unsubscribe: Sequence[str],
        initial_resource_versions: Mapping[str, str],
    ) -> None:
        # Lengths first: they cost nothing, whatever the request's size.
        check_resource_names("resource_names_subscribe", len(subscribe))
        check_resource_names("resource_names_unsubscribe", len(unsubscribe))
        check_resource_names("initial_resource_versions", len(initial_resource_versions))
        # Delta subscriptions accumulate over requests: bound the total the stream would hold afterwards.
        new = [n for n in subscribe if n and n != "*" and n not in self._subscribed]
        if len(self._subscribed) + len(new) > MAX_RESOURCE_NAMES:
            total = len((self._subscribed.keys() | set(new)) - set(unsubscribe))
            if total > MAX_RESOURCE_NAMES:
                raise ResourceLimitError("subscriptions", total)

    def _plan(self, resolver: SecretResolver, events: list[Event]) -> Step[DeltaResponse]:
        names: Iterable[str] = self._subscribed
        if self._wildcard:
            names = dict.fromkeys([*self._subscribed, *resolver.wildcard_names(self.subscriber)])
        wanted = set(names)
        to_send: list[SecretResource] = []
        removed: list[str] = []
        for name in names:
            resolved = resolver.resolve(name, self.subscriber)
            if isinstance(resolved, Rejection):
                self._reporter.rejected(resolved, name in self._held, events)
                if _withdrawn(resolved) and name in self._held:
                    del self._held[name]
                    removed.append(name)
                    events.append(Removed(name))
                continue
            self._reporter.resolved(name)
            if self._changed(resolved):
                to_send.append(resolved)
        for name in [n for n in self._held if n not in wanted]:
            if self._wildcard:
                # Held through the wildcard but no longer part of it: removed when that is for good.
                resolved = resolver.resolve(name, self.subscriber)
                if isinstance(resolved, Rejection):
                    if not _withdrawn(resolved):
                        continue
                    removed.append(name)
                    events.append(Removed(name))
            # Otherwise: versions the client claimed (initial_resource_versions) for names it does not
            # subscribe to.
            del self._held[name]
        if not to_send and not removed:
            return Step(None, tuple(events))
        for resource in to_send:
            self._held[resource.name] = resource.version
        nonce = self._nonces()
        self._in_flight[nonce] = tuple((r.name, r.version) for r in to_send)
        while len(self._in_flight) > MAX_IN_FLIGHT:
            self._in_flight.popitem(last=False)
        response = DeltaResponse(state_version(self._held.items()), nonce, tuple(to_send), tuple(removed))
        return Step(response, tuple(events))
