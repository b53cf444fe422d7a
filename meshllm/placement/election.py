"""Which model a node serves and who hosts each model (sans-I/O).

docs/design.md, "Placement". Nothing here reads a socket, a file or a
clock: the Elector actor builds a `NodeView` from the mesh view, the disk scan
and the memory detection (`meshllm.placement.memory`), passes the time in, and acts on
the `Decision` it gets back.

Rules
-----

Fit ("Joining nodes": "only models that fit"). A model fits a node when
``ceil(size_bytes * MEMORY_OVERHEAD) <= budget_bytes`` (weights plus KV cache
and compute buffers). A model of unknown size (a Hugging Face reference not
yet sized) is assumed to fit: the only way to learn otherwise is to try, and a
failed load is reported back with `Elector.mark_failed`, which rules the model
out for this node. A node with a budget of 0 (a client, or memory not
detected) fits nothing.

What a node can serve. A model of the mesh catalog (every node's
`available_models` and `requested_models`, and what anyone serves: "Gossip")
that this node can obtain: its file is on this node's disk, or a download
source is known (`ModelInfo.downloadable`). A catalog name with no `ModelInfo`
is one this node cannot get, and is never chosen.

Explicit ("Joining nodes": ``--model X --join``). `NodeView.explicit` is
served as is, fitting or not (a model that fits no single node is what
tensor split is for), and never re-decided: a failure to load is the
supervisor's to retry.

Auto-assignment ("Joining nodes", "Auto-assignment priority") for ``--join``
alone, counting the servers of each model among the *other* nodes (clients and
nodes whose server failed do not count):

1. an unserved model already on disk;
2. an unserved model that needs a download;
3. the least-served model on disk;
4. the least-served model overall.

Within a tier: fewest servers, then the largest model first (a large model
can only go to a large node, a small one can still be taken by anyone who
comes later), unknown sizes last, then by name. Nothing that fits: no model,
the node waits for capacity.

Re-decision without flapping (dead models go cold; a decision holds until
the mesh changes again). `Elector` holds its
decision; a node serving a model keeps it unless the model failed on this node
or no longer fits its budget, with one exception below. A node without a model
(waiting for capacity) looks again at every mesh change and takes what the
priority gives, for instance a model whose last server left. A restarted
Elector adopts what the node's own announcement says it serves.

Filling gaps. When a catalog model has had no server for `COLD_GRACE_S` (a
server that restarts within it is not replaced), a redundant server may move
to it: a node that joined with ``--join`` alone (it announces no
`requested_models`), whose model has other servers, and which is not the
elected host of its model's group (so the host stays and the model it leaves
never goes cold). It moves only to a cold model that fits it (priorities 1
and 2), never between served models: there is no usage-aware rebalancing
("What's not implemented"). Every move fills a gap and makes none, so moves
end.

Contention. Two nodes that see the same cold model must not both take it (and
then both leave it). Each node plays the same deterministic round: the
waiting nodes in node-id order, then the redundant servers in node-id order,
each take their priority choice (a redundant server only a cold model), and a
model claimed by an earlier contender counts as served for the later ones. A
node's estimate of a peer uses that peer's announced disk
(`available_models`) and budget (`vram_bytes`) and this node's knowledge of
sizes and downloads; a waiting peer that announces `requested_models` (it was
started with ``--model``) is expected to take the first of them. Then:

- its choice in that round is its own first choice: take it;
- its choice is another cold model (priorities 1 and 2): take it at once, it
  fills a gap as well;
- otherwise (its cold first choice is claimed by an earlier contender and all
  it is left with is adding capacity or nothing): wait, keeping what it has.
  Next round the claimer serves the model and the choice is made again.
  Estimates of peers can be wrong (a peer knows a size this node does not,
  or the model already failed there), so a claim not taken up within
  `DEFER_TIMEOUT_S` (plus `DEFER_STAGGER_S` per earlier contender queued on
  the same model, so that two waiters do not time out together) is ignored
  and the model taken. The first contender never waits for anyone, so every
  round someone moves. `Elector.next_deadline` says when to call again
  without a mesh change.

Paused nodes (`meshllm ctl pause`, `--pause-when-busy`). A node that announces
`paused` is neither a server of its model nor a contender: its model is cold
for the others (a waiting node takes it at once, a redundant server after the
cold grace), and nobody expects it to claim anything until it resumes.

Usage-aware placement (issue 12; `meshllm.placement.demand` says how demand is
counted and gossiped). The mesh's demand per model is every entry node's requests in
the last minute and the time of the latest. A model asked for in the last
`idle_unload_s` (`--idle-unload`) that nobody serves is *wanted*; so is a model over
`hot_rpm` requests per minute per server for `hot_hold_s`. An auto-assigned solo
server whose model nobody asked for in `idle_unload_s` is *free*, and so is one spare
of a model in use that its other servers can carry (`spare_models`): each round gives
each wanted model one free node (`demand_moves`; a waiting node takes a cold one by the
priority instead). A cold model the plan left to a node that does not take it (its
estimate was wrong) is taken by the other free nodes in the plan's order, one
`defer_stagger_s` apart after `cold_grace_s` (`_overdue`). Every switch holds a node
for `hold_s` (`idle_unload_s`): a node switches at most once per idle period, whatever
members claim or pause, and gap filling never takes a server its model needs.
Nodes started with `--model` never move; a paused node takes nothing. A `--models-dir` node also
serves the other models on its disk that fit (`shelf`), unloading an idle one only for
one that is asked for.

Per-model election groups ("Per-model election groups"). Nodes serving the
same model form a group; its host is the node with the most VRAM (announced
`vram_bytes`), ties to the smallest node id. Groups are independent.

No accidental tensor split ("No accidental tensor split"). Every member of a
group runs its own llama-server (solo). Tensor split is not built yet: a model
that fits no single node runs only where `--model` names it, solo.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from enum import StrEnum

from meshllm.mesh.membership import mesh_catalog
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.placement.demand import ModelDemand, demand_of

MEMORY_OVERHEAD = 1.1
"""Memory a model needs per byte of its file (KV cache, compute buffers)."""

COLD_GRACE_S = 30.0
"""How long a model must stay cold before a redundant server moves to it."""

DEFER_TIMEOUT_S = 20.0
"""How long a waiting node leaves a cold model to the lower id that should take it."""

DEFER_STAGGER_S = 5.0
"""Extra wait per earlier node queued on the same model."""

IDLE_UNLOAD_S = 600.0
"""A model nobody asked for in this long may be unloaded for one that is asked for
(`--idle-unload`; 0: never)."""

HOT_RPM = 60.0
"""Requests per minute per server over which a model is hot (`--hot-rpm`)."""

HOT_HOLD_S = 120.0
"""How long a model must stay hot before an idle server moves to it."""

WANTED_S = 60.0
"""A cold model asked for within this long (or `idle_unload_s`, if longer) still wants a
server: requests for it wait up to `--load-wait` (60 s by default)."""

SWITCH_HOLD_S = 300.0
"""How long a node that switched models stays before it may switch again to fill a gap,
when demand is not followed (`--idle-unload 0`; otherwise the hold is `idle_unload_s`)."""


class Reason(StrEnum):
    """Why a node serves what it serves (or nothing)."""

    EXPLICIT = "explicit"
    """`--model X` on this node."""
    UNSERVED_ON_DISK = "unserved-on-disk"
    """Priority 1: nobody serves it and the file is here."""
    UNSERVED_DOWNLOAD = "unserved-download"
    """Priority 2: nobody serves it; download first."""
    LEAST_SERVED_ON_DISK = "least-served-on-disk"
    """Priority 3: adds capacity with a file that is here."""
    LEAST_SERVED = "least-served"
    """Priority 4: adds capacity; download first."""
    DEMAND = "demand"
    """Requested and served by nobody; this node's own model was idle."""
    HOT = "hot"
    """Over `hot_rpm` requests per server for `hot_hold_s`; this node's model was idle."""
    RESUMED = "resumed"
    """Kept what this node's announcement already served (the Elector restarted)."""
    WAITING = "waiting"
    """A lower node id is expected to take this node's choice; wait a round."""
    NOTHING_FITS = "nothing-fits"
    """No model of the catalog fits (or can be obtained); waiting for capacity."""
    EMPTY_CATALOG = "empty-catalog"
    """No model in the mesh yet."""


