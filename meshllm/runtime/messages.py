"""Messages that actors of one node exchange over ZeroMQ (msgspec, tagged).

Commands are imperative (`DropModel`), events and states are nouns or past tense
(`LocalServerState`, `RouteTable`). A *tell* expects no reply; an *ask* gets
exactly one reply message or an `ActorError`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from meshllm.mesh.wire import Demand, OwnerOrder, PeerAnnouncement
from meshllm.placement.split import SplitRole
from meshllm.runtime.config import ModelSpec

ServerStateName = Literal[
    "stopped", "waiting", "downloading", "loading", "ready", "draining", "failed"
]
"""`waiting`: a split group's standby, serving nothing until the group needs it;
`draining`: told to serve another model, no target any more, ending its requests."""


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    """Stop the actor (or, sent to the root, the whole node)."""

    reason: str = ""


class GetLatest(msgspec.Struct, tag=True, frozen=True):
    """Ask a publisher for the latest value it published on `topic`."""

    topic: str


class Nothing(msgspec.Struct, tag=True, frozen=True):
    """Reply to `GetLatest` when nothing has been published yet."""


class ActorError(msgspec.Struct, tag=True, frozen=True):
    """The reply to an ask that failed."""

    message: str


class ExtraServer(msgspec.Struct, frozen=True):
    """One more llama-server of this node (`--models-dir`): a model served alone."""

    model: str
    state: ServerStateName = "loading"
    port: int = 0
    pid: int = 0
    reason: str = ""
    restarts: int = 0


class LocalServerState(msgspec.Struct, tag=True, frozen=True):
    """What this node's llama-server is doing (published by ServerSupervisor)."""

    model: str = ""
    """Model name; empty when this node serves nothing."""
    path: str = ""
    state: ServerStateName = "stopped"
    port: int = 0
    pid: int = 0
    reason: str = ""
    """Why the server failed, taken from llama-server's own output."""
    restarts: int = 0
    split: SplitRole | None = None
    """This node's part in its model's split group; None: it serves the model alone.
    A worker's `port` is its RPC server's."""
    sha256: str = ""
    """Digest of the model file when this node downloaded it (its own `--model URL`):
    announced, so other nodes can fetch the same file and check it."""
    size: int = 0
    paused: bool = False
    """`meshllm ctl pause` (or `--pause-when-busy`): this node is no target any more; its
    server keeps running (`state` as before) until its requests in flight ended, then stops."""
    downloaded: int = 0
    """While `downloading`: bytes of the model file on disk so far."""
    download_total: int = 0
    """While `downloading`: the file's size, when known (0: unknown)."""
    extras: tuple[ExtraServer, ...] = ()
    """Its other llama-servers (`--models-dir`)."""

    def ready_extras(self) -> tuple[ExtraServer, ...]:
        return tuple(x for x in self.extras if x.state == "ready" and x.port)


class RouteTarget(msgspec.Struct, frozen=True):
    """One place a model's requests can go."""

    node_id: str
    local: bool
    port: int
    """llama-server port on that node (local) or its API port (remote)."""
    model: str = ""
    """The model served there (the remote Tunnel checks it; the request may name another)."""
    workers: tuple[str, ...] = ()
    """A split host's workers (none: the model is served there alone)."""
    shares: tuple[float, ...] = ()
    """A split host's layer shares: its own, then each worker's."""
    host: str = ""
    """A local external backend's host (`--backend-url`); empty: 127.0.0.1."""
    backend: bool = False
    """An external backend serves the model there (meshllm.http.backends)."""


class ModelRoute(msgspec.Struct, frozen=True):
    name: str
    targets: tuple[RouteTarget, ...] = ()
    """Empty for a cold model: known to the mesh, served by no node."""
    nodes: tuple[str, ...] = ()
    """Node ids serving the model."""
    note: str = ""
    """Why a cold model is not served (e.g. it fits nowhere, even split), when known."""
    loadable: bool = False
    """A cold model some node could load (a file on its disk, or a download source): a
    request for it waits for that (`--load-wait`); one nobody can load, or whose server
    failed (`note`), is 503 at once."""


