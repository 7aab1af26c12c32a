"""SPIFFE ID templates: ``spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}`` filled from an attested caller.

A template is validated once, when the configuration is loaded: every placeholder is a known attribute and
the text around the placeholders is a valid SPIFFE ID once each placeholder stands for a plain segment
character. Filling is pure: the caller's attributes go in, a `SpiffeId` or the reason there is none comes
out. Values are inserted as they are (never escaped or normalised): a value that would make the ID invalid
(an empty value, ``.``/``..`` as a whole segment, a ``/`` or any character outside SPIFFE-ID.md 2.2) means
the ID is not issued, rather than some other ID than the one the operator wrote.

No gRPC and no config import here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from svidgate.errors import SpiffeIdError
from svidgate.identity.spiffe_id import SpiffeId, TrustDomain

if TYPE_CHECKING:
    from svidgate.identity.entitlement import KubernetesWorkload

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


def _namespace(w: KubernetesWorkload) -> str:
    return w.namespace


def _service_account(w: KubernetesWorkload) -> str:
    return w.service_account


def _pod_name(w: KubernetesWorkload) -> str:
    return w.pod_name


def _pod_uid(w: KubernetesWorkload) -> str:
    return w.pod_uid


def _node_name(w: KubernetesWorkload) -> str:
    return w.node_name


def _container_name(w: KubernetesWorkload) -> str:
    return w.container_name


#: Placeholder name -> the attested attribute it stands for.
PLACEHOLDERS = MappingProxyType(
    {
        "k8s:ns": _namespace,
        "k8s:sa": _service_account,
        "k8s:pod-name": _pod_name,
        "k8s:pod-uid": _pod_uid,
        "k8s:node-name": _node_name,
        "k8s:container-name": _container_name,
    }
)


@dataclass(frozen=True, slots=True)
class SpiffeIdTemplate:
    """A SPIFFE ID with ``{k8s:...}`` placeholders in its path. Build it with `parse`.

    Attributes:
        text: the template as written.
        trust_domain: the trust domain (placeholders are allowed in the path only).
        placeholders: the placeholder names used, in order of first use.
    """

    text: str
    trust_domain: TrustDomain
    placeholders: tuple[str, ...]

    @staticmethod
    def is_template(text: str) -> bool:
        """True when `text` contains a ``{`` or ``}`` (a SPIFFE ID never does)."""
        return "{" in text or "}" in text

    @classmethod
    def parse(cls, text: str) -> SpiffeIdTemplate:
        """Validate a template.

        Raises:
            SpiffeIdError: an unknown or malformed placeholder, a placeholder outside the path, or text that
                is not a SPIFFE ID once the placeholders are filled with a plain segment character.
        """
        names: list[str] = []
        for match in _PLACEHOLDER_RE.finditer(text):
            name = match.group(1)
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + k + "}" for k in PLACEHOLDERS)
                raise SpiffeIdError(f"{text!r}: unknown placeholder {{{name}}} (known: {known})")
            if name not in names:
                names.append(name)
        skeleton = _PLACEHOLDER_RE.sub("x", text)
        if "{" in skeleton or "}" in skeleton:
            raise SpiffeIdError(f"{text!r}: unbalanced '{{' or '}}'")
        if not names:
            raise SpiffeIdError(f"{text!r}: no placeholder")
        if "{" in text.removeprefix("spiffe://").split("/", 1)[0]:
            raise SpiffeIdError(f"{text!r}: placeholders are allowed in the path only")
        spiffe_id = SpiffeId.parse(skeleton)
        return cls(text, spiffe_id.trust_domain, tuple(names))

    def fill(self, workload: KubernetesWorkload) -> SpiffeId:
        """The SPIFFE ID for one attested Kubernetes workload.

        Raises:
            SpiffeIdError: the filled-in text is not a valid SPIFFE ID (the message names the placeholder
                values, which are not secret).
        """
        values: Mapping[str, str] = {name: PLACEHOLDERS[name](workload) for name in self.placeholders}
        for name, value in values.items():
            if not value:
                raise SpiffeIdError(f"{self.text}: {{{name}}} is empty for this caller")
            if "/" in value:
                raise SpiffeIdError(f"{self.text}: {{{name}}} = {value[:100]!r} contains '/'")
        return SpiffeId.parse(_PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.text))

    def __str__(self) -> str:
        return self.text
