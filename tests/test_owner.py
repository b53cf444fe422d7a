"""The mesh owner key (issue 12, item 4): the gate's decisions, the key files, the token.

Sans-I/O and in-process; the real nodes are in tests/test_owner_control.py."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.cli import main
from meshllm.mesh import wire
from meshllm.mesh.identity import public_der
from meshllm.mesh.owner import (
    OwnerGate,
    OwnerKeyError,
    check_holds_owner,
    create_owner_key,
    export_owner_key,
    import_owner_key,
    known_owner,
    load_owner_key,
    new_command,
    settle_owner,
    sign_command,
)
from meshllm.mesh.token import (
    PREFIX,
    InvalidToken,
    InviteToken,
    decode_token,
    encode_token,
    mesh_id_of,
    new_secret,
)
from meshllm.runtime.paths import NodeHome

NOW = 1_800_000_000.0
MESH = mesh_id_of(b"x" * 32)
NODE = "0123456789abcdef"
OTHER = "fedcba9876543210"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


OWNER = new_key()


def gate(**kw: object) -> OwnerGate:
    return OwnerGate(public_der(OWNER), NODE, MESH, **kw)  # type: ignore[arg-type]


def order(
    action: str = "stop",
    model: str | None = None,
    at: float = NOW,
    target: str = NODE,
    mesh: str = MESH,
    key: ec.EllipticCurvePrivateKey = OWNER,
) -> wire.OwnerOrder:
    return sign_command(key, new_command(mesh, target, action, model, at))


def test_the_owners_command_for_this_node_is_accepted_once() -> None:
    g = gate()
    signed = order("drop", "m")
    verdict = g.check(signed, NOW + 1)
    assert verdict.accepted and verdict.command == signed.command
    again = g.check(signed, NOW + 2)
    assert not again.accepted and "replay" in again.reason


@pytest.mark.parametrize(
    ("signed", "why"),
    [
        (order(key=new_key()), "not signed by the mesh owner"),
        (wire.OwnerOrder(order().command, b""), "not signed by the mesh owner"),
        (order(target=OTHER), f"for node {OTHER}"),
        (order(mesh=mesh_id_of(b"y" * 32)), "another mesh"),
        (order(at=NOW - 121), "too old"),
        (order(at=NOW + 121), "in the future"),
        (order("drop", None), "names no model"),
    ],
)
def test_refused(signed: wire.OwnerOrder, why: str) -> None:
    g = gate()
    verdict = g.check(signed, NOW)
    assert not verdict.accepted and why in verdict.reason
    assert not g.seen  # nothing a refused command carries is remembered


def test_a_command_altered_after_signing_is_refused() -> None:
    signed = order("drop", "small")
    altered = wire.OwnerOrder(
        msgspec.structs.replace(signed.command, model="large"), signed.signature
    )
    assert "not signed" in gate().check(altered, NOW).reason


def test_a_node_that_knows_no_owner_refuses_everything() -> None:
    verdict = OwnerGate(b"", NODE, MESH).check(order(), NOW)
    assert not verdict.accepted and "knows no mesh owner" in verdict.reason
    assert not OwnerGate(b"not a key", NODE, MESH).check(order(), NOW).accepted


def test_nonces_are_forgotten_after_the_window_and_bounded() -> None:
    g = gate(max_remembered=2)
    assert g.check(order(), NOW).accepted
    assert g.check(order(), NOW).accepted
    full = g.check(order(), NOW)
    assert not full.accepted and "too many" in full.reason
    # Past the window the first two are forgotten: their commands are too old by then.
    assert g.check(order(at=NOW + 121), NOW + 121.5).accepted
    assert len(g.seen) == 1


def test_the_command_survives_the_wire() -> None:
    signed = order("drop", "m")
    frame = wire.encode_frame(signed)
    decoded = wire.decode_payload(frame[wire.HEADER :])
    assert isinstance(decoded, wire.OwnerOrder) and decoded == signed
    assert gate().check(decoded, NOW).accepted


def test_a_bad_command_does_not_decode() -> None:
    for bad in ({"action": "reboot"}, {"nonce": b"short"}, {"target": "NODE"}):
        fields = {**msgspec.structs.asdict(order().command), **bad}
        raw = msgspec.msgpack.encode(wire.Envelope(1, wire.OwnerOrder(fields, b"")))  # type: ignore[arg-type]
        with pytest.raises(wire.WireError):
            wire.decode_payload(raw)


# -- the token carries the owner ----------------------------------------------------


def test_the_token_carries_the_owner_and_old_tokens_still_decode() -> None:
    secret = new_secret()
    owner = public_der(OWNER)
    token = decode_token(encode_token(InviteToken(secret, ("127.0.0.1:1",), "m", owner)))
    assert token.owner == owner

    class OldToken(msgspec.Struct):  # the format before owner keys
        secret: bytes
        addresses: tuple[str, ...]
        mesh_id: str = ""

    raw = msgspec.msgpack.encode(OldToken(secret, ("127.0.0.1:1",), "m"))
    old = PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert decode_token(old).owner == b""
    with pytest.raises(InvalidToken, match="owner key is damaged"):
        decode_token(encode_token(InviteToken(secret, ("127.0.0.1:1",), "m", b"bad")))


# -- key files ----------------------------------------------------------------------


def home(tmp_path: Path, name: str = "home") -> NodeHome:
    h = NodeHome(tmp_path / name)
    h.ensure()
    return h


def test_the_first_node_makes_the_key_owner_only(tmp_path: Path) -> None:
    h = home(tmp_path)
    owner = settle_owner(h, set(), same_mesh=True, fresh=True, client=False)
    assert stat.S_IMODE(h.owner_key_path.stat().st_mode) == 0o600
    assert known_owner(h) == owner == public_der(load_owner_key(h))
    # A restart keeps it.
    assert settle_owner(h, set(), same_mesh=True, fresh=False, client=False) == owner


def test_a_joiner_learns_the_owner_from_the_token(tmp_path: Path) -> None:
    h = home(tmp_path)
    owner = public_der(OWNER)
    assert settle_owner(h, {owner}, same_mesh=False, fresh=False, client=False) == owner
    assert known_owner(h) == owner and not h.owner_key_path.exists()
    # An old token later: the home still knows the owner.
    assert settle_owner(h, set(), same_mesh=True, fresh=False, client=False) == owner
    # A member's token naming itself as the owner of the same mesh: refused.
    with pytest.raises(OwnerKeyError, match="another mesh owner"):
        settle_owner(h, {public_der(new_key())}, same_mesh=True, fresh=False, client=False)
    # Joining another mesh: its owner replaces this one.
    other = public_der(new_key())
    assert settle_owner(h, {other}, same_mesh=False, fresh=False, client=False) == other
    with pytest.raises(OwnerKeyError, match="different mesh owners"):
        settle_owner(h, {owner, other}, same_mesh=False, fresh=False, client=False)


def test_a_lite_client_writes_nothing(tmp_path: Path) -> None:
    h = home(tmp_path)
    owner = public_der(OWNER)
    assert settle_owner(h, {owner}, same_mesh=False, fresh=False, client=True) == owner
    assert not h.owner_public_path.exists()


def test_export_and_import(tmp_path: Path) -> None:
    first, second, stranger = home(tmp_path, "a"), home(tmp_path, "b"), home(tmp_path, "c")
    owner = create_owner_key(first)
    settle_owner(second, {owner}, same_mesh=False, fresh=False, client=False)
    settle_owner(stranger, {public_der(new_key())}, same_mesh=False, fresh=False, client=False)
    with pytest.raises(OwnerKeyError, match="holds no mesh owner key"):
        load_owner_key(second)
    pem = tmp_path / "owner.pem"
    pem.write_text(export_owner_key(first))
    with pytest.raises(OwnerKeyError, match="not the owner key of this node's mesh"):
        import_owner_key(stranger, str(pem))
    assert not stranger.owner_key_path.exists()
    assert "installed" in import_owner_key(second, str(pem))
    assert stat.S_IMODE(second.owner_key_path.stat().st_mode) == 0o600
    check_holds_owner(load_owner_key(second), owner)
    with pytest.raises(OwnerKeyError, match="not the owner key"):
        check_holds_owner(new_key(), owner)
    with pytest.raises(OwnerKeyError, match="has no owner key"):
        check_holds_owner(load_owner_key(second), b"")
    junk = tmp_path / "junk"
    junk.write_text("not a key")
    with pytest.raises(OwnerKeyError, match="PEM private key"):
        import_owner_key(home(tmp_path, "d"), str(junk))
    with pytest.raises(OwnerKeyError, match="cannot read"):
        import_owner_key(second, str(tmp_path / "missing"))


def test_cli_export_import(tmp_path: Path) -> None:
    first, second = home(tmp_path, "a"), home(tmp_path, "b")
    create_owner_key(first)
    out = tmp_path / "owner.pem"
    runner = CliRunner()
    done = runner.invoke(
        main, ["ctl", "owner", "export", "--home", str(first.root), "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    done = runner.invoke(main, ["ctl", "owner", "import", str(out), "--home", str(second.root)])
    assert done.exit_code == 0 and "installed" in done.output
    assert second.owner_key_path.read_bytes() == first.owner_key_path.read_bytes()
    done = runner.invoke(main, ["ctl", "owner", "export", "--home", str(tmp_path / "none")])
    assert done.exit_code == 1 and "holds no mesh owner key" in done.output


def test_cli_node_goes_with_drop_and_stop_only(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["ctl", "--node", NODE, "status", "--home", str(tmp_path)])
    assert done.exit_code == 2 and "drop` and `stop` only" in done.output
    done = runner.invoke(main, ["ctl", "--node", "node-b", "stop", "--home", str(tmp_path)])
    assert done.exit_code == 2 and "16 lowercase hex digits" in done.output
    # No owner key here: refused before anything is sent.
    done = runner.invoke(main, ["ctl", "--node", NODE, "stop", "--home", str(tmp_path)])
    assert done.exit_code == 1 and "holds no mesh owner key" in done.output
