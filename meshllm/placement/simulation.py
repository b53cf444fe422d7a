"""A simulated week of demand-driven placement (sans-I/O, deterministic with a seed).

Issue 12, "Usage-aware placement": hysteresis so that nothing flaps, shown on a week of
bursty demand over 20 nodes and 8 models, with the number of model switches reported.

What is real here and what is made up. Every node runs its own
`meshllm.placement.election.Elector`, as the Elector actor does for a node started with
``--join`` alone (no ``--model``): it gets a `NodeView` of every node's announcement
(its own included) and the mesh's demand from `mesh_demand`, and what it decides
becomes its announcement (``serving``, role "host", ``server_state`` "loading" for a
load time, then "ready"). Requests enter through one lite client (role "client"): a
real `DemandMeter` counts them and its `changed` snapshot is the client's announced
``demand``, the path the real nodes use. Made up: the traffic (`bursty_week`), load and
download times (`SimConfig`), and gossip, which here is instant: every node decides
from the same snapshot of the mesh once per step (`SimConfig.step_s`), so a decision
is seen by the others one step later and a deadline (`Elector.next_deadline`) is met
at the next step.

How a request fares. A request at time t for model m is *served at once* when a server
of m was ready at t; *served after a load* when a server of m gets ready by
``t + load_wait_s`` (a server loading then, or one that starts loading before that
and is quick enough: the proxy holds a request for a cold model that long); otherwise
*not served*.

Static placement (today's: ``--idle-unload 0``) runs the same week for comparison.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise

import msgspec

from meshllm.mesh.wire import PeerAnnouncement
from meshllm.placement.demand import DemandMeter, mesh_demand
from meshllm.placement.election import (
    HOT_HOLD_S,
    HOT_RPM,
    IDLE_UNLOAD_S,
    Decision,
    Elector,
    ModelInfo,
    NodeView,
    Reason,
    fits,
)

GB = 10**9
DAY_S = 86_400.0
HOUR_S = 3_600.0
MINUTE_S = 60.0
WALL_START = 1_798_848_000.0
"""Unix time of the simulation's time 0 (a Monday, 00:00 UTC): the lite client
announces unix times, the Electors run in simulation seconds."""


@dataclass(frozen=True)
class SimConfig:
    """One simulated run. The defaults are the issue's week: 20 nodes, 8 models."""

    nodes: int = 20
    models: int = 8
    days: float = 7.0
    step_s: float = 60.0
    """Every node decides once per step (the demand's window is a minute); requests
    arrive in between. A week of the default mesh takes 30 to 40 s of CPU at 60 s (the
    election core's update dominates: about 0.2 ms per node and step)."""
    seed: int = 0
    idle_unload_s: float = IDLE_UNLOAD_S
    """`--idle-unload`; 0 is static placement (nobody moves for demand)."""
    hot_rpm: float = HOT_RPM
    hot_hold_s: float = HOT_HOLD_S
    load_wait_s: float = 60.0
    """How long a request for a model without a ready server waits for one."""
    load_base_s: float = 5.0
    load_gb_per_s: float = 2.0
    """Load time: `load_base_s` plus the file read at this rate."""
    download_gb_per_s: float = 0.1
    """Download time for a model not on the node's disk (then it is on its disk)."""
    peak_rpm: float = 30.0
    """Requests per minute of the most popular model at the daily peak, before bursts."""
    bursts_per_day: float = 1.5
    """Per model: bursts of 10x traffic, each 10 to 60 minutes long."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.models < 1:
            raise ValueError("a simulation needs at least one node and one model")
        if self.days <= 0 or self.step_s <= 0:
            raise ValueError("days and step_s must be positive")
        if min(self.idle_unload_s, self.hot_rpm, self.hot_hold_s, self.load_wait_s) < 0:
            raise ValueError("idle_unload_s, hot_rpm, hot_hold_s and load_wait_s must be >= 0")


@dataclass(frozen=True)
class SimModel:
    name: str
    size_bytes: int


@dataclass(frozen=True)
class SimNode:
    node_id: str
    budget_bytes: int
    disk: frozenset[str]
    """Models on its disk at the start (all models are downloadable as well)."""


@dataclass(frozen=True)
class Switch:
    """A node left one model for another."""

    at: float
    node_id: str
    from_model: str
    to_model: str
    reason: str


@dataclass(frozen=True)
class SimReport:
    """What a run did. Switches are changes from one model to another (a node's first
    model is a load, not a switch)."""

    config: SimConfig
    switches: int
    switches_per_node_day: float
    max_switches_node_hour: int
    """The most switches one node made in any 60 minutes (a sliding window)."""
    max_switches_node_day: int
    """The most switches one node made in any 24 hours (a sliding window)."""
    min_switch_gap_s: float
    """The shortest time between two switches of one node (inf: none switched twice)."""
    loads: dict[str, int]
    """Every load (first models included), by the Elector's reason."""
    demand_loads: int
    hot_loads: int
    requests: int
    served_at_once: int
    served_after_load: int
    not_served: int
    peak_rpm_per_server: float
    """The most requests in a minute per ready server of a model, any model, any step."""
    hot_minutes: float
    """Minutes (summed over models) in which a served model had more than `hot_rpm`
    requests per ready server: how long the mesh ran short of replicas."""
    switch_log: tuple[Switch, ...] = field(repr=False)

    def summary(self) -> dict[str, object]:
        """The figures, without the log (for JSON)."""
        return {
            "idle_unload_s": self.config.idle_unload_s,
            "switches": self.switches,
            "switches_per_node_day": round(self.switches_per_node_day, 3),
            "max_switches_node_hour": self.max_switches_node_hour,
            "max_switches_node_day": self.max_switches_node_day,
            "min_switch_gap_s": self.min_switch_gap_s,
            "loads": dict(self.loads),
            "demand_loads": self.demand_loads,
            "hot_loads": self.hot_loads,
            "requests": self.requests,
            "served_at_once": self.served_at_once,
            "served_after_load": self.served_after_load,
            "not_served": self.not_served,
            "peak_rpm_per_server": round(self.peak_rpm_per_server, 1),
            "hot_minutes": round(self.hot_minutes, 1),
        }


