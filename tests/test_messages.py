"""Wire messages (meshllm.runtime.messages): every type round-trips; junk is rejected."""

from __future__ import annotations

import re
import typing
from typing import Any

import msgspec
import pytest

from meshllm.mesh.wire import OwnerCommand, OwnerOrder
from meshllm.runtime import messages as m

ROUTES = m.RouteTable(
    (
        m.ModelRoute(
            "a",
            (m.RouteTarget("n1", True, 8001), m.RouteTarget("n2", False, 9337)),
            ("n1", "n2"),
        ),
        m.ModelRoute("cold"),
    )
)
SERVER = m.LocalServerState(
    model="a", path="/m/a.gguf", state="failed", port=8001, pid=42, reason="oom", restarts=3
)

# A sample with non-default values for every message type; types added later
# without a sample here are built from their schema by `_build`.
SAMPLES: dict[type[Any], m.Message] = {
    m.Shutdown: m.Shutdown("ctl stop"),
    m.GetLatest: m.GetLatest("routes"),
    m.Nothing: m.Nothing(),
    m.ActorError: m.ActorError("ValueError: boom"),
    m.LocalServerState: SERVER,
    m.RouteTable: ROUTES,
    m.DropModel: m.DropModel("a"),
    m.GetStatus: m.GetStatus(),
    m.NodeStatus: m.NodeStatus(
        node_id="n1",
        role="host",
        home="/h",
        http="127.0.0.1:9337",
        server=SERVER,
        routes=ROUTES,
        actors=(m.ActorStatus("proxy", 10, True, 0), m.ActorStatus("router", 11, False, 2)),
    ),
    m.CtlDone: m.CtlDone("dropped a"),
    m.SendOwnerOrder: m.SendOwnerOrder(
        OwnerOrder(
            OwnerCommand(
                mesh_id="0123456789ab",
                target="0123456789abcdef",
                action="stop",
                issued_ms=1_800_000_000_000,
                nonce=b"\x01" * 16,
            ),
            b"\x30" * 70,
        )
    ),
}


def _value(t: msgspec.inspect.Type) -> Any:
    """A non-default value of the inspected type `t`."""
    i = msgspec.inspect
    if isinstance(t, i.StrType):
        # The first sample that meets the type's constraints (wire ids, addresses, URLs).
        samples = ("x", "0123456789abcdef", "0123456789ab", "0" * 64, "h:1", "http://x")
        return next(s for s in samples if t.pattern is None or re.search(t.pattern, s))
    if isinstance(t, i.BoolType):
        return True
    if isinstance(t, i.IntType):
        return 7
    if isinstance(t, i.FloatType):
        return 0.5 if t.le is not None else 1.5
    if isinstance(t, i.BytesType):
        return b"\x00\xff" * max(1, (t.min_length or 0))
    if isinstance(t, i.LiteralType):
        return t.values[-1]
    if isinstance(t, i.UnionType):
        return _value(next(x for x in t.types if not isinstance(x, i.NoneType)))
    if isinstance(t, i.TupleType):
        return tuple(_value(x) for x in t.item_types)
    if isinstance(t, i.VarTupleType):
        return (_value(t.item_type),)
    if isinstance(t, (i.ListType, i.SetType, i.FrozenSetType)):
        return [_value(t.item_type)]
    if isinstance(t, i.DictType):
        return {_value(t.key_type): _value(t.value_type)}
    if isinstance(t, i.StructType):
        return _build(t.cls)
    raise NotImplementedError(f"no sample value for {t!r}: add the message to SAMPLES")


FIELD_SAMPLES = {("PeerAnnouncement", "ext"): msgspec.msgpack.encode({"x": [1]})}
"""Fields whose type alone does not say what a valid value is."""


def _build(cls: type[Any]) -> Any:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return cls(
        **{f.name: FIELD_SAMPLES.get((cls.__name__, f.name)) or _value(f.type) for f in info.fields}
    )


MESSAGE_TYPES: tuple[type[Any], ...] = typing.get_args(m.Message)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_round_trip(cls: type[Any]) -> None:
    msg = SAMPLES.get(cls) or _build(cls)
    back = m.decode(m.encode(msg))
    assert type(back) is cls
    assert back == msg


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_round_trip_of_defaults(cls: type[Any]) -> None:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    required = {f.name: _value(f.type) for f in info.fields if f.required}
    msg = cls(**required)
    assert m.decode(m.encode(msg)) == msg


def test_every_message_type_is_tagged_with_a_distinct_tag() -> None:
    tags = [msgspec.inspect.type_info(c).tag for c in MESSAGE_TYPES]  # type: ignore[attr-defined]
    assert None not in tags
    assert len(set(tags)) == len(tags)


def test_samples_cover_only_union_members() -> None:
    assert set(SAMPLES) <= set(MESSAGE_TYPES), "a sample's type is missing from Message"


def test_omitted_fields_take_their_defaults() -> None:
    # Schema evolution: an older sender leaves out fields added later.
    data = msgspec.msgpack.encode({"type": "LocalServerState", "model": "a"})
    assert m.decode(data) == m.LocalServerState(model="a")


def test_unknown_fields_are_ignored() -> None:
    # A newer sender's extra fields do not break an older receiver.
    data = msgspec.msgpack.encode({"type": "DropModel", "model": "a", "future": [1, 2]})
    assert m.decode(data) == m.DropModel("a")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"garbage that is not msgpack \xff\xfe",
        m.encode(m.DropModel("a"))[:-2],  # truncated
        msgspec.msgpack.encode({"type": "NoSuchMessage"}),
        msgspec.msgpack.encode({"model": "a"}),  # no tag
        msgspec.msgpack.encode({"type": "DropModel"}),  # required field missing
        msgspec.msgpack.encode({"type": "CtlDone", "message": 3}),  # wrong type
        msgspec.msgpack.encode({"type": "LocalServerState", "state": "exploded"}),
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode("GetStatus"),
        msgspec.msgpack.encode(None),
    ],
)
def test_malformed_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        m.decode(data)


def test_messages_are_immutable() -> None:
    msg = m.DropModel("a")
    with pytest.raises(AttributeError):
        msg.model = "b"  # type: ignore[misc]
