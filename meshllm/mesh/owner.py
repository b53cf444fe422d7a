"""The mesh owner: a key that lets one person stop or unload any node of the mesh.

The node that starts a mesh (no `--join`) makes the owner key (`owner.key` in
its home, mode 0600, a P-256 key like a node's identity). Its public half goes
into every invite token, so each node learns it the way it learns the mesh
secret, and keeps it in its home (`owner.pub`). A member holds the secret, not
the owner key: `meshllm ctl --node ID stop|drop MODEL` signs an `OwnerCommand`
with the owner key where it is run, and the target acts on it only when
`OwnerGate` finds it signed by that key, meant for that node of that mesh,
recent, and not seen before. `meshllm ctl owner export/import` moves the key
to another machine.

Sans-I/O: `OwnerGate.check` takes the wall clock as an argument.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.mesh import wire
from meshllm.mesh.identity import BadKey, load_or_create_key, load_public, public_der, sign, verify
from meshllm.runtime.paths import NodeHome, write_private

WINDOW_S = 120.0
"""A command is acted on within this many seconds of being signed (either way: the
two machines' clocks may differ by some), and its nonce is remembered that long."""
MAX_REMEMBERED = 4096
"""Nonces remembered at once: only commands the owner signed get that far, so this
bounds what the owner could make a node hold, not what a member can."""


class OwnerKeyError(ValueError):
    """An owner key that cannot be used: missing, damaged, or of another mesh."""


# -- commands ----------------------------------------------------------------------


def new_command(
    mesh_id: str, target: str, action: str, model: str | None, now: float
) -> wire.OwnerCommand:
    """A command for `target` at wall-clock time `now`, with a fresh nonce."""
    return wire.OwnerCommand(
        mesh_id=mesh_id,
        target=target,
        action=action,  # type: ignore[arg-type]  # checked by the wire type on decode
        model=model,
        issued_ms=int(now * 1000),
        nonce=secrets.token_bytes(wire.OWNER_NONCE_BYTES),
    )


def sign_command(key: ec.EllipticCurvePrivateKey, command: wire.OwnerCommand) -> wire.OwnerOrder:
    return wire.OwnerOrder(command, sign(key, wire.owner_signed_bytes(command)))


@dataclass(frozen=True)
class Verdict:
    """What `OwnerGate.check` decided: act on `command`, or refuse it for `reason`."""

    accepted: bool
    reason: str = ""
    command: wire.OwnerCommand | None = None


@dataclass
class OwnerGate:
    """Decides whether this node acts on an `OwnerOrder`: signed by the mesh owner,
    for this node of this mesh, within `window_s` of now, and never seen before."""

    owner_public: bytes
    """The owner's public key (DER); empty: this node knows no owner and refuses all."""
    node_id: str
    mesh_id: str
    window_s: float = WINDOW_S
    max_remembered: int = MAX_REMEMBERED
    seen: dict[bytes, float] = field(default_factory=dict)
    """Nonce -> when it may be forgotten (its command is out of the window by then)."""

    def __post_init__(self) -> None:
        self.public = None
        if self.owner_public:
            try:
                self.public = load_public(self.owner_public)
            except BadKey:
                self.public = None

    def check(self, order: wire.OwnerOrder, now: float) -> Verdict:
        cmd = order.command
        if self.public is None:
            return Verdict(False, "this node knows no mesh owner key: it takes no owner commands")
        if cmd.mesh_id != self.mesh_id:
            return Verdict(False, "the command is for another mesh")
        if cmd.target != self.node_id:
            return Verdict(False, f"the command is for node {cmd.target}, not this one")
        # The signature before anything is remembered: only the owner can fill `seen`.
        if not verify(self.public, order.signature, wire.owner_signed_bytes(cmd)):
            return Verdict(False, "the command is not signed by the mesh owner key")
        issued = cmd.issued_ms / 1000
        if issued < now - self.window_s:
            return Verdict(False, f"the command was signed {now - issued:.0f}s ago: too old")
        if issued > now + self.window_s:
            return Verdict(False, "the command was signed in the future (check the clocks)")
        if cmd.action == "drop" and cmd.model is None:
            return Verdict(False, "a drop command names no model")
        self._forget(now)
        if cmd.nonce in self.seen:
            return Verdict(False, "the command was already acted on (a replay)")
        if len(self.seen) >= self.max_remembered:
            return Verdict(False, "too many owner commands at once; try again later")
        self.seen[cmd.nonce] = issued + self.window_s
        return Verdict(True, command=cmd)

    def _forget(self, now: float) -> None:
        for nonce in [n for n, until in self.seen.items() if until < now]:
            del self.seen[nonce]


# -- key files -----------------------------------------------------------------------


def create_owner_key(home: NodeHome) -> bytes:
    """Make the mesh owner key in `home` (the node that starts a mesh); its public key."""
    key = load_or_create_key(home.owner_key_path)
    der = public_der(key)
    write_private(home.owner_public_path, der)
    return der


def known_owner(home: NodeHome) -> bytes:
    """The owner public key `home` knows (DER), or b""."""
    try:
        return home.owner_public_path.read_bytes()
    except FileNotFoundError:
        return b""


def settle_owner(
    home: NodeHome, given: set[bytes], same_mesh: bool, fresh: bool, client: bool
) -> bytes:
    """The owner public key of the mesh this node is in, written to `home` as needed.

    `given`: the owners the `--join` tokens name; `same_mesh`: the tokens' secret is
    the one `home` already held (or there are no tokens); `fresh`: this node starts a
    new mesh (it makes the key). A token naming another owner than the home knows for
    the same mesh is refused: that is a member handing out its own key as the owner's."""
    if len(given) > 1:
        raise OwnerKeyError("the --join tokens name different mesh owners")
    if fresh and not client:
        return create_owner_key(home)
    known = known_owner(home) if same_mesh else b""
    owner = given.pop() if given else known
    if known and owner != known:
        raise OwnerKeyError(
            "the invite token names another mesh owner key than this home knows for this "
            f"mesh ({home.owner_public_path}); refusing it. Ask the mesh owner for a token"
        )
    if not client and owner and owner != known_owner(home):
        write_private(home.owner_public_path, owner)
    return owner


def load_owner_key(home: NodeHome) -> ec.EllipticCurvePrivateKey:
    """The owner key held in `home`; `OwnerKeyError` when there is none."""
    path = home.owner_key_path
    if not path.exists():
        raise OwnerKeyError(
            f"this node holds no mesh owner key ({path}): only the node that started the "
            "mesh has it, or one it was given to with `meshllm ctl owner import FILE`"
        )
    return _parse_key(path.read_bytes(), str(path))


def _parse_key(pem: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise OwnerKeyError(f"{where} does not hold a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise OwnerKeyError(f"{where} does not hold a P-256 key (a meshllm owner key)")
    return key


def export_owner_key(home: NodeHome) -> str:
    """The owner key in `home` as PEM text (for `meshllm ctl owner export`)."""
    key = load_owner_key(home)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem.decode().strip()


MAX_KEY_FILE_BYTES = 16 * 1024


def import_owner_key(home: NodeHome, path: str) -> str:
    """Install the owner key in the PEM file at `path` in `home`; what was done.

    Refused when `home` knows another owner for its mesh: the key would sign
    commands no node of this mesh takes."""
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as file:
            pem = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise OwnerKeyError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise OwnerKeyError(f"{path} is too large for a key")
    key = _parse_key(pem, path)
    der = public_der(key)
    known = known_owner(home)
    if known and known != der:
        raise OwnerKeyError(
            f"{path} is not the owner key of this node's mesh (its owner is in "
            f"{home.owner_public_path}); nothing was changed"
        )
    home.root.mkdir(parents=True, exist_ok=True)
    write_private(home.owner_key_path, pem)
    if not known:
        write_private(home.owner_public_path, der)
        return (
            f"owner key installed in {home.owner_key_path}; this home knew no owner, so "
            "it now trusts this key (a running node from its next start)"
        )
    return f"owner key installed in {home.owner_key_path}"


def check_holds_owner(key: ec.EllipticCurvePrivateKey, owner_public: bytes) -> None:
    """`OwnerKeyError` unless `key` is the owner key of the mesh whose owner is `owner_public`."""
    if not owner_public:
        raise OwnerKeyError(
            "this node's mesh has no owner key (it was made before owner keys, or joined "
            "with an old token): no node takes owner commands"
        )
    if public_der(key) != owner_public:
        raise OwnerKeyError("the owner key in this home is not the owner key of this node's mesh")