# -- the mesh and its traffic -------------------------------------------------------


def make_mesh(config: SimConfig) -> tuple[list[SimNode], list[SimModel]]:
    """Nodes with budgets of 8 to 80 GB and models of 1 to 40 GB (log-spread); each model
    is on the disk of one to three nodes it fits (every model is in the catalog)."""
    rng = random.Random(f"mesh-{config.seed}")
    lo, hi = math.log(1.0), math.log(40.0)
    sizes = [math.exp(lo + (hi - lo) * i / max(1, config.models - 1)) for i in range(config.models)]
    models = [SimModel(f"model-{i}", int(gb * GB)) for i, gb in enumerate(sizes)]
    budgets = [8, 12, 16, 24, 32, 48, 64, 80]
    node_budgets = [80] + [rng.choice(budgets) for _ in range(config.nodes - 1)]
    ids = sorted(f"{rng.getrandbits(64):016x}" for _ in range(config.nodes))
    disks: list[set[str]] = [set() for _ in range(config.nodes)]
    for model in models:
        fitting = [i for i, b in enumerate(node_budgets) if fits(model.size_bytes, b * GB)]
        for i in rng.sample(fitting, min(len(fitting), rng.randint(1, 3))):
            disks[i].add(model.name)
    nodes = [
        SimNode(node_id, budget * GB, frozenset(disk))
        for node_id, budget, disk in zip(ids, node_budgets, disks, strict=True)
    ]
    return nodes, models


