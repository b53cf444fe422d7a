"""Local actor messaging over ZeroMQ.

Every actor binds a ROUTER *mailbox* (`<name>.ipc`) and a PUB socket
(`<name>.pub.ipc`) in the node's run directory. Frames on a mailbox are
`[kind, correlation id, msgpack payload]` where kind is `T` (tell: no reply),
`A` (ask: exactly one reply) or, going back, `R` (reply). Publications are
`[topic, payload]`. Publishers keep the latest value per topic and answer
`GetLatest`, so a subscriber that (re)starts catches up at once instead of
waiting for the next change.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

import msgspec
import zmq
import zmq.asyncio

from meshllm.runtime import messages
from meshllm.runtime.messages import ActorError, Message

log = logging.getLogger(__name__)

TELL = b"T"
ASK = b"A"
REPLY = b"R"

AskHandler = Callable[[Message], Awaitable[Message]]
TellHandler = Callable[[Message], Awaitable[None]]
TopicHandler = Callable[[str, Message], Awaitable[None]]


class AskTimeout(TimeoutError):
    """An ask got no reply within its deadline."""


class Bus:
    """One process's endpoint: its mailbox, its publisher and its outgoing links."""

    def __init__(self, run_dir: str, name: str | None) -> None:
        self.run_dir = run_dir
        self.name = name
        self.ctx = zmq.asyncio.Context()
        self._links: dict[str, zmq.asyncio.Socket] = {}
        self._pending: dict[bytes, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._latest: dict[str, bytes] = {}
        self._topic_seen: dict[str, int] = {}
        """Publications received per topic (a catch-up reply must not undo a newer one)."""
        self.mailbox: zmq.asyncio.Socket | None = None
        self.pub: zmq.asyncio.Socket | None = None
        self.sub: zmq.asyncio.Socket | None = None
        self.malformed = 0

    def address(self, name: str, pub: bool = False) -> str:
        return f"ipc://{self.run_dir}/{name}{'.pub' if pub else ''}.ipc"

    # -- serving ---------------------------------------------------------------

    def serve(self, on_tell: TellHandler, on_ask: AskHandler) -> None:
        """Bind this actor's mailbox and publisher and start dispatching."""
        assert self.name is not None
        self.mailbox = self.ctx.socket(zmq.ROUTER)
        self.mailbox.setsockopt(zmq.LINGER, 0)
        self.mailbox.bind(self.address(self.name))
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.address(self.name, pub=True))
        self._spawn(self._serve_mailbox(on_tell, on_ask))

    async def _serve_mailbox(self, on_tell: TellHandler, on_ask: AskHandler) -> None:
        assert self.mailbox is not None
        while True:
            frames = await self.mailbox.recv_multipart()
            if len(frames) != 4:
                self.malformed += 1
                continue
            ident, kind, corr, payload = frames
            try:
                msg = messages.decode(payload)
            except msgspec.DecodeError as exc:
                self.malformed += 1
                log.warning("dropped malformed message: %s", exc)
                if kind == ASK:
                    await self._reply(ident, corr, ActorError(f"malformed message: {exc}"))
                continue
            if kind == TELL:
                self._spawn(self._run_tell(on_tell, msg))
            elif kind == ASK:
                self._spawn(self._run_ask(on_ask, ident, corr, msg))
            else:
                self.malformed += 1

    async def _run_tell(self, on_tell: TellHandler, msg: Message) -> None:
        try:
            await on_tell(msg)
        except Exception:
            # A failed tell is the actor's own failure (pykka's rule): log and let
            # the supervisor restart it if it keeps going wrong.
            log.exception("tell %s failed", type(msg).__name__)

    async def _run_ask(self, on_ask: AskHandler, ident: bytes, corr: bytes, msg: Message) -> None:
        reply: Message
        if isinstance(msg, messages.GetLatest):
            latest = self._latest.get(msg.topic)
            reply = messages.decode(latest) if latest else messages.Nothing()
        else:
            try:
                reply = await on_ask(msg)
            except Exception as exc:
                # A failed ask returns the error to the asker.
                log.exception("ask %s failed", type(msg).__name__)
                reply = ActorError(f"{type(exc).__name__}: {exc}")
        await self._reply(ident, corr, reply)

    async def _reply(self, ident: bytes, corr: bytes, reply: Message) -> None:
        assert self.mailbox is not None
        await self.mailbox.send_multipart([ident, REPLY, corr, messages.encode(reply)])

    # -- publishing ------------------------------------------------------------

    async def publish(self, topic: str, msg: Message) -> None:
        payload = messages.encode(msg)
        self._latest[topic] = payload
        assert self.pub is not None
        await self.pub.send_multipart([topic.encode(), payload])

    async def republish(self) -> None:
        """Send every latest value again (covers ZeroMQ's slow-joiner gap)."""
        assert self.pub is not None
        for topic, payload in self._latest.items():
            await self.pub.send_multipart([topic.encode(), payload])

    def subscribe(self, publisher: str, topics: list[str], on_topic: TopicHandler) -> None:
        if self.sub is None:
            self.sub = self.ctx.socket(zmq.SUB)
            self.sub.setsockopt(zmq.LINGER, 0)
            self._spawn(self._serve_sub(on_topic))
        self.sub.connect(self.address(publisher, pub=True))
        for topic in topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())

    async def catch_up(self, publisher: str, topics: list[str], on_topic: TopicHandler) -> None:
        """Fetch the publisher's latest values, so a (re)start need not wait for a change."""
        for topic in topics:
            for _ in range(20):
                seen = self._topic_seen.get(topic, 0)
                try:
                    latest = await self.ask(publisher, messages.GetLatest(topic), timeout=0.5)
                except AskTimeout:
                    continue
                # A publication that arrived while we asked is at least as new: keep it.
                fresh = self._topic_seen.get(topic, 0) == seen
                if fresh and not isinstance(latest, messages.Nothing | ActorError):
                    await on_topic(topic, latest)
                break

    async def _serve_sub(self, on_topic: TopicHandler) -> None:
        assert self.sub is not None
        while True:
            frames = await self.sub.recv_multipart()
            if len(frames) != 2:
                self.malformed += 1
                continue
            try:
                msg = messages.decode(frames[1])
            except msgspec.DecodeError:
                self.malformed += 1
                continue
            topic = frames[0].decode(errors="replace")
            self._topic_seen[topic] = self._topic_seen.get(topic, 0) + 1
            try:
                await on_topic(topic, msg)
            except Exception:
                log.exception("handling topic %r failed", topic)

    # -- sending ---------------------------------------------------------------

    def _link(self, target: str) -> zmq.asyncio.Socket:
        sock = self._links.get(target)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.address(target))
            self._links[target] = sock
            self._spawn(self._read_replies(sock))
        return sock

    async def _read_replies(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or frames[0] != REPLY:
                self.malformed += 1
                continue
            future = self._pending.pop(frames[1], None)
            if future is None or future.done():
                continue
            try:
                future.set_result(messages.decode(frames[2]))
            except msgspec.DecodeError as exc:
                future.set_exception(exc)

    async def tell(self, target: str, msg: Message) -> None:
        await self._link(target).send_multipart([TELL, b"", messages.encode(msg)])

    async def ask(self, target: str, msg: Message, timeout: float = 5.0) -> Message:
        """Send `msg` to `target` and wait for its reply; raises `AskTimeout`."""
        corr = str(next(self._ids)).encode()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[corr] = future
        try:
            await self._link(target).send_multipart([ASK, corr, messages.encode(msg)])
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise AskTimeout(
                f"{target} did not answer {type(msg).__name__} in {timeout}s"
            ) from None
        finally:
            self._pending.pop(corr, None)

    # -- lifecycle -------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("bus task failed: %r", exc)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.ctx.destroy(linger=0)


async def ask_address(address: str, msg: Message, timeout: float = 5.0) -> Message:
    """One ask to a mailbox at `address`, from a throwaway socket (used by `meshllm ctl`)."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        await sock.send_multipart([ASK, b"1", messages.encode(msg)])
        if not await sock.poll(int(timeout * 1000)):
            raise AskTimeout(f"no answer from {address} in {timeout}s")
        frames = await sock.recv_multipart()
        if len(frames) != 3 or frames[0] != REPLY:
            raise ValueError(f"malformed reply from {address}")
        return messages.decode(frames[2])
    finally:
        ctx.destroy(linger=0)
