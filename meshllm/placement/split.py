"""Tensor split planning (sans-I/O): which members serve a model no one of them can hold.

A model is split only when it fits on no single member of its group (the same
rule as placement: size x `MEMORY_OVERHEAD` within a member's memory), or when
the operator asks for it. The host is the member with the most memory; it takes
the fewest workers that make the model fit, the nearest of them (round-trip
time as the host measures it), skipping members beyond an RTT limit: every
decoded token waits for each worker once, so each worker and each millisecond
costs tokens per second. Layers go to each member in proportion to its memory
(llama-server's `--tensor-split`).

A plan that still works is kept (`plan(..., current=...)`): a member that
comes back, or a nearer one that joins, does not reshuffle a split that
serves, since moving layers means loading the model again.

Which member plays which part (`role_of`): the nodes that serve a model
but cannot hold it alone (or were started with `--split`) form its split
group. Its host is the member that already claims to be (so a bigger member
that joins does not take over a split that serves), else `host_of`. The
host plans, with its own round trips, and announces the plan; a member the
host's plan names is its worker, the others stand by. Every member computes
the same host from the same announcements.

Pure functions of their arguments; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec

from meshllm.mesh.wire import MAX_SPLIT_WORKERS
from meshllm.placement.election import MEMORY_OVERHEAD
from meshllm.placement.memory import format_bytes

RTT_LIMIT_MS = 80.0
"""Members farther than this (round trip, from the host) are never workers."""
HOLD_S = 10.0
"""How long a node keeps a part that runs something (host or worker) before a change
that no departure forces (`PartHold`): a member cannot make it restart its server more
often than this by what it announces."""


@dataclass(frozen=True)
class Member:
    """A member of the model's group, as the planner sees it."""

    node_id: str
    memory_bytes: int
    """What it may use for models (`--max-vram` already applied)."""


@dataclass(frozen=True)
class Solo:
    """One member holds the model: no split."""

    host: str


@dataclass(frozen=True)
class Split:
    """The host runs llama-server with the workers' RPC servers."""

    host: str
    workers: tuple[str, ...]
    """Nearest first."""
    shares: tuple[float, ...]
    """`--tensor-split` proportions: the host's, then each worker's; they sum to 1."""

    @property
    def members(self) -> tuple[str, ...]:
        return (self.host, *self.workers)


@dataclass(frozen=True)
class NoFit:
    """The model fits nowhere, even pooled: said, not retried."""

    reason: str


@dataclass(frozen=True)
class Waiting:
    """Not yet known: members that would make the model fit have no round trip measured."""

    reason: str


Plan = Solo | Split | NoFit | Waiting


def host_of(members: list[Member]) -> Member | None:
    """The member that hosts the model (most memory, then lowest id): the round
    trips `plan` takes are this member's."""
    return min(members, key=lambda m: (-m.memory_bytes, m.node_id), default=None)


def needed_bytes(model_bytes: int) -> int:
    """Memory a model needs, in all, wherever its layers go."""
    return int(model_bytes * MEMORY_OVERHEAD)