def bursty_week(config: SimConfig, names: Sequence[str]) -> dict[str, list[float]]:
    """Expected requests per minute, per model and minute of the run.

    Popularity follows a Zipf-like skew (a random order of the models); a daily cycle
    (quietest at 04:00, busiest at 16:00, weekends at half); bursts of 10x for 10 to 60
    minutes; and the less popular half of the models has long quiet spells (2 to 30
    hours of nothing, between 1 to 8 hours of use).
    """
    rng = random.Random(f"traffic-{config.seed}")
    minutes = math.ceil(config.days * DAY_S / MINUTE_S)
    order = list(names)
    rng.shuffle(order)
    out: dict[str, list[float]] = {}
    cycle = []
    for minute in range(minutes):
        t = minute * MINUTE_S
        daily = 0.55 - 0.45 * math.cos(2 * math.pi * (t - 4 * HOUR_S) / DAY_S)
        weekend = 0.5 if int(t // DAY_S) % 7 >= 5 else 1.0
        cycle.append(daily * weekend)
    for rank, name in enumerate(order):
        base = config.peak_rpm / (rank + 1) ** 1.1
        rates = [base * c for c in cycle]
        if rank >= len(order) // 2:
            minute, active = 0, rng.random() < 0.5
            while minute < minutes:
                span = int(rng.uniform(1, 8) * 60) if active else int(rng.uniform(2, 30) * 60)
                if not active:
                    for i in range(minute, min(minutes, minute + span)):
                        rates[i] = 0.0
                minute, active = minute + span, not active
        bursts = _poisson(rng, config.bursts_per_day * config.days)
        for _ in range(bursts):
            start = rng.randrange(minutes)
            for i in range(start, min(minutes, start + rng.randint(10, 60))):
                rates[i] = max(rates[i], base) * 10
        out[name] = rates
    return out


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


# -- the simulation ------------------------------------------------------------------


class _Server:
    """What one node runs: its model and when it is ready (inf: nothing)."""

    __slots__ = ("download", "model", "ready_at")

    def __init__(self) -> None:
        self.model: str | None = None
        self.ready_at = math.inf
        self.download = False


class Simulation:
    """N Electors, one lite client, and a clock that advances in steps.

    `run` plays the whole configured time; `run_until` and the attributes let a test
    look in between. `rates` (per model: expected requests per minute, for every minute)
    replaces the generated week.
    """

    def __init__(
        self,
        config: SimConfig,
        *,
        nodes: Sequence[SimNode] | None = None,
        models: Sequence[SimModel] | None = None,
        rates: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        self.config = config
        if nodes is None or models is None:
            made_nodes, made_models = make_mesh(config)
            nodes = made_nodes if nodes is None else nodes
            models = made_models if models is None else models
        self.nodes = list(nodes)
        self.models = {m.name: m for m in models}
        self.rates = dict(rates) if rates is not None else bursty_week(config, list(self.models))
        unknown = set(self.rates) - set(self.models)
        if unknown:
            raise ValueError(f"rates for unknown models: {sorted(unknown)}")
        self.rng = random.Random(f"requests-{config.seed}")
        self.electors = {
            n.node_id: Elector(
                idle_unload_s=config.idle_unload_s,
                hot_rpm=config.hot_rpm,
                hot_hold_s=config.hot_hold_s,
            )
            for n in self.nodes
        }
        self.disk = {n.node_id: set(n.disk) for n in self.nodes}
        self.servers = {n.node_id: _Server() for n in self.nodes}
        self.infos = {n.node_id: self._infos(n.node_id) for n in self.nodes}
        self.meter = DemandMeter()
        self.client = PeerAnnouncement(node_id="f" * 16, generation=1, role="client")
        self.anns = {n.node_id: self._announce(n) for n in self.nodes}
        self.now = 0.0
        self.switch_log: list[Switch] = []
        self.loads: Counter[str] = Counter()
        self.pending: dict[str, deque[float]] = {m: deque() for m in self.models}
        self.requests = self.at_once = self.after_load = self.not_served = 0
        self.peak_rpm_per_server = 0.0
        self.hot_minutes = 0.0

    # -- state as the mesh sees it

    def _infos(self, node_id: str) -> dict[str, ModelInfo]:
        disk = self.disk[node_id]
        return {
            name: ModelInfo(name, m.size_bytes, on_disk=name in disk, downloadable=True)
            for name, m in self.models.items()
        }

    def _announce(self, node: SimNode) -> PeerAnnouncement:
        server = self.servers[node.node_id]
        state = "stopped"
        if server.model is not None:
            state = "ready" if server.ready_at <= self.now else "loading"
        return PeerAnnouncement(
            node_id=node.node_id,
            generation=1,
            role="host" if server.model else "idle",
            serving=server.model,
            server_state=state,
            available_models=tuple(sorted(self.disk[node.node_id])),
            vram_bytes=node.budget_bytes,
        )

    def serving(self, model: str, *, ready: bool = False) -> list[str]:
        """The nodes serving `model` (only those ready now, with `ready`)."""
        return [
            node_id
            for node_id, s in self.servers.items()
            if s.model == model and (not ready or s.ready_at <= self.now)
        ]

    # -- one step

    def step(self) -> None:
        """Decide at `now` (every node, from the same snapshot), then play the requests
        of the next `step_s` seconds."""
        cfg = self.config
        now = self.now
        for node in self.nodes:
            server = self.servers[node.node_id]
            if server.model is not None and server.ready_at <= now and server.download:
                server.download = False
                self.disk[node.node_id].add(server.model)
                self.infos[node.node_id] = self._infos(node.node_id)
            self.anns[node.node_id] = self._announce(node)
        wall = WALL_START + now
        snap = self.meter.changed(wall)
        if snap is not None:
            self.client = msgspec.structs.replace(self.client, demand=snap)
        announcements = (*self.anns.values(), self.client)
        demand = mesh_demand(announcements, wall, now)
        decisions: list[tuple[SimNode, Decision]] = []
        for node in self.nodes:
            view = NodeView(
                node_id=node.node_id,
                budget_bytes=node.budget_bytes,
                models=self.infos[node.node_id],
                announcements=announcements,
                demand=demand,
            )
            decision = self.electors[node.node_id].update(view, now)
            if decision is not None:
                decisions.append((node, decision))
        for node, decision in decisions:
            self._apply(node, decision)
        self._resolve_pending()
        self._play_requests(now, now + cfg.step_s)
        self.now = now + cfg.step_s

    def _apply(self, node: SimNode, decision: Decision) -> None:
        server = self.servers[node.node_id]
        if decision.model == server.model:
            return
        if server.model is not None and decision.model is not None:
            self.switch_log.append(
                Switch(self.now, node.node_id, server.model, decision.model, str(decision.reason))
            )
        server.model = decision.model
        if decision.model is None:
            server.ready_at, server.download = math.inf, False
            return
        self.loads[str(decision.reason)] += 1
        gb = self.models[decision.model].size_bytes / GB
        on_disk = decision.model in self.disk[node.node_id]
        seconds = self.config.load_base_s + gb / self.config.load_gb_per_s
        if not on_disk:
            seconds += gb / self.config.download_gb_per_s
        server.ready_at, server.download = self.now + seconds, not on_disk

    def _first_ready(self, model: str) -> float:
        return min(
            (s.ready_at for s in self.servers.values() if s.model == model), default=math.inf
        )

    def _resolve_pending(self, final: bool = False) -> None:
        """Settle the requests that waited: a server ready within their wait serves them;
        past their wait (nothing decided from the next step on is ready in time) they
        are not served."""
        wait = self.config.load_wait_s
        horizon = math.inf if final else self.now + self.config.step_s
        for model, queue in self.pending.items():
            if not queue:
                continue
            ready = self._first_ready(model)
            while queue:
                t = queue[0]
                if ready <= t + wait:
                    self.after_load += 1
                elif t + wait < horizon:
                    self.not_served += 1
                else:
                    break
                queue.popleft()

    def _play_requests(self, start: float, end: float) -> None:
        minute = int(start // MINUTE_S)
        fraction = (end - start) / MINUTE_S
        for model, rates in self.rates.items():
            rpm = rates[minute] if minute < len(rates) else 0.0
            n = _poisson(self.rng, rpm * fraction)
            if not n:
                continue
            ready = self._first_ready(model)
            for t in sorted(self.rng.uniform(start, end) for _ in range(n)):
                self.meter.seen(model, WALL_START + t)
                if ready <= t:
                    self.at_once += 1
                else:
                    self.pending[model].append(t)
            self.requests += n
        for model in self.rates:
            ready = len(
                [s for s in self.servers.values() if s.model == model and s.ready_at <= end]
            )
            if ready:
                rpm = self.meter.rpm(model, WALL_START + end)
                self.peak_rpm_per_server = max(self.peak_rpm_per_server, rpm / ready)
                if rpm / ready > self.config.hot_rpm > 0:
                    self.hot_minutes += (end - start) / MINUTE_S

    def run_until(self, t: float) -> None:
        while self.now < t:
            self.step()

    def run(self) -> SimReport:
        """Play the configured days; what happened."""
        self.run_until(self.config.days * DAY_S)
        self._resolve_pending(final=True)
        return self.report()

    def report(self) -> SimReport:
        cfg = self.config
        times: dict[str, list[float]] = {}
        for s in self.switch_log:
            times.setdefault(s.node_id, []).append(s.at)
        gaps = [b - a for ts in times.values() for a, b in pairwise(ts)]
        return SimReport(
            config=cfg,
            switches=len(self.switch_log),
            switches_per_node_day=len(self.switch_log) / len(self.nodes) / cfg.days,
            max_switches_node_hour=max(
                (_most_within(ts, HOUR_S) for ts in times.values()), default=0
            ),
            max_switches_node_day=max(
                (_most_within(ts, DAY_S) for ts in times.values()), default=0
            ),
            min_switch_gap_s=min(gaps, default=math.inf),
            loads=dict(sorted(self.loads.items())),
            demand_loads=self.loads[Reason.DEMAND],
            hot_loads=self.loads[Reason.HOT],
            requests=self.requests,
            served_at_once=self.at_once,
            served_after_load=self.after_load,
            not_served=self.not_served,
            peak_rpm_per_server=self.peak_rpm_per_server,
            hot_minutes=self.hot_minutes,
            switch_log=tuple(self.switch_log),
        )


def _most_within(times: Sequence[float], window: float) -> int:
    """The most of sorted `times` in any half-open window [t, t + window)."""
    return max((bisect_right(times, t + window - 1e-9) - i for i, t in enumerate(times)), default=0)


def simulate(config: SimConfig | None = None) -> SimReport:
    """Run one configured simulation (the issue's week by default)."""
    return Simulation(config or SimConfig()).run()


def compare(config: SimConfig | None = None) -> tuple[SimReport, SimReport]:
    """The same mesh and traffic, demand-driven (`config`) and static (``idle_unload_s=0``)."""
    config = config or SimConfig()
    return simulate(config), simulate(replace(config, idle_unload_s=0.0))
