"""Messages between nodes: length-prefixed, size-limited, versioned msgspec frames.

A frame is a 4-byte big-endian length and a msgpack `Envelope`. Decoding is
strict (types are checked); unknown fields are ignored and new fields carry
defaults, so nodes of different versions interoperate. A frame over
`MAX_FRAME_BYTES` cannot be skipped safely and ends the stream.

One exception: a `PeerAnnouncement` is signed by its node, and a receiver checks the
signature over its own re-encoding of what it decoded, which leaves out fields it does
not know. So an announcement never gains top-level fields within a protocol version:
what a newer version adds goes in `PeerAnnouncement.ext` (an opaque msgpack map that
every version signs, checks and relays byte for byte), and a new top-level field means
a new `PROTOCOL_VERSION`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import msgspec

from meshllm import PROTOCOL_VERSION

MAX_FRAME_BYTES = 1 << 20
HEADER = 4

Role = Literal["host", "worker", "standby", "client", "idle"]
"""`host`: runs llama-server for its model (alone, or with workers); `worker`: runs an RPC
server for a split host; `standby`: in a split group, in neither part now; `client`: a lite
client; `idle`: serves nothing."""

GENERATION_MAX = 2**62
"""Generations stay below this (a boot generation is ~2**49); bumps saturate here,
so no peer can push one past what msgpack and every decoder take."""
Generation = Annotated[int, msgspec.Meta(ge=0, lt=GENERATION_MAX)]


class WireError(Exception):
    """A peer broke the protocol; the one exception type raised below the boundary."""


class FrameTooLarge(WireError):
    """A frame's length is over the limit: the stream cannot be read any further."""


# -- bounds of what a peer may announce (decoding rejects the rest) ------------------

NodeId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
"""16 lowercase hex digits: the start of the SHA-256 of the node's public key (identity.py)."""
ModelName = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f/\\.][^\x00-\x1f\x7f/\\]*$"
    ),
]
"""A model's name (the GGUF file's stem): no path separators, control characters or leading dot."""
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
Address = Annotated[
    str,
    msgspec.Meta(
        max_length=262, pattern=rf"^(\[[0-9A-Fa-f:.]{{2,45}}\]|[A-Za-z0-9._-]{{1,253}}):{_PORT}$"
    ),
]
"""`host:port` (a name, IPv4, or `[IPv6]`), port 1-65535."""
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
"""A port, 0 when there is none."""
Bytes = Annotated[int, msgspec.Meta(ge=0, lt=2**53)]
"""A size in bytes (a petabyte-scale bound: far over any real model or memory)."""
MAX_SPLIT_WORKERS = 64
"""Workers one split host may announce."""
Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
"""A member's part of a split model's layers."""
Url = Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^https?://[^\x00-\x20\x7f]+$")]
"""A download source: http or https only, no spaces or control characters."""
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
ShortText = Annotated[str, msgspec.Meta(max_length=64)]
"""A version or state string."""
Reason = Annotated[str, msgspec.Meta(max_length=200)]

MAX_MODELS = 256
"""Models one node may list (available, requested) or describe (sizes, URLs, digests)."""
MAX_ADDRESSES = 8
MAX_PEERS = 8192
"""Entries in a `Digest` (a mesh bigger than this is refused member by member: membership.py)."""
PUBLIC_KEY_MAX = 128
"""A DER P-256 public key is 91 bytes."""
EXT_MAX = 16 << 10
"""Bytes of newer versions' fields one announcement may carry (`PeerAnnouncement.ext`)."""
EXT_DEPTH = 4
"""How deep `PeerAnnouncement.ext` may nest: what a newer version reads must not be
able to exhaust its decoder's stack."""
SIGNATURE_MAX = 80
"""A DER ECDSA P-256 signature is at most 72 bytes."""

Models = Annotated[tuple[ModelName, ...], msgspec.Meta(max_length=MAX_MODELS)]