_TIER_REASONS = {
    1: Reason.UNSERVED_ON_DISK,
    2: Reason.UNSERVED_DOWNLOAD,
    3: Reason.LEAST_SERVED_ON_DISK,
    4: Reason.LEAST_SERVED,
}


@dataclass(frozen=True)
class ModelInfo:
    """A model this node knows how to get."""

    name: str
    size_bytes: int | None = None
    """File size; None when not known yet."""
    on_disk: bool = False
    """The file is in this node's models directory."""
    downloadable: bool = False
    """A download source is known (built-in catalog or Hugging Face reference)."""

    @property
    def obtainable(self) -> bool:
        return self.on_disk or self.downloadable


@dataclass(frozen=True)
class NodeView:
    """Everything one node decides from."""

    node_id: str
    budget_bytes: int
    """What a model may fill here (`MemoryInfo.total_bytes`, or `--max-vram`)."""
    models: Mapping[str, ModelInfo] = field(default_factory=dict)
    """Models this node can obtain (on disk or downloadable), by name."""
    announcements: Sequence[PeerAnnouncement] = ()
    """The latest announcement of every known node, this node's own included
    (`Membership.all()`); its own counts for the catalog and for what it serves now,
    never as a server when this node chooses."""
    explicit: str | None = None
    """`--model X` (the first one): serve X whatever the mesh does."""
    excluded: frozenset[str] = frozenset()
    """Models never to choose here (failed to load or download)."""
    demand: Mapping[str, ModelDemand] = field(default_factory=dict)
    """The mesh's requests per model (`meshllm.placement.demand.mesh_demand`), in the
    clock `Elector.update` is given."""