class RouteTable(msgspec.Struct, tag=True, frozen=True):
    """Where each model's requests go (published by Router, used by Proxy)."""

    models: tuple[ModelRoute, ...] = ()


class BackendStatus(msgspec.Struct, frozen=True):
    """One external backend of this node (`--backend-url`)."""

    url: str
    host: str
    port: int
    up: bool = False
    models: tuple[str, ...] = ()
    """The models it serves (meshllm.http.backends.served_models)."""
    reason: str = ""
    """Why it is down."""


class BackendsState(msgspec.Struct, tag=True, frozen=True):
    """This node's external backends (published by the Backends actor on `backends`)."""

    backends: tuple[BackendStatus, ...] = ()


class MeshView(msgspec.Struct, tag=True, frozen=True):
    """The live peers this node knows (published by Gossiper on topic `mesh`)."""

    node_id: str
    peers: tuple[PeerAnnouncement, ...] = ()
    """Every other live node's latest announcement, sorted by node id."""
    me: PeerAnnouncement | None = None
    """This node's own announcement, as the mesh sees it."""


class SuspectPeer(msgspec.Struct, tag=True, frozen=True):
    """Something failed talking to `node_id` (link lost, tunnel stream broke): probe it now."""

    node_id: str
    reason: str = ""


class ProbePeer(msgspec.Struct, tag=True, frozen=True):
    """HealthProber -> Gossiper: send a probe to `node_id`."""

    node_id: str
    nonce: int


class ProbeVia(msgspec.Struct, tag=True, frozen=True):
    """HealthProber -> Gossiper: ask `via` to probe `target` for us."""

    via: str
    target: str
    nonce: int


class ProbeAnswered(msgspec.Struct, tag=True, frozen=True):
    """Gossiper -> HealthProber: the ack for `nonce` arrived."""

    nonce: int


class PeerDied(msgspec.Struct, tag=True, frozen=True):
    """HealthProber -> Gossiper: `node_id` is dead; remove it and tell the mesh."""

    node_id: str


class GetToken(msgspec.Struct, tag=True, frozen=True):
    """`meshllm ctl token`."""


class ServeModel(msgspec.Struct, tag=True, frozen=True):
    """What this node should serve (published by Elector on topic `wanted`)."""

    spec: ModelSpec | None = None
    """None: serve nothing, wait for capacity."""
    reason: str = ""
    split: SplitRole | None = None
    """The node's part in the model's split group (meshllm.placement.split); None: alone."""
    extras: tuple[ModelSpec, ...] = ()
    """More models to serve, each alone with its own llama-server (`--models-dir`)."""


class PeerRtts(msgspec.Struct, tag=True, frozen=True):
    """Round trips to peers, in ms, as probes measured them (HealthProber, topic `rtt`)."""

    rtt_ms: dict[str, float] = {}


class UseRpcWorkers(msgspec.Struct, tag=True, frozen=True):
    """ServerSupervisor -> Tunnel (ask): carry a split host's RPC connections to these
    workers (nearest first); replaces the previous set, () closes all."""

    workers: tuple[str, ...] = ()


class RpcPorts(msgspec.Struct, tag=True, frozen=True):
    """Tunnel's reply to `UseRpcWorkers`: one loopback port per worker, in order."""

    ports: tuple[int, ...] = ()


class DropModel(msgspec.Struct, tag=True, frozen=True):
    """`meshllm ctl drop`: stop serving `model`, kill llama-server, exit."""

    model: str


class SendOwnerOrder(msgspec.Struct, tag=True, frozen=True):
    """`meshllm ctl --node ID stop|drop MODEL` -> root -> Tunnel (ask): carry this signed
    order to its target node; the reply is the target's answer (`CtlDone` when it acts,
    `ActorError` when it refuses or cannot be reached)."""

    order: OwnerOrder


