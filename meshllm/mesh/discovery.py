"""LAN discovery: what a node advertises over mDNS and what `meshllm discover` makes of
what it hears. No sockets here (the zeroconf glue is `meshllm.mesh.mdns`).

A node started with `--discover` advertises one service of type `SERVICE_TYPE`
whose TXT record names its mesh (the mesh id, a hash of the secret: see
`token.mesh_id_of`), its node id, its gossip addresses and the models its mesh
serves. Never the secret nor the token: whoever hears the advertisement still
needs a token to join.

Anyone on the LAN can advertise anything, so what is heard is checked field by
field (`decode_txt`) and kept within bounds (`Nearby`); text that reaches a
terminal holds no control characters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from meshllm.http.backends import check_model_name
from meshllm.mesh.token import InvalidToken, split_address

SERVICE_TYPE = "_meshllm._udp.local."
TXT_VERSION = "1"
"""Version of the TXT layout; a record of another version is ignored."""
MAX_ADDRESSES = 4
"""Gossip addresses per node (TXT keys `a0`..`a3`)."""
MAX_MODELS = 16
"""Models per node (TXT keys `m0`..`m15`)."""
TXT_BUDGET = 1300
"""Most bytes of TXT a node sends (RFC 6763 section 6.2: keep it under 1300); models
beyond it are left out and `mx=1` says so."""
MAX_VALUE_BYTES = 250
"""A TXT string is at most 255 bytes, key and `=` included."""
MAX_NODES_HEARD = 256
"""Advertisements `Nearby` keeps; more (a flood from one host) are counted, not kept."""
MAX_REASONS = 5
"""Distinct reasons for refused advertisements that `Nearby` keeps to show."""

_MESH_ID = re.compile(r"[0-9a-f]{12}")
_NODE_ID = re.compile(r"[0-9a-f]{16}")
_HOST = re.compile(r"[A-Za-z0-9._:%\[\]-]{1,253}")
_VERSION = re.compile(r"[A-Za-z0-9.+_-]{1,32}")


class InvalidAdvert(ValueError):
    """What was heard is not a meshllm advertisement this version understands."""


class Advert(msgspec.Struct, frozen=True):
    """One node's advertisement."""

    mesh_id: str
    """The mesh's public id (`token.mesh_id_of`), never its secret."""
    node_id: str
    addresses: tuple[str, ...]
    """`host:port` of the node's gossip endpoint (what an invite token names)."""
    models: tuple[str, ...] = ()
    """Models its mesh serves or was asked for, as far as the TXT budget allows."""
    more_models: bool = False
    """More models than `models` lists."""
    version: str = ""
    """The node's meshllm version."""


def instance_name(advert: Advert) -> str:
    """The service instance name (at most 63 bytes): one per node and mesh."""
    return f"meshllm-{advert.mesh_id}-{advert.node_id}"


def encode_txt(advert: Advert) -> dict[str, str]:
    """The TXT properties of `advert`, within `TXT_BUDGET` (models are cut, not addresses)."""
    txt = {"v": TXT_VERSION, "mesh": advert.mesh_id, "node": advert.node_id}
    if advert.version:
        txt["ver"] = advert.version
    for i, address in enumerate(advert.addresses[:MAX_ADDRESSES]):
        txt[f"a{i}"] = address
    size = sum(len(k) + len(v.encode()) + 2 for k, v in txt.items())
    more = advert.more_models or len(advert.models) > MAX_MODELS
    room = TXT_BUDGET - len("mx=1") - 1
    for i, model in enumerate(advert.models[:MAX_MODELS]):
        entry = len(f"m{i}") + len(model.encode()) + 2
        if size + entry > room or len(model.encode()) > MAX_VALUE_BYTES:
            more = True
            break
        txt[f"m{i}"] = model
        size += entry
    if more:
        txt["mx"] = "1"
    return txt