@dataclass(frozen=True)
class Decision:
    """What this node should serve."""

    model: str | None
    reason: Reason
    download: bool = False
    """The file is not on disk: download it before serving."""
    detail: str = ""


# -- fit and counting -----------------------------------------------------------


def need_bytes(size_bytes: int) -> int:
    """Memory a model of this file size needs (`MEMORY_OVERHEAD`)."""
    return math.ceil(size_bytes * MEMORY_OVERHEAD)


def fits(size_bytes: int | None, budget_bytes: int) -> bool:
    """Whether a model fits a budget; unknown sizes are assumed to fit a nonzero budget."""
    if budget_bytes <= 0:
        return False
    return size_bytes is None or need_bytes(size_bytes) <= budget_bytes


def also_served(ann: PeerAnnouncement) -> tuple[str, ...]:
    """The models a node's other llama-servers serve (`also_serving`): believed only from
    a node that runs servers (announces memory, is no client) and is not paused."""
    if ann.paused or ann.vram_bytes <= 0 or ann.role not in ("host", "idle"):
        return ()
    return ann.also_serving


def models_served(ann: PeerAnnouncement) -> tuple[str, ...]:
    """Every model a node serves for the mesh: its own (`_counts_as_server`) and those
    of its other llama-servers (`also_served`)."""
    own = (ann.serving,) if ann.serving and _counts_as_server(ann) else ()
    return (*own, *also_served(ann))


def _counts_as_server(ann: PeerAnnouncement) -> bool:
    """A node that serves its model: a host (a split group's workers and standbys are
    part of their host's server, not servers of their own). A paused node (`meshllm ctl
    pause`) serves nothing for the mesh, even while its last requests end."""
    return (
        bool(ann.serving)
        and ann.role in ("host", "idle")
        and ann.server_state != "failed"
        and not ann.paused
    )


def servers_by_model(
    announcements: Iterable[PeerAnnouncement],
) -> dict[str, list[PeerAnnouncement]]:
    """Model -> the announcements of the nodes serving it (clients and failed servers left out)."""
    groups: dict[str, list[PeerAnnouncement]] = {}
    for ann in announcements:
        for model in dict.fromkeys(models_served(ann)):
            groups.setdefault(model, []).append(ann)
    return groups


def serving_counts(
    announcements: Iterable[PeerAnnouncement], exclude: str | None = None
) -> Counter[str]:
    """Model -> number of nodes serving it, leaving out node `exclude`."""
    return Counter(
        model
        for ann in announcements
        if ann.node_id != exclude
        for model in dict.fromkeys(models_served(ann))
    )


def catalog_of(view: NodeView) -> set[str]:
    """The mesh catalog as this node sees it, plus the models on its own disk."""
    names = mesh_catalog(view.announcements)
    names.update(name for name, info in view.models.items() if info.on_disk)
    return names


# -- auto-assignment ---------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    name: str
    size_bytes: int | None
    on_disk: bool


def _tier(cand: _Candidate, counts: Mapping[str, int]) -> int:
    unserved = counts.get(cand.name, 0) == 0
    if unserved:
        return 1 if cand.on_disk else 2
    return 3 if cand.on_disk else 4


def _best(
    candidates: Iterable[_Candidate],
    counts: Mapping[str, int],
    demand: Mapping[str, ModelDemand] | None = None,
) -> tuple[_Candidate, int] | None:
    """The auto-assignment priority (docs/design.md, "Placement").

    Ties break as the module docstring says; among equals, the model asked for most.
    """
    demand = demand or {}

    def key(c: _Candidate) -> tuple[int, int, float, int, str]:
        size_key = -c.size_bytes if c.size_bytes is not None else 1
        rpm = demand_of(demand, c.name).rpm
        return (_tier(c, counts), counts.get(c.name, 0), -rpm, size_key, c.name)

    best = min(candidates, key=key, default=None)
    return None if best is None else (best, _tier(best, counts))


def _own_candidates(view: NodeView, catalog: Iterable[str]) -> list[_Candidate]:
    out = []
    for name in catalog:
        ok, here = _own_take(view, name)
        if ok:
            out.append(_Candidate(name, view.models[name].size_bytes, here))
    return out


def _peer_candidates(
    peer: PeerAnnouncement, view: NodeView, catalog: Iterable[str]
) -> list[_Candidate]:
    """Our estimate of what a peer could take: its disk, our sizes and download sources."""
    out = []
    for name in catalog:
        ok, here = _could_take(peer, name, view)
        if ok:
            info = view.models.get(name)
            out.append(_Candidate(name, info.size_bytes if info is not None else None, here))
    return out


