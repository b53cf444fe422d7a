"""Invite tokens (meshllm.mesh.token): round trip and clear errors for damaged tokens."""

from __future__ import annotations

import base64

import msgspec
import pytest

from meshllm.mesh.token import (
    PREFIX,
    SECRET_BYTES,
    InvalidToken,
    InviteToken,
    decode_token,
    encode_token,
    mesh_id_of,
    new_secret,
    split_address,
)


def make(**changes: object) -> InviteToken:
    secret = new_secret()
    token = InviteToken(secret, ("192.168.1.5:40000", "[fe80::1]:40000"), mesh_id_of(secret))
    return msgspec.structs.replace(token, **changes)


def raw_token(payload: object) -> str:
    """A token whose body is any msgpack value (what a buggy or hostile encoder could send)."""
    body = base64.urlsafe_b64encode(msgspec.msgpack.encode(payload)).decode().rstrip("=")
    return PREFIX + body


def test_round_trip() -> None:
    token = make()
    text = encode_token(token)
    assert text.startswith(PREFIX)
    assert "=" not in text and "/" not in text and "+" not in text  # pasteable as is
    assert decode_token(text) == token
    assert decode_token(f"  {text}\n") == token  # pasted with whitespace


def test_new_secret_and_mesh_id() -> None:
    a, b = new_secret(), new_secret()
    assert len(a) == SECRET_BYTES and a != b
    assert mesh_id_of(a) == mesh_id_of(a) != mesh_id_of(b)
    assert len(mesh_id_of(a)) == 12


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "starts with 'meshllm1.'"),
        ("meshllm2.abcd", "starts with 'meshllm1.'"),
        ("hello world", "starts with 'meshllm1.'"),
        (PREFIX, "damaged"),
        (PREFIX + "A", "damaged"),  # not valid base64 (one char too many)
        (PREFIX + "!!!!", "damaged"),
        (PREFIX + "é", "damaged"),
        (PREFIX + "bm90IG1zZ3BhY2s", "damaged"),  # base64 of "not msgpack"
    ],
)
def test_malformed_tokens_are_rejected_clearly(text: str, message: str) -> None:
    with pytest.raises(InvalidToken, match=message):
        decode_token(text)


def test_truncated_token_is_rejected() -> None:
    text = encode_token(make())
    for cut in (len(PREFIX) + 3, len(text) // 2, len(text) - 5):
        with pytest.raises(InvalidToken, match="damaged"):
            decode_token(text[:cut])


def test_wrong_secret_length() -> None:
    with pytest.raises(InvalidToken, match="secret has the wrong length"):
        decode_token(encode_token(make(secret=b"short")))


def test_no_address() -> None:
    with pytest.raises(InvalidToken, match="no address"):
        decode_token(encode_token(make(addresses=())))


@pytest.mark.parametrize(
    "address", ["nohost", "host:", ":40000", "host:0", "host:65536", "host:port", "host:-1"]
)
def test_bad_address(address: str) -> None:
    with pytest.raises(InvalidToken, match="bad address"):
        decode_token(encode_token(make(addresses=("10.0.0.1:1", address))))


def test_wrong_field_types_are_damaged_not_a_crash() -> None:
    for payload in (
        {"secret": "not bytes", "addresses": ["a:1"]},
        {"secret": b"x" * 32, "addresses": "a:1"},
        {"addresses": ["a:1"]},
        [1, 2, 3],
        42,
    ):
        with pytest.raises(InvalidToken, match="damaged"):
            decode_token(raw_token(payload))


def test_split_address() -> None:
    assert split_address("10.0.0.1:9000") == ("10.0.0.1", 9000)
    assert split_address("[::1]:9000") == ("::1", 9000)
    assert split_address("example.org:1") == ("example.org", 1)
    assert split_address("0.0.0.0:0", allow_zero=True) == ("0.0.0.0", 0)
    with pytest.raises(InvalidToken):
        split_address("0.0.0.0:0")
