"""Property-based fuzzing (hypothesis) of every decoder that reads untrusted bytes.

Each decoder has one documented error type, and a property here feeds it random and
mutated input and accepts nothing else: no IndexError, KeyError, UnicodeError,
struct.error, OverflowError or RecursionError leaks, and input it accepts decodes to
what was encoded. The number of cases comes from the `meshllm` hypothesis profile
(tests/conftest.py, `MESHLLM_FUZZ_EXAMPLES`).

Targets: the wire frame decoder and announcements (`meshllm.mesh.wire`), the invite
token parser (`meshllm.mesh.token`), the GGUF header reader
(`meshllm.models.files.read_gguf_header`), the request body peek of the Proxy
(`meshllm.http.proxy`), and the HTTP/1.1 response parser (`meshllm.http.h1`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import math
import struct
import tempfile
import tracemalloc
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import gguf
import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshllm import PROTOCOL_VERSION
from meshllm.http import proxy
from meshllm.http.h1 import ResponseError, ResponseReader
from meshllm.mesh import wire
from meshllm.mesh.token import (
    PREFIX,
    SECRET_BYTES,
    InvalidToken,
    InviteToken,
    decode_token,
    encode_token,
    split_address,
    token_text,
)
from meshllm.models.files import GgufHeader, GgufHeaderError, read_gguf_header
from meshllm.runtime.messages import ModelRoute, RouteTable, ServerStateName

# -- shared strategies ----------------------------------------------------------------

MSGPACK_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
"""Every integer msgpack can carry."""

EXTREME_INTS = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            -1,
            65535,
            65536,
            2**31 - 1,
            2**31,
            2**32,
            2**53 + 1,
            2**62 - 1,
            2**62,
            2**63 - 1,
            2**63,
            2**64 - 1,
            -(2**31),
            -(2**63),
        ]
    ),
    MSGPACK_INTS,
)

TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
"""Any text msgpack can encode (no lone surrogates), control and bidi characters included."""

EXTREME_TEXT = st.one_of(
    TEXT,
    st.sampled_from(
        ["", "\x00", "\x1b[2J", "\u202eevil", "a" * 70_000, "é" * 20_000, "host:99999"]
    ),
)

MSGPACK_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | MSGPACK_INTS | st.floats() | TEXT | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=8,
)
"""Any msgpack value: what a hostile peer can put where a field is expected."""


def msgpack_nested(depth: int) -> bytes:
    """A msgpack value `depth` arrays deep: [[[...[0]...]]]; too deep to build as objects."""
    return b"\x91" * depth + b"\x00"


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: overwrite a byte, insert one, delete one."""
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            out.append(value)
            continue
        i = position % len(out)
        if kind == 0:
            out[i] = value
        elif kind == 1:
            out.insert(i, value)
        else:
            del out[i]
    return bytes(out)