def _decision(cand: _Candidate, tier: int, detail: str = "") -> Decision:
    return Decision(cand.name, _TIER_REASONS[tier], download=not cand.on_disk, detail=detail)


def _nothing(view: NodeView, catalog: set[str]) -> Decision:
    if not catalog:
        return Decision(None, Reason.EMPTY_CATALOG)
    return Decision(
        None,
        Reason.NOTHING_FITS,
        detail=f"none of the mesh's {len(catalog)} models both fits this node's "
        f"{view.budget_bytes / 1e9:.3g} GB and is on its disk or downloadable",
    )


def choose(view: NodeView) -> Decision:
    """Auto-assignment for this node alone (no contention with other waiting nodes)."""
    catalog = catalog_of(view)
    counts = serving_counts(view.announcements, view.node_id)
    picked = _best(_own_candidates(view, catalog), counts, view.demand)
    return _nothing(view, catalog) if picked is None else _decision(*picked)


def choose_model(view: NodeView) -> str | None:
    """The model auto-assignment gives this node, or None."""
    return choose(view).model


def decide(view: NodeView) -> Decision:
    """One decision from scratch: `--model X` if given, else auto-assignment."""
    if view.explicit:
        info = view.models.get(view.explicit)
        return Decision(
            view.explicit, Reason.EXPLICIT, download=info is not None and not info.on_disk
        )
    return choose(view)


@dataclass(frozen=True)
class _Round:
    """One node's play of the contention round (module docstring, "Contention")."""

    first: tuple[_Candidate, int] | None
    """Its choice ignoring the other contenders."""
    given: tuple[_Candidate, int] | None
    """Its choice after the contenders before it took theirs."""
    claimer: str | None
    """The contender expected to take `first`, when someone does."""
    queued: int
    """Contenders before it whose own first choice is `first` as well."""


def _may_move(
    ann: PeerAnnouncement, hosts: Mapping[str, str], busy: Set[str] = frozenset()
) -> bool:
    """A peer that could leave its model for a cold one: auto-assigned and not its host.

    A node started with `--model` announces it in `requested_models`; one that
    joined with `--join` alone announces none.
    """
    return (
        _counts_as_server(ann)
        and not ann.requested_models
        and ann.serving is not None
        and hosts.get(ann.serving) != ann.node_id
        and ann.serving not in busy
    )


def _play_round(
    view: NodeView, matured: Set[str] | None = None, busy: Set[str] = frozenset()
) -> _Round:
    """Play the round for this node: waiting (`matured` None) or moving to a matured cold model.

    Contenders in order: the waiting nodes by id, then the movers by id. A waiting
    node plays among the waiting ids below its own; a mover after every waiting
    node and the movers below it. Movers only take cold models.
    """
    me = view.node_id
    catalog = catalog_of(view)
    base = serving_counts(view.announcements, me)

    def cold_only(cands: list[_Candidate]) -> list[_Candidate]:
        assert matured is not None
        return [c for c in cands if c.name in matured and base.get(c.name, 0) == 0]

    own = _own_candidates(view, catalog)
    if matured is not None:
        own = cold_only(own)
    first = _best(own, base, view.demand)
    # A paused node takes nothing: no contender, its claims none (it gives its model back).
    others = [
        a for a in view.announcements if a.node_id != me and a.role != "client" and not a.paused
    ]
    waiting = sorted((a for a in others if not a.serving), key=lambda a: a.node_id)
    hosts = elect_hosts(view.announcements)
    movers = sorted((a for a in others if _may_move(a, hosts, busy)), key=lambda a: a.node_id)
    if matured is None:
        ahead = [(a, False) for a in waiting if a.node_id < me]
    else:
        ahead = [(a, False) for a in waiting] + [(a, True) for a in movers if a.node_id < me]
    counts = Counter(base)
    claims: dict[str, str] = {}
    queued = 0
    for peer, moving in ahead:
        if peer.requested_models and not moving:
            # Started with `--model X`: it serves X, whatever the priority says.
            explicit = peer.requested_models[0]
            counts[explicit] += 1
            claims.setdefault(explicit, peer.node_id)
            continue
        cands = _peer_candidates(peer, view, catalog)
        if moving:
            cands = cold_only(cands) if matured is not None else []
        peer_first = _best(cands, base, view.demand)
        if first is not None and peer_first is not None and peer_first[0].name == first[0].name:
            queued += 1
        pick = _best(cands, counts, view.demand)
        if pick is None or (moving and pick[1] > 2):
            continue
        counts[pick[0].name] += 1
        claims.setdefault(pick[0].name, peer.node_id)
    given = _best(own, counts, view.demand)
    if matured is not None and given is not None and given[1] > 2:
        given = None
    claimer = claims.get(first[0].name) if first is not None else None
    return _Round(first, given, claimer, queued)


# -- demand (usage-aware placement) ------------------------------------------------