RPM_MAX = 1e9
UNIX_MAX = 2**40
"""Unix seconds bound (year 36812): far over any real clock, under every decoder's ints."""


class Demand(msgspec.Struct, frozen=True, array_like=True):
    """Requests for one model that entered the mesh at the announcing node
    (`meshllm.placement.demand`): placement reads the mesh's demand from these."""

    rpm: Annotated[float, msgspec.Meta(ge=0.0, le=RPM_MAX)] = 0.0
    """Requests in the last minute."""
    last: Annotated[int, msgspec.Meta(ge=0, lt=UNIX_MAX)] = 0
    """Unix time (seconds) of the latest one; 0: none yet."""


class PeerAnnouncement(msgspec.Struct, frozen=True, kw_only=True):
    """What a node tells the mesh about itself (docs/design.md, "Gossip and failure detection").

    Signed by the node it describes: `public_key` is that node's key (its id is
    derived from it) and `signature` covers everything else (`signed_bytes`), so
    no other member can forge or alter it (checked by `meshllm.mesh.membership`).
    """

    node_id: NodeId
    generation: Generation
    """Grows with every change; the higher one wins when two copies meet."""
    version: ShortText = ""
    role: Role = "idle"
    http_port: Port = 0
    """The node's OpenAI API port (meaningful for the Host role)."""
    serving: ModelName | None = None
    """Model loaded here, or None."""
    server_state: ShortText = "stopped"
    available_models: Models = ()
    requested_models: Models = ()
    vram_bytes: Bytes = 0
    addresses: Annotated[tuple[Address, ...], msgspec.Meta(max_length=MAX_ADDRESSES)] = ()
    """`host:port` of the node's gossip endpoint."""
    tunnel_port: Port = 0
    model_sizes: Annotated[dict[ModelName, Bytes], msgspec.Meta(max_length=MAX_MODELS)] = {}
    """Bytes of the models this node has or requested, where known (for fit checks)."""
    model_urls: Annotated[dict[ModelName, Url], msgspec.Meta(max_length=MAX_MODELS)] = {}
    """Download sources of the models this node requested, so others can fetch them."""
    model_sha256: Annotated[dict[ModelName, Sha256], msgspec.Meta(max_length=MAX_MODELS)] = {}
    """SHA-256 (hex) of those downloads: a peer fetches a proposed model only with
    its size and digest, and checks both."""
    server_reason: Reason = ""
    """Why the model is not served here, when `server_state` is failed."""
    split_group: bool = False
    """The node is in its model's split group: it cannot hold `serving` alone (or was
    started with `--split`), so it serves it only with other members."""
    split_host: NodeId | None = None
    """A worker's host (the node whose llama-server uses its RPC server)."""
    split_workers: Annotated[tuple[NodeId, ...], msgspec.Meta(max_length=MAX_SPLIT_WORKERS)] = ()
    """A split host's workers, nearest first."""
    split_shares: Annotated[tuple[Share, ...], msgspec.Meta(max_length=MAX_SPLIT_WORKERS + 1)] = ()
    """A split host's layer shares: its own, then each worker's."""
    backend_models: Models = ()
    """Models this node's up external backends serve (`--backend-url`): other nodes
    route them here, through the tunnel."""
    also_serving: Models = ()
    """Models this node serves besides `serving`, each with a llama-server of its own
    (`--models-dir`), ready and alone (never split)."""
    demand: Annotated[dict[ModelName, Demand], msgspec.Meta(max_length=MAX_MODELS)] = {}
    """Requests per model that entered the mesh here (the mesh's models only)."""
    paused: bool = False
    """`meshllm ctl pause`: no target for anyone, no server in any election (its
    model goes to other nodes by the usual rules) until `meshllm ctl resume`."""
    ext: Annotated[bytes, msgspec.Meta(max_length=EXT_MAX)] = b""
    """Fields of newer versions of this protocol (module docstring): a msgpack map this
    version does not read, but signs, checks and passes on unchanged."""
    public_key: Annotated[bytes, msgspec.Meta(max_length=PUBLIC_KEY_MAX)] = b""
    """The node's public key (DER SubjectPublicKeyInfo)."""
    signature: Annotated[bytes, msgspec.Meta(max_length=SIGNATURE_MAX)] = b""
    """The node's signature of `signed_bytes(self)`."""

    def __post_init__(self) -> None:
        if self.ext and not _shallow_map(self.ext):
            raise ValueError(f"ext must be a msgpack map at most {EXT_DEPTH} levels deep")


