"""LAN discovery, sans-I/O (meshllm.mesh.discovery): the TXT record a node advertises,
and what `meshllm discover` makes of what anyone on the LAN can send."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.mesh.discovery import (
    JOIN_NOTE,
    MAX_ADDRESSES,
    MAX_MODELS,
    MAX_REASONS,
    MAX_VALUE_BYTES,
    TXT_BUDGET,
    Advert,
    InvalidAdvert,
    Nearby,
    decode_txt,
    encode_txt,
    format_nearby,
    instance_name,
    nearby_json,
)
from meshllm.mesh.token import InviteToken, encode_token, mesh_id_of, new_secret

NODE = "0123456789abcdef"


def advert(**changes: object) -> Advert:
    base = Advert(
        mesh_id=mesh_id_of(b"x" * 32),
        node_id=NODE,
        addresses=("192.168.1.5:40000",),
        models=("llama-3.2-1b", "qwen2.5-7b"),
        version="0.1.0",
    )
    return msgspec.structs.replace(base, **changes)


def heard(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    """TXT properties as zeroconf hands them over."""
    return {k.encode(): v.encode() for k, v in txt.items()}


def txt_size(txt: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) + 2 for k, v in txt.items())


def test_round_trip() -> None:
    a = advert(addresses=("192.168.1.5:40000", "[fe80::1]:40000"))
    assert decode_txt(heard(encode_txt(a))) == a
    assert len(instance_name(a).encode()) <= 63


def test_the_secret_and_the_token_are_never_advertised() -> None:
    secret = new_secret()
    mesh_id = mesh_id_of(secret)
    token = encode_token(InviteToken(secret, ("192.168.1.5:40000",), mesh_id))
    txt = encode_txt(advert(mesh_id=mesh_id))
    sent = " ".join([instance_name(advert(mesh_id=mesh_id)), *txt.keys(), *txt.values()])
    for form in (secret.hex(), base64.urlsafe_b64encode(secret).decode().rstrip("="), token):
        assert form not in sent
    assert set(Advert.__struct_fields__) == {
        "mesh_id",
        "node_id",
        "addresses",
        "models",
        "more_models",
        "version",
    }


def test_many_or_long_models_are_cut_to_the_budget_and_said_so() -> None:
    models = tuple(f"{i:02d}-" + "m" * 190 for i in range(MAX_MODELS + 4))
    txt = encode_txt(advert(models=models))
    assert txt_size(txt) <= TXT_BUDGET
    assert all(len(k) + 1 + len(v.encode()) <= 255 for k, v in txt.items())
    assert txt["mx"] == "1"
    back = decode_txt(heard(txt))
    assert back.more_models and 0 < len(back.models) < len(models)
    assert back.models == models[: len(back.models)]
    assert back.addresses == advert().addresses  # addresses are never cut


def test_a_few_models_fit_whole() -> None:
    txt = encode_txt(advert())
    assert "mx" not in txt
    assert decode_txt(heard(txt)).models == advert().models


def test_unknown_keys_and_extra_addresses_are_ignored() -> None:
    txt = encode_txt(advert())
    txt.update({"future": "thing", f"a{MAX_ADDRESSES}": "10.0.0.9:1", "flag": ""})
    props = heard(txt)
    props[b"bare"] = None  # a key without '='
    assert decode_txt(props) == advert()


GOOD = encode_txt(advert())


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"v": None}, "TXT version none"),
        ({"v": "2"}, "TXT version '2'"),
        ({"mesh": None}, "bad mesh id"),
        ({"mesh": "ABCDEF012345"}, "bad mesh id"),
        ({"mesh": "0" * 13}, "bad mesh id"),
        ({"node": "xyz"}, "bad node id"),
        ({"a0": None}, "no gossip address"),
        ({"a0": "10.0.0.1"}, "want host:port"),
        ({"a0": "10.0.0.1:0"}, "want host:port"),
        ({"a0": "10.0.0.1:99999"}, "want host:port"),
        ({"a0": "\x1b[31mred:80"}, "bad host"),
        ({"a0": "a b:80"}, "bad host"),
        ({"m0": "a/b"}, "bad model name"),
        ({"m0": "evil\x1b]0;title\x07"}, "bad model name"),
        ({"m0": ".hidden"}, "bad model name"),
        ({"m0": "csi\x9b31m"}, "bad model name"),
        ({"m0": "bidi\u202e"}, "bad model name"),
        ({"ver": "1.0\n"}, "bad version"),
        ({"m1": "m" * (MAX_VALUE_BYTES + 1)}, "longer than"),
    ],
)
def test_malformed_adverts_are_refused_with_a_reason(
    changes: dict[str, str | None], reason: str
) -> None:
    props = heard(GOOD)
    for key, value in changes.items():
        if value is None:
            props.pop(key.encode(), None)
        else:
            props[key.encode()] = value.encode()
    with pytest.raises(InvalidAdvert, match=reason) as info:
        decode_txt(props)
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)


def test_non_utf8_is_refused() -> None:
    props = heard(GOOD)
    props[b"node"] = b"\xff" * 16
    with pytest.raises(InvalidAdvert, match="not UTF-8"):
        decode_txt(props)


def test_nearby_groups_by_mesh_and_forgets_the_gone() -> None:
    nearby = Nearby()
    other = "fedcba987654"
    assert nearby.heard("n1", heard(encode_txt(advert(node_id="1" * 16)))) is None
    assert nearby.heard("n2", heard(encode_txt(advert(node_id="2" * 16, models=("z",))))) is None
    assert nearby.heard("n3", heard(encode_txt(advert(mesh_id=other, models=())))) is None
    meshes = nearby.meshes()
    assert [m.mesh_id for m in meshes] == sorted([advert().mesh_id, other])
    ours = next(m for m in meshes if m.mesh_id == advert().mesh_id)
    assert [a.node_id for a in ours.nodes] == ["1" * 16, "2" * 16]
    assert ours.models == ("llama-3.2-1b", "qwen2.5-7b", "z")
    nearby.gone("n2")
    nearby.gone("never-heard")
    assert sum(len(m.nodes) for m in nearby.meshes()) == 2


def test_nearby_is_bounded_however_much_is_heard() -> None:
    nearby = Nearby(limit=3)
    for i in range(10):
        nearby.heard(f"n{i}", heard(encode_txt(advert(node_id=f"{i:016x}"))))
    for i in range(50):
        nearby.heard(f"bad{i}", {b"v": b"1", b"mesh": f"bad{i}".encode()})
    assert len(nearby.adverts) == 3
    assert nearby.refused == 7 + 50
    assert len(nearby.reasons) == MAX_REASONS
    # One already kept may still change.
    nearby.heard("n0", heard(encode_txt(advert(node_id="f" * 16))))
    assert nearby.adverts["n0"].node_id == "f" * 16


def test_format_and_json_say_that_joining_needs_the_token() -> None:
    nearby = Nearby()
    assert "no meshllm mesh heard" in format_nearby(nearby)
    nearby.heard("n1", heard(encode_txt(advert(more_models=True))))
    nearby.heard("bad", {b"v": b"9"})
    text = format_nearby(nearby)
    assert f"mesh {advert().mesh_id}: 1 node" in text
    assert "llama-3.2-1b, qwen2.5-7b (and more)" in text
    assert f"node {NODE}  192.168.1.5:40000  (meshllm 0.1.0)" in text
    assert "ignored 1 advertisement(s)" in text and "TXT version '9'" in text
    assert JOIN_NOTE in text and "--join TOKEN" in JOIN_NOTE
    data = json.loads(json.dumps(nearby_json(nearby)))
    assert data["meshes"][0]["nodes"][0]["addresses"] == ["192.168.1.5:40000"]
    assert data["ignored"] == 1 and data["note"] == JOIN_NOTE


TXT_KEYS = st.sampled_from(["v", "mesh", "node", "a0", "a1", "m0", "m1", "mx", "ver", "x"])


@given(
    st.dictionaries(
        st.one_of(TXT_KEYS.map(str.encode), st.binary(max_size=20)),
        st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=60).map(str.encode)),
        max_size=12,
    )
)
def test_anything_heard_is_taken_or_refused_cleanly(props: dict[bytes, bytes | None]) -> None:
    base = heard(GOOD)
    for candidate in (props, {**base, **props}):
        nearby = Nearby()
        nearby.heard("x", candidate)
        text = format_nearby(nearby)
        assert all(c.isprintable() for c in text.replace("\n", ""))


def test_the_models_advertised_follow_the_mesh_view() -> None:
    from actors.discovery import advertised_models
    from meshllm.mesh.wire import PeerAnnouncement
    from meshllm.runtime.messages import MeshView

    me = PeerAnnouncement(node_id="1" * 16, generation=1, requested_models=("b", "a"))
    peers = (
        PeerAnnouncement(node_id="2" * 16, generation=1, serving="c"),
        PeerAnnouncement(node_id="3" * 16, generation=1, backend_models=("d", "a")),
    )
    assert advertised_models(MeshView("1" * 16, peers, me)) == ("a", "b", "c", "d")
    assert advertised_models(MeshView("1" * 16)) == ()