def recently_asked(view: NodeView, model: str, now: float, idle_unload_s: float) -> bool:
    """Whether anyone asked for `model` in the last `idle_unload_s`."""
    return demand_of(view.demand, model).idle_s(now) < idle_unload_s


def _own_take(view: NodeView, model: str) -> tuple[bool, bool]:
    """(this node can take `model`, its file is here): not failed here, obtainable, fits."""
    info = view.models.get(model)
    if model in view.excluded or info is None or not info.obtainable:
        return False, False
    return fits(info.size_bytes, view.budget_bytes), info.on_disk


def _could_take(ann: PeerAnnouncement, model: str, view: NodeView) -> tuple[bool, bool]:
    """(can take it, its file is there already): this node's own knowledge for itself,
    our estimate for a peer (its disk and budget, our sizes and sources)."""
    if ann.node_id == view.node_id:
        return _own_take(view, model)
    info = view.models.get(model)
    here = model in ann.available_models
    if not here and (info is None or not info.downloadable):
        return False, False
    return fits(info.size_bytes if info is not None else None, ann.vram_bytes), here


def demand_moves(
    view: NodeView,
    now: float,
    idle_unload_s: float,
    hot: Set[str] = frozenset(),
    hot_rpm: float = 0.0,
) -> dict[str, tuple[str, Reason, bool]]:
    """Which idle servers switch to a model that is asked for (module docstring,
    "Usage-aware placement"): node id -> (model, reason, download needed).

    Every node computes the same plan from the same view and acts on its own line.
    Wanted, in order: the cold models asked for in the last `idle_unload_s` (most
    requests per minute first), then the `hot` ones (most requests per server first).
    Free: the auto-assigned solo servers whose model nobody asked for in
    `idle_unload_s`. Each wanted model gets at most one free node per round: the one
    with the file on disk, then the one idle longest, then the smallest id. A cold model
    that a waiting node could take is left to it (it takes it by the priority).
    """
    if idle_unload_s <= 0:
        return {}
    served = servers_by_model(view.announcements)
    nodes = [a for a in view.announcements if a.role != "client" and not a.paused]

    def rpm(model: str) -> float:
        return demand_of(view.demand, model).rpm

    hot_models = sorted(
        (m for m in hot if m in served), key=lambda m: (-rpm(m) / len(served[m]), m)
    )
    free = free_servers(view, now, idle_unload_s, hot_rpm)
    waiting = [a for a in nodes if not a.serving and a.vram_bytes > 0]
    moves: dict[str, tuple[str, Reason, bool]] = {}
    for model, reason in [
        *((m, Reason.DEMAND) for m in wanted_cold(view, now, idle_unload_s)),
        *((m, Reason.HOT) for m in hot_models),
    ]:
        if reason is Reason.DEMAND and any(_could_take(a, model, view)[0] for a in waiting):
            continue
        options = takers(view, model, free)
        if not options:
            continue
        pick, here = options[0]
        moves[pick.node_id] = (model, reason, not here)
        free.remove(pick)
    return moves


def wanted_cold(view: NodeView, now: float, idle_unload_s: float) -> list[str]:
    """The models nobody serves that were asked for within `idle_unload_s` (at least
    `WANTED_S`: demand takes a second or two to cross the mesh, in whole seconds), the
    most asked for first."""
    served = servers_by_model(view.announcements)
    window = max(idle_unload_s, WANTED_S)
    return sorted(
        (m for m in catalog_of(view) if m not in served and recently_asked(view, m, now, window)),
        key=lambda m: (-demand_of(view.demand, m).rpm, m),
    )


def spare_models(view: NodeView, now: float, idle_unload_s: float, hot_rpm: float) -> set[str]:
    """Models in use whose servers but one could carry them: under `hot_rpm` per server
    with one server less (`hot_rpm` 0: no model has a spare)."""
    if hot_rpm <= 0:
        return set()
    return {
        m
        for m, group in servers_by_model(view.announcements).items()
        if len(group) > 1
        and recently_asked(view, m, now, idle_unload_s)
        and demand_of(view.demand, m).rpm <= hot_rpm * (len(group) - 1)
    }


def free_servers(
    view: NodeView, now: float, idle_unload_s: float, hot_rpm: float = 0.0
) -> list[PeerAnnouncement]:
    """Auto-assigned solo servers that may switch: those whose model nobody asked for
    within `idle_unload_s`, and one spare of each model the others can carry
    (`spare_models`): the auto-assigned non-host with the largest id."""
    auto = [
        a
        for a in view.announcements
        if a.role != "client"
        and _counts_as_server(a)
        and a.serving is not None
        and not a.requested_models
        and not a.split_group
    ]
    free = [a for a in auto if not recently_asked(view, a.serving or "", now, idle_unload_s)]
    spares = spare_models(view, now, idle_unload_s, hot_rpm)
    hosts = elect_hosts(view.announcements)
    for model in sorted(spares):
        group = [a for a in auto if a.serving == model and hosts.get(model) != a.node_id]
        if group:
            free.append(max(group, key=lambda a: a.node_id))
    return free


