"""Tunnel: carries requests for remote models over QUIC, streamed both ways.

Glue only: the QUIC endpoint (its own UDP port, see `meshllm.mesh.quic`), the
Proxy's unix socket, and the two topics it follows. The requesting side is
`meshllm.tunnel.client.TunnelClient`, the host's side
`meshllm.tunnel.server.TunnelServer`; the request frame and the Proxy's end
of the hop are in `meshllm.tunnel.hop`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket

from meshllm.mesh.quic import MeshEndpoint, key_from_pem
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor
from meshllm.tunnel.client import TunnelClient
from meshllm.tunnel.server import TunnelServer, guard_control


class Tunnel(Actor):
    """Glue: the QUIC endpoint, the Proxy's unix socket, mesh view and local state."""

    name = "tunnel"
    subscriptions = {"gossiper": ["mesh"], "server_supervisor": ["local"]}

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
        elif isinstance(msg, m.LocalServerState):
            self.server.local = msg

    async def _suspect(self, node_id: str, reason: str) -> None:
        await self.bus.tell("health_prober", m.SuspectPeer(node_id, reason))

    async def on_stop(self) -> None:
        await self.client.close()
        self.server.close()
        self.endpoint.close()
        with contextlib.suppress(OSError):
            os.unlink(self.config.tunnel_http_path)