def plan(
    model_bytes: int,
    members: list[Member],
    rtt_ms: Mapping[str, float],
    *,
    force_split: bool = False,
    rtt_limit_ms: float = RTT_LIMIT_MS,
    current: Plan | None = None,
    host_id: str | None = None,
) -> Plan:
    """Where `model_bytes` of model is served among `members`.

    `rtt_ms`: round trips from the host-to-be to each other member, as its
    health prober measured them; a member with none is not a worker (not known
    to be reachable). `force_split`: split even when one member could hold it
    (`--split`), over the host and its nearest worker at least. `current`: the
    plan in force, kept while it still works. `host_id`: the host, when the group
    already has one (else `host_of`).
    """
    need = needed_bytes(model_bytes)
    by_id = {m.node_id: m for m in members}
    if current is not None and _still_works(current, need, by_id, rtt_ms, rtt_limit_ms):
        # Kept unless the reason for its kind is gone: a split only while no one
        # member holds the model (or one is asked for), a solo host unless asked to split.
        if isinstance(current, Solo) and not force_split:
            return current
        if isinstance(current, Split) and (force_split or not _one_holds(need, members)):
            return current
    host = by_id.get(host_id) if host_id is not None else host_of(members)
    if host is None:
        return NoFit("no member in the model's group")
    if host.memory_bytes >= need and not force_split:
        return Solo(host.node_id)
    others = [m for m in members if m is not host]
    # At most as many candidates as a plan may name: the planner's cost stays flat
    # however many members a group has (a member can make ids by the thousand).
    near = sorted(
        (
            m
            for m in others
            if m.node_id in rtt_ms and rtt_ms[m.node_id] <= rtt_limit_ms and m.memory_bytes > 0
        ),
        key=lambda m: (rtt_ms[m.node_id], m.node_id),
    )[:MAX_SPLIT_WORKERS]
    workers = _fewest_nearest(need - host.memory_bytes, near, at_least=1 if force_split else 0)
    if workers is None and host.memory_bytes >= need:
        return Solo(host.node_id)  # asked to split, but no worker is in reach
    if workers is None:
        unmeasured = _largest(
            [m for m in others if m.node_id not in rtt_ms and m.memory_bytes > 0],
            MAX_SPLIT_WORKERS,
        )
        if unmeasured and _fewest_nearest(need - host.memory_bytes, near + unmeasured, 0):
            return Waiting(f"measuring round trips to {len(unmeasured)} member(s)")
        pooled = host.memory_bytes + sum(m.memory_bytes for m in near)
        far = sum(1 for m in others if m.memory_bytes > 0) - len(near)
        beyond = f" ({far} more beyond {rtt_limit_ms:g} ms or unmeasured)" if far else ""
        held = "1 member in reach holds" if not near else f"{1 + len(near)} members in reach hold"
        return NoFit(
            f"needs {format_bytes(need)}; its split group's {held} {format_bytes(pooled)}{beyond}"
        )
    return _split(host, workers)


def _fewest_nearest(missing: int, near: list[Member], at_least: int) -> tuple[Member, ...] | None:
    """The fewest members of `near` (sorted nearest first) whose memory covers `missing`,
    and among sets of that size the one reaching least far down the list; None if
    even all of them fall short."""
    count = max(at_least, 0)
    while count <= len(near):
        if count and sum(m.memory_bytes for m in _largest(near, count)) >= missing:
            break
        if count == 0 and missing <= 0:
            return ()
        count += 1
    else:
        return None
    # The shortest prefix of the nearest members in which `count` of them fit.
    for end in range(count, len(near) + 1):
        chosen = _largest(near[:end], count)
        if sum(m.memory_bytes for m in chosen) >= missing:
            return tuple(sorted(chosen, key=near.index))
    return None  # unreachable: the whole list fits by the loop above


def _largest(members: list[Member], count: int) -> list[Member]:
    return sorted(members, key=lambda m: (-m.memory_bytes, m.node_id))[:count]


def _split(host: Member, workers: tuple[Member, ...]) -> Split:
    total = host.memory_bytes + sum(w.memory_bytes for w in workers)
    shares = tuple(m.memory_bytes / total for m in (host, *workers))
    return Split(host.node_id, tuple(w.node_id for w in workers), shares)


def _one_holds(need: int, members: list[Member]) -> bool:
    return any(m.memory_bytes >= need for m in members)


def _still_works(
    current: Plan,
    need: int,
    by_id: Mapping[str, Member],
    rtt_ms: Mapping[str, float],
    rtt_limit_ms: float,
) -> bool:
    """`current` can go on serving: its members are all here, still hold what they
    must, and every worker is still within reach."""
    if isinstance(current, NoFit | Waiting):
        return False
    if isinstance(current, Solo):
        host = by_id.get(current.host)
        return host is not None and host.memory_bytes >= need
    if any(node not in by_id for node in current.members):
        return False
    if any(rtt_ms.get(w, float("inf")) > rtt_limit_ms for w in current.workers):
        return False
    return sum(by_id[node].memory_bytes for node in current.members) >= need


# -- who plays which part ----------------------------------------------------------------