def takers(
    view: NodeView, model: str, free: Iterable[PeerAnnouncement]
) -> list[tuple[PeerAnnouncement, bool]]:
    """The free nodes that could take `model`, best first (file on disk, idle longest,
    smallest id), each with whether its file is there."""
    options = []
    for a in free:
        if a.serving == model or model in a.also_serving:
            continue
        ok, here = _could_take(a, model, view)
        if ok:
            assert a.serving is not None
            last = demand_of(view.demand, a.serving).last
            options.append(((not here, last, a.node_id), a, here))
    options.sort(key=lambda o: o[0])
    return [(a, here) for _, a, here in options]


def shelf(
    view: NodeView,
    primary: str | None,
    current: Iterable[str],
    now: float,
    idle_unload_s: float,
) -> tuple[str, ...]:
    """What a `--models-dir` node serves besides `primary`, each with its own
    llama-server: the models on its disk that fit what `primary` leaves of the budget,
    the most asked-for first, then the largest.

    Without churn: what runs now stays before anything new, unless nobody asked for it
    in `idle_unload_s` and a model that was asked for needs its memory (then it is
    unloaded, the idle unload of "Usage-aware placement"); a model nobody asks for never
    displaces one that runs.
    """
    left = view.budget_bytes
    if primary is not None:
        info = view.models.get(primary)
        if info is None or not info.size_bytes:
            return ()  # how much the main model leaves is not known yet: nothing beside it
        left -= need_bytes(info.size_bytes)
    running = set(current)
    cands = [
        info
        for name, info in view.models.items()
        if info.on_disk and info.size_bytes and name != primary and name not in view.excluded
    ]

    def rank(info: ModelInfo) -> tuple[float, int, str]:
        return (-demand_of(view.demand, info.name).rpm, -(info.size_bytes or 0), info.name)

    def asked(info: ModelInfo) -> bool:
        return idle_unload_s <= 0 or recently_asked(view, info.name, now, idle_unload_s)

    def group(info: ModelInfo) -> int:
        if info.name in running:
            return 0 if asked(info) else 2
        return 1 if idle_unload_s > 0 and asked(info) else 3

    chosen = []
    for info in sorted(cands, key=lambda i: (group(i), *rank(i))):
        assert info.size_bytes is not None
        need = need_bytes(info.size_bytes)
        if need <= left:
            chosen.append(info.name)
            left -= need
    return tuple(sorted(chosen))


# -- the Elector core ---------------------------------------------------------------