def _shallow_map(data: bytes) -> bool:
    """Whether `data` is one msgpack map nesting at most `EXT_DEPTH` levels."""
    try:
        value = _ext_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return isinstance(value, dict) and _depth(value, EXT_DEPTH)


def _depth(value: object, left: int) -> bool:
    if isinstance(value, dict):
        items: list[object] = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return True
    return left > 0 and all(_depth(item, left - 1) for item in items)


_ext_decoder = msgspec.msgpack.Decoder()


def signed_bytes(ann: PeerAnnouncement) -> bytes:
    """What a node signs of its announcement: the msgpack of everything but the signature.

    Decoding keeps the order of the dicts, so a receiver re-encodes exactly the
    bytes that were signed."""
    return _encoder.encode(msgspec.structs.replace(ann, signature=b""))


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
    """Announcements the receiver may not have (on connect, on change, on a digest).

    A big table goes as several `Sync`s, each under the frame cap (`sync_frames`)."""

    announcements: tuple[PeerAnnouncement, ...]


class Fingerprint(msgspec.Struct, tag=True, frozen=True):
    """A hash of the sender's digest; a full `Digest` follows only when the hashes differ."""

    value: int


class Digest(msgspec.Struct, tag=True, frozen=True):
    """node id -> generation known to the sender (anti-entropy)."""

    generations: Annotated[dict[NodeId, Generation], msgspec.Meta(max_length=MAX_PEERS + 1)]
    reply: bool = False
    """An answer to a digest: never answered with another digest (no ping-pong)."""


class PeerGone(msgspec.Struct, tag=True, frozen=True):
    """A node left (graceful) or was found dead.

    Signed by the node itself (`signature` over `gone_bytes`), it is a leave and
    removes the node at once. Unsigned, it is another member's death verdict:
    the receiver only suspects the node and removes it on its own evidence."""

    node_id: NodeId
    generation: Generation
    reason: Reason = ""
    signature: Annotated[bytes, msgspec.Meta(max_length=SIGNATURE_MAX)] = b""


def gone_bytes(gone: PeerGone) -> bytes:
    """What a leaving node signs: a label (never a valid announcement), its id and generation."""
    return _encoder.encode(("meshllm-leave", gone.node_id, gone.generation))


class Probe(msgspec.Struct, tag=True, frozen=True):
    nonce: int


class ProbeAck(msgspec.Struct, tag=True, frozen=True):
    nonce: int


class ProbeRequest(msgspec.Struct, tag=True, frozen=True):
    """Indirect probe: please probe `target` and ack `nonce` to me if it answers."""

    target: NodeId
    nonce: int


# -- tunnel ----------------------------------------------------------------------


class TunnelOpen(msgspec.Struct, tag=True, frozen=True):
    """First frame of a tunnel stream: raw HTTP/1.1 for `model`'s llama-server follows."""

    model: ModelName


class RpcOpen(msgspec.Struct, tag=True, frozen=True):
    """First frame of a tensor-split stream: the bytes of one llama.cpp RPC connection
    follow, both ways, for the worker's RPC server (meshllm.tunnel.rpc)."""


# -- owner control (meshllm.mesh.owner) -------------------------------------------

OWNER_NONCE_BYTES = 16
MeshId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{12}$")]
"""`meshllm.mesh.token.mesh_id_of` the mesh secret."""


