"""Who is in the mesh (sans-I/O): merging announcements, leaves and deaths.

Each node owns its `PeerAnnouncement` and bumps its generation on every
change; when two copies of a node's announcement meet, the higher generation
wins (docs/design.md, "Gossip and failure detection"). A node that left or
died leaves a tombstone, so an old copy still travelling through the mesh
cannot bring it back; only a newer generation (the node restarted, or
refuted a false death) can. Generations start from the wall clock at boot, so a
restarted node outranks its past self.

Every announcement is signed by the node it describes (`Authenticator`): a
node signs its own whenever it changes, and an announcement whose key does not
derive its node id, or whose signature does not verify, is refused. The table
holds at most `MAX_PEERS` members.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.mesh import identity
from meshllm.mesh.wire import (
    GENERATION_MAX,
    MAX_PEERS,
    PeerAnnouncement,
    PeerGone,
    gone_bytes,
    signed_bytes,
)

TOMBSTONE_TTL_S = 120.0
ANNOUNCEMENT_MAX_BYTES = 64 << 10
"""An announcement's largest encoded size. Honest ones take a few kB; the field bounds alone
(`wire.PeerAnnouncement`) would allow ~800 kB, and a table of those ~6 GB."""
TABLE_MAX_BYTES = 32 << 20
"""The membership table's largest total of encoded announcements."""
BAD_SIGNATURE = "its signature does not verify"
VERIFIED_CACHE = 2 * MAX_PEERS
"""Digests of announcements whose signature verified (a full table and its next versions)."""


class Authenticator:
    """Checks that an announcement (or a leave) comes from the node it is about.

    A verified announcement's digest is remembered, so a `Sync` of a big table
    costs a signature check only for what is new (~0.15 ms each)."""

    def __init__(self) -> None:
        self._verified: dict[bytes, None] = {}
        """Digests of verified announcements, oldest first (a bounded LRU)."""

    def refusal(self, ann: PeerAnnouncement) -> str | None:
        """Why `ann` is not authentic, or None when its node signed it."""
        if identity.node_id_of_der(ann.public_key) != ann.node_id:
            return "its key does not match its node id"
        data = signed_bytes(ann)
        digest = hashlib.blake2b(data + ann.signature, digest_size=16).digest()
        if digest in self._verified:
            return None
        try:
            key = identity.load_public(ann.public_key)
        except identity.BadKey:
            return "its key is not a P-256 public key"
        if not identity.verify(key, ann.signature, data):
            return BAD_SIGNATURE
        if len(self._verified) >= VERIFIED_CACHE:
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = None
        return None

    @staticmethod
    def is_leave(gone: PeerGone, ann: PeerAnnouncement | None) -> bool:
        """True when `gone` is signed by its node (`ann`, our copy of it, holds the key)."""
        if ann is None or not gone.signature:
            return False
        try:
            key = identity.load_public(ann.public_key)
        except identity.BadKey:
            return False
        return identity.verify(key, gone.signature, gone_bytes(gone))


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 with RFC 6979 nonces (as `identity.sign`, which `identity.verify`
    checks): no dependence on a random source, and the same bytes for the same announcement,
    so a simulation with a seed is repeatable to the byte."""
    return key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def sign_announcement(ann: PeerAnnouncement, key: ec.EllipticCurvePrivateKey) -> PeerAnnouncement:
    """`ann` with `key`'s public key and signature."""
    unsigned = msgspec.structs.replace(ann, public_key=identity.public_der(key), signature=b"")
    return msgspec.structs.replace(unsigned, signature=_sign(key, signed_bytes(unsigned)))


def sign_leave(gone: PeerGone, key: ec.EllipticCurvePrivateKey) -> PeerGone:
    return msgspec.structs.replace(gone, signature=_sign(key, gone_bytes(gone)))


def _bump(generation: int) -> int:
    """The next generation, saturating below `GENERATION_MAX` (a valid one on every wire)."""
    return min(generation + 1, GENERATION_MAX - 1)


def boot_generation() -> int:
    return int(time.time() * 1000) << 8


