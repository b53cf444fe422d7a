"""Console: the web console of `meshllm up --console PORT` (Starlette on uvicorn).

Glue: follows the Gossiper's mesh view, the Router's table and this node's
server state, turns them into a `MeshStatus` (`meshllm.mesh.status`) and hands
it to the app, which pushes it to every open page. The console is optional,
so a port that is taken does not take the node down: the actor says so and
tries again now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from meshllm.http.asgi import ActorServer, actor_server
from meshllm.http.console import ConsoleApp
from meshllm.mesh.status import build_mesh_status, own_card
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor

BIND_RETRY_S = 5.0
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def bind_console(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class Console(Actor):
    name = "console"
    subscriptions = {
        "server_supervisor": ["local"],
        "router": ["routes"],
        "gossiper": ["mesh"],
    }

    async def on_start(self) -> None:
        cfg = self.config
        api_host = "127.0.0.1" if cfg.http_host in WILDCARD_HOSTS else cfg.http_host
        self.api = f"http://{api_host}:{cfg.http_port}/v1"
        # What this node offers for models: what the Gossiper announces.
        self.vram_bytes = cfg.vram_bytes
        self.local = m.LocalServerState()
        self.mesh = m.MeshView(cfg.node_id)
        self.routes = m.RouteTable()
        self.app = ConsoleApp(
            api_host,
            cfg.http_port,
            cfg.options.max_body_bytes,
            loopback_only=_is_loopback(cfg.console_host),
            cors_origins=cfg.options.cors_origins,
            api_key=self.resources.get("api_key", ""),
        )
        self._update()
        self.server: ActorServer | None = None
        self.serving = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        cfg = self.config
        told = False
        while True:
            try:
                sock = bind_console(cfg.console_host, cfg.options.console_port)
            except OSError as exc:
                if not told:
                    self.log.error(
                        "the console cannot listen on %s:%s (%s); retrying every %.0fs",
                        cfg.console_host,
                        cfg.options.console_port,
                        exc.strerror,
                        BIND_RETRY_S,
                    )
                    told = True
                await asyncio.sleep(BIND_RETRY_S)
                continue
            break
        self.server = actor_server(self.app, graceful_s=2)
        host = f"[{cfg.console_host}]" if ":" in cfg.console_host else cfg.console_host
        self.log.info("console on http://%s:%s/", host, cfg.options.console_port)
        try:
            await self.server.serve(sockets=[sock])
        finally:
            sock.close()

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        match msg:
            case m.LocalServerState():
                self.local = msg
            case m.RouteTable():
                self.routes = msg
            case m.MeshView():
                self.mesh = msg
            case _:
                return
        self._update()

    def _update(self) -> None:
        cfg = self.config
        me = own_card(cfg.node_id, cfg.options.client, self.local, self.vram_bytes, cfg.http_port)
        self.app.set_status(build_mesh_status(me, self.mesh, self.routes, self.api))

    async def on_stop(self) -> None:
        self.app.close()
        if self.server is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.serving, 5)
        else:
            self.serving.cancel()
        self.app.close_upstream()


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