class OwnerCommand(msgspec.Struct, frozen=True, kw_only=True):
    """What the mesh owner tells one node to do (`meshllm ctl --node ID stop|drop MODEL`)."""

    mesh_id: MeshId
    target: NodeId
    """The only node that acts on it."""
    action: Literal["stop", "drop"]
    model: ModelName | None = None
    """The model to drop (`drop` only)."""
    issued_ms: Annotated[int, msgspec.Meta(ge=0, lt=2**53)]
    """The signer's wall clock, in ms since the epoch: old commands are refused."""
    nonce: Annotated[bytes, msgspec.Meta(min_length=OWNER_NONCE_BYTES, max_length=32)]
    """Random: a command is acted on once (`meshllm.mesh.owner.OwnerGate`)."""


class OwnerOrder(msgspec.Struct, tag=True, frozen=True):
    """First frame of a tunnel stream: a command signed with the mesh owner key.

    The target answers with one `OwnerAnswer` frame and ends the stream."""

    command: OwnerCommand
    signature: Annotated[bytes, msgspec.Meta(max_length=SIGNATURE_MAX)] = b""
    """The owner key's signature of `owner_signed_bytes(command)`."""


class OwnerAnswer(msgspec.Struct, tag=True, frozen=True):
    done: bool
    message: Reason = ""


def owner_signed_bytes(command: OwnerCommand) -> bytes:
    """What the owner signs: a label (never a valid announcement or leave) and the command."""
    return _encoder.encode(("meshllm-owner-command", command))


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
    | RpcOpen
    | OwnerOrder
    | OwnerAnswer
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


def sync_frames(
    anns: list[PeerAnnouncement] | tuple[PeerAnnouncement, ...],
) -> list[Sync]:
    """`anns` as as few `Sync`s as fit, each under `MAX_FRAME_BYTES` (a big table in chunks)."""
    budget = MAX_FRAME_BYTES - SYNC_OVERHEAD
    chunks: list[Sync] = []
    chunk: list[PeerAnnouncement] = []
    used = 0
    for ann in anns:
        size = len(_encoder.encode(ann))
        if chunk and used + size > budget:
            chunks.append(Sync(tuple(chunk)))
            chunk, used = [], 0
        chunk.append(ann)
        used += size
    if chunk or not chunks:
        chunks.append(Sync(tuple(chunk)))
    return chunks


SYNC_OVERHEAD = 64
"""Bytes of a `Sync` frame beyond its announcements (envelope, tag, array header), generously."""


class _LooseSync(msgspec.Struct, tag="Sync", frozen=True):
    announcements: tuple[msgspec.Raw, ...]


class _LooseEnvelope(msgspec.Struct, frozen=True, array_like=True):
    v: int
    msg: _LooseSync


_loose_decoder = msgspec.msgpack.Decoder(_LooseEnvelope)
_announcement_decoder = msgspec.msgpack.Decoder(PeerAnnouncement)


def salvage_sync(payload: bytes) -> tuple[Sync, list[str]] | None:
    """The valid announcements of a `Sync` that failed to decode, and why the others failed.

    One malformed announcement costs that announcement alone, not the rest of
    the table. None when `payload` is not a `Sync` of this protocol version at all."""
    try:
        envelope = _loose_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return None
    if envelope.v != PROTOCOL_VERSION:
        return None
    good: list[PeerAnnouncement] = []
    errors: list[str] = []
    for raw in envelope.msg.announcements:
        try:
            good.append(_announcement_decoder.decode(raw))
        except msgspec.DecodeError as exc:
            errors.append(str(exc)[:200])
        except RecursionError:
            errors.append("nested too deep")
    return Sync(tuple(good)), errors


def decode_payload(payload: bytes) -> WireMessage:
    """Decode one frame's payload; `WireError` when malformed or of another version."""
    try:
        envelope = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireError(f"malformed frame: {exc}") from None
    except RecursionError:
        # msgspec skips an unknown field's value recursively: a peer can nest one
        # deeper than the stack goes.
        raise WireError("malformed frame: nested too deep") from None
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