EDITS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 2**32), st.integers(0, 255)), min_size=1, max_size=8
)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` split at `points` (taken modulo its length): the pieces a socket may deliver."""
    bounds = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)] or [data]


CUTS = st.lists(st.integers(min_value=0, max_value=2**20), max_size=12)


# -- wire frames ------------------------------------------------------------------------

NODE_IDS = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)
PORTS = st.integers(min_value=1, max_value=65535)
NAMES = st.builds(
    str.__add__,
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=1),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", max_size=39),
)
"""Model names as the project writes them (a leading dot is refused: a hidden file)."""
GENERATIONS = st.integers(min_value=0, max_value=wire.GENERATION_MAX - 1)

ANNOUNCEMENTS = st.builds(
    wire.PeerAnnouncement,
    node_id=NODE_IDS,
    generation=GENERATIONS,
    version=st.sampled_from(["", "0.1.0"]),
    role=st.sampled_from(typing.get_args(wire.Role)),
    http_port=PORTS,
    serving=st.none() | NAMES,
    server_state=st.sampled_from(typing.get_args(ServerStateName)),
    available_models=st.lists(NAMES, max_size=4).map(tuple),
    requested_models=st.lists(NAMES, max_size=4).map(tuple),
    backend_models=st.lists(NAMES, max_size=4).map(tuple),
    vram_bytes=st.integers(min_value=0, max_value=2**50),
    addresses=st.lists(PORTS.map(lambda p: f"10.0.0.1:{p}"), min_size=1, max_size=3).map(tuple),
    tunnel_port=PORTS,
)
"""Announcements that any sensible validation accepts (the round-trip property)."""

MESSAGES: st.SearchStrategy[wire.WireMessage] = st.one_of(
    st.builds(wire.Hello, NODE_IDS, st.binary(min_size=16, max_size=16)),
    st.builds(
        wire.Challenge,
        NODE_IDS,
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=32, max_size=32),
    ),
    st.builds(wire.Proof, st.binary(min_size=32, max_size=32)),
    st.just(wire.Welcome()),
    st.builds(wire.Refused, TEXT),
    st.builds(wire.Sync, st.lists(ANNOUNCEMENTS, max_size=4).map(tuple)),
    st.builds(wire.Fingerprint, MSGPACK_INTS),
    st.builds(wire.Digest, st.dictionaries(NODE_IDS, GENERATIONS, max_size=8), reply=st.booleans()),
    st.builds(wire.PeerGone, NODE_IDS, GENERATIONS, st.sampled_from(["", "left", "dead"])),
    st.builds(wire.Probe, MSGPACK_INTS),
    st.builds(wire.ProbeAck, MSGPACK_INTS),
    st.builds(wire.ProbeRequest, NODE_IDS, MSGPACK_INTS),
    st.builds(wire.TunnelOpen, NAMES),
    st.just(wire.RpcOpen()),
    st.builds(
        wire.OwnerOrder,
        st.builds(
            wire.OwnerCommand,
            mesh_id=st.text(alphabet="0123456789abcdef", min_size=12, max_size=12),
            target=NODE_IDS,
            action=st.sampled_from(["stop", "drop"]),
            model=st.none() | NAMES,
            issued_ms=st.integers(min_value=0, max_value=2**53 - 1),
            nonce=st.binary(min_size=16, max_size=32),
        ),
        st.binary(max_size=wire.SIGNATURE_MAX),
    ),
    st.builds(wire.OwnerAnswer, st.booleans(), st.sampled_from(["", "refused", "stopping"])),
)


def read_frames(data: bytes, limit: int = wire.MAX_FRAME_BYTES) -> tuple[list[Any], BaseException]:
    """Every frame `read_frame` gets from a stream of `data` then EOF, and the exception
    that ended the reading (the EOF error if all of it was frames)."""

    async def main() -> tuple[list[Any], BaseException]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        frames: list[Any] = []
        while True:
            try:
                frames.append(await wire.read_frame(reader, limit))
            except Exception as exc:
                return frames, exc

    return asyncio.run(main())


def assert_clean_end(exc: BaseException) -> None:
    """A frame stream ends with a protocol error or at EOF, never with anything else."""
    assert isinstance(exc, wire.WireError | asyncio.IncompleteReadError), repr(exc)


@given(st.binary(max_size=2048))
def test_decode_payload_of_random_bytes_raises_only_wire_error(payload: bytes) -> None:
    with contextlib.suppress(wire.WireError):
        wire.decode_payload(payload)


@given(MESSAGES)
def test_every_valid_message_round_trips(msg: wire.WireMessage) -> None:
    frame = wire.encode_frame(msg)
    assert wire.decode_payload(frame[wire.HEADER :]) == msg


@given(st.lists(MESSAGES, max_size=6), CUTS)
def test_frames_read_from_a_stream_in_any_pieces_come_out_whole(
    msgs: list[wire.WireMessage], points: list[int]
) -> None:
    data = b"".join(wire.encode_frame(m) for m in msgs)

    async def main() -> list[wire.WireMessage]:
        reader = asyncio.StreamReader()

        async def deliver() -> None:
            for piece in cut(data, points):
                reader.feed_data(piece)
                await asyncio.sleep(0)  # the reader runs between pieces
            reader.feed_eof()

        feeder = asyncio.create_task(deliver())
        got = [await wire.read_frame(reader) for _ in msgs]
        await feeder
        assert reader.at_eof()
        return got

    assert asyncio.run(main()) == msgs


@given(st.lists(MESSAGES, min_size=1, max_size=4), EDITS)
def test_mutated_frames_end_the_stream_cleanly(
    msgs: list[wire.WireMessage], edits: list[tuple[int, int, int]]
) -> None:
    _, exc = read_frames(mutate(b"".join(wire.encode_frame(m) for m in msgs), edits))
    assert_clean_end(exc)


@given(st.binary(max_size=4096))
def test_random_streams_end_cleanly(data: bytes) -> None:
    _, exc = read_frames(data)
    assert_clean_end(exc)


@given(st.integers(min_value=wire.MAX_FRAME_BYTES + 1, max_value=2**32 - 1), st.binary())
def test_an_oversized_length_is_refused_before_reading_the_frame(size: int, rest: bytes) -> None:
    """The announced length alone ends the stream: nothing of the body is awaited or kept."""
    frames, exc = read_frames(size.to_bytes(wire.HEADER, "big") + rest)
    assert frames == []
    assert isinstance(exc, wire.FrameTooLarge)


@pytest.mark.parametrize("where", ["after the envelope", "in an unknown field"])
def test_deeply_nested_payload_is_a_wire_error(where: str) -> None:
    enc = msgspec.msgpack.encode
    deep = msgpack_nested(100_000)
    if where == "after the envelope":
        payload = b"\x93" + enc(PROTOCOL_VERSION) + enc({"type": "Welcome"}) + deep
    else:
        payload = b"\x92" + enc(PROTOCOL_VERSION) + b"\x82" + enc("type") + enc("Welcome")
        payload += enc("junk") + deep
    assert len(payload) < wire.MAX_FRAME_BYTES  # one frame: a peer can send it
    with pytest.raises(wire.WireError):
        wire.decode_payload(payload)


# -- announcements (Sync) with extreme field values --------------------------------------


def hostile_value(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of the shape `annotation` describes, at the extremes, including ones that
    validation must refuse (ports out of range, huge sizes, odd text)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return hostile_value(args[0])
    if annotation is str:
        return EXTREME_TEXT
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return EXTREME_INTS
    if annotation is bytes:
        return st.binary(max_size=64)
    if annotation is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(args) | EXTREME_TEXT
    if origin in (typing.Union, types.UnionType):
        return st.one_of([hostile_value(a) for a in args])
    if origin is tuple:
        return st.lists(hostile_value(args[0]), max_size=6) | st.sampled_from([["a"] * 20_000])
    if origin is dict:
        return st.dictionaries(hostile_value(args[0]), hostile_value(args[1]), max_size=6)
    return MSGPACK_VALUES


FIELDS = msgspec.structs.fields(wire.PeerAnnouncement)


@st.composite
def hostile_announcements(draw: st.DrawFn) -> dict[str, Any]:
    """A raw announcement as a map: each field absent, extreme, or of the wrong type,
    plus an unknown field now and then (a newer node's)."""
    raw: dict[str, Any] = {}
    for field in FIELDS:
        choice = draw(st.sampled_from(["extreme", "extreme", "extreme", "absent", "wrong"]))
        if choice == "extreme" or (choice == "absent" and field.required):
            raw[field.encode_name] = draw(hostile_value(field.type))
        elif choice == "wrong":
            raw[field.encode_name] = draw(MSGPACK_VALUES)
    if draw(st.booleans()):
        raw[draw(TEXT.filter(lambda k: k not in raw))] = draw(MSGPACK_VALUES)
    return raw


@given(st.lists(hostile_announcements(), min_size=1, max_size=2))
def test_sync_with_hostile_announcements_is_refused_or_kept_exactly(
    raws: list[dict[str, Any]],
) -> None:
    """Whatever validation announcements get, a Sync is either refused with `WireError`
    or decoded to exactly the values sent, and what was accepted encodes again (a value
    that breaks encoding, like a generation over 2**64, never gets in)."""
    payload = msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Sync", "announcements": raws}])
    try:
        msg = wire.decode_payload(payload)
    except wire.WireError:
        return
    assert isinstance(msg, wire.Sync)
    names = {f.encode_name for f in FIELDS}
    for raw, ann in zip(raws, msg.announcements, strict=True):
        built = msgspec.msgpack.decode(msgspec.msgpack.encode(ann))  # as sent: lists, dicts
        assert {k: v for k, v in raw.items() if k in names} == {
            k: v for k, v in built.items() if k in raw
        }
    try:
        frame = wire.encode_frame(msg)
    except wire.WireError:
        return  # over the frame cap (a 70,000-character name, say): a clean refusal
    assert wire.decode_payload(frame[wire.HEADER :]) == msg


@settings(max_examples=max(1, settings().max_examples // 4))  # 4 decodes a case
@given(st.lists(hostile_announcements(), min_size=1, max_size=3), st.binary(max_size=64))
def test_salvaging_a_sync_keeps_exactly_the_valid_announcements(
    raws: list[dict[str, Any]], junk: bytes
) -> None:
    """What the Gossiper does with a Sync that failed to decode: each announcement is
    judged alone (kept only if it decodes on its own), and nothing else ever raises."""
    payload = msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Sync", "announcements": raws}])
    salvaged = wire.salvage_sync(payload)
    assert salvaged is not None
    sync, errors = salvaged
    alone: list[wire.PeerAnnouncement] = []
    for raw in raws:
        one = msgspec.msgpack.encode([PROTOCOL_VERSION, {"type": "Sync", "announcements": [raw]}])
        with contextlib.suppress(wire.WireError):
            alone.extend(cast(wire.Sync, wire.decode_payload(one)).announcements)
    assert list(sync.announcements) == alone
    assert len(errors) == len(raws) - len(alone)
    result = wire.salvage_sync(junk + payload[: len(junk)])
    assert result is None or isinstance(result[0], wire.Sync)


# -- invite tokens ----------------------------------------------------------------------

HOSTS = st.one_of(
    st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="[]"),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from(["[fe80::1]", "[::1]", "localhost", "192.168.1.5"]),
)
ADDRESSES = st.builds(lambda h, p: f"{h}:{p}", HOSTS, PORTS)
TOKENS = st.builds(
    InviteToken,
    secret=st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES),
    addresses=st.lists(ADDRESSES, min_size=1, max_size=4).map(tuple),
    mesh_id=TEXT,
)


@given(TOKENS)
def test_every_valid_token_round_trips(token: InviteToken) -> None:
    text = encode_token(token)
    assert text.isascii() and text.startswith(PREFIX)
    assert decode_token(text) == token
    assert decode_token(f"\n {text} \n") == token


@given(HOSTS, st.integers(min_value=0, max_value=65535))
def test_split_address_takes_back_what_was_joined(host: str, port: int) -> None:
    if port == 0:
        with pytest.raises(InvalidToken):
            split_address(f"{host}:0")
        assert split_address(f"{host}:0", allow_zero=True) == (host.strip("[]"), 0)
    else:
        assert split_address(f"{host}:{port}") == (host.strip("[]"), port)


@given(st.text())
@example("h:²")  # a digit to str.isdigit, not to int()
@example("h:" + "1" * 5000)  # over int()'s limit on digits
@example("[]:80")  # no host inside the brackets
def test_split_address_of_any_text_raises_only_invalid_token(text: str) -> None:
    try:
        host, port = split_address(text)
    except InvalidToken as exc:
        assert len(str(exc)) < 200  # a long address is shortened in the message
        return
    assert host and 1 <= port <= 65535


def token_body(payload: object) -> str:
    return PREFIX + base64.urlsafe_b64encode(msgspec.msgpack.encode(payload)).decode()


@given(
    st.one_of(
        st.text(),
        st.text().map(lambda t: PREFIX + t),
        st.binary().map(lambda b: PREFIX + base64.urlsafe_b64encode(b).decode()),
        MSGPACK_VALUES.map(token_body),
        st.dictionaries(
            st.sampled_from(["secret", "addresses", "mesh_id", "other"]), MSGPACK_VALUES
        ).map(token_body),
    )
)
# An ignored field nested 50,000 deep (msgspec recurses into it to skip it).
@example(PREFIX + base64.urlsafe_b64encode(b"\x81\xa4junk" + msgpack_nested(50_000)).decode())
@example(PREFIX + "A" * 100_000)
def test_decode_token_of_any_text_raises_only_invalid_token(text: str) -> None:
    try:
        token = decode_token(text)
    except InvalidToken:
        return
    assert len(token.secret) == SECRET_BYTES and token.addresses


@given(TOKENS, EDITS)
def test_mutated_tokens_raise_only_invalid_token(
    token: InviteToken, edits: list[tuple[int, int, int]]
) -> None:
    damaged = mutate(encode_token(token).encode(), edits).decode("latin-1")
    with contextlib.suppress(InvalidToken):
        decode_token(damaged)


SECRET_FREE_CHARS = len(PREFIX) + 13
"""A token's first characters are the same in every token: 'meshllm1.' and the base64 of
msgpack's map header and the key 'secret' (10 bytes: 13 characters carry none of it)."""


def paste_mistakes(text: str) -> Iterator[str]:
    """How a token gets damaged between one terminal and another."""
    body = text[len(PREFIX) :]
    yield body  # the prefix left out
    yield text[3:]  # the start cut off
    yield "x" + text  # a stray character in front
    yield text.upper()
    yield "meshllm1:" + body
    yield text[: len(text) // 2]  # the end cut off
    yield text.replace(".", " ", 1)


@given(st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES))
def test_errors_never_quote_the_secret_bearing_part_of_a_token(secret: bytes) -> None:
    """The last review found `decode_token` quoting the first 16 characters of text that
    lacks the prefix: a token pasted without it then showed 16 bits of the secret."""
    text = encode_token(InviteToken(secret, ("10.0.0.1:40000",)))
    assert (
        encode_token(InviteToken(b"\0" * SECRET_BYTES, ("h:1",)))[:SECRET_FREE_CHARS]
        == (text[:SECRET_FREE_CHARS])
    )
    # Any 6 characters that overlap the secret's encoding.
    windows = {text[i : i + 6] for i in range(SECRET_FREE_CHARS - 5, len(text) - 5)}
    for damaged in paste_mistakes(text):
        with pytest.raises(InvalidToken) as caught:
            decode_token(damaged)
        message = str(caught.value)
        assert not any(w in message for w in windows), (damaged, message)


@pytest.fixture(scope="module")
def token_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="meshllm-fuzz-") as name:
        path = Path(name)
        (path / "token").write_text("meshllm1.abc\n")
        (path / "latin1").write_bytes(b"\xe9t\xe9\n")
        (path / "empty").write_text("  \n")
        (path / "dir").mkdir()
        yield path


@given(
    st.one_of(
        st.text(),
        st.sampled_from(["token", "latin1", "empty", "dir", "missing", "", "a\x00b"]),
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20),
    )
)
def test_token_text_of_any_value_raises_only_invalid_token(token_dir: Path, name: str) -> None:
    assert token_text(name.lstrip("@") or "x") == (name.lstrip("@") or "x")  # not a file
    try:
        text = token_text(f"@{token_dir}/{name}")
    except InvalidToken:
        return
    assert text == text.strip() and text


# -- GGUF headers -----------------------------------------------------------------------

_T = gguf.GGUFValueType
_GGUF_SCALARS: dict[Any, tuple[st.SearchStrategy[Any], str]] = {
    _T.UINT8: (st.integers(0, 2**8 - 1), "B"),
    _T.INT8: (st.integers(-(2**7), 2**7 - 1), "b"),
    _T.UINT16: (st.integers(0, 2**16 - 1), "H"),
    _T.INT16: (st.integers(-(2**15), 2**15 - 1), "h"),
    _T.UINT32: (st.integers(0, 2**32 - 1), "I"),
    _T.INT32: (st.integers(-(2**31), 2**31 - 1), "i"),
    _T.UINT64: (st.integers(0, 2**64 - 1), "Q"),
    _T.INT64: (st.integers(-(2**63), 2**63 - 1), "q"),
    _T.FLOAT32: (st.floats(width=32), "f"),
    _T.FLOAT64: (st.floats(), "d"),
    _T.BOOL: (st.booleans(), "?"),
}
GGUF_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)


@st.composite
def gguf_values(draw: st.DrawFn) -> tuple[Any, Any, Any]:
    """(value type, value, array item type) of one GGUF key/value."""
    kind = draw(st.sampled_from([*_GGUF_SCALARS, _T.STRING, _T.ARRAY]))
    if kind == _T.STRING:
        return kind, draw(GGUF_TEXT), None
    if kind == _T.ARRAY:
        item = draw(st.sampled_from([_T.UINT32, _T.INT64, _T.FLOAT32, _T.STRING]))
        items = GGUF_TEXT if item == _T.STRING else _GGUF_SCALARS[item][0]
        return kind, draw(st.lists(items, min_size=1, max_size=5)), item
    return kind, draw(_GGUF_SCALARS[kind][0]), None


GGUF_METADATA = st.dictionaries(
    GGUF_TEXT.filter(lambda k: k != "general.architecture"), gguf_values(), max_size=8
)


def write_gguf(path: Path, metadata: dict[str, tuple[Any, Any, Any]], big: bool) -> bytes:
    endian = gguf.GGUFEndian.BIG if big else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    for key, (kind, value, item) in metadata.items():
        writer.add_key_value(key, value, kind, sub_type=item)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def gguf_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="meshllm-fuzz-") as name:
        yield Path(name)


def read_header_bounded(path: Path, data: bytes) -> GgufHeader | GgufHeaderError:
    """`read_gguf_header` of `data`: a header or its one error type, and the Python
    memory it takes stays under a megabyte however large the counts in it claim to be."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        try:
            result: GgufHeader | GgufHeaderError = read_gguf_header(path)
        except GgufHeaderError as exc:
            result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20) + 4 * len(data), f"{peak} bytes to read a {len(data)}-byte file"
    return result


def expected_value(kind: Any, value: Any, big: bool) -> Any:
    """What reading back gives: floats as stored (float32 rounds)."""
    if kind in (_T.FLOAT32, _T.FLOAT64):
        fmt = (">" if big else "<") + _GGUF_SCALARS[kind][1]
        return struct.unpack(fmt, struct.pack(fmt, value))[0]
    return value


@given(GGUF_METADATA, st.booleans())
def test_valid_gguf_headers_read_back(
    gguf_dir: Path, metadata: dict[str, tuple[Any, Any, Any]], big: bool
) -> None:
    header = read_header_bounded(gguf_dir / "valid.gguf", write_gguf(gguf_dir / "w", metadata, big))
    assert isinstance(header, GgufHeader), header
    assert header.architecture == "llama"
    for key, (kind, value, _) in metadata.items():
        if kind == _T.ARRAY:
            assert key not in header.metadata  # arrays are skipped
            continue
        got: Any = header.metadata[key]
        want = expected_value(kind, value, big)
        assert got == want or (math.isnan(want) and math.isnan(got)), (key, got, want)


@pytest.fixture(scope="module")
def sample_ggufs(gguf_dir: Path) -> list[bytes]:
    """A few real headers to damage: scalars, strings, string and nested arrays, both
    byte orders."""
    samples = []
    for big in (False, True):
        writer = gguf.GGUFWriter(
            gguf_dir / "sample",
            "qwen2",
            endianess=(gguf.GGUFEndian.BIG if big else gguf.GGUFEndian.LITTLE),
        )
        writer.add_name("Synthetic")
        writer.add_block_count(28)
        writer.add_context_length(32768)
        writer.add_rope_freq_base(1e6)
        writer.add_token_list([f"tok{i}" for i in range(20)])
        writer.add_token_types([1] * 20)
        writer.add_array("test.nested", [[1, 2], [3], ["a", "b"]])
        writer.add_bool("test.flag", True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        samples.append((gguf_dir / "sample").read_bytes())
    return samples


HUGE_COUNTS = st.sampled_from([2**60, 2**63, 2**64 - 1, 2**32, 2**31, 2**20 + 1]) | st.integers(
    0, 2**64 - 1
)


@given(
    st.integers(0, 1),
    st.integers(0, 2**32),
    HUGE_COUNTS,
    st.booleans(),
    st.none() | st.integers(0, 2**32),
)
def test_gguf_headers_with_huge_counts_fail_cleanly_in_bounded_memory(
    gguf_dir: Path,
    sample_ggufs: list[bytes],
    which: int,
    at: int,
    count: int,
    big: bool,
    truncate: int | None,
) -> None:
    """Any 8 bytes of a header (tensor count, key/value count, a string's length, an
    array's count, ...) set to a huge number: a clean error, no allocation of that size."""
    data = bytearray(sample_ggufs[which])
    at = at % (len(data) - 8)
    data[at : at + 8] = count.to_bytes(8, "big" if big else "little")
    if truncate is not None:
        data = data[: truncate % (len(data) + 1)]
    read_header_bounded(gguf_dir / "huge.gguf", bytes(data))


@given(st.integers(0, 1), EDITS, st.none() | st.integers(0, 2**32))
def test_mutated_gguf_headers_raise_only_header_errors(
    gguf_dir: Path,
    sample_ggufs: list[bytes],
    which: int,
    edits: list[tuple[int, int, int]],
    truncate: int | None,
) -> None:
    data = mutate(sample_ggufs[which], edits)
    if truncate is not None:
        data = data[: truncate % (len(data) + 1)]
    read_header_bounded(gguf_dir / "mutated.gguf", data)


@given(st.binary(max_size=256), st.booleans())
def test_random_files_raise_only_header_errors(gguf_dir: Path, data: bytes, magic: bool) -> None:
    if magic:
        data = b"GGUF" + (3).to_bytes(4, "little") + data
    read_header_bounded(gguf_dir / "random.gguf", data)


def test_counts_of_2_to_the_60_are_refused_without_allocating(
    gguf_dir: Path, sample_ggufs: list[bytes]
) -> None:
    """The counts at fixed places (key/value count; the first key's length; the first
    value's string length) each claim 2**60 items."""
    data = sample_ggufs[0]
    first_key_len = int.from_bytes(data[24:32], "little")
    first_value = 32 + first_key_len + 4  # after the key and its value type
    for offset in (16, 24, first_value):
        damaged = data[:offset] + (2**60).to_bytes(8, "little") + data[offset + 8 :]
        result = read_header_bounded(gguf_dir / "count.gguf", damaged)
        assert isinstance(result, GgufHeaderError), offset


def test_a_huge_metadata_string_is_not_read_into_memory(gguf_dir: Path) -> None:
    length = 64 << 20
    key = b"general.name"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    head += struct.pack("<Q", len(key)) + key + struct.pack("<IQ", int(_T.STRING), length)
    path = gguf_dir / "long-string.gguf"
    with path.open("wb") as file:
        file.write(head)
        file.truncate(len(head) + length)  # sparse: the string is zeros, never written
    tracemalloc.start()
    try:
        with contextlib.suppress(GgufHeaderError):
            read_gguf_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        path.unlink()
    assert peak < 16 << 20, f"{peak >> 20} MiB to read a header"


# -- the request body peek of the Proxy ------------------------------------------------

JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=8,
)
REQUEST_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "model": st.none() | TEXT | JSON_VALUES,
        "stream": st.none() | st.booleans() | JSON_VALUES,
        "messages": JSON_VALUES,
        "temperature": st.floats(allow_nan=False, allow_infinity=False),
    },
)


@given(st.one_of(st.binary(max_size=512), JSON_VALUES.map(msgspec.json.encode)))
def test_peek_of_any_body_raises_only_decode_error(body: bytes) -> None:
    with contextlib.suppress(msgspec.DecodeError):  # ValidationError is one
        proxy._peek.decode(body)


@given(REQUEST_BODIES)
def test_peek_reads_model_and_stream_as_sent(request_body: dict[str, Any]) -> None:
    model, stream = request_body.get("model"), request_body.get("stream")
    valid = isinstance(model, str | None) and isinstance(stream, bool | None)
    try:
        peek = proxy._peek.decode(msgspec.json.encode(request_body))
    except msgspec.ValidationError:
        assert not valid
        return
    assert valid and (peek.model, peek.stream) == (model, stream)


KNOWN_MODEL = "cold-model"


def answer(body: bytes, points: list[int]) -> tuple[int, dict[str, Any]]:
    """The Proxy's answer to a chat request with `body` (in pieces), in strict mode, with
    one model known to the mesh and none serving: every request is refused."""
    app = proxy.ProxyApp(strict_models=True, max_body_bytes=1 << 20)
    app.set_table(RouteTable((ModelRoute(KNOWN_MODEL),)))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "scheme": "http",
        "headers": [(b"content-type", b"application/json")],
    }
    pieces = cut(body, points)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, content = sent
    assert content["type"] == "http.response.body"
    error = msgspec.json.decode(content["body"])
    return start["status"], error


@given(
    st.one_of(st.binary(max_size=512), REQUEST_BODIES.map(msgspec.json.encode)),
    CUTS,
)
def test_proxy_answers_any_request_body_with_a_clean_error(body: bytes, points: list[int]) -> None:
    status, error = answer(body, points)
    assert error["error"]["message"]
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        assert status == 400
        return
    fields = parsed if isinstance(parsed, dict) else {"model": []}
    model, stream = fields.get("model"), fields.get("stream")
    if not isinstance(model, str | None) or not isinstance(stream, bool | None):
        assert status == 400
    else:
        assert status == (404 if model and model != KNOWN_MODEL else 503)


def test_deeply_nested_request_body_is_a_400() -> None:
    depth = 100_000
    body = b'{"model":"m","x":' + b"[" * depth + b"]" * depth + b"}"
    status, _ = answer(body, [])
    assert status == 400


# -- HTTP/1.1 responses (the chunked decoder) ------------------------------------------

CHUNKS = st.lists(st.binary(min_size=1, max_size=300), max_size=8)


@st.composite
def chunked_responses(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A valid chunked response in the forms a server may choose (hex of either case,
    leading zeros, extensions, trailers) and its chunks."""
    chunks = draw(CHUNKS)
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"]
    out.append(b"Transfer-Encoding: chunked\r\n\r\n")
    for chunk in chunks:
        size = f"{len(chunk):x}"
        size = size.upper() if draw(st.booleans()) else size
        size = "0" * draw(st.integers(0, 3)) + size
        ext = draw(st.sampled_from(["", ";name", ";name=value", ';q="x y"']))
        out.append(f"{size}{ext}\r\n".encode() + chunk + b"\r\n")
    out.append(b"0\r\n")
    if draw(st.booleans()):
        out.append(b"X-Trailer: done\r\n")
    out.append(b"\r\n")
    return b"".join(out), chunks


def feed_all(reader: ResponseReader, pieces: list[bytes]) -> None:
    reader.expect()
    for piece in pieces:
        reader.feed(piece)


@given(chunked_responses(), CUTS)
def test_chunked_bodies_decode_the_same_in_any_pieces(
    response: tuple[bytes, list[bytes]], points: list[int]
) -> None:
    """And every piece passed on is one whole chunk: an SSE event is never cut in two."""
    data, chunks = response
    reader = ResponseReader()
    feed_all(reader, cut(data, points))
    assert reader.done and reader.status == 200 and reader.chunked
    assert reader.pieces == chunks


@given(st.binary(max_size=2000), CUTS)
def test_sized_bodies_decode_the_same_in_any_pieces(body: bytes, points: list[int]) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    reader = ResponseReader()
    feed_all(reader, cut(data, points))
    assert reader.done and reader.length == len(body)
    assert b"".join(reader.pieces) == body


def feed_until_error(pieces: list[bytes]) -> None:
    """Feed everything; only `ResponseError` may stop it (and nothing is fed after it)."""
    reader = ResponseReader()
    reader.expect()
    try:
        for piece in pieces:
            reader.feed(piece)
        reader.closed_cleanly()
    except ResponseError:
        pass


@given(st.binary(max_size=1024), CUTS)
def test_random_responses_raise_only_response_error(data: bytes, points: list[int]) -> None:
    feed_until_error(cut(data, points))


@given(st.binary(max_size=512), st.booleans())
def test_random_bytes_after_a_valid_head_raise_only_response_error(
    data: bytes, chunked: bool
) -> None:
    head = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 10"
    feed_until_error([b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n", data])


@given(chunked_responses(), EDITS, CUTS)
def test_mutated_chunked_responses_raise_only_response_error(
    response: tuple[bytes, list[bytes]], edits: list[tuple[int, int, int]], points: list[int]
) -> None:
    feed_until_error(cut(mutate(response[0], edits), points))


@given(st.sampled_from([b"ffffffffffffffffff", b"1" * 40, b"-1", b"0x10", b"+5", b"1 2"]))
def test_absurd_chunk_sizes_are_errors(size: bytes) -> None:
    reader = ResponseReader()
    reader.expect()
    with pytest.raises(ResponseError):
        reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nx")
