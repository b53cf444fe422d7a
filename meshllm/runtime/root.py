"""The root process of a node: starts the actors, restarts the dead, serves `meshllm ctl`.

Adding an actor is a new file in `actors/` plus one line in `ACTORS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from meshllm.mesh.status import announced_part
from meshllm.runtime import busy
from meshllm.runtime import messages as m
from meshllm.runtime.actor import actor_main
from meshllm.runtime.backoff import Backoff
from meshllm.runtime.bus import AskTimeout, Bus
from meshllm.runtime.config import NodeConfig

log = logging.getLogger("meshllm.node")


@dataclass(frozen=True)
class ActorSpec:
    name: str
    target: str
    enabled: Callable[[NodeConfig], bool] = lambda config: True


def _serves(config: NodeConfig) -> bool:
    """Runs llama-server (or an RPC server): not a lite client, no external backends."""
    return not config.options.client and not config.options.backend_urls


def _has_backends(config: NodeConfig) -> bool:
    return bool(config.options.backend_urls)


ACTORS: list[ActorSpec] = [
    ActorSpec("server_supervisor", "actors.server_supervisor:ServerSupervisor", _serves),
    ActorSpec("elector", "actors.elector:Elector", _serves),
    ActorSpec("backends", "actors.backends:Backends", _has_backends),
    ActorSpec("gossiper", "actors.gossiper:Gossiper"),
    ActorSpec("health_prober", "actors.health_prober:HealthProber"),
    ActorSpec("router", "actors.router:Router"),
    ActorSpec("tunnel", "actors.tunnel:Tunnel"),
    ActorSpec("console", "actors.console:Console", lambda c: c.options.console_port > 0),
    ActorSpec("discovery", "actors.discovery:Discovery", lambda c: c.options.discover),
    ActorSpec("proxy", "actors.proxy:Proxy"),
]

FOLLOWED = {
    "server_supervisor": ["local"],
    "router": ["routes"],
    "gossiper": ["mesh"],
    "backends": ["backends"],
}
"""What the root follows, for `meshllm ctl status`."""

STOP_GRACE_S = 8.0
KILL_GRACE_S = 2.0


OWNER_ORDER_TIMEOUT_S = 15.0
"""How long `meshllm ctl --node ID ...` waits for the target's answer, the dial included."""


def drop_refusal(client: bool, server: m.LocalServerState, model: str) -> str:
    """Why this node cannot drop `model` (`ctl drop`, local or the owner's); "" if it can."""
    if any(x.model == model for x in server.extras):
        return (
            f"{model!r} is one of this node's --models-dir models: `ctl drop` ends the node "
            f"with its main model ({server.model or 'none'}); move the file out of the "
            "directory and restart the node to stop serving it"
        )
    if client or not server.model:
        return "this node serves no model"
    if model != server.model:
        return f"this node serves {server.model!r}, not {model!r}; nothing was dropped"
    return ""


@dataclass
class RunningActor:
    spec: ActorSpec
    process: BaseProcess | None = None
    policy: Backoff = field(default_factory=lambda: Backoff(window_s=30.0))
    restart_handle: asyncio.TimerHandle | None = None


