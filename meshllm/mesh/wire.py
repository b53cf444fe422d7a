"""Messages between nodes: length-prefixed, size-limited, versioned msgspec frames.

A frame is a 4-byte big-endian length and a msgpack `Envelope`. Decoding is
strict (types are checked); unknown fields are ignored and new fields carry
defaults, so nodes of different versions interoperate. A frame over
`MAX_FRAME_BYTES` cannot be skipped safely and ends the stream.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import msgspec

from meshllm import PROTOCOL_VERSION

MAX_FRAME_BYTES = 1 << 20
HEADER = 4

Role = Literal["host", "client", "idle"]

GENERATION_MAX = 2**62
"""Generations stay below this (a boot generation is ~2**49); bumps saturate here,
so no peer can push one past what msgpack and every decoder take."""
Generation = Annotated[int, msgspec.Meta(ge=0, lt=GENERATION_MAX)]


class WireError(Exception):
    """A peer broke the protocol; the one exception type raised below the boundary."""


class FrameTooLarge(WireError):
    """A frame's length is over the limit: the stream cannot be read any further."""


class PeerAnnouncement(msgspec.Struct, frozen=True, kw_only=True):
    """What a node tells the mesh about itself (docs/design.md, "Gossip and failure detection")."""

    node_id: str
    generation: Generation
    """Grows with every change; the higher one wins when two copies meet."""
    version: str = ""
    role: Role = "idle"
    http_port: int = 0
    """The node's OpenAI API port (meaningful for the Host role)."""
    serving: str | None = None
    """Model loaded here, or None."""
    server_state: str = "stopped"
    available_models: tuple[str, ...] = ()
    requested_models: tuple[str, ...] = ()
    vram_bytes: int = 0
    addresses: tuple[str, ...] = ()
    """`host:port` of the node's gossip endpoint."""
    tunnel_port: int = 0
    model_sizes: dict[str, int] = {}
    """Bytes of the models this node has or requested, where known (for fit checks)."""
    model_urls: dict[str, str] = {}
    """Download sources of the models this node requested, so others can fetch them."""
    model_sha256: dict[str, str] = {}
    """SHA-256 (hex) of those downloads: a peer fetches a proposed model only with
    its size and digest, and checks both."""


# -- admission (the first stream of every connection) ---------------------------


class Hello(msgspec.Struct, tag=True, frozen=True):
    node_id: str
    nonce: bytes
    key: bytes = b""
    """The client's public key (DER); `node_id` must be its id."""


class Challenge(msgspec.Struct, tag=True, frozen=True):
    node_id: str
    """Must be the id of the key in the server's TLS certificate."""
    nonce: bytes
    mac: bytes
    """Proves the server holds the secret: HMAC over both nonces."""


class Proof(msgspec.Struct, tag=True, frozen=True):
    mac: bytes
    signature: bytes = b""
    """The client key's signature of the exchange: proves the Hello's node id."""


class Welcome(msgspec.Struct, tag=True, frozen=True):
    pass


class Refused(msgspec.Struct, tag=True, frozen=True):
    reason: str


# -- gossip and health ---------------------------------------------------------------


class Sync(msgspec.Struct, tag=True, frozen=True):
    """Announcements the receiver may not have (on connect, on change, on a digest)."""

    announcements: tuple[PeerAnnouncement, ...]


class Fingerprint(msgspec.Struct, tag=True, frozen=True):
    """A hash of the sender's digest; a full `Digest` follows only when the hashes differ."""

    value: int


class Digest(msgspec.Struct, tag=True, frozen=True):
    """node id -> generation known to the sender (anti-entropy)."""

    generations: dict[str, Generation]
    reply: bool = False
    """An answer to a digest: never answered with another digest (no ping-pong)."""


class PeerGone(msgspec.Struct, tag=True, frozen=True):
    """A node left (graceful) or was found dead; remove it now."""

    node_id: str
    generation: Generation
    reason: str = ""


class Probe(msgspec.Struct, tag=True, frozen=True):
    nonce: int


class ProbeAck(msgspec.Struct, tag=True, frozen=True):
    nonce: int


class ProbeRequest(msgspec.Struct, tag=True, frozen=True):
    """Indirect probe: please probe `target` and ack `nonce` to me if it answers."""

    target: str
    nonce: int


# -- tunnel ----------------------------------------------------------------------


class TunnelOpen(msgspec.Struct, tag=True, frozen=True):
    """First frame of a tunnel stream: raw HTTP/1.1 for `model`'s llama-server follows."""

    model: str


WireMessage = (
    Hello
    | Challenge
    | Proof
    | Welcome
    | Refused
    | Sync
    | Fingerprint
    | Digest
    | PeerGone
    | Probe
    | ProbeAck
    | ProbeRequest
    | TunnelOpen
)


TrafficKind = Literal["gossip", "probe", "other"]

GOSSIP_MESSAGES = (Sync, Fingerprint, Digest, PeerGone)
PROBE_MESSAGES = (Probe, ProbeAck, ProbeRequest)


def traffic_kind(msg: WireMessage) -> TrafficKind:
    """Which budget a frame counts against (endpoint counters and the simulation alike)."""
    if isinstance(msg, GOSSIP_MESSAGES):
        return "gossip"
    if isinstance(msg, PROBE_MESSAGES):
        return "probe"
    return "other"


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    v: int
    msg: WireMessage


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_frame(msg: WireMessage) -> bytes:
    payload = _encoder.encode(Envelope(PROTOCOL_VERSION, msg))
    if len(payload) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return len(payload).to_bytes(HEADER, "big") + payload


def decode_payload(payload: bytes) -> WireMessage:
    """Decode one frame's payload; `WireError` when malformed or of another version."""
    try:
        envelope = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireError(f"malformed frame: {exc}") from None
    if envelope.v != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {envelope.v}")
    return envelope.msg


async def read_payload(reader: asyncio.StreamReader, limit: int = MAX_FRAME_BYTES) -> bytes:
    """The next frame's payload; `WireError` on an oversized frame, EOF error at the end."""
    header = await reader.readexactly(HEADER)
    size = int.from_bytes(header, "big")
    if size > limit:
        raise FrameTooLarge(f"frame of {size} bytes exceeds {limit}")
    return await reader.readexactly(size)


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME_BYTES) -> WireMessage:
    return decode_payload(await read_payload(reader, limit))
