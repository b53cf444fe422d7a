"""The mesh at a glance (sans-I/O): what the web console and its JSON endpoint show.

Built from what a node already knows (its own server state, the gossiped
announcements of its peers and the Router's table), so the console never asks
another actor anything per request. See docs/design.md, "Actors".
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from meshllm import __version__
from meshllm.mesh import wire
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.runtime.messages import LocalServerState, MeshView, RouteTable

ModelStatus = Literal["warm", "cold"]


class NodeCard(msgspec.Struct, frozen=True, kw_only=True):
    """One node of the mesh, as a box on the page."""

    node_id: str
    role: str
    """host, worker or standby (parts of a split), client, or idle (a node waiting
    for capacity)."""
    state: str
    """State of the node's server: stopped, waiting, downloading, loading, ready or failed."""
    model: str | None
    """Model the node serves (or is loading); None when it serves nothing."""
    vram_bytes: int
    """Memory the node announces for models (0: none announced)."""
    http_port: int
    this_node: bool
    version: str = ""
    reason: str = ""
    """Why the node's server failed."""
    split_host: str = ""
    """A worker's host."""
    workers: tuple[str, ...] = ()
    """A split host's workers."""
    shares: tuple[float, ...] = ()
    """A split host's layer shares: its own, then each worker's."""
    paused: bool = False
    """`meshllm ctl pause`: the node gave its machine back (serves no one until resumed)."""
    also: tuple[str, ...] = ()
    """The other models it serves, each with its own llama-server (`--models-dir`)."""


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """One model of the mesh catalog."""

    name: str
    status: ModelStatus
    """warm: at least one node serves it and is ready; cold: in the catalog, served by none."""
    node_count: int
    nodes: tuple[str, ...]
    """Node ids whose server for this model is ready."""
    loading: tuple[str, ...] = ()
    """Node ids still loading (or restarting) a server for it."""
    splits: tuple[SplitCard, ...] = ()
    """The ready servers of it that are split over several nodes."""
    note: str = ""
    """Why a cold model is not served, when a node said so (e.g. it fits nowhere)."""


class SplitCard(msgspec.Struct, frozen=True, kw_only=True):
    """A model served by a host with workers: who holds which share of its layers."""

    host: str
    members: tuple[str, ...]
    """The host, then its workers."""
    shares: tuple[float, ...]
    """Each member's share, in the same order."""


class MeshMemory(msgspec.Struct, frozen=True, kw_only=True):
    """Total memory for models over the mesh.

    Every node that announces memory counts, with what it announces: its GPUs'
    VRAM, or on a node without a GPU the share of system RAM it offers. The
    wire does not tell the two apart, so the console labels the total as such.
    """

    total_bytes: int
    nodes: int
    """Nodes that announce memory (vram_bytes > 0)."""
    nodes_without: int
    """Nodes that announce none (lite clients, or no detection yet)."""


class MeshStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the console page shows; served as JSON by `/api/status`."""

    node_id: str
    """This node."""
    api: str
    """Base URL of this node's OpenAI API."""
    nodes: tuple[NodeCard, ...]
    """This node first, then its peers by node id."""
    models: tuple[ModelCard, ...]
    """Warm models first, then cold ones, each group by name."""
    memory: MeshMemory


def own_card(
    node_id: str, client: bool, local: LocalServerState, vram_bytes: int, http_port: int
) -> NodeCard:
    """This node's box: the same role rule the Gossiper announces."""
    part = announced_part(local, client)
    return NodeCard(
        node_id=node_id,
        role=part["role"],
        state=local.state,
        model=local.model or None,
        vram_bytes=vram_bytes,
        http_port=http_port,
        this_node=True,
        reason=local.reason if local.state == "failed" else "",
        version=__version__,
        split_host=part["split_host"] or "",
        workers=part["split_workers"],
        shares=part["split_shares"],
        paused=local.paused,
        also=tuple(x.model for x in local.ready_extras()),
    )


def peer_card(ann: PeerAnnouncement) -> NodeCard:
    return NodeCard(
        node_id=ann.node_id,
        role=ann.role,
        state=ann.server_state,
        model=ann.serving,
        vram_bytes=ann.vram_bytes,
        http_port=ann.http_port,
        this_node=False,
        version=ann.version,
        reason=ann.server_reason,
        split_host=ann.split_host or "",
        workers=ann.split_workers,
        shares=ann.split_shares,
        paused=ann.paused,
        also=ann.also_serving,
    )


def build_mesh_status(me: NodeCard, mesh: MeshView, routes: RouteTable, api: str) -> MeshStatus:
    """The console's view of the mesh from this node's latest knowledge."""
    nodes = (me, *(peer_card(p) for p in sorted(mesh.peers, key=lambda p: p.node_id)))
    loading: dict[str, list[str]] = {}
    for node in nodes:
        if node.model and node.state in ("loading", "stopped") and not node.paused:
            loading.setdefault(node.model, []).append(node.node_id)
    models = [
        ModelCard(
            name=route.name,
            status="warm" if route.targets else "cold",
            node_count=len(route.nodes),
            nodes=route.nodes,
            loading=tuple(loading.get(route.name, ())),
            splits=tuple(
                SplitCard(host=t.node_id, members=(t.node_id, *t.workers), shares=t.shares)
                for t in route.targets
                if t.workers
            ),
            note=route.note,
        )
        for route in routes.models
    ]
    models.sort(key=lambda card: (card.status != "warm", card.name))
    counted = [n for n in nodes if n.vram_bytes > 0]
    memory = MeshMemory(
        total_bytes=sum(n.vram_bytes for n in counted),
        nodes=len(counted),
        nodes_without=len(nodes) - len(counted),
    )
    return MeshStatus(node_id=me.node_id, api=api, nodes=nodes, models=tuple(models), memory=memory)


ROLES: dict[str, wire.Role] = {"host": "host", "worker": "worker", "standby": "standby"}
"""A split group's parts as announced (`nofit` is a standby whose model fits nowhere)."""


def announced_part(local: LocalServerState, client: bool) -> dict[str, Any]:
    """The announcement's role and split fields for this node's server state."""
    split = local.split
    if client or split is None:
        role: wire.Role = "client" if client else ("host" if local.model else "idle")
        return {
            "role": role,
            "split_group": False,
            "split_host": None,
            "split_workers": (),
            "split_shares": (),
        }
    hosting = split.part == "host" and bool(split.workers)
    return {
        "role": ROLES.get(split.part, "standby"),
        "split_group": True,
        "split_host": split.host if split.part == "worker" else None,
        "split_workers": split.workers if hosting else (),
        "split_shares": split.shares if hosting else (),
    }