class Node:
    """Supervises the actor processes of one node until told to stop."""

    def __init__(
        self, config: NodeConfig, resources: dict[str, dict[str, Any]], token: str = ""
    ) -> None:
        self.config = config
        self.resources = resources
        self.ctx = multiprocessing.get_context("spawn")
        self.actors = {s.name: RunningActor(s) for s in ACTORS if s.enabled(config)}
        self.bus = Bus(config.run_dir, "control")
        self.server = m.LocalServerState()
        self.routes = m.RouteTable()
        self.mesh = m.MeshView(config.node_id)
        self.backends = m.BackendsState()
        self.token = token
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.done = asyncio.Event()
        self.exit_reason = ""
        percent = config.options.pause_when_busy
        self.busy = (
            busy.BusyWatcher(percent) if percent and "server_supervisor" in self.actors else None
        )
        """`--pause-when-busy`: decides when to give the machine back."""
        self.paused_by_hand = False
        """`meshllm ctl pause` (not yet resumed): the watcher leaves the node paused."""

    # -- actors ----------------------------------------------------------------

    def _start(self, actor: RunningActor) -> None:
        actor.restart_handle = None
        if self.stopping:
            return
        proc = self.ctx.Process(
            target=actor_main,
            args=(actor.spec.target, self.config, self.resources.get(actor.spec.name, {})),
            name=actor.spec.name,
        )
        proc.start()
        actor.process = proc
        log.debug("started %s (pid %s)", actor.spec.name, proc.pid)
        loop = asyncio.get_running_loop()
        loop.add_reader(proc.sentinel, self._on_exit, actor, proc)
        if topics := FOLLOWED.get(actor.spec.name):
            # The first publication of a fresh actor can beat our subscription.
            task = loop.create_task(self.bus.catch_up(actor.spec.name, topics, self._on_topic))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _on_exit(self, actor: RunningActor, proc: BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(0)
        if self.stopping:
            return
        delay = actor.policy.failed(time.monotonic())
        log.warning(
            "%s (pid %s) exited with %s; restarting in %.1fs",
            actor.spec.name,
            proc.pid,
            proc.exitcode,
            delay,
        )
        actor.restart_handle = asyncio.get_running_loop().call_later(delay, self._start, actor)

    # -- control ---------------------------------------------------------------

    async def _on_ask(self, msg: m.Message) -> m.Message:
        match msg:
            case m.GetStatus():
                return self.status()
            case m.GetToken():
                return m.CtlDone(self.token)
            case m.Shutdown(reason=reason):
                self.request_stop(reason or "meshllm ctl stop")
                return m.CtlDone("stopping")
            case m.DropModel(model=model):
                if why := drop_refusal(self.config.options.client, self.server, model):
                    return m.ActorError(why)
                self.request_stop(f"dropped {model}")
                return m.CtlDone(f"dropping {model}: llama-server stops and this node exits")
            case m.SendOwnerOrder(order=order):
                if order.command.target == self.config.node_id:
                    return m.ActorError(
                        "that is this node's own id: leave out --node to act on this node"
                    )
                if "tunnel" not in self.actors:
                    return m.ActorError("this node has no tunnel to carry the command")
                return await self.bus.ask("tunnel", msg, OWNER_ORDER_TIMEOUT_S)
            case m.PauseServing():
                return await self.pause(msg)
        return m.ActorError(f"unknown control command {type(msg).__name__}")

    async def pause(self, msg: m.PauseServing) -> m.Message:
        """`meshllm ctl pause` / `resume`: the ServerSupervisor drains and stops its server.
        A resume by hand also ends a pause of `--pause-when-busy` (which watches afresh)."""
        if "server_supervisor" not in self.actors:
            return m.ActorError("this node runs no llama-server: nothing to pause or resume")
        reply = await self._tell_supervisor(msg)
        if isinstance(reply, m.CtlDone):
            self.paused_by_hand = msg.paused
            if not msg.paused and self.busy is not None:
                self.busy.reset()
        return reply

    async def _tell_supervisor(self, msg: m.PauseServing) -> m.Message:
        try:
            return await self.bus.ask("server_supervisor", msg, timeout=5.0)
        except AskTimeout as exc:
            return m.ActorError(f"the server supervisor did not answer: {exc}")

    async def _watch_busy(self, watcher: busy.BusyWatcher) -> None:
        """`--pause-when-busy`: sample other processes' use, act on the watcher's word."""
        gpu = busy.GpuSampler()
        root = os.getpid()
        try:
            before = busy.sample_cpu(root)
        except (OSError, ValueError) as exc:
            log.warning("--pause-when-busy cannot read the CPU use (%s); not watching", exc)
            return
        while not self.stopping:
            await asyncio.sleep(busy.SAMPLE_S)
            try:
                # Off the loop: a scan of /proc (and NVML) must not hold up `meshllm ctl`.
                after = await asyncio.to_thread(busy.sample_cpu, root)
            except (OSError, ValueError) as exc:
                log.warning("--pause-when-busy cannot read the CPU use (%s); not watching", exc)
                return
            use = busy.others_percent(before, after)
            before = after
            gpu_use = await asyncio.to_thread(gpu.others_percent, set(after.own))
            if gpu_use is not None:
                use = max(use, gpu_use)
            action = watcher.observe(use, time.monotonic())
            if action is None:
                continue
            if self.paused_by_hand:
                # `ctl pause` holds: only `ctl resume` ends it, and the watcher starts over.
                watcher.reset()
                continue
            why = f"other processes use {use:.0f}% (--pause-when-busy {watcher.percent:g})"
            log.info("%s: %s", "pausing" if action == "pause" else "resuming", why)
            await self._tell_supervisor(m.PauseServing(action == "pause", reason=why))

    async def _on_tell(self, msg: m.Message) -> None:
        if isinstance(msg, m.Shutdown):
            self.request_stop(msg.reason)

    async def _on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.LocalServerState):
            self.server = msg
        elif isinstance(msg, m.RouteTable):
            self.routes = msg
        elif isinstance(msg, m.MeshView):
            self.mesh = msg
        elif isinstance(msg, m.BackendsState):
            self.backends = msg

    def status(self) -> m.NodeStatus:
        actors = tuple(
            m.ActorStatus(
                name=a.spec.name,
                pid=(a.process.pid or 0) if a.process else 0,
                alive=bool(a.process and a.process.is_alive()),
                restarts=a.policy.total,
            )
            for a in self.actors.values()
        )
        return m.NodeStatus(
            node_id=self.config.node_id,
            role=announced_part(self.server, self.config.options.client)["role"],
            home=self.config.home,
            http=f"{self.config.http_host}:{self.config.http_port}",
            server=self.server,
            routes=self.routes,
            actors=actors,
            peers=self.mesh.peers,
            # No token: status output gets pasted into bug reports; `ctl token` has it.
            me=self.mesh.me,
            backends=self.backends.backends,
        )

    def request_stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.exit_reason = reason
            task = asyncio.get_running_loop().create_task(self._shutdown(reason))
            self.tasks.add(task)

    async def _shutdown(self, reason: str) -> None:
        log.info("stopping node: %s", reason)
        for actor in self.actors.values():
            if actor.restart_handle:
                actor.restart_handle.cancel()
        alive = [a.process for a in self.actors.values() if a.process and a.process.is_alive()]
        for proc in alive:
            with contextlib.suppress(Exception):
                await self.bus.tell(proc.name, m.Shutdown(reason))
        await _wait_exit(alive, STOP_GRACE_S)
        for proc in alive:
            if proc.is_alive():
                log.warning("%s did not stop in %.0fs; terminating", proc.name, STOP_GRACE_S)
                proc.terminate()
        await _wait_exit(alive, KILL_GRACE_S)
        for proc in alive:
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        self.done.set()

    async def run(self) -> str:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, f"signal {signal.Signals(sig).name}")
        self.bus.serve(self._on_tell, self._on_ask)
        for publisher, topics in FOLLOWED.items():
            self.bus.subscribe(publisher, topics, self._on_topic)
        for actor in self.actors.values():
            self._start(actor)
        if self.busy is not None:
            task = loop.create_task(self._watch_busy(self.busy))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        await self.done.wait()
        self.bus.close()
        return self.exit_reason


async def _wait_exit(procs: list[BaseProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def cleanup_run_dir(run_dir: str) -> None:
    """Remove the sockets of a node that has stopped."""
    for entry in os.scandir(run_dir):
        if entry.name.endswith(".ipc"):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
