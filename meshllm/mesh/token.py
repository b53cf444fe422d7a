"""Invite tokens: the mesh's secret plus the addresses to dial, in one pasteable string.

Format: `meshllm1.` + base64url(msgpack(InviteToken)). Anything else is
rejected with a message that says what is wrong with it.
"""

from __future__ import annotations

import base64
import binascii
import secrets

import msgspec

PREFIX = "meshllm1."
SECRET_BYTES = 32


class InvalidToken(ValueError):
    """The string is not a meshllm invite token."""


class InviteToken(msgspec.Struct, frozen=True):
    secret: bytes
    """Shared secret: holding it is what admits a peer to the mesh."""
    addresses: tuple[str, ...]
    """`host:port` of the inviting node's gossip endpoint."""
    mesh_id: str = ""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def mesh_id_of(secret: bytes) -> str:
    import hashlib

    return hashlib.sha256(b"meshllm mesh id" + secret).hexdigest()[:12]


def encode_token(token: InviteToken) -> str:
    raw = msgspec.msgpack.encode(token)
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(text: str) -> InviteToken:
    text = text.strip()
    if not text.startswith(PREFIX):
        raise InvalidToken(f"an invite token starts with {PREFIX!r}; got {text[:16]!r}...")
    body = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        token = msgspec.msgpack.decode(raw, type=InviteToken)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidToken(f"the invite token is damaged (copied incompletely?): {exc}") from None
    if len(token.secret) != SECRET_BYTES:
        raise InvalidToken("the invite token's secret has the wrong length")
    if not token.addresses:
        raise InvalidToken("the invite token names no address to dial")
    for address in token.addresses:
        split_address(address)
    return token


def split_address(address: str, allow_zero: bool = False) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    lowest = 0 if allow_zero else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise InvalidToken(f"bad address {address!r} (want host:port)")
    return host.strip("[]"), int(port)
