"""Local actor messaging (meshllm.runtime.bus): two Bus endpoints in one process over ipc://."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import msgspec
import pytest
import zmq
import zmq.asyncio

from meshllm.runtime import messages as m
from meshllm.runtime.bus import ASK, REPLY, TELL, AskTimeout, Bus, ask_address

T = TypeVar("T")
WAIT_S = 5.0


@pytest.fixture
def run_dir() -> Iterator[str]:
    # ipc:// paths must stay short (about 100 bytes), so not pytest's tmp_path.
    path = tempfile.mkdtemp(prefix="mbus-", dir="/tmp")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (last := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last saw {last!r}")
        await asyncio.sleep(0.005)


class Actor:
    """A bus endpoint that records tells and answers asks with `answer`."""

    def __init__(
        self,
        run_dir: str,
        name: str,
        answer: Callable[[m.Message], Awaitable[m.Message]] | None = None,
    ) -> None:
        self.bus = Bus(run_dir, name)
        self.told: list[m.Message] = []
        self.asked: list[m.Message] = []
        self.answer = answer
        self.bus.serve(self.on_tell, self.on_ask)

    async def on_tell(self, msg: m.Message) -> None:
        self.told.append(msg)
        if isinstance(msg, m.Shutdown) and msg.reason == "fail":
            raise RuntimeError("tell handler failed")

    async def on_ask(self, msg: m.Message) -> m.Message:
        self.asked.append(msg)
        if self.answer is not None:
            return await self.answer(msg)
        return m.CtlDone(str(self.bus.name))


async def echo(msg: m.Message) -> m.Message:
    assert isinstance(msg, m.Shutdown)
    await asyncio.sleep(0.001 * (hash(msg.reason) % 5))  # replies come back out of order
    return m.CtlDone(msg.reason)


def test_tell(run_dir: str) -> None:
    async def main() -> None:
        a, b = Actor(run_dir, "a"), Bus(run_dir, "b")
        try:
            await b.tell("a", m.DropModel("x"))
            await b.tell("a", m.GetStatus())
            await wait_until(lambda: len(a.told) == 2, "two tells")
            assert a.told == [m.DropModel("x"), m.GetStatus()]
            assert a.asked == []
        finally:
            a.bus.close()
            b.close()

    run(main())


def test_ask_reply(run_dir: str) -> None:
    async def main() -> None:
        a, b = Actor(run_dir, "a"), Bus(run_dir, None)  # an asker needs no mailbox
        try:
            assert await b.ask("a", m.GetStatus(), timeout=WAIT_S) == m.CtlDone("a")
            assert a.asked == [m.GetStatus()]
        finally:
            a.bus.close()
            b.close()

    run(main())


def test_concurrent_asks_get_their_own_replies(run_dir: str) -> None:
    async def main() -> None:
        a, b = Actor(run_dir, "a", echo), Bus(run_dir, "b")
        try:
            replies = await asyncio.gather(
                *(b.ask("a", m.Shutdown(str(i)), timeout=WAIT_S) for i in range(50))
            )
            assert replies == [m.CtlDone(str(i)) for i in range(50)]
        finally:
            a.bus.close()
            b.close()

    run(main())


def test_both_directions(run_dir: str) -> None:
    async def main() -> None:
        a, b = Actor(run_dir, "a"), Actor(run_dir, "b")
        try:
            assert await a.bus.ask("b", m.GetStatus(), timeout=WAIT_S) == m.CtlDone("b")
            assert await b.bus.ask("a", m.GetStatus(), timeout=WAIT_S) == m.CtlDone("a")
        finally:
            a.bus.close()
            b.bus.close()

    run(main())


def test_ask_timeout_when_nobody_listens(run_dir: str) -> None:
    async def main() -> None:
        b = Bus(run_dir, "b")
        try:
            with pytest.raises(AskTimeout, match=r"nobody did not answer GetStatus in 0\.2s"):
                await b.ask("nobody", m.GetStatus(), timeout=0.2)
            assert b._pending == {}
        finally:
            b.close()

    run(main())


def test_ask_timeout_on_a_slow_handler_then_later_asks_work(run_dir: str) -> None:
    async def slow(msg: m.Message) -> m.Message:
        if isinstance(msg, m.Shutdown) and msg.reason == "slow":
            await asyncio.sleep(0.3)
        return m.CtlDone(msg.reason if isinstance(msg, m.Shutdown) else "")

    async def main() -> None:
        a, b = Actor(run_dir, "a", slow), Bus(run_dir, "b")
        try:
            with pytest.raises(AskTimeout):
                await b.ask("a", m.Shutdown("slow"), timeout=0.1)
            assert await b.ask("a", m.Shutdown("fast"), timeout=WAIT_S) == m.CtlDone("fast")
            await asyncio.sleep(0.4)  # the late reply to the timed-out ask arrives, dropped
            assert await b.ask("a", m.Shutdown("again"), timeout=WAIT_S) == m.CtlDone("again")
            assert b.malformed == 0
        finally:
            a.bus.close()
            b.close()

    run(main())


def test_failed_ask_returns_actor_error(run_dir: str) -> None:
    async def failing(msg: m.Message) -> m.Message:
        raise ValueError("no such model")

    async def main() -> None:
        a, b = Actor(run_dir, "a", failing), Bus(run_dir, "b")
        try:
            reply = await b.ask("a", m.DropModel("x"), timeout=WAIT_S)
            assert reply == m.ActorError("ValueError: no such model")
            # the mailbox still works afterwards
            a.answer = None
            assert isinstance(await b.ask("a", m.GetStatus(), timeout=WAIT_S), m.CtlDone)
        finally:
            a.bus.close()
            b.close()

    run(main())


def test_failed_tell_does_not_break_the_mailbox(run_dir: str) -> None:
    async def main() -> None:
        a, b = Actor(run_dir, "a"), Bus(run_dir, "b")
        try:
            await b.tell("a", m.Shutdown("fail"))
            await wait_until(lambda: a.told, "the failing tell")
            assert isinstance(await b.ask("a", m.GetStatus(), timeout=WAIT_S), m.CtlDone)
        finally:
            a.bus.close()
            b.close()

    run(main())


def test_publish_subscribe(run_dir: str) -> None:
    table = m.RouteTable((m.ModelRoute("demo", (m.RouteTarget("n1", True, 8001),), ("n1",)),))

    async def main() -> None:
        a, b = Actor(run_dir, "a"), Bus(run_dir, "b")
        got: list[tuple[str, m.Message]] = []

        async def on_topic(topic: str, msg: m.Message) -> None:
            got.append((topic, msg))

        try:
            b.subscribe("a", ["routes"], on_topic)
            await a.bus.publish("server", m.LocalServerState(model="x"))
            await a.bus.publish("routes", table)
            # ZeroMQ's slow joiner: a fresh subscription can miss the first sends.
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while not got:
                assert asyncio.get_running_loop().time() < deadline, "no publication arrived"
                await a.bus.republish()
                await asyncio.sleep(0.02)
            assert all(topic == "routes" for topic, _ in got), got
            assert got[0] == ("routes", table)
            got.clear()
            await a.bus.publish("routes", m.RouteTable())
            await wait_until(lambda: got, "the second publication")
            assert got == [("routes", m.RouteTable())]
        finally:
            a.bus.close()
            b.close()

    run(main())


def test_get_latest(run_dir: str) -> None:
    async def main() -> None:
        a, b = Actor(run_dir, "a"), Bus(run_dir, "b")
        try:
            ask = b.ask
            assert await ask("a", m.GetLatest("routes"), timeout=WAIT_S) == m.Nothing()
            await a.bus.publish("routes", m.RouteTable((m.ModelRoute("old"),)))
            await a.bus.publish("server", m.LocalServerState(model="x", state="ready"))
            await a.bus.publish("routes", m.RouteTable((m.ModelRoute("new"),)))
            assert await ask("a", m.GetLatest("routes"), timeout=WAIT_S) == m.RouteTable(
                (m.ModelRoute("new"),)
            )
            assert await ask("a", m.GetLatest("server"), timeout=WAIT_S) == m.LocalServerState(
                model="x", state="ready"
            )
            assert await ask("a", m.GetLatest("other"), timeout=WAIT_S) == m.Nothing()
            assert a.asked == [], "GetLatest is answered by the bus, not the actor"
        finally:
            a.bus.close()
            b.close()

    run(main())


def test_malformed_frames_are_counted_and_do_not_break_the_mailbox(run_dir: str) -> None:
    async def main() -> None:
        a, b = Actor(run_dir, "a"), Bus(run_dir, "b")
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(a.bus.address("a"))
        try:
            await raw.send_multipart([b"garbage"])  # wrong frame count
            await raw.send_multipart([TELL, b"", b"\xc1 not msgpack"])
            await raw.send_multipart([b"X", b"", m.encode(m.GetStatus())])  # unknown kind
            await raw.send_multipart([TELL, b"", b"", b"", b""])  # too many frames
            await raw.send_multipart([ASK, b"9", msgspec.msgpack.encode({"type": "Nope"})])
            # a malformed ask still gets an answer, so its asker does not hang
            assert await raw.poll(int(WAIT_S * 1000)), "no reply to the malformed ask"
            kind, corr, payload = await raw.recv_multipart()
            assert (kind, corr) == (REPLY, b"9")
            reply = m.decode(payload)
            assert isinstance(reply, m.ActorError) and "malformed" in reply.message
            await wait_until(lambda: a.bus.malformed == 5, "five malformed frames")
            assert a.told == [] and a.asked == []
            assert await b.ask("a", m.GetStatus(), timeout=WAIT_S) == m.CtlDone("a")
            await b.tell("a", m.GetStatus())
            await wait_until(lambda: a.told == [m.GetStatus()], "a good tell")
        finally:
            ctx.destroy(linger=0)
            a.bus.close()
            b.close()

    run(main())


def test_malformed_reply_is_counted_by_the_asker(run_dir: str) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        fake = ctx.socket(zmq.ROUTER)
        fake.setsockopt(zmq.LINGER, 0)
        b = Bus(run_dir, "b")
        fake.bind(b.address("fake"))
        try:
            ask = asyncio.ensure_future(b.ask("fake", m.GetStatus(), timeout=WAIT_S))
            ident, kind, corr, _ = await asyncio.wait_for(fake.recv_multipart(), WAIT_S)
            assert kind == ASK
            await fake.send_multipart([ident, b"junk"])
            await fake.send_multipart([ident, REPLY, corr, m.encode(m.CtlDone("fake"))])
            assert await ask == m.CtlDone("fake")
            assert b.malformed == 1
        finally:
            ctx.destroy(linger=0)
            b.close()

    run(main())


def test_ask_address(run_dir: str) -> None:
    async def main() -> None:
        a = Actor(run_dir, "a")
        try:
            reply = await ask_address(a.bus.address("a"), m.GetStatus(), timeout=WAIT_S)
            assert reply == m.CtlDone("a")
            with pytest.raises(AskTimeout):
                await ask_address(a.bus.address("nobody"), m.GetStatus(), timeout=0.2)
        finally:
            a.bus.close()

    run(main())


def test_catch_up_never_undoes_a_newer_publication(run_dir: str) -> None:
    async def main() -> None:
        bus = Bus(run_dir, None)
        seen: list[m.Message] = []

        async def stale_ask(target: str, msg: m.Message, timeout: float = 5.0) -> m.Message:
            # A publication arrives while the ask is in flight: the reply is older.
            bus._topic_seen["local"] = bus._topic_seen.get("local", 0) + 1
            return m.LocalServerState(model="stale")

        async def on_topic(topic: str, msg: m.Message) -> None:
            seen.append(msg)

        bus.ask = stale_ask  # type: ignore[method-assign]
        try:
            await bus.catch_up("server_supervisor", ["local"], on_topic)
        finally:
            bus.close()
        assert seen == []

    run(main())
