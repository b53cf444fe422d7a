"""The actor base class and the entry point of every actor process.

An actor is one OS process started by the root (`meshllm up`) with the spawn
context. It owns a `Bus`: a mailbox for tells and asks and a publisher for
state. Subclasses override the hooks; they never block the event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from typing import Any, ClassVar

import uvloop

from meshllm.runtime import logs
from meshllm.runtime.bus import Bus
from meshllm.runtime.config import NodeConfig
from meshllm.runtime.messages import ActorError, Message, Shutdown
from meshllm.runtime.procutil import die_with_parent

REPUBLISH_INTERVAL_S = 1.0
ON_STOP_BUDGET_S = 6.0
"""Less than the root's grace (runtime.STOP_GRACE_S) before it terminates an actor."""


class Actor:
    """Base class: `on_start`, `on_stop`, `on_tell`, `on_ask`, `on_topic` hooks."""

    name: ClassVar[str]
    subscriptions: ClassVar[dict[str, list[str]]] = {}
    """Publisher actor name -> topics this actor follows."""

    def __init__(self, config: NodeConfig, resources: dict[str, Any] | None = None) -> None:
        self.config = config
        self.resources = resources or {}
        self.log = logging.getLogger(f"meshllm.{self.name}")
        self.bus = Bus(config.run_dir, self.name)
        self.stopping = asyncio.Event()

    # -- hooks -----------------------------------------------------------------

    async def on_start(self) -> None:
        """Called once the mailbox is bound."""

    async def on_stop(self) -> None:
        """Called on shutdown; release what the actor owns (child processes!)."""

    async def on_tell(self, msg: Message) -> None:
        self.log.warning("ignored tell %s", type(msg).__name__)

    async def on_ask(self, msg: Message) -> Message:
        return ActorError(f"{self.name} does not answer {type(msg).__name__}")

    async def on_topic(self, topic: str, msg: Message) -> None:
        """A publication on a followed topic arrived."""

    # -- plumbing --------------------------------------------------------------

    async def _dispatch_tell(self, msg: Message) -> None:
        if isinstance(msg, Shutdown):
            self.log.info("shutting down: %s", msg.reason or "asked to")
            self.stopping.set()
        else:
            await self.on_tell(msg)

    async def _dispatch_ask(self, msg: Message) -> Message:
        return await self.on_ask(msg)

    async def _republish_forever(self) -> None:
        while True:
            await asyncio.sleep(REPUBLISH_INTERVAL_S)
            await self.bus.republish()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        self.bus.serve(self._dispatch_tell, self._dispatch_ask)
        for publisher, topics in self.subscriptions.items():
            self.bus.subscribe(publisher, topics, self.on_topic)
        await self.on_start()
        helpers = [asyncio.create_task(self._republish_forever())]
        helpers += [
            asyncio.create_task(self.bus.catch_up(publisher, topics, self.on_topic))
            for publisher, topics in self.subscriptions.items()
        ]
        try:
            await self.stopping.wait()
        finally:
            for task in helpers:
                task.cancel()
            try:
                await asyncio.wait_for(self.on_stop(), ON_STOP_BUDGET_S)
            except Exception:
                self.log.exception("on_stop failed")
            self.bus.close()


def actor_main(target: str, config: NodeConfig, resources: dict[str, Any]) -> None:
    """Entry point of an actor process (`target` is `module:Class`)."""
    die_with_parent(signal.SIGTERM)
    # Ctrl-C reaches the whole process group; only the root reacts to it and then
    # tells every actor to stop, so there is one shutdown path.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    logs.setup(config.options.log_level, cls.name)
    uvloop.run(cls(config, resources).run())
