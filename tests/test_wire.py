"""Frames between nodes (meshllm.mesh.wire): round trips, limits, strictness, versions."""

from __future__ import annotations

import asyncio
import typing

import msgspec
import pytest

from meshllm import PROTOCOL_VERSION
from meshllm.mesh import wire

ANN = wire.PeerAnnouncement(
    node_id="0123456789abcdef",
    generation=451_584_000_000_000,
    version="0.1.0",
    role="host",
    http_port=9337,
    serving="meshllm-demo",
    server_state="ready",
    available_models=("meshllm-demo", "other"),
    requested_models=("wanted",),
    vram_bytes=8 << 30,
    addresses=("10.0.0.1:40000",),
    tunnel_port=40001,
)

EVERY_MESSAGE: list[wire.WireMessage] = [
    wire.Hello("n1", b"\x01" * 16),
    wire.Challenge("n2", b"\x02" * 16, b"\x03" * 32),
    wire.Proof(b"\x04" * 32),
    wire.Welcome(),
    wire.Refused("wrong mesh secret"),
    wire.Sync((ANN, wire.PeerAnnouncement(node_id="000000000000000b", generation=1))),
    wire.Sync(()),
    wire.Digest({"000000000000000a": 1, "000000000000000b": 1 << 60}),
    wire.Digest({"000000000000000a": 1}, reply=True),
    wire.Fingerprint(12345),
    wire.PeerGone("000000000000000a", 7, "left"),
    wire.PeerGone("000000000000000a", 7, "left", b"\x30" * 70),
    wire.Probe(1),
    wire.ProbeAck(1 << 41),
    wire.ProbeRequest("00000000000000ff", 99),
    wire.TunnelOpen("meshllm-demo"),
    wire.RpcOpen(),
    wire.OwnerOrder(
        wire.OwnerCommand(
            mesh_id="0123456789ab",
            target="00000000000000ff",
            action="drop",
            model="meshllm-demo",
            issued_ms=1_800_000_000_000,
            nonce=b"\x05" * 16,
        ),
        b"\x30" * 70,
    ),
    wire.OwnerAnswer(False, "the command is not signed by the mesh owner key"),
]


def payload_of(frame: bytes) -> bytes:
    size = int.from_bytes(frame[: wire.HEADER], "big")
    assert size == len(frame) - wire.HEADER
    return frame[wire.HEADER :]


def reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in EVERY_MESSAGE} == set(typing.get_args(wire.WireMessage))


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_round_trip(msg: wire.WireMessage) -> None:
    assert wire.decode_payload(payload_of(wire.encode_frame(msg))) == msg


def test_read_frames_from_a_stream() -> None:
    async def main() -> list[wire.WireMessage]:
        reader = reader_with(b"".join(wire.encode_frame(m) for m in EVERY_MESSAGE))
        async with asyncio.timeout(5):
            return [await wire.read_frame(reader) for _ in EVERY_MESSAGE]

    assert asyncio.run(main()) == EVERY_MESSAGE


def test_oversized_frame_is_rejected_on_encode() -> None:
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.encode_frame(wire.TunnelOpen("x" * wire.MAX_FRAME_BYTES))
    many = tuple(ANN for _ in range(wire.MAX_FRAME_BYTES // 150))
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.encode_frame(wire.Sync(many))


def test_oversized_frame_is_rejected_on_read_before_its_body_arrives() -> None:
    async def main() -> None:
        header = (wire.MAX_FRAME_BYTES + 1).to_bytes(wire.HEADER, "big")
        reader = reader_with(header, eof=False)  # no body: must not wait for one
        async with asyncio.timeout(5):
            with pytest.raises(wire.WireError, match="exceeds"):
                await wire.read_payload(reader)

    asyncio.run(main())


def test_a_frame_at_the_limit_is_fine() -> None:
    async def main() -> None:
        body = b"\x00" * wire.MAX_FRAME_BYTES
        reader = reader_with(wire.MAX_FRAME_BYTES.to_bytes(wire.HEADER, "big") + body)
        async with asyncio.timeout(5):
            assert await wire.read_payload(reader) == body

    asyncio.run(main())


def test_truncated_stream_ends_with_incomplete_read() -> None:
    async def main() -> None:
        frame = wire.encode_frame(wire.Probe(5))
        async with asyncio.timeout(5):
            with pytest.raises(asyncio.IncompleteReadError):
                await wire.read_frame(reader_with(frame[:-2]))
            with pytest.raises(asyncio.IncompleteReadError):
                await wire.read_frame(reader_with(frame[:2]))

    asyncio.run(main())


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xff\xff",
        b"GET / HTTP/1.1\r\n",
        msgspec.msgpack.encode("just a string"),
        msgspec.msgpack.encode([PROTOCOL_VERSION]),
        msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "NoSuchMessage"}]),
        msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Probe", "nonce": "one"}]),
        msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Probe"}]),
        msgspec.msgpack.encode([PROTOCOL_VERSION, {"nonce": 1}]),
        msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Sync", "announcements": [{}]}]),
        msgspec.msgpack.encode(
            [
                PROTOCOL_VERSION,
                {"type": "Sync", "announcements": [{"node_id": "a", "generation": 1, "role": "x"}]},
            ]
        ),
        wire.encode_frame(wire.Probe(1)),  # a whole frame, header included, is not a payload
    ],
)
def test_garbage_payloads_raise_wire_error(payload: bytes) -> None:
    with pytest.raises(wire.WireError, match="malformed"):
        wire.decode_payload(payload)


