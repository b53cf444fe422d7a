"""Demand per model (sans-I/O): what each node counts, and what the mesh adds up.

Every request enters the mesh at one node (its Proxy). That node counts it for the
model it asked for (a model of the mesh, warm or cold: a request for a cold model is
the clearest demand there is) in a `DemandMeter`, and announces the counts
(`PeerAnnouncement.demand`): requests in the last minute and the time of the latest.
Placement (`meshllm.placement.election`) adds up every node's announcement with
`mesh_demand`, in its own clock.

A member's announcement is its own word: `mesh_demand` bounds what it can do with it
(a time in the future counts as now, a rate at most `RPM_MAX`), and placement only
ever moves a node whose model nobody asked for in a while, so a lying member can
move idle servers at most, once per idle period.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshllm.mesh.wire import RPM_MAX, UNIX_MAX, Demand, PeerAnnouncement

WINDOW_S = 60.0
"""The rate is over the last minute."""
BUCKET_S = 5.0
MAX_MODELS = 256
"""Models one meter counts (the announcement's bound): the least recent is forgotten."""
PUBLISH_EVERY_S = 10.0
"""A meter whose counts only drifted is announced at most this often (`changed`)."""


@dataclass(frozen=True)
class ModelDemand:
    """The mesh's demand for a model, in the clock of whoever asks."""

    rpm: float = 0.0
    """Requests in the last minute, all entry nodes together."""
    last: float = -math.inf
    """When the latest request arrived; -inf: never."""

    def idle_s(self, now: float) -> float:
        """Seconds since the latest request (inf: never requested)."""
        return now - self.last


class DemandMeter:
    """Requests per model entering at this node, in 5 s buckets over the last minute."""

    def __init__(self, max_models: int = MAX_MODELS) -> None:
        self.max_models = max_models
        self.buckets: dict[str, deque[tuple[int, int]]] = {}
        """model -> (bucket index, requests) of the last minute, oldest first."""
        self.last: dict[str, float] = {}
        """model -> unix time of the latest request (insertion order: least recent first)."""
        self.announced: dict[str, Demand] = {}
        self.announced_at = -math.inf

    def seen(self, model: str, now: float) -> None:
        """A request for `model` arrived at unix time `now`."""
        index = int(now // BUCKET_S)
        counts = self.buckets.setdefault(model, deque())
        if counts and counts[-1][0] == index:
            counts[-1] = (index, counts[-1][1] + 1)
        else:
            counts.append((index, 1))
        self.last.pop(model, None)
        self.last[model] = now
        while len(self.last) > self.max_models:
            oldest = next(iter(self.last))
            del self.last[oldest]
            self.buckets.pop(oldest, None)

    def rpm(self, model: str, now: float) -> float:
        counts = self.buckets.get(model)
        if not counts:
            return 0.0
        first = int((now - WINDOW_S) // BUCKET_S) + 1
        while counts and counts[0][0] < first:
            counts.popleft()
        return float(sum(n for _, n in counts))

    def snapshot(self, now: float) -> dict[str, Demand]:
        """What to announce: every model requested here, most recent last."""
        return {
            model: Demand(min(self.rpm(model, now), RPM_MAX), min(int(last), UNIX_MAX - 1))
            for model, last in self.last.items()
        }

    def changed(self, now: float) -> dict[str, Demand] | None:
        """The snapshot when it is worth announcing, else None: at once when a model is
        requested that was not (or not in the last minute) and when a rate doubles or
        halves; otherwise at most every `PUBLISH_EVERY_S` (each announcement is
        gossiped to every node)."""
        snap = self.snapshot(now)
        if snap == self.announced:
            return None
        urgent = any(_moved(self.announced.get(model), d) for model, d in snap.items())
        if not urgent and now - self.announced_at < PUBLISH_EVERY_S:
            return None
        self.announced, self.announced_at = snap, now
        return snap


def _moved(before: Demand | None, now: Demand) -> bool:
    if before is None or before.rpm == 0.0:
        return now.rpm > 0.0
    return now.rpm >= 2 * before.rpm or now.rpm <= before.rpm / 2


def mesh_demand(
    announcements: Iterable[PeerAnnouncement], wall_now: float, now: float
) -> dict[str, ModelDemand]:
    """Every node's announced demand added up (rates summed, the latest request kept),
    with times moved from unix time to the caller's clock (`now` is `wall_now` there).
    A time in the future counts as now."""
    rpm: dict[str, float] = {}
    last: dict[str, float] = {}
    for ann in announcements:
        for model, d in ann.demand.items():
            rpm[model] = min(rpm.get(model, 0.0) + d.rpm, RPM_MAX)
            if d.last:
                last[model] = max(last.get(model, 0.0), min(float(d.last), wall_now))
    return {
        model: ModelDemand(rate, now - (wall_now - last[model]) if model in last else -math.inf)
        for model, rate in rpm.items()
    }


def mesh_rpm(announcements: Iterable[PeerAnnouncement]) -> dict[str, float]:
    """Requests per minute per model, every node's announced demand added up."""
    return {model: d.rpm for model, d in mesh_demand(announcements, 0.0, 0.0).items()}


def demand_of(demand: Mapping[str, ModelDemand], model: str) -> ModelDemand:
    return demand.get(model) or ModelDemand()
