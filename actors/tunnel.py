"""Tunnel: carries requests for remote models over QUIC, streamed both ways.

Glue only: the QUIC endpoint (its own UDP port, see `meshllm.mesh.quic`), the
Proxy's unix socket, and the two topics it follows. The requesting side is
`meshllm.tunnel.client.TunnelClient`, the host's side
`meshllm.tunnel.server.TunnelServer`; the request frame and the Proxy's end
of the hop are in `meshllm.tunnel.hop`.

A split host's llama-server reaches each worker's RPC server through a
loopback port here (`UseRpcWorkers`, asked by the ServerSupervisor): each
connection waits until the worker announces its RPC server ready for this
node, then becomes a QUIC stream to the worker's Tunnel
(`meshllm.tunnel.rpc`). Bytes relayed go to `rpc-traffic.json` in the run
directory and to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshllm.mesh import wire
from meshllm.mesh.owner import OwnerGate
from meshllm.mesh.quic import MeshEndpoint, key_from_pem, release_stream, write_last
from meshllm.mesh.token import mesh_id_of
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor
from meshllm.runtime.logs import Throttle
from meshllm.runtime.paths import publish_json
from meshllm.runtime.root import drop_refusal
from meshllm.tunnel.client import TunnelClient
from meshllm.tunnel.rpc import RpcForwarder
from meshllm.tunnel.server import TunnelServer, guard_control

OWNER_ANSWER_S = 10.0
"""How long an owner command may take to reach its target and be answered."""
OWNER_ANSWER_BYTES = 4096
RPC_TRAFFIC_S = 0.5
"""How often the RPC byte counters are written while a split is hosted here."""


def worker_ready(view: m.MeshView, worker: str) -> bool:
    """Whether `worker` announces its RPC server ready for this node (its host)."""
    ann = next((p for p in view.peers if p.node_id == worker), None)
    return (
        ann is not None
        and ann.role == "worker"
        and ann.split_host == view.node_id
        and ann.server_state == "ready"
    )


class Tunnel(Actor):
    """Glue: the QUIC endpoint, the Proxy's unix socket, mesh view and local state."""

    name = "tunnel"
    subscriptions = {
        "gossiper": ["mesh"],
        "server_supervisor": ["local"],
        "backends": ["backends"],
    }

    async def on_start(self) -> None:
        # Everything on_topic touches exists before the first await.
        max_body = self.config.options.max_body_bytes
        self.server = TunnelServer(max_body_bytes=max_body)
        self.endpoint = MeshEndpoint(
            self.config.node_id,
            self.config.mesh_secret,
            key_from_pem(self.resources["key"]),
            # Incoming links need no setup (their streams go to `handle_stream`), but
            # their control stream must not buffer what a member sends there.
            on_link=guard_control,
            stream_handler=self.server.handle_stream,
        )
        self.client = TunnelClient(self.endpoint, suspect=self._suspect, max_body_bytes=max_body)
        self.gate = OwnerGate(
            self.config.owner_public, self.config.node_id, mesh_id_of(self.config.mesh_secret)
        )
        self.owner_warnings = Throttle()
        self.server.on_owner_order = self._owner_order
        self.view = m.MeshView(self.config.node_id)
        self.view_changed = asyncio.Event()
        self.forwarders: list[RpcForwarder] = []
        self.rpc_sent = self.rpc_received = 0
        """Bytes of RPC connections whose forwarders are closed (the open ones count apart)."""
        self.rpc_file = Path(self.config.run_dir) / "rpc-traffic.json"
        self.rpc_task: asyncio.Task[None] | None = None
        sock: socket.socket | None = self.resources.get("socket")
        if sock is not None:
            await self.endpoint.listen(sock)
            self.log.info("tunnel on udp port %s", sock.getsockname()[1])
        await self.client.serve(self.config.tunnel_http_path)
        # As in the Proxy: what exists now lives as long as the process; out of the
        # collector's sight, the collections that per-packet garbage triggers stay cheap.
        gc.collect()
        gc.freeze()

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if isinstance(msg, m.MeshView):
            self.client.set_view(msg)
            self.view = msg
            self.view_changed.set()
            self.view_changed = asyncio.Event()
        elif isinstance(msg, m.LocalServerState):
            self.server.local = msg
        elif isinstance(msg, m.BackendsState):
            self.server.backends = msg

    async def on_ask(self, msg: m.Message) -> m.Message:
        if isinstance(msg, m.UseRpcWorkers):
            return await self._use_workers(msg.workers)
        if isinstance(msg, m.SendOwnerOrder):
            return await self._send_owner_order(msg.order)
        if isinstance(msg, m.CountInFlight):
            return m.InFlight(self.server.local_in_flight)
        return await super().on_ask(msg)

    async def _use_workers(self, workers: tuple[str, ...]) -> m.RpcPorts:
        """Replace the split's forwarders with one per worker; their loopback ports."""
        await self._close_forwarders()
        ports = []
        for worker in workers:
            forwarder = RpcForwarder(functools.partial(self._open_rpc, worker))
            ports.append(await forwarder.listen())
            self.forwarders.append(forwarder)
        if workers:
            self.log.info("RPC ports for workers %s: %s", ", ".join(workers), ports)
            if self.rpc_task is None:
                self.rpc_task = asyncio.create_task(self._write_rpc_traffic_forever())
        return m.RpcPorts(tuple(ports))

    async def _open_rpc(self, worker: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to `worker`'s RPC server, once it says it is ready for this node
        (llama-server waits on its connection meanwhile, as during a load)."""
        deadline = time.monotonic() + self.config.options.load_timeout_s
        while not worker_ready(self.view, worker):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionError(f"worker {worker} did not get its RPC server ready")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.view_changed.wait(), left)
        return await self.client.open_stream(worker)

    async def _send_owner_order(self, order: wire.OwnerOrder) -> m.Message:
        """Carry a signed owner command to its target; the target's answer."""
        target = order.command.target
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(OWNER_ANSWER_S):
                reader, writer = await self.client.open_stream(target)
                write_last(writer, wire.encode_frame(order))
                answer = await wire.read_frame(reader, OWNER_ANSWER_BYTES)
        except TimeoutError:
            return m.ActorError(f"node {target} did not answer in {OWNER_ANSWER_S:.0f}s")
        except asyncio.IncompleteReadError:
            return m.ActorError(
                f"node {target} closed the stream without answering "
                "(a meshllm version without owner control?)"
            )
        except (ConnectionError, wire.WireError) as exc:
            return m.ActorError(f"cannot reach node {target}: {exc}")
        finally:
            if writer is not None:
                with contextlib.suppress(Exception):
                    release_stream(reader, writer)
        if not isinstance(answer, wire.OwnerAnswer):
            return m.ActorError(f"node {target} answered with a {type(answer).__name__}")
        if not answer.done:
            return m.ActorError(f"node {target} refused: {answer.message}")
        return m.CtlDone(answer.message)

    async def _owner_order(
        self, peer: str, order: wire.OwnerOrder
    ) -> tuple[wire.OwnerAnswer, Callable[[], Awaitable[Any]] | None]:
        """A peer's owner command: checked by the gate, refusals logged (throttled: a
        member chooses how often), the action done by the root once answered."""
        verdict = self.gate.check(order, time.time())
        if not verdict.accepted:
            skipped = self.owner_warnings.allow(peer, time.monotonic())
            if skipped is not None:
                more = f" ({skipped} more not logged)" if skipped else ""
                self.log.warning(
                    "refused an owner command from node %s: %s%s", peer, verdict.reason, more
                )
            return wire.OwnerAnswer(False, verdict.reason), None
        cmd = order.command
        me = self.config.node_id
        action: m.Message
        if cmd.action == "drop":
            model = cmd.model or ""
            if why := drop_refusal(self.config.options.client, self.server.local, model):
                return wire.OwnerAnswer(False, why), None
            action = m.DropModel(model)
            text = f"node {me}: dropping {model}: llama-server stops and the node exits"
        else:
            action = m.Shutdown(f"the mesh owner's `meshllm ctl --node {me} stop` (via {peer})")
            text = f"node {me} is stopping"
        self.log.warning("the mesh owner (via node %s) asked this node to %s", peer, cmd.action)
        return wire.OwnerAnswer(True, text), functools.partial(self.bus.ask, "control", action)

    def _rpc_totals(self) -> tuple[int, int]:
        sent = self.rpc_sent + sum(f.relayed.to_worker for f in self.forwarders)
        received = self.rpc_received + sum(f.relayed.from_worker for f in self.forwarders)
        return sent, received

    async def _close_forwarders(self) -> None:
        if not self.forwarders:
            return
        for forwarder in self.forwarders:
            await forwarder.close()
            self.rpc_sent += forwarder.relayed.to_worker
            self.rpc_received += forwarder.relayed.from_worker
        self.forwarders = []
        sent, received = self._rpc_totals()
        self.log.info("RPC to workers so far: %d bytes sent, %d received", sent, received)
        self._write_rpc_traffic()

    def _write_rpc_traffic(self) -> None:
        sent, received = self._rpc_totals()
        data = {"to_workers": sent, "from_workers": received, "forwarders": len(self.forwarders)}
        publish_json(self.rpc_file, data)

    async def _write_rpc_traffic_forever(self) -> None:
        """The byte counters, for the tests and the benchmark (a second load of a model
        sends far fewer bytes than the first when the workers keep their tensor cache)."""
        while True:
            self._write_rpc_traffic()
            await asyncio.sleep(RPC_TRAFFIC_S)

    async def _suspect(self, node_id: str, reason: str) -> None:
        await self.bus.tell("health_prober", m.SuspectPeer(node_id, reason))

    async def on_stop(self) -> None:
        if self.rpc_task is not None:
            self.rpc_task.cancel()
        await self._close_forwarders()
        await self.client.close()
        self.server.close()
        self.endpoint.close()
        with contextlib.suppress(OSError):
            os.unlink(self.config.tunnel_http_path)