def _text(props: Mapping[bytes, bytes | None], key: str) -> str | None:
    raw = props.get(key.encode())
    if raw is None:
        return None
    if len(raw) > MAX_VALUE_BYTES:
        raise InvalidAdvert(f"TXT value {key!r} is longer than {MAX_VALUE_BYTES} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidAdvert(f"TXT value {key!r} is not UTF-8") from None


def _check_address(address: str) -> str:
    try:
        host, _port = split_address(address)
    except InvalidToken as exc:
        raise InvalidAdvert(str(exc)) from None
    if not _HOST.fullmatch(host):
        raise InvalidAdvert(f"bad host in address {address[:80]!r}")
    return address


def decode_txt(props: Mapping[bytes, bytes | None]) -> Advert:
    """The advertisement in heard TXT properties; `InvalidAdvert` (saying what is wrong,
    quoting at most a few escaped characters) otherwise. Unknown keys are ignored."""
    version = _text(props, "v")
    if version != TXT_VERSION:
        shown = "none" if version is None else repr(version[:16])
        raise InvalidAdvert(f"TXT version {shown}, not {TXT_VERSION!r}")
    mesh_id = _text(props, "mesh") or ""
    if not _MESH_ID.fullmatch(mesh_id):
        raise InvalidAdvert(f"bad mesh id {mesh_id[:20]!r}")
    node_id = _text(props, "node") or ""
    if not _NODE_ID.fullmatch(node_id):
        raise InvalidAdvert(f"bad node id {node_id[:20]!r}")
    addresses = []
    for i in range(MAX_ADDRESSES):
        address = _text(props, f"a{i}")
        if address is not None:
            addresses.append(_check_address(address))
    if not addresses:
        raise InvalidAdvert("no gossip address")
    models = []
    for i in range(MAX_MODELS):
        model = _text(props, f"m{i}")
        if model is None:
            continue
        if check_model_name(model) is not None or not model.isprintable():
            raise InvalidAdvert(f"bad model name {model[:40]!r}")
        models.append(model)
    ver = _text(props, "ver") or ""
    if ver and not _VERSION.fullmatch(ver):
        raise InvalidAdvert(f"bad version {ver[:20]!r}")
    return Advert(
        mesh_id=mesh_id,
        node_id=node_id,
        addresses=tuple(addresses),
        models=tuple(dict.fromkeys(models)),
        more_models=_text(props, "mx") == "1",
        version=ver,
    )


class MeshNearby(msgspec.Struct, frozen=True):
    """One mesh heard on the LAN: its nodes' advertisements, sorted by node id."""

    mesh_id: str
    nodes: tuple[Advert, ...]
    models: tuple[str, ...]
    """Every model its nodes advertise, sorted."""


@dataclass
class Nearby:
    """What was heard, bounded: at most `limit` advertisements, keyed by service name."""

    limit: int = MAX_NODES_HEARD
    adverts: dict[str, Advert] = field(default_factory=dict)
    refused: int = 0
    """Advertisements that were malformed or over `limit`."""
    reasons: list[str] = field(default_factory=list)
    """The first `MAX_REASONS` distinct reasons for refusing one."""

    @property
    def full(self) -> bool:
        return len(self.adverts) >= self.limit

    def heard(self, name: str, props: Mapping[bytes, bytes | None]) -> str | None:
        """Take one heard service; returns why it was refused, or None."""
        try:
            advert = decode_txt(props)
        except InvalidAdvert as exc:
            return self._refuse(str(exc))
        if name not in self.adverts and self.full:
            return self.over_limit()
        self.adverts[name] = advert
        return None

    def over_limit(self) -> str:
        """One more advertisement than `limit` was heard (and not kept)."""
        return self._refuse(f"more than {self.limit} advertisements")

    def gone(self, name: str) -> None:
        self.adverts.pop(name, None)

    def _refuse(self, reason: str) -> str:
        self.refused += 1
        if reason not in self.reasons and len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)
        return reason

    def meshes(self) -> list[MeshNearby]:
        by_mesh: dict[str, list[Advert]] = {}
        for advert in self.adverts.values():
            by_mesh.setdefault(advert.mesh_id, []).append(advert)
        return [
            MeshNearby(
                mesh_id,
                tuple(sorted(nodes, key=lambda a: (a.node_id, a.addresses))),
                tuple(sorted({model for a in nodes for model in a.models})),
            )
            for mesh_id, nodes in sorted(by_mesh.items())
        ]


JOIN_NOTE = (
    "Joining a mesh still needs its invite token: ask a member for the output of "
    "`meshllm ctl token`, then `meshllm up --join TOKEN`. Advertisements are not "
    "authenticated: anyone on the network can send one."
)


def format_nearby(nearby: Nearby) -> str:
    """`meshllm discover`'s table."""
    meshes = nearby.meshes()
    lines = [] if meshes else ["no meshllm mesh heard on the local network"]
    for mesh in meshes:
        count = len(mesh.nodes)
        lines.append(f"mesh {mesh.mesh_id}: {count} node{'s' if count != 1 else ''}")
        if mesh.models:
            more = " (and more)" if any(a.more_models for a in mesh.nodes) else ""
            lines.append(f"  models: {', '.join(mesh.models)}{more}")
        for advert in mesh.nodes:
            version = f"  (meshllm {advert.version})" if advert.version else ""
            lines.append(f"  node {advert.node_id}  {' '.join(advert.addresses)}{version}")
    if nearby.refused:
        lines.append(
            f"ignored {nearby.refused} advertisement(s) that were not understood: "
            + "; ".join(nearby.reasons)
        )
    lines.append(JOIN_NOTE)
    return "\n".join(lines)


def nearby_json(nearby: Nearby) -> dict[str, object]:
    """`meshllm discover --json`."""
    return {
        "meshes": msgspec.to_builtins(nearby.meshes()),
        "ignored": nearby.refused,
        "ignored_reasons": list(nearby.reasons),
        "note": JOIN_NOTE,
    }