def test_another_protocol_version_is_rejected() -> None:
    for version in (PROTOCOL_VERSION + 1, 0):
        payload = msgspec.msgpack.encode([version, {"type": "Probe", "nonce": 1}])
        with pytest.raises(wire.WireError, match=f"unsupported protocol version {version}"):
            wire.decode_payload(payload)


def test_unknown_fields_are_ignored_and_missing_ones_default() -> None:
    """A newer node's announcement (extra fields) decodes here; an older one's (fewer) too."""
    newer = msgspec.to_builtins(ANN, builtin_types=(bytes,))
    newer["gpu_model"] = "H100"
    newer["future"] = {"nested": [1, 2, 3]}
    payload = msgspec.msgpack.encode(
        [PROTOCOL_VERSION, {"type": "Sync", "announcements": [newer], "hint": "extra"}]
    )
    assert wire.decode_payload(payload) == wire.Sync((ANN,))

    older = {"node_id": "0000000000000001", "generation": 3}
    msg = wire.decode_payload(
        msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Sync", "announcements": [older]}])
    )
    assert isinstance(msg, wire.Sync)
    (ann,) = msg.announcements
    assert ann == wire.PeerAnnouncement(node_id="0000000000000001", generation=3)
    assert ann.role == "idle" and ann.serving is None and ann.addresses == ()

    probe = msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Probe", "nonce": 4, "ttl": 3}])
    assert wire.decode_payload(probe) == wire.Probe(4)


# -- bounds on what a peer may announce (issue 9, item 3) ---------------------------------


def sync_payload(*announcements: dict[str, typing.Any]) -> bytes:
    msg = {"type": "Sync", "announcements": list(announcements)}
    return msgspec.msgpack.encode([PROTOCOL_VERSION, msg])


GOOD = msgspec.to_builtins(ANN, builtin_types=(bytes,))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", "0123456789ABCDEF"),  # uppercase
        ("node_id", "0123456789abcde"),  # short
        ("node_id", "../../etc/passwd"),
        ("generation", wire.GENERATION_MAX),
        ("generation", -1),
        ("http_port", 65536),
        ("tunnel_port", -1),
        ("serving", "../other.gguf"),
        ("serving", ".hidden"),
        ("serving", "a\nb"),
        ("serving", "x" * 201),
        ("available_models", ["m"] * (wire.MAX_MODELS + 1)),
        ("requested_models", ["a/b"]),
        ("backend_models", ["m"] * (wire.MAX_MODELS + 1)),
        ("backend_models", ["org/model"]),
        ("vram_bytes", -1),
        ("vram_bytes", 2**60),
        ("addresses", ["10.0.0.1:0"]),
        ("addresses", ["10.0.0.1:65536"]),
        ("addresses", ["10.0.0.1"]),
        ("addresses", ["a b:1"]),
        ("addresses", ["h:1"] * (wire.MAX_ADDRESSES + 1)),
        ("model_sizes", {"m": -5}),
        ("model_sizes", {"../m": 5}),
        ("model_urls", {"m": "file:///etc/passwd"}),
        ("model_urls", {"m": "ftp://host/m.gguf"}),
        ("model_urls", {"m": "https://" + "x" * 2048}),
        ("model_sha256", {"m": "ab" * 31}),
        ("model_sha256", {"m": "AB" * 32}),
        ("version", "v" * 65),
        ("public_key", b"k" * (wire.PUBLIC_KEY_MAX + 1)),
        ("signature", b"s" * (wire.SIGNATURE_MAX + 1)),
    ],
)
def test_an_out_of_bounds_field_is_rejected(field: str, value: object) -> None:
    with pytest.raises(wire.WireError, match=field):
        wire.decode_payload(sync_payload({**GOOD, field: value}))


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "PeerGone", "node_id": "0123456789abcdef", "generation": 1, "reason": "r" * 201},
        {"type": "PeerGone", "node_id": "nope", "generation": 1},
        {"type": "Digest", "generations": {"NOT-AN-ID": 1}},
        {"type": "ProbeRequest", "target": "../x", "nonce": 1},
        {"type": "TunnelOpen", "model": "../../etc/passwd"},
    ],
)
def test_other_gossip_fields_are_bounded_too(msg: dict[str, typing.Any]) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_payload(msgspec.msgpack.encode([PROTOCOL_VERSION, msg]))


