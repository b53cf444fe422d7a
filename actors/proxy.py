"""Proxy: the node's OpenAI-compatible endpoint (Starlette on uvicorn with uvloop).

The listening socket is opened by the root process and handed over, so a
restarted Proxy serves on the same port without a gap in which clients get
"connection refused": they wait in the kernel's backlog instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time

from meshllm.http.asgi import actor_server
from meshllm.http.metrics import NodeMessage
from meshllm.http.proxy import ProxyApp, is_loopback_address
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor
from meshllm.tunnel.hop import remote_via_tunnel


class Proxy(Actor):
    name = "proxy"
    subscriptions = {
        "router": ["routes"],
        # only for `/metrics`: peers alive and the gossip endpoint's traffic, the
        # probes and their round trips, the local llama-server's restarts, state and
        # download
        "gossiper": ["mesh", "traffic"],
        "health_prober": ["rtt", "probes"],
        "server_supervisor": ["local"],
    }
    DEMAND_TICK_S = 1.0
    """How often the demand counts are looked at (`DemandMeter.changed` says when they
    are worth announcing)."""

    async def on_start(self) -> None:
        self.app = ProxyApp(
            self.config.options.strict_models,
            self.config.options.max_body_bytes,
            remote=remote_via_tunnel(self.config.tunnel_http_path),
            loopback_only=is_loopback_address(self.config.http_host),
            cors_origins=self.config.options.cors_origins,
            max_in_flight=self.config.options.max_in_flight,
            max_queued=self.config.options.max_queued,
            queue_wait_s=self.config.options.queue_wait_s,
            affinity=not self.config.options.no_affinity,
            stall_s=self.config.options.stall_s,
            api_keys=self.config.api_keys,
            load_wait_s=self.config.options.load_wait_s,
        )
        self.demand_task = asyncio.create_task(self._publish_demand())
        sock: socket.socket = self.resources["socket"]
        self.server = actor_server(
            self.app,
            graceful_s=3,
            backlog=2048,
            # llama-server's own `server` and `date` headers pass through; uvicorn's
            # would only duplicate them (and cost time on every response).
            server_header=False,
            date_header=False,
        )
        self.serving = asyncio.create_task(self.server.serve(sockets=[sock]))
        # If uvicorn ever stops by itself, end the actor: the root restarts it.
        self.serving.add_done_callback(lambda _: self.stopping.set())
        # What exists now lives as long as the process: move it out of the collector's
        # sight, so the collections that per-request garbage triggers stay cheap.
        gc.collect()
        gc.freeze()
        self.log.info("OpenAI API on http://%s:%s", self.config.http_host, self.config.http_port)

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.RouteTable) and msg != self.app.routes.table:
            self.app.set_table(msg)
        elif isinstance(msg, NodeMessage):
            self.app.metrics.node.update(msg)

    async def on_ask(self, msg: m.Message) -> m.Message:
        if isinstance(msg, m.CountInFlight):
            count, routed = self.app.local_in_flight(self.config.node_id, msg.model)
            return m.InFlight(count, routed)
        return await super().on_ask(msg)

    async def _publish_demand(self) -> None:
        while True:
            await asyncio.sleep(self.DEMAND_TICK_S)
            snap = self.app.demand.changed(time.time())
            if snap is not None:
                await self.bus.publish("demand", m.DemandState(snap))

    async def on_stop(self) -> None:
        self.demand_task.cancel()
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.serving, 5)
