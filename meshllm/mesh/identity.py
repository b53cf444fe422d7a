"""A node's identity: a persistent key under `--home` (ephemeral for lite clients).

The node id is derived from the public key, so two processes on one machine
with different homes (or a lite client beside a serving node) never collide.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

NODE_ID_CHARS = 16
"""A node id is this many hex digits of the SHA-256 of the node's public key (DER)."""


class BadKey(ValueError):
    """Bytes that are not a P-256 public key in DER (SubjectPublicKeyInfo)."""


def public_der(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The public key as DER SubjectPublicKeyInfo: what ids are derived from and peers see."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def node_id_of_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()[:NODE_ID_CHARS]


def node_id_of(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    return node_id_of_der(public_der(key))


def load_public(der: bytes) -> ec.EllipticCurvePublicKey:
    """A peer's public key from DER; `BadKey` unless it is a P-256 key."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"not a public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BadKey("not a P-256 public key")
    return key


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature (DER) of `data`."""
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """True when `signature` is `public`'s signature of `data`; never raises for bad input."""
    try:
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def load_or_create_key(path: Path | None) -> ec.EllipticCurvePrivateKey:
    """Read the PEM key at `path`, creating it (mode 0600) if absent; `None`: ephemeral."""
    if path is not None and path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} does not hold an EC private key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    if path is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)
    return key
