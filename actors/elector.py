"""Elector: decides which model this node serves (docs/design.md,
"Placement"), as glue around `meshllm.placement.election.Elector`.

It follows the mesh view and this node's server state, re-decides when they
change (and at the core's own deadlines), and publishes the wanted model on
topic `wanted` for the ServerSupervisor. A model that does not fit this node
(or `--split`) is served with the other nodes of its split group: which part
this node plays comes from `meshllm.placement.split.role_of`, with the round
trips the HealthProber measured (topic `rtt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from meshllm.mesh.wire import PeerAnnouncement
from meshllm.models.catalog import CATALOG, SourceRefused, find_entry, proposed_source
from meshllm.placement import election, split
from meshllm.placement.demand import demand_of, mesh_demand
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor
from meshllm.runtime.config import ModelSpec, NodeConfig
from meshllm.runtime.logs import Throttle

REPORTED_MAX = 1024
"""How many refused proposals the Elector remembers having logged."""


class ModelSources(NamedTuple):
    specs: dict[str, ModelSpec]
    """Every model this node could serve, by name: on its disk, or with a download source."""
    refused: dict[tuple[str, str], str]
    """(peer node id, model name) -> why the source that peer proposed is not used."""


def model_sources(
    own: tuple[ModelSpec, ...], announcements: list[PeerAnnouncement], models_dir: str
) -> ModelSources:
    """Every model this node could serve, and the peers' proposals it refused.

    Sources, most trusted first: this node's own files and `--model` flags, the built-in
    catalog, then the downloads peers propose for the models they requested. A proposal is
    used only when `proposed_source` accepts it (size and SHA-256 announced, http(s), a name
    that is not the catalog's); its file is named after the model, inside `models_dir`. When
    peers propose different sources for one name, the lowest node id's is used (every node
    then picks the same one; the digest decides what is served, not the URL).
    """
    specs: dict[str, ModelSpec] = {}
    refused: dict[tuple[str, str], str] = {}
    own_names = {spec.name for spec in own}
    for ann in sorted(announcements, key=lambda a: a.node_id):
        for name, url in ann.model_urls.items():
            if name in own_names or find_entry(name) is not None:
                continue  # this node's own choice, or the catalog's source: never a peer's
            try:
                source = proposed_source(
                    name, url, ann.model_sizes.get(name), ann.model_sha256.get(name)
                )
            except SourceRefused as exc:
                refused[(ann.node_id, name)] = str(exc)
                continue
            target = str(Path(models_dir) / source.file)
            specs.setdefault(
                name, ModelSpec(name, "", source.url, source.size, source.sha256, target)
            )
    for entry in CATALOG:
        target = str(Path(models_dir) / entry.file)
        specs[entry.name] = ModelSpec(
            entry.name, "", entry.url, entry.size or 0, entry.sha256 or "", target
        )
    for spec in own:
        specs[spec.name] = spec
    return ModelSources(specs, refused)


def known_models(
    own: tuple[ModelSpec, ...], announcements: list[PeerAnnouncement], models_dir: str
) -> dict[str, ModelSpec]:
    """Every model this node could serve, by name (see `model_sources`)."""
    return model_sources(own, announcements, models_dir).specs


def model_bytes(spec: ModelSpec) -> int:
    """The model's size: announced or catalogued, else its file's; 0 when unknown."""
    if spec.size:
        return spec.size
    try:
        return os.path.getsize(spec.path) if spec.path else 0
    except OSError:
        return 0


def describe(part: split.SplitRole) -> str:
    """One line for the log about a split group part."""
    if part.part == "host" and part.workers:
        shares = ", ".join(f"{s:.0%}" for s in part.shares)
        return f"host with workers {', '.join(part.workers)} (layers {shares})"
    if part.part == "host":
        return "host, alone (the model fits here, and no other member is there to split with)"
    if part.part == "worker":
        return f"worker for {part.host}"
    return f"{part.part}: {part.note}"


def model_infos(specs: dict[str, ModelSpec]) -> dict[str, election.ModelInfo]:
    return {
        name: election.ModelInfo(
            name,
            size_bytes=spec.size or None,
            on_disk=bool(spec.path),
            downloadable=bool(spec.url),
        )
        for name, spec in specs.items()
    }


def election_core(config: NodeConfig) -> election.Elector:
    """The election core with this node's timings (`--cold-grace`, `--idle-unload`,
    `--hot-rpm`)."""
    opts = config.options
    return election.Elector(
        cold_grace_s=opts.cold_grace_s, idle_unload_s=opts.idle_unload_s, hot_rpm=opts.hot_rpm
    )


class Elector(Actor):
    name = "elector"
    subscriptions = {
        "gossiper": ["mesh"],
        "server_supervisor": ["local"],
        "health_prober": ["rtt"],
    }

    async def on_start(self) -> None:
        cfg = self.config
        self.core = election_core(cfg)
        self.mesh = m.MeshView(cfg.node_id)
        self.local = m.LocalServerState()
        self.explicit = cfg.models[0].name if cfg.models else None
        self.wanted: ModelSpec | None = None
        self.wanted_split: split.SplitRole | None = None
        self.wanted_extras: tuple[ModelSpec, ...] = ()
        """`--models-dir`: the other models served here (`election.shelf`)."""
        self.extras_failed: set[str] = set()
        self.shelf_due: float | None = None
        self.split_plan: split.Plan | None = None
        """The plan this node made as its split group's host (kept while it works)."""
        self.split_host: str | None = None
        """The split group's host as this node last saw it claim the part."""
        self.hold = split.PartHold()
        self.heard_peers = not cfg.options.join
        self.rtts: dict[str, float] = {}
        self.reason = ""
        self.served_here: set[str] = set()
        self.reported: set[tuple[str, str, str]] = set()
        self.throttle = Throttle()
        """Lines about refused proposals: their names are a member's words, and one
        announcement may carry 256 of them (a peer cycling names would flood the log)."""
        # `--join` alone: choose from the mesh's view, not from the empty one before
        # joining (a choice made then would be held: "a decision holds").
        self.heard_mesh = not cfg.options.join or self.explicit is not None
        self.wake = asyncio.Event()
        self.timer = asyncio.create_task(self._timer())
        await self._decide()

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.MeshView):
            self.mesh = msg
        elif isinstance(msg, m.PeerRtts):
            self.rtts = msg.rtt_ms
        elif isinstance(msg, m.LocalServerState):
            previous, self.local = self.local, msg
            if msg.state == "ready":
                self.served_here.add(msg.model)
            for extra in msg.extras:
                if extra.state == "ready":
                    self.served_here.add(extra.model)
                elif extra.state == "failed" and extra.model not in self.served_here:
                    if extra.model not in self.extras_failed:
                        self.log.warning("%s failed here (%s)", extra.model, extra.reason)
                    self.extras_failed.add(extra.model)
            changed = (previous.model, previous.state) != (msg.model, msg.state)
            if (
                changed
                and msg.state == "failed"
                and msg.model
                and msg.model != self.explicit
                and msg.model not in self.served_here
            ):
                # A model that could not be downloaded or loaded here is not chosen
                # again; one that served before and crashed is only restarted.
                self.log.warning("%s failed here (%s); choosing again", msg.model, msg.reason)
                self.core.mark_failed(msg.model)
        await self._decide()

    async def _decide(self) -> None:
        cfg = self.config
        if not self.heard_mesh:
            if not self.mesh.peers:
                return
            self.heard_mesh = True
        announcements = list(self.mesh.peers)
        if self.mesh.me is not None:
            announcements.append(self.mesh.me)
        specs, refused = model_sources((*cfg.available, *cfg.models), announcements, cfg.models_dir)
        self._report_refused(refused)
        now = time.monotonic()
        view = election.NodeView(
            node_id=cfg.node_id,
            budget_bytes=cfg.vram_bytes,
            models=model_infos(specs),
            announcements=announcements,
            explicit=self.explicit,
            demand=mesh_demand(announcements, time.time(), now),
        )
        decision = self.core.update(view, now)
        self.wake.set()
        if decision is not None:
            self.reason = f"{decision.reason}{': ' + decision.detail if decision.detail else ''}"
            self.log.info("decided: serve %s (%s)", decision.model or "nothing", self.reason)
        model = self.core.decision.model if self.core.decision else None
        spec = specs.get(model) if model else None
        part = self._split_part(spec, announcements)
        extras = self._extras(view, model, specs, now)
        if (spec, part, extras) != (self.wanted, self.wanted_split, self.wanted_extras):
            if part is not None and part != self.wanted_split:
                self.log.info("split group of %s: %s", spec.name if spec else "-", describe(part))
            if extras != self.wanted_extras:
                names = ", ".join(x.name for x in extras) or "none"
                self.log.info("--models-dir: also serving %s", names)
            self.wanted, self.wanted_split, self.wanted_extras = spec, part, extras
            await self.bus.publish("wanted", m.ServeModel(spec, self.reason, part, extras))

    def _extras(
        self,
        view: election.NodeView,
        model: str | None,
        specs: dict[str, ModelSpec],
        now: float,
    ) -> tuple[ModelSpec, ...]:
        """`--models-dir`: the models this node serves besides `model` (`election.shelf`)."""
        self.shelf_due = None
        if self.config.options.models_dir is None or self.config.vram_bytes <= 0:
            return ()
        ttl = self.config.options.idle_unload_s
        view = replace(view, excluded=view.excluded | self.core.failed | self.extras_failed)
        running = [x.name for x in self.wanted_extras]
        names = election.shelf(view, model, running, now, ttl)
        if ttl > 0:
            # A running model turning idle may make room for one asked for: look again then.
            turns = [demand_of(view.demand, name).last + ttl for name in running]
            self.shelf_due = min((t for t in turns if t > now), default=None)
        return tuple(specs[name] for name in names if name in specs)

    def _split_part(
        self, spec: ModelSpec | None, announcements: list[PeerAnnouncement]
    ) -> split.SplitRole | None:
        """This node's part in `spec`'s split group; None when it serves the model alone
        (it fits here, or its size is unknown, and `--split` was not given)."""
        opts = self.config.options
        if spec is None:
            self.split_plan = None
            return None
        size = model_bytes(spec)
        budget = self.config.vram_bytes
        if not opts.split and (budget <= 0 or election.fits(size or None, budget)):
            # Fits here, or memory was not detected: served alone, as before splits.
            self.split_plan = None
            return None
        if not self.heard_peers:
            if not self.mesh.peers:
                # Joining: plan with the group, not alone before it is heard (a node
                # that would split must not load the whole model meanwhile).
                return split.SplitRole("standby", note="joining the mesh")
            self.heard_peers = True
        me = self.config.node_id
        members = [split.GroupMember(me, self.config.vram_bytes)]
        for ann in announcements:
            if ann.serving != spec.name or not ann.split_group:
                continue
            # A worker whose RPC server failed is no candidate until it recovers.
            failed = ann.role == "worker" and ann.server_state == "failed"
            member = split.GroupMember(
                ann.node_id, 0 if failed else ann.vram_bytes, ann.role == "host", ann.split_workers
            )
            if ann.node_id == me:
                members[0] = member  # what the others see of this node
            else:
                members.append(member)
        part, self.split_plan = split.role_of(
            me,
            size,
            members,
            self.rtts,
            force_split=opts.split,
            rtt_limit_ms=opts.split_rtt_limit_ms,
            current=self.split_plan,
            incumbent=self.split_host,
        )
        claims = {m.node_id for m in members if m.claims_host}
        self.split_host = part.host if part.host in claims else self.split_host
        return self.hold.settle(part, {m.node_id for m in members}, time.monotonic())

    def _report_refused(self, refused: dict[tuple[str, str], str]) -> None:
        """Say once why a peer's proposed download is not used (the model then has no
        download source here). Names come from gossip: logged with %r, truncated, and at most
        one line per `Throttle` interval (the others are counted in the next line)."""
        now = time.monotonic()
        for (node_id, name), reason in refused.items():
            key = (node_id, name, reason)
            if key in self.reported:
                continue
            if len(self.reported) >= REPORTED_MAX:
                self.reported.clear()  # bounded: a peer cycling names cannot grow it
            self.reported.add(key)
            skipped = self.throttle.allow("refused proposal", now)
            if skipped is None:
                continue
            more = f" ({skipped} more not logged)" if skipped else ""
            self.log.warning(
                "model %.80r proposed by %.80r has no download source here: %.200r%s",
                name,
                node_id,
                reason,
                more,
            )

    async def _timer(self) -> None:
        """Re-run the decision at the core's own deadlines (claims that expire, cold grace)."""
        while True:
            deadlines = [self.core.next_deadline(), self.hold.due(), self.shelf_due]
            deadline = min((d for d in deadlines if d is not None), default=None)
            delay = 3600.0 if deadline is None else max(0.0, deadline - time.monotonic())
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)
                continue
            await self._decide()

    async def on_stop(self) -> None:
        self.timer.cancel()