class SplitRole(msgspec.Struct, frozen=True):
    """This node's part in its model's split group (`role_of`), as the Elector passes it on."""

    part: Literal["host", "worker", "standby", "nofit"]
    host: str = ""
    """The group's host (this node when `part` is host)."""
    workers: tuple[str, ...] = ()
    """The host's workers, nearest first; none: the host serves alone."""
    shares: tuple[float, ...] = ()
    """`--tensor-split` shares: the host's, then each worker's."""
    note: str = ""
    """Why a standby waits, or why the model fits nowhere."""


@dataclass(frozen=True)
class GroupMember:
    """A member of a model's split group, as its announcement says."""

    node_id: str
    memory_bytes: int
    claims_host: bool = False
    """It announces itself as the group's host."""
    workers: tuple[str, ...] = ()
    """The workers its plan names (when it claims to host)."""


def group_host(members: list[GroupMember], incumbent: str | None = None) -> str | None:
    """The group's host: `incumbent` (the host this node saw last) while it is a member
    that still claims it, so a member announcing more memory cannot take over a split
    that serves; else among the members that claim it (normally one), else among all,
    the one `host_of` picks."""
    claimers = [m for m in members if m.claims_host]
    if any(m.node_id == incumbent for m in claimers):
        return incumbent
    claimers = claimers or members
    host = host_of([Member(m.node_id, m.memory_bytes) for m in claimers])
    return None if host is None else host.node_id


def role_of(
    me: str,
    model_bytes: int,
    members: list[GroupMember],
    rtt_ms: Mapping[str, float],
    *,
    force_split: bool = False,
    rtt_limit_ms: float = RTT_LIMIT_MS,
    current: Plan | None = None,
    incumbent: str | None = None,
) -> tuple[SplitRole, Plan | None]:
    """This node's part in the group `members` (itself included), and, when it is the
    host, its plan (to pass back as `current` next time). `incumbent`: the group's host
    as this node last saw it (`group_host`)."""
    host = group_host(members, incumbent)
    if host is None:
        return SplitRole("standby", note="no member in the group"), None
    if host != me:
        by_id = {m.node_id: m for m in members}
        if me in by_id[host].workers:
            return SplitRole("worker", host=host), None
        return SplitRole("standby", host=host, note=f"standing by; {host} plans the split"), None
    pool = [Member(m.node_id, m.memory_bytes) for m in members]
    chosen = plan(
        model_bytes,
        pool,
        rtt_ms,
        force_split=force_split,
        rtt_limit_ms=rtt_limit_ms,
        current=current,
        host_id=me,
    )
    if isinstance(chosen, Solo):
        return SplitRole("host", host=me, shares=(1.0,)), chosen
    if isinstance(chosen, Split):
        return SplitRole("host", me, chosen.workers, chosen.shares), chosen
    if isinstance(chosen, Waiting):
        return SplitRole("standby", host=me, note=chosen.reason), chosen
    return SplitRole("nofit", host=me, note=chosen.reason), chosen


class PartHold:
    """Keeps a part that runs something (host or worker) for `hold_s` before a change
    that no departure forces: what members announce cannot make this node restart its
    server in a loop. A change is taken at once when the part runs nothing (standby,
    no fit) or when a member the part depends on (its host, its workers) left the group.
    """

    def __init__(self, hold_s: float = HOLD_S) -> None:
        self.hold_s = hold_s
        self.part: SplitRole | None = None
        self.since = -float("inf")
        self.held = False
        """A proposed change waits for `due`."""

    def settle(self, proposed: SplitRole | None, present: set[str], now: float) -> SplitRole | None:
        """The part to take now, given the one `role_of` proposes and the group's members."""
        current = self.part
        if proposed == current:
            return current
        running = current is not None and current.part in ("host", "worker")
        if running and now - self.since < self.hold_s:
            assert current is not None
            needed = {current.host, *current.workers} - {""}
            if needed <= present:
                self.held = True
                return current  # held: see `due`
        self.part, self.since, self.held = proposed, now, False
        return proposed

    def due(self) -> float | None:
        """When a held change may be taken (call `settle` again then), if one waits."""
        return self.since + self.hold_s if self.held else None