class PauseServing(msgspec.Struct, tag=True, frozen=True):
    """`meshllm ctl pause` / `resume` (root -> ServerSupervisor): stop being a target, let
    the requests in flight end (at most `drain_s`), stop llama-server; or serve again."""

    paused: bool
    drain_s: float = 60.0
    reason: str = ""


class CountInFlight(msgspec.Struct, tag=True, frozen=True):
    """ServerSupervisor -> Proxy, Tunnel (ask): how many requests the local server of
    `model` is answering for you now."""

    model: str


class InFlight(msgspec.Struct, tag=True, frozen=True):
    """Reply to `CountInFlight`."""

    count: int
    routed: bool = False
    """The Proxy's route table still sends new requests to the local server."""


class GetStatus(msgspec.Struct, tag=True, frozen=True):
    """`meshllm ctl status`."""


class ActorStatus(msgspec.Struct, frozen=True):
    name: str
    pid: int
    alive: bool
    restarts: int


class NodeStatus(msgspec.Struct, tag=True, frozen=True):
    node_id: str
    role: str
    home: str
    http: str
    server: LocalServerState
    routes: RouteTable
    actors: tuple[ActorStatus, ...] = ()
    peers: tuple[PeerAnnouncement, ...] = ()
    token: str = ""
    """Not filled any more (status output gets shared): `meshllm ctl token` prints it."""
    me: PeerAnnouncement | None = None
    backends: tuple[BackendStatus, ...] = ()
    """This node's external backends (`--backend-url`)."""


class DemandState(msgspec.Struct, tag=True, frozen=True):
    """Requests per model that entered the mesh at this node (Proxy, topic `demand`)."""

    models: dict[str, Demand] = {}


class CtlDone(msgspec.Struct, tag=True, frozen=True):
    """Reply to a control command that has no other result."""

    message: str = ""


class ProbeCounts(msgspec.Struct, tag=True, frozen=True):
    """What the HealthProber's probes did since it started (cumulative; topic `probes`):
    `meshllm.mesh.health.ProbeStats`."""

    sent: int = 0
    answered: int = 0
    timed_out: int = 0
    indirect_sent: int = 0
    declared_dead: int = 0


class GossipTraffic(msgspec.Struct, tag=True, frozen=True):
    """What the Gossiper's QUIC endpoint carried since it started (cumulative; topic
    `traffic`): `meshllm.mesh.quic.Traffic`. Frames and their bytes by kind (gossip,
    probe, other); datagrams and their bytes as the UDP socket saw them."""

    frames_sent: dict[str, int] = {}
    frames_received: dict[str, int] = {}
    frame_bytes_sent: dict[str, int] = {}
    frame_bytes_received: dict[str, int] = {}
    datagrams_sent: int = 0
    datagrams_received: int = 0
    udp_bytes_sent: int = 0
    udp_bytes_received: int = 0


Message = (
    Shutdown
    | GetLatest
    | Nothing
    | ActorError
    | LocalServerState
    | RouteTable
    | BackendsState
    | MeshView
    | SuspectPeer
    | ProbePeer
    | ProbeVia
    | ProbeAnswered
    | PeerDied
    | GetToken
    | ServeModel
    | PeerRtts
    | UseRpcWorkers
    | RpcPorts
    | DropModel
    | SendOwnerOrder
    | PauseServing
    | CountInFlight
    | InFlight
    | GetStatus
    | NodeStatus
    | CtlDone
    | DemandState
    | ProbeCounts
    | GossipTraffic
)

ENCODER = msgspec.msgpack.Encoder()
DECODER: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return ENCODER.encode(message)


def decode(data: bytes) -> Message:
    """Decode one message; raises `msgspec.DecodeError` on anything malformed."""
    return DECODER.decode(data)
