"""Key types svidgate generates and their key IDs (a key's JWS `alg`: `jwtsvid.jwt_algorithm_for_key`).

Only key types every SPIFFE implementation and Envoy's BoringSSL accept: ECDSA P-256 (the default, as in
SPIRE), ECDSA P-384 and RSA-2048.
"""

from __future__ import annotations

import base64
import enum
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from svidgate.errors import SvidgateError

#: Private keys svidgate can generate and sign with.
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeyType(enum.Enum):
    """A key algorithm and size; the value is the spelling used in configuration."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """Parse a configuration spelling such as ``ec-p256``.

        Raises:
            SvidgateError: the text names no supported key type (the message lists the supported ones).
        """
        try:
            return cls(text)
        except ValueError:
            supported = ", ".join(k.value for k in cls)
            raise SvidgateError(f"unsupported key type {text!r} (supported: {supported})") from None


DEFAULT_KEY_TYPE = KeyType.EC_P256


def generate_private_key(key_type: KeyType = DEFAULT_KEY_TYPE) -> SigningKey:
    """Generate a fresh private key of `key_type`.

    Args:
        key_type: the algorithm and size.

    Returns:
        The new private key.
    """
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    # 65537 is the only public exponent anyone should use (and the only one Go's crypto accepts by default).
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_type_of(private_key: PrivateKeyTypes) -> KeyType:
    """The `KeyType` of an existing private key.

    Raises:
        SvidgateError: the key is of a type or size svidgate does not sign with.
    """
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if isinstance(private_key.curve, ec.SECP256R1):
            return KeyType.EC_P256
        if isinstance(private_key.curve, ec.SECP384R1):
            return KeyType.EC_P384
        raise SvidgateError(f"unsupported elliptic curve {private_key.curve.name}")
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size == 2048:
            return KeyType.RSA_2048
        raise SvidgateError(f"unsupported RSA key size {private_key.key_size}")
    raise SvidgateError(f"unsupported private key type {type(private_key).__name__}")


def key_id(public_key: PublicKeyTypes) -> str:
    """A stable, collision-resistant key ID (JWS ``kid``) for a public key.

    The unpadded base64url of the first 20 bytes of SHA-256 over the SubjectPublicKeyInfo DER: the same key
    always gets the same ID across restarts and processes, and 160 bits leave no practical room for
    collisions.

    Args:
        public_key: any public key `cryptography` can serialise as SubjectPublicKeyInfo.

    Returns:
        A 27-character ASCII string.
    """
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(spki).digest()[:20]).rstrip(b"=").decode("ascii")
