"""Merging gossip (meshllm.mesh.membership): generations, tombstones, refutation, catalog."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm import PROTOCOL_VERSION
from meshllm.mesh import identity, wire
from meshllm.mesh.membership import (
    ANNOUNCEMENT_MAX_BYTES,
    BAD_SIGNATURE,
    TOMBSTONE_TTL_S,
    Authenticator,
    Membership,
    encoded_size,
    mesh_catalog,
    sign_announcement,
    sign_leave,
)
from meshllm.mesh.wire import GENERATION_MAX, PeerAnnouncement


def ann(node_id: str, generation: int, **fields: Any) -> PeerAnnouncement:
    return PeerAnnouncement(node_id=node_id, generation=generation, **fields)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def signed(key: ec.EllipticCurvePrivateKey, generation: int = 5, **fields: Any) -> PeerAnnouncement:
    return sign_announcement(ann(identity.node_id_of(key), generation, **fields), key)


def mesh(me_generation: int = 100) -> Membership:
    return Membership(ann("me", me_generation))


def test_higher_generation_wins_lower_and_equal_are_ignored() -> None:
    m = mesh()
    assert m.merge(ann("b", 5, serving="x"), now=0)
    assert m.merge(ann("b", 7, serving="y"), now=0)
    assert m.peers["b"].serving == "y"
    assert not m.merge(ann("b", 6, serving="old"), now=0)
    assert not m.merge(ann("b", 7, serving="same generation"), now=0)
    assert m.peers["b"].serving == "y" and m.peers["b"].generation == 7


def test_remove_leaves_a_tombstone_that_blocks_stale_copies() -> None:
    m = mesh()
    m.merge(ann("b", 5), now=0)
    assert m.remove("b", 5, now=10)
    assert "b" not in m.peers
    # The same or an older copy still travelling through the mesh cannot bring it back.
    assert not m.merge(ann("b", 5), now=11)
    assert not m.merge(ann("b", 4), now=11)
    assert "b" not in m.peers
    # A restart (newer generation) gets through and clears the tombstone.
    assert m.merge(ann("b", 6), now=12)
    assert m.peers["b"].generation == 6
    assert "b" not in m.tombstones


def test_remove_of_an_older_generation_or_unknown_node_is_ignored() -> None:
    m = mesh()
    m.merge(ann("b", 8), now=0)
    assert not m.remove("b", 7, now=1)  # b refuted since then: keep it
    assert "b" in m.peers
    assert not m.remove("nobody", 1, now=1)
    assert m.tombstones == {}
    assert m.remove("b", 9, now=1)  # removal as of a newer generation applies


def test_tombstone_expires() -> None:
    m = mesh()
    m.merge(ann("b", 5), now=0)
    m.remove("b", 5, now=0)
    assert not m.merge(ann("b", 5), now=TOMBSTONE_TTL_S - 1)
    m.expire(TOMBSTONE_TTL_S - 1)
    assert "b" in m.tombstones
    m.expire(TOMBSTONE_TTL_S)
    assert m.tombstones == {}
    assert m.merge(ann("b", 5), now=TOMBSTONE_TTL_S)
    # An expired stone also stops blocking before expire() has run.
    m.remove("b", 5, now=200)
    assert m.merge(ann("b", 5), now=200 + TOMBSTONE_TTL_S)


def test_told_we_are_dead_we_refute_with_a_newer_generation() -> None:
    m = mesh(100)
    assert not m.remove("me", 100, now=0)
    assert m.me.generation == 101
    # Reported dead as of a generation above ours: no tombstone can hold that one (a
    # node's own verdicts use a generation it had from us), so it is a forgery, and
    # following it would let a member push us to the top of the range.
    assert not m.remove("me", GENERATION_MAX - 1, now=0)
    assert m.me.generation == 102
    assert "me" not in m.peers and "me" not in m.tombstones


def test_a_newer_copy_of_ourselves_is_outranked() -> None:
    m = mesh(100)
    assert m.merge(ann("me", 250, serving="stale"), now=0)
    assert m.me.generation == 251
    assert m.me.serving is None  # our own state stays ours
    assert "me" not in m.peers


def test_our_own_copy_echoed_back_is_not_news() -> None:
    # Regression: an equal generation used to count as "newer", so every link-up
    # (the peer's Sync holds our current copy) bumped our generation, and the
    # bumped copy echoed back bumped it again, forever.
    m = mesh(100)
    assert not m.merge(m.me, now=0)
    assert not m.merge(ann("me", 99), now=0)
    assert m.me.generation == 100


def test_update_self_bumps_the_generation_only_on_change() -> None:
    m = mesh(100)
    assert not m.update_self(serving=None)
    assert m.me.generation == 100
    assert m.update_self(serving="llama", role="host")
    assert m.me.generation == 101 and m.me.serving == "llama" and m.me.role == "host"
    assert not m.update_self(serving="llama")
    assert m.me.generation == 101


def test_digest_and_newer_than() -> None:
    a, b = mesh(10), Membership(ann("other", 20))
    a.merge(ann("x", 3), now=0)
    a.merge(ann("y", 4), now=0)
    b.merge(ann("x", 5), now=0)
    assert a.digest() == {"me": 10, "x": 3, "y": 4}
    # What b holds that a lacks or has older: b itself and its newer x, not y.
    missing = b.newer_than(a.digest())
    assert sorted((m.node_id, m.generation) for m in missing) == [("other", 20), ("x", 5)]
    for m in missing:
        a.merge(m, now=0)
    assert b.newer_than(a.digest()) == []
    # and the other way round a still has y for b
    assert [m.node_id for m in a.newer_than(b.digest())] == ["me", "y"]


def test_view_is_sorted_and_excludes_ourselves() -> None:
    m = mesh()
    for node_id in ("c", "a", "b"):
        m.merge(ann(node_id, 1), now=0)
    assert [p.node_id for p in m.view()] == ["a", "b", "c"]
    assert m.all()[0].node_id == "me"


def test_mesh_catalog_is_the_union_of_available_requested_and_serving() -> None:
    m = Membership(ann("me", 1, available_models=("a",), requested_models=("b",)))
    m.merge(ann("p", 1, available_models=("a", "c"), serving="d"), now=0)
    m.merge(ann("q", 1, requested_models=("e",)), now=0)
    assert mesh_catalog(m.all()) == {"a", "b", "c", "d", "e"}
    assert mesh_catalog([]) == set()
    # a node that leaves takes its models out of the catalog
    m.remove("q", 1, now=0)
    assert mesh_catalog(m.all()) == {"a", "b", "c", "d"}


def test_fingerprint_matches_only_for_equal_digests() -> None:
    a = Membership(ann("a", 1))
    b = Membership(ann("b", 1))
    assert a.fingerprint() != b.fingerprint()
    a.merge(ann("b", 1), 0.0)
    b.merge(ann("a", 1), 0.0)
    assert a.fingerprint() == b.fingerprint()
    b.merge(ann("c", 5), 0.0)
    assert a.fingerprint() != b.fingerprint()
    assert a.lacks(b.digest())
    assert not b.lacks(a.digest())


def test_generations_past_the_bound_are_refused_on_the_wire() -> None:
    # A hostile member's PeerGone or Sync at the top of the integer range would push
    # our generation past what msgpack encodes and break every frame we send after.
    for msg in (
        wire.PeerGone("me", wire.GENERATION_MAX),
        wire.Sync((ann("me", 2**64 - 1),)),
        wire.Digest({"me": wire.GENERATION_MAX}),
    ):
        payload = msgspec.msgpack.encode(wire.Envelope(PROTOCOL_VERSION, msg))
        with pytest.raises(wire.WireError):
            wire.decode_payload(payload)


def test_refuting_the_highest_valid_generation_stays_encodable() -> None:
    key = new_key()
    top = wire.GENERATION_MAX - 1
    m = Membership(ann(identity.node_id_of(key), top - 1), key)
    assert not m.remove(m.node_id, top, now=0)  # refuted, not removed
    assert m.me.generation == top
    assert not m.remove(m.node_id, top, now=0)
    assert m.me.generation == top  # saturated
    assert m.merge(ann(m.node_id, top), now=0) is False
    assert m.update_self(serving="x")
    assert m.me.generation == top
    wire.decode_payload(wire.encode_frame(wire.Sync((m.me,)))[wire.HEADER :])
    assert Authenticator().refusal(m.me) is None


# -- signatures (issue 9, item 2) -----------------------------------------------------


def test_a_node_signs_its_announcement_on_every_change() -> None:
    key = new_key()
    m = Membership(ann(identity.node_id_of(key), 1), key)
    auth = Authenticator()
    assert m.me.public_key == identity.public_der(key)
    assert auth.refusal(m.me) is None
    m.update_self(serving="x")
    assert auth.refusal(m.me) is None
    m.remove(m.node_id, m.me.generation, now=0)  # refuted: a new generation, signed again
    assert auth.refusal(m.me) is None


def test_only_the_node_itself_can_sign_its_announcement() -> None:
    victim, forger = new_key(), new_key()
    auth = Authenticator()
    genuine = signed(victim, serving="x")
    assert auth.refusal(genuine) is None
    victim_id = identity.node_id_of(victim)
    # Unsigned, or a field changed after signing:
    unsigned = msgspec.structs.replace(genuine, signature=b"")
    assert auth.refusal(unsigned) == "its signature does not verify"
    altered = msgspec.structs.replace(genuine, addresses=("10.6.6.6:1",))
    assert auth.refusal(altered) == "its signature does not verify"
    bumped = msgspec.structs.replace(genuine, generation=genuine.generation + 1)
    assert auth.refusal(bumped) == "its signature does not verify"
    # Signed by another key: either it carries the victim's key (the signature fails) ...
    by_forger = sign_announcement(ann(victim_id, 9), forger)
    assert auth.refusal(by_forger) == "its key does not match its node id"
    with_victim_key = msgspec.structs.replace(by_forger, public_key=identity.public_der(victim))
    assert auth.refusal(with_victim_key) == "its signature does not verify"
    # ... or claims the forger's own id with the victim's key.
    own_id = sign_announcement(ann(identity.node_id_of(forger), 9), forger)
    stolen_key = msgspec.structs.replace(own_id, public_key=identity.public_der(victim))
    assert auth.refusal(stolen_key) == "its key does not match its node id"
    junk_key = ann(identity.node_id_of_der(b"junk"), 1, public_key=b"junk")
    assert auth.refusal(junk_key) == "its key is not a P-256 public key"


def test_verified_signatures_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = identity.verify

    def counting(*args: Any) -> bool:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(identity, "verify", counting)
    auth, genuine = Authenticator(), signed(new_key())
    assert auth.refusal(genuine) is None
    assert auth.refusal(genuine) is None
    assert len(calls) == 1
    forged = msgspec.structs.replace(genuine, vram_bytes=1)
    assert auth.refusal(forged) is not None
    assert auth.refusal(forged) is not None
    assert len(calls) == 3  # failures are never cached as good


def test_a_leave_counts_only_when_signed_by_the_node() -> None:
    key, other = new_key(), new_key()
    known = signed(key)
    gone = wire.PeerGone(known.node_id, known.generation, "left")
    assert Authenticator.is_leave(sign_leave(gone, key), known)
    assert not Authenticator.is_leave(gone, known)
    assert not Authenticator.is_leave(sign_leave(gone, other), known)
    later = msgspec.structs.replace(sign_leave(gone, key), generation=known.generation + 1)
    assert not Authenticator.is_leave(later, known)
    assert not Authenticator.is_leave(sign_leave(gone, key), None)


def test_the_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meshllm.mesh.membership.MAX_PEERS", 2)
    m = mesh()
    assert m.merge(ann("a", 1), now=0) and m.merge(ann("b", 1), now=0)
    assert m.full()
    assert not m.merge(ann("c", 1), now=0)
    assert "c" not in m.peers
    assert m.merge(ann("a", 2), now=0)  # a known member still updates


def big(node_id: str, generation: int, models: int, url_length: int = 40) -> PeerAnnouncement:
    """An announcement with `models` download URLs, each within the field bounds."""
    urls = {f"m{i:03}": f"https://example.com/{'x' * url_length}/{i}" for i in range(models)}
    return ann(node_id, generation, model_urls=urls)


def test_an_oversized_announcement_is_refused() -> None:
    """The field bounds alone allow ~800 kB per announcement: one is capped far below."""
    m = mesh()
    oversized = big("a", 1, wire.MAX_MODELS, url_length=1000)
    wire.encode_frame(wire.Sync((oversized,)))  # it fits a frame: only the cap refuses it
    assert encoded_size(oversized) > ANNOUNCEMENT_MAX_BYTES
    assert m.refusal(oversized) == f"it is over {ANNOUNCEMENT_MAX_BYTES} bytes"
    assert not m.merge(oversized, now=0)
    assert "a" not in m.peers and m.total_bytes == 0
    honest = big("a", 1, 8)
    assert m.refusal(honest) is None and m.merge(honest, now=0)
    assert m.total_bytes == encoded_size(honest)
    assert not m.merge(big("a", 2, wire.MAX_MODELS, url_length=1000), now=0)
    assert m.peers["a"] == honest  # a known member's oversized update is refused too


def test_the_table_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meshllm.mesh.membership.ANNOUNCEMENT_MAX_BYTES", 1100)
    monkeypatch.setattr("meshllm.mesh.membership.TABLE_MAX_BYTES", 2500)
    m = mesh()
    assert m.refusal(big("x", 1, 20)) == "it is over 1100 bytes"
    assert not m.merge(big("x", 1, 20), now=0)
    assert m.merge(big("a", 1, 10), now=0) and m.merge(big("b", 1, 10), now=0)
    size = encoded_size(big("a", 1, 10))
    assert m.total_bytes == 2 * size < 2500 < 3 * size
    assert m.refusal(big("c", 1, 10)) == "the membership table is full (2500 bytes)"
    assert not m.merge(big("c", 1, 10), now=0)
    assert m.merge(ann("a", 2), now=0)  # a known member still updates, and shrinks
    assert m.total_bytes == size + encoded_size(ann("a", 2))
    assert m.merge(big("c", 1, 10), now=0)  # room again
    assert m.remove("b", 1, now=0)
    assert m.total_bytes == encoded_size(ann("a", 2)) + size


def test_a_newer_versions_fields_in_ext_are_checked_and_relayed_unchanged() -> None:
    """`wire`'s rule for new announcement fields: a newer node puts them in `ext`; this
    version verifies its signature, keeps it, and passes it on byte for byte, so a third
    node (of the newer version) still finds it signed."""
    newer = new_key()
    future = msgspec.msgpack.encode({"gpu_kind": "h200", "tokens_per_s": [91.5, 12]})
    sent = signed(newer, 7, ext=future)
    relay = mesh()
    frame = wire.encode_frame(wire.Sync((sent,)))
    (received,) = wire.decode_payload(frame[wire.HEADER :]).announcements  # type: ignore[union-attr]
    assert relay.refusal(received) is None and relay.merge(received, now=0)
    (again,) = wire.decode_payload(
        wire.encode_frame(wire.Sync(tuple(a for a in relay.all() if a == received)))[wire.HEADER :]
    ).announcements  # type: ignore[union-attr]
    assert again.ext == future and Authenticator().refusal(again) is None
    # What the rule avoids: a top-level field this version does not know is lost in its
    # re-encoding, and the signature with it.
    fields = msgspec.msgpack.decode(msgspec.msgpack.encode(ann(identity.node_id_of(newer), 8)))
    fields["gpu_kind"] = "h200"
    key_fields = {**fields, "public_key": identity.public_der(newer), "signature": b""}
    raw = msgspec.msgpack.encode(key_fields)
    unknown = msgspec.msgpack.decode(raw, type=PeerAnnouncement)
    forged = msgspec.structs.replace(unknown, signature=identity.sign(newer, raw))
    assert Authenticator().refusal(forged) == BAD_SIGNATURE


def test_frames_of_the_previous_protocol_are_refused_by_name() -> None:
    payload = msgspec.msgpack.encode(wire.Envelope(PROTOCOL_VERSION - 1, wire.Welcome()))
    with pytest.raises(
        wire.WireError, match=f"unsupported protocol version {PROTOCOL_VERSION - 1}"
    ):
        wire.decode_payload(payload)