class Elector:
    """Holds this node's decision and changes it only when the rules say so.

    Call `update` on every mesh change and at `next_deadline`; act on the
    `Decision` it returns, which comes only when the decision changed. Report a
    model that failed to download or load with `mark_failed`.
    """

    def __init__(
        self,
        *,
        cold_grace_s: float = COLD_GRACE_S,
        defer_timeout_s: float = DEFER_TIMEOUT_S,
        defer_stagger_s: float = DEFER_STAGGER_S,
        idle_unload_s: float = IDLE_UNLOAD_S,
        hot_rpm: float = HOT_RPM,
        hot_hold_s: float = HOT_HOLD_S,
    ) -> None:
        self.cold_grace_s = cold_grace_s
        self.idle_unload_s = idle_unload_s
        self.hot_rpm = hot_rpm
        self.hot_hold_s = hot_hold_s
        self._hot_since: dict[str, float] = {}
        """Served models over `hot_rpm` per server -> since when (this node's view)."""
        self._moved_at = -math.inf
        """When this node last switched models: it stays `hold_s` at least (no rule moves
        it before, so neither demand nor claims a member makes can make it flap)."""
        self.hold_s = idle_unload_s if idle_unload_s > 0 else SWITCH_HOLD_S
        self._taker_since: dict[str, float] = {}
        """Wanted cold models this node could take -> since when (`_overdue`)."""
        self._wanted_since: dict[str, float] = {}
        """Cold models asked for -> since when (this node's view)."""
        self._due: list[float] = []
        """When the demand rules may decide otherwise without a mesh change."""
        self.defer_timeout_s = defer_timeout_s
        self.defer_stagger_s = defer_stagger_s
        self.decision: Decision | None = None
        self.failed: set[str] = set()
        self._cold_since: dict[str, float] = {}
        """Catalog models nobody serves -> when this node first saw them so."""
        self._deferral: tuple[str, float, float] | None = None
        """(model, since, timeout) while leaving a model to the contender before us."""
        self._now = -math.inf
        self._redundant = False
        """This node may leave its model for a cold one (see "Filling gaps")."""

    def mark_failed(self, model: str) -> None:
        """`model` cannot be served here: never choose it again (`--model X` is kept)."""
        self.failed.add(model)

    def next_deadline(self) -> float | None:
        """When `update` should run even if the mesh does not change, or None."""
        times = []
        if self._redundant:
            times = [since + self.cold_grace_s for since in self._cold_since.values()]
        if self._deferral is not None:
            times.append(self._deferral[1] + self._deferral[2])
        times += self._due
        future = [t for t in times if t > self._now]
        return min(future, default=None)

    def update(self, view: NodeView, now: float) -> Decision | None:
        """Re-decide if the mesh changed in a way that matters; the new decision, if any."""
        self._now = now
        view = replace(view, excluded=view.excluded | self.failed)
        self._track_cold(view, now)
        self._track_hot(view, now)
        self._redundant = False
        new = self._next(view, now)
        if new.model is not None:
            self._cold_since.pop(new.model, None)
        previous = self.decision
        if new == previous:
            return None
        switched = previous is not None and previous.model not in (None, new.model)
        self.decision = new
        if switched and new.model is not None:
            self._moved_at = now
        return new

    def _track_cold(self, view: NodeView, now: float) -> None:
        cold = catalog_of(view) - set(servers_by_model(view.announcements))
        if self.decision is not None and self.decision.model is not None:
            cold.discard(self.decision.model)
        self._cold_since = {m: self._cold_since.get(m, now) for m in cold}

    def _next(self, view: NodeView, now: float) -> Decision:
        if view.explicit:
            self._deferral = None
            return decide(view)
        held = self._held(view)
        own = next((a for a in view.announcements if a.node_id == view.node_id), None)
        if own is not None and own.paused:
            # Paused: the others count this node out and take its model; it takes
            # nothing itself until it resumes (it would only double what they take).
            self._deferral = None
            return held or self.decision or Decision(None, Reason.WAITING, detail="paused")
        if held is None:
            return self._wait_or_take(view, now)
        return self._move(view, now, held) or self._follow_demand(view, now, held) or held

    def _busy(self, view: NodeView, now: float) -> set[str]:
        """Models asked for within `idle_unload_s` (none when demand is not followed):
        their servers never leave them to fill a gap."""
        if self.idle_unload_s <= 0:
            return set()
        asked = {m for m in view.demand if recently_asked(view, m, now, self.idle_unload_s)}
        return asked - spare_models(view, now, self.idle_unload_s, self.hot_rpm)

    def _track_hot(self, view: NodeView, now: float) -> None:
        self._due = []
        if self.idle_unload_s > 0:
            wanted = wanted_cold(view, now, self.idle_unload_s)
            self._wanted_since = {m: self._wanted_since.get(m, now) for m in wanted}
        if self.idle_unload_s <= 0 or self.hot_rpm <= 0:
            self._hot_since = {}
            return
        hot = {}
        for model, group in servers_by_model(view.announcements).items():
            if demand_of(view.demand, model).rpm / len(group) > self.hot_rpm:
                hot[model] = self._hot_since.get(model, now)
        self._hot_since = hot
        self._due = [since + self.hot_hold_s for since in hot.values()]

    def _overdue(
        self, view: NodeView, now: float, free: list[PeerAnnouncement]
    ) -> tuple[str, Reason, bool] | None:
        """A model asked for that stayed cold for `cold_grace_s` although the plan gave it
        to someone: estimates of others can be wrong (a node where it failed, a waiting
        node that never takes it), so the free nodes that can take it do, one
        `defer_stagger_s` apart in the plan's order, this node by its own knowledge."""
        mine = {}
        for model in wanted_cold(view, now, self.idle_unload_s):
            ranked = takers(view, model, free)
            ids = [a.node_id for a, _ in ranked]
            if view.node_id not in ids or model not in self._wanted_since:
                continue
            # Patience counts from when the model was wanted *and* this node could take
            # it: nodes that turn free together do not all find themselves overdue.
            mine[model] = since = self._taker_since.get(model, now)
            rank = ids.index(view.node_id)
            start = max(self._wanted_since[model], since)
            due = start + self.cold_grace_s + self.defer_stagger_s * rank
            if now >= due:
                self._taker_since = {}
                return model, Reason.DEMAND, not ranked[rank][1]
            self._due.append(due)
        self._taker_since = mine
        return None

    def _holding(self, now: float) -> bool:
        """Whether this node switched too recently to switch again (`hold_s`)."""
        until = self._moved_at + self.hold_s
        if now < until:
            self._due.append(until)
            return True
        return False

    def hot(self, now: float) -> set[str]:
        """Models hot for `hot_hold_s` as this node saw them."""
        return {m for m, since in self._hot_since.items() if now - since >= self.hot_hold_s}

    def _follow_demand(self, view: NodeView, now: float, held: Decision) -> Decision | None:
        """Leave an idle model for one that is asked for (`demand_moves`)."""
        assert held.model is not None
        own = next((a for a in view.announcements if a.node_id == view.node_id), None)
        if self.idle_unload_s <= 0 or own is None or own.serving != held.model:
            return None  # not announced yet: the others plan with what we announce
        if self._holding(now):
            return None
        free = free_servers(view, now, self.idle_unload_s, self.hot_rpm)
        if all(a.node_id != view.node_id for a in free):
            # Our model is in use: look again once it is idle. (Others may plan with us
            # meanwhile: a model they leave to us is taken by the next free node when it
            # stays cold, `_overdue`.)
            self._due.append(demand_of(view.demand, held.model).last + self.idle_unload_s)
            return None
        hot = self.hot(now)
        move = demand_moves(view, now, self.idle_unload_s, hot, self.hot_rpm).get(view.node_id)
        move = move or self._overdue(view, now, free)
        if move is None:
            return None
        model, reason, download = move
        idle = demand_of(view.demand, held.model).idle_s(now)
        since = "never asked for" if math.isinf(idle) else f"idle {idle:.0f}s"
        return Decision(model, reason, download, detail=f"moved from {held.model} ({since})")

    def _held(self, view: NodeView) -> Decision | None:
        """The current model if it stays: not failed here and still fitting."""
        current = self.decision
        if current is None or current.model is None:
            own = next((a for a in view.announcements if a.node_id == view.node_id), None)
            if own is None or not own.serving or own.role == "client":
                return None
            info = view.models.get(own.serving)
            current = Decision(
                own.serving, Reason.RESUMED, download=info is not None and not info.on_disk
            )
        assert current.model is not None
        if current.model in view.excluded:
            return None
        info = view.models.get(current.model)
        if not fits(info.size_bytes if info is not None else None, view.budget_bytes):
            return None
        return current

    def _defer(self, play: _Round, now: float) -> bool:
        """Start or continue leaving `play.first` to its claimer; True once that ran out."""
        assert play.first is not None
        name = play.first[0].name
        if self._deferral is None or self._deferral[0] != name:
            timeout = self.defer_timeout_s + self.defer_stagger_s * play.queued
            self._deferral = (name, now, timeout)
        _, since, timeout = self._deferral
        if now - since >= timeout:
            self._deferral = None
            return True
        return False

    def _wait_or_take(self, view: NodeView, now: float) -> Decision:
        """A node without a model: take the round's choice, or wait for the claimer."""
        play = _play_round(view)
        if play.first is None:
            self._deferral = None
            return _nothing(view, catalog_of(view))
        first, first_tier = play.first
        if play.given is not None:
            given, given_tier = play.given
            if given.name == first.name or given_tier <= 2 or first_tier > 2:
                self._deferral = None
                return _decision(given, given_tier)
        # Our cold first choice is claimed by a lower id and we are left with less: wait.
        if self._defer(play, now):
            return _decision(first, first_tier, detail=f"{play.claimer} did not take it")
        return Decision(None, Reason.WAITING, detail=f"{first.name} left to {play.claimer}")

    def _move(self, view: NodeView, now: float, held: Decision) -> Decision | None:
        """A redundant auto-assigned server leaves for a model cold for `cold_grace_s`."""
        assert held.model is not None
        group = [
            a
            for a in view.announcements
            if a.node_id != view.node_id and held.model in models_served(a)
        ]
        me = PeerAnnouncement(node_id=view.node_id, generation=0, vram_bytes=view.budget_bytes)
        matured = {m for m, t in self._cold_since.items() if now - t >= self.cold_grace_s}
        if held.model in self._busy(view, now) or self._holding(now):
            # Its users need every server (a hot model's replicas above all), or this
            # node only just switched: no gap filling.
            self._deferral = None
            return None
        if not group or elect_host([*group, me]) == view.node_id:
            self._deferral = None
            return None
        self._redundant = True
        if not matured:
            self._deferral = None
            return None
        play = _play_round(view, matured, self._busy(view, now))
        if play.first is None:
            self._deferral = None
            return None
        if play.given is not None:
            self._deferral = None
            return _decision(*play.given, detail=f"moved from {held.model}")
        if self._defer(play, now):
            first, tier = play.first
            return _decision(first, tier, detail=f"moved from {held.model}; {play.claimer} did not")
        return None


# -- elections ---------------------------------------------------------------------


def _host_key(ann: PeerAnnouncement) -> tuple[int, str]:
    return (-ann.vram_bytes, ann.node_id)


def elect_host(group: Iterable[PeerAnnouncement]) -> str | None:
    """Most VRAM wins, ties to the smallest node id ("Per-model election groups")."""
    best = min(group, key=_host_key, default=None)
    return None if best is None else best.node_id


def elect_hosts(announcements: Iterable[PeerAnnouncement]) -> dict[str, str]:
    """Model -> host node id, one independent election per model served."""
    hosts = {}
    for model, group in servers_by_model(announcements).items():
        host = elect_host(group)
        if host is not None:
            hosts[model] = host
    return hosts