def test_accepted_values_at_the_edges() -> None:
    edges = {
        **GOOD,
        "http_port": 65535,
        "addresses": ["[::1]:1", "node-1.example.org:65535", "10.0.0.1:443"],
        "model_urls": {"m": "http://h/m.gguf", "n": "https://h/n.gguf?x=1"},
        "model_sha256": {"m": "0" * 64},
        "serving": "Qwen2.5-3B-Instruct-Q4_K_M",
    }
    assert isinstance(wire.decode_payload(sync_payload(edges)), wire.Sync)


def test_a_malformed_announcement_is_dropped_alone() -> None:
    bad = {**GOOD, "node_id": "BAD"}
    payload = sync_payload(bad, GOOD, {**GOOD, "http_port": -1})
    with pytest.raises(wire.WireError):
        wire.decode_payload(payload)
    salvaged = wire.salvage_sync(payload)
    assert salvaged is not None
    sync, errors = salvaged
    assert sync == wire.Sync((ANN,))
    assert len(errors) == 2 and "node_id" in errors[0] and "http_port" in errors[1]
    # Anything but a Sync of this version is not salvaged.
    assert wire.salvage_sync(msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Probe"}])) is None
    assert wire.salvage_sync(msgspec.msgpack.encode([PROTOCOL_VERSION + 1, {}])) is None
    assert wire.salvage_sync(b"\xc1") is None


def test_a_big_table_is_split_into_syncs_under_the_frame_cap() -> None:
    padded = msgspec.structs.replace(ANN, available_models=tuple(f"m{i}" for i in range(200)))
    anns = [msgspec.structs.replace(padded, generation=i) for i in range(2000)]
    syncs = wire.sync_frames(anns)
    assert len(syncs) > 1
    for sync in syncs:
        assert len(wire.encode_frame(sync)) <= wire.MAX_FRAME_BYTES + wire.HEADER
    assert [a for s in syncs for a in s.announcements] == anns
    assert wire.sync_frames([]) == [wire.Sync(())]


def test_the_largest_valid_announcement_fits_one_frame() -> None:
    """Every bound at its maximum still fits a frame, so `sync_frames` can always send it."""
    name = "n" * 200
    names = tuple(f"{i:03d}{name[3:]}" for i in range(wire.MAX_MODELS))
    largest = wire.PeerAnnouncement(
        node_id="0" * 16,
        generation=wire.GENERATION_MAX - 1,
        version="v" * 64,
        serving=name,
        server_state="s" * 64,
        available_models=names,
        requested_models=names,
        vram_bytes=2**53 - 1,
        addresses=tuple(f"{'h' * 253}:65535" for _ in range(wire.MAX_ADDRESSES)),
        model_sizes=dict.fromkeys(names, 2**53 - 1),
        model_urls=dict.fromkeys(names, "https://" + "u" * 2040),
        model_sha256=dict.fromkeys(names, "f" * 64),
        backend_models=names,
        public_key=b"k" * wire.PUBLIC_KEY_MAX,
        signature=b"s" * wire.SIGNATURE_MAX,
    )
    frame = wire.encode_frame(wire.Sync((largest,)))
    assert wire.decode_payload(frame[wire.HEADER :]) == wire.Sync((largest,))
