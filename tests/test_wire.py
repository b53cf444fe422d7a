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
