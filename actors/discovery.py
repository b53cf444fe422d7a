"""Discovery: advertise this node's mesh on the local network over mDNS (`up --discover`).

Glue around `meshllm.mesh.mdns.Advertiser`: the advertisement (mesh id, node id,
gossip address; never the secret) is built once from the config, and its models
follow the mesh view, re-announced at most every `UPDATE_INTERVAL_S`. A network
without multicast costs a warning, never the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import msgspec

from meshllm import __version__
from meshllm.mesh.discovery import Advert
from meshllm.mesh.mdns import ENV_INTERFACES, Advertiser, MdnsError
from meshllm.mesh.token import mesh_id_of
from meshllm.runtime import messages as m
from meshllm.runtime.actor import Actor

UPDATE_INTERVAL_S = 5.0
"""Least time between two re-announcements (multicast is shared by the whole LAN)."""


def advertised_models(view: m.MeshView) -> tuple[str, ...]:
    """The models a mesh view shows served or asked for, sorted."""
    nodes = [*view.peers, *([view.me] if view.me is not None else [])]
    names = {p.serving for p in nodes if p.serving}
    names |= {name for p in nodes for name in (*p.requested_models, *p.backend_models)}
    return tuple(sorted(names))


class Discovery(Actor):
    name = "discovery"
    subscriptions = {"gossiper": ["mesh"]}

    async def on_start(self) -> None:
        cfg = self.config
        self.advert = Advert(
            mesh_id=mesh_id_of(cfg.mesh_secret),
            node_id=cfg.node_id,
            addresses=(f"{cfg.advertise_host}:{cfg.gossip_port}",),
            models=tuple(dict.fromkeys([s.name for s in cfg.models] + [*cfg.backend_models])),
            version=__version__,
        )
        self.advertiser: Advertiser | None = None
        self.update_task: asyncio.Task[None] | None = None
        self.start_task = asyncio.create_task(self._start())

    async def _start(self) -> None:
        try:
            advertiser = Advertiser(self.advert)
        except MdnsError as exc:
            self.log.warning("cannot advertise the mesh on the local network: %s", exc)
            return
        self.advertiser = advertiser  # closed by on_stop, even while it starts
        try:
            await advertiser.start()
        except Exception as exc:  # no multicast, a name conflict: the node runs on
            self.log.warning("cannot advertise the mesh on the local network: %r", exc)
            self.advertiser = None
            await advertiser.close()
            return
        self.log.info(
            "advertising mesh %s on the local network (mDNS) at %s",
            self.advert.mesh_id,
            ", ".join(self.advert.addresses),
        )
        if self.config.advertise_host.startswith("127.") and not os.environ.get(ENV_INTERFACES):
            self.log.warning(
                "the advertised address %s is loopback: other machines cannot dial it "
                "(start with --bind 0.0.0.0:PORT or --advertise HOST)",
                self.config.advertise_host,
            )

    async def on_topic(self, topic: str, msg: m.Message) -> None:
        if not isinstance(msg, m.MeshView):
            return
        models = advertised_models(msg)
        if models != self.advert.models:
            self.advert = msgspec.structs.replace(self.advert, models=models)
            if self.update_task is None or self.update_task.done():
                self.update_task = asyncio.create_task(self._update_soon())

    async def _update_soon(self) -> None:
        """Re-announce the latest advertisement, then wait out the interval (changes in
        between are taken by the next call)."""
        await self.start_task
        if self.advertiser is None or self.advertiser.zeroconf is None:
            return
        try:
            await self.advertiser.update(self.advert)
        except Exception as exc:  # a failed update costs this update, not the actor
            self.log.warning("re-announcing the mesh failed: %r", exc)
        await asyncio.sleep(UPDATE_INTERVAL_S)
        if self.advert != self.advertiser.advert:
            self.update_task = asyncio.create_task(self._update_soon())

    async def on_stop(self) -> None:
        for task in (self.start_task, self.update_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.advertiser is not None:
            with contextlib.suppress(Exception):
                await self.advertiser.close()