@dataclass
class Membership:
    me: PeerAnnouncement
    key: ec.EllipticCurvePrivateKey | None = None
    """Signs `me` on every change (None: unsigned, for tests of the protocol alone)."""
    peers: dict[str, PeerAnnouncement] = field(default_factory=dict)
    tombstones: dict[str, tuple[int, float]] = field(default_factory=dict)
    """node id -> (generation at removal, expiry time)."""
    _fingerprint: int | None = field(default=None, repr=False, compare=False)
    """`fingerprint()` until the digest changes (it is asked for on every gossip round)."""
    sizes: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    """node id -> encoded size of its announcement in `peers`."""
    total_bytes: int = field(default=0, repr=False, compare=False)
    """The sum of `sizes` (at most `TABLE_MAX_BYTES`)."""

    def __post_init__(self) -> None:
        self._set_me(self.me)

    @property
    def node_id(self) -> str:
        return self.me.node_id

    def full(self) -> bool:
        """True when no new member fits (`MAX_PEERS`)."""
        return len(self.peers) >= MAX_PEERS

    def refusal(self, ann: PeerAnnouncement) -> str | None:
        """Why `ann` has no room here, or None (also when it is no news: `merge` drops it)."""
        known = self.peers.get(ann.node_id)
        if ann.node_id == self.node_id or (
            known is not None and known.generation >= ann.generation
        ):
            return None
        if known is None and self.full():
            return "the membership table is full"
        size = encoded_size(ann)
        if size > ANNOUNCEMENT_MAX_BYTES:
            return f"it is over {ANNOUNCEMENT_MAX_BYTES} bytes"
        if self.total_bytes - self.sizes.get(ann.node_id, 0) + size > TABLE_MAX_BYTES:
            return f"the membership table is full ({TABLE_MAX_BYTES} bytes)"
        return None

    def _set_me(self, ann: PeerAnnouncement) -> None:
        self.me = ann if self.key is None else sign_announcement(ann, self.key)
        self._fingerprint = None

    def update_self(self, **changes: object) -> bool:
        """Change our own announcement; True (and a new generation) if anything changed."""
        updated = msgspec.structs.replace(self.me, **changes)
        if updated == self.me:
            return False
        self._set_me(msgspec.structs.replace(updated, generation=_bump(self.me.generation)))
        return True

    def merge(self, ann: PeerAnnouncement, now: float) -> bool:
        """Take in an announcement; True if it told us something new."""
        if ann.node_id == self.node_id:
            if ann.generation > self.me.generation:
                # Someone holds a newer copy of us (we restarted): outrank it. An
                # equal generation is our own current copy echoed back: no news.
                self._set_me(msgspec.structs.replace(self.me, generation=_bump(ann.generation)))
                return True
            return False
        stone = self.tombstones.get(ann.node_id)
        if stone is not None:
            if ann.generation <= stone[0] and now < stone[1]:
                return False
            del self.tombstones[ann.node_id]
        known = self.peers.get(ann.node_id)
        if known is not None and known.generation >= ann.generation:
            return False
        if known is None and self.full():
            return False
        size = encoded_size(ann)
        old_size = self.sizes.get(ann.node_id, 0)
        if size > ANNOUNCEMENT_MAX_BYTES or self.total_bytes - old_size + size > TABLE_MAX_BYTES:
            return False
        self.peers[ann.node_id] = ann
        self.total_bytes += size - old_size
        self.sizes[ann.node_id] = size
        self._fingerprint = None
        return True

    def buried(self, ann: PeerAnnouncement, now: float) -> int | None:
        """The tombstone's generation if a tombstone keeps `ann` out, else None."""
        stone = self.tombstones.get(ann.node_id)
        if stone is not None and ann.generation <= stone[0] and now < stone[1]:
            return stone[0]
        return None

    def remove(self, node_id: str, generation: int, now: float) -> bool:
        """A node left or died (as of `generation`); True if we had it."""
        if node_id == self.node_id:
            # Reported dead while alive: refute with a newer generation. Only a node's
            # own verdicts leave tombstones, at a generation it had from us, so one
            # more than ours outranks them; a claimed generation above ours is a
            # forgery (it would push us to the top of the range) and is not followed.
            self._set_me(msgspec.structs.replace(self.me, generation=_bump(self.me.generation)))
            return False
        known = self.peers.get(node_id)
        if known is None or known.generation > generation:
            return False
        del self.peers[node_id]
        self.total_bytes -= self.sizes.pop(node_id, 0)
        self._fingerprint = None
        self.tombstones[node_id] = (generation, now + TOMBSTONE_TTL_S)
        return True

    def expire(self, now: float) -> None:
        for node_id, (_, expiry) in list(self.tombstones.items()):
            if now >= expiry:
                del self.tombstones[node_id]

    def digest(self) -> dict[str, int]:
        gens = {node_id: ann.generation for node_id, ann in self.peers.items()}
        gens[self.node_id] = self.me.generation
        return gens

    def fingerprint(self) -> int:
        """A 64-bit hash of `digest()`: equal fingerprints mean nothing to exchange."""
        if self._fingerprint is None:
            data = msgspec.msgpack.encode(sorted(self.digest().items()))
            digest = hashlib.blake2b(data, digest_size=8).digest()
            self._fingerprint = int.from_bytes(digest, "big") >> 1
        return self._fingerprint

    def lacks(self, digest: dict[str, int]) -> bool:
        """True if a node with this digest knows something newer than we do."""
        mine = self.digest()
        return any(gen > mine.get(node_id, -1) for node_id, gen in digest.items())

    def newer_than(self, digest: dict[str, int]) -> list[PeerAnnouncement]:
        """What a node with this digest is missing or has older."""
        return [a for a in self.all() if a.generation > digest.get(a.node_id, -1)]

    def all(self) -> list[PeerAnnouncement]:
        return [self.me, *self.peers.values()]

    def view(self) -> tuple[PeerAnnouncement, ...]:
        return tuple(sorted(self.peers.values(), key=lambda a: a.node_id))


def encoded_size(ann: PeerAnnouncement) -> int:
    """`ann`'s size on the wire (msgpack), which bounds what a table of them holds."""
    return len(msgspec.msgpack.encode(ann))


def mesh_catalog(announcements: Iterable[PeerAnnouncement]) -> set[str]:
    names: set[str] = set()
    for ann in announcements:
        names.update(ann.available_models)
        names.update(ann.requested_models)
        names.update(ann.also_serving)
        if ann.serving:
            names.add(ann.serving)
    return names
