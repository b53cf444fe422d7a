"""LAN discovery's zeroconf glue (meshllm.mesh.mdns), in one process on loopback: an
advertised node is heard, and so is its update; nothing leaves the machine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import ifaddr
import pytest

from meshllm.mesh import mdns
from meshllm.mesh.discovery import Advert, Nearby
from meshllm.mesh.token import mesh_id_of
from meshllm.testing import wait_for

MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux's value; Python names it on few builds
WAIT_S = 20.0
"""Deadline for hearing what was advertised (a loaded machine)."""


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mdns.ENV_INTERFACES, "127.0.0.1")


class Sentinel:
    """Every mDNS packet this machine sees, with the interface it came in on. A packet
    sent out of another interface comes back here too (multicast loop), with that
    interface's index."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.sock.bind(("", MDNS_PORT))
        self.local: set[str] = set()
        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if isinstance(ip.ip, str):
                    self.local.add(ip.ip)
                    membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(ip.ip)
                    with contextlib.suppress(OSError):
                        self.sock.setsockopt(
                            socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership
                        )
        self.sock.settimeout(0.1)
        self.heard: list[tuple[int, str]] = []
        """(interface index, source address) of each packet."""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            try:
                _data, ancillary, _flags, source = self.sock.recvmsg(9000, 64)
            except TimeoutError:
                continue
            for level, kind, data in ancillary:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    index = struct.unpack("I", data[:4])[0]
                    self.heard.append((index, source[0]))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def sentinel() -> Iterator[Sentinel]:
    s = Sentinel()
    try:
        yield s
    finally:
        s.close()


def lo_index() -> int:
    return socket.if_nametoindex("lo")


def send_canary(sentinel: Sentinel) -> str:
    """One packet out of the first non-loopback IPv4 interface, with TTL 0: looped back to
    this machine, never put on the wire. Returns its source address ("" if none)."""
    others = sorted(ip for ip in sentinel.local if not ip.startswith("127."))
    if not others:
        return ""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(others[0]))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.bind((others[0], 0))
        sock.sendto(b"canary", (MDNS_GROUP, MDNS_PORT))
    return others[0]


def wait_until(condition: Callable[[], bool]) -> None:
    wait_for(condition, WAIT_S, "the sentinel to hear the canary")


def make_advert(node_id: str, models: tuple[str, ...] = ("m1",)) -> Advert:
    return Advert(
        mesh_id=mesh_id_of(b"s" * 32),
        node_id=node_id,
        addresses=("127.0.0.1:40000",),
        models=models,
        version="0.1.0",
    )


def test_interfaces_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mdns.ENV_INTERFACES, " 127.0.0.1 , 10.0.0.1")
    assert mdns.interfaces() == ["127.0.0.1", "10.0.0.1"]
    monkeypatch.setenv(mdns.ENV_INTERFACES, "eth0")
    with pytest.raises(mdns.MdnsError, match="IPv4 addresses"):
        mdns.interfaces()
    monkeypatch.delenv(mdns.ENV_INTERFACES)
    assert mdns.interfaces() == mdns.InterfaceChoice.All


def test_advertised_nodes_are_heard_updated_and_withdrawn(sentinel: Sentinel) -> None:
    first, second = make_advert("a" * 16), make_advert("b" * 16, models=())

    def has(node_id: str, model: str | None = None) -> Callable[[Nearby], bool]:
        def check(nearby: Nearby) -> bool:
            return any(
                a.node_id == node_id and (model is None or model in a.models)
                for a in nearby.adverts.values()
            )

        return check

    async def scenario() -> None:
        one, two = mdns.Advertiser(first), mdns.Advertiser(second)
        try:
            await asyncio.gather(one.start(), two.start())
            nearby = await asyncio.to_thread(
                mdns.browse, WAIT_S, lambda n: has("a" * 16)(n) and has("b" * 16)(n)
            )
            [mesh] = nearby.meshes()
            assert {a.node_id for a in mesh.nodes} == {"a" * 16, "b" * 16}
            assert mesh.models == ("m1",) and nearby.refused == 0
            assert all(a.addresses == ("127.0.0.1:40000",) for a in mesh.nodes)

            await two.update(make_advert("b" * 16, models=("m2",)))
            nearby = await asyncio.to_thread(
                mdns.browse, WAIT_S, lambda n: has("a" * 16)(n) and has("b" * 16, "m2")(n)
            )
            assert nearby.meshes()[0].models == ("m1", "m2")
        finally:
            await asyncio.gather(one.close(), two.close())
        # Withdrawn: a fresh listener hears no one (it listens for a short while).
        nearby = await asyncio.to_thread(mdns.browse, 1.0)
        assert nearby.meshes() == []

    asyncio.run(scenario())
    canary = send_canary(sentinel)
    wait_until(lambda: (canary in {src for _i, src in sentinel.heard}) or not canary)
    sentinel.close()
    assert sentinel.heard, "the sentinel heard nothing: it cannot vouch for anything"
    if canary:  # proof that the sentinel sees a packet sent out of another interface
        assert any(src == canary and i != lo_index() for i, src in sentinel.heard)
        sentinel.heard = [(i, src) for i, src in sentinel.heard if src != canary]
    beyond = [(i, src) for i, src in sentinel.heard if i != lo_index() and src in sentinel.local]
    assert beyond == [], f"mDNS packets from this machine on other interfaces: {beyond[:5]}"


def test_garbage_from_a_hostile_host_is_counted_and_ignored(sentinel: Sentinel) -> None:
    """Services of our type with every field wrong, next to a good one: `browse` keeps the
    good one and counts the rest, and what it prints is plain text."""
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    from meshllm.mesh.discovery import SERVICE_TYPE, format_nearby

    garbage = [
        {"v": "1", "mesh": "\x1b[2J", "node": "x", "a0": "nowhere"},
        {"v": "1", "mesh": "0" * 12, "node": "0" * 16, "a0": "127.0.0.1:1", "m0": "a/\x9b"},
        {"v": "7", "junk": "y" * 200},
        {b"\xff\xfe": b"\x00" * 100},
    ]

    async def scenario() -> Nearby:
        good = mdns.Advertiser(make_advert("c" * 16))
        hostile = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=mdns.IPVersion.V4Only)
        try:
            infos = [
                AsyncServiceInfo(
                    SERVICE_TYPE,
                    f"evil-{i}.{SERVICE_TYPE}",
                    addresses=[socket.inet_aton("127.0.0.1")],
                    port=1,
                    properties=props,  # type: ignore[arg-type]
                    server=f"evil-{i}.local.",
                )
                for i, props in enumerate(garbage)
            ]
            announced = await asyncio.gather(*map(hostile.async_register_service, infos))
            await asyncio.gather(good.start(), *announced)

            def done(nearby: Nearby) -> bool:
                return nearby.refused >= len(garbage) and len(nearby.adverts) >= 1

            return await asyncio.to_thread(mdns.browse, WAIT_S, done)
        finally:
            await asyncio.gather(good.close(), hostile.async_close())

    nearby = asyncio.run(scenario())
    assert [a.node_id for a in nearby.adverts.values()] == ["c" * 16]
    assert nearby.refused == len(garbage)
    text = format_nearby(nearby)
    assert f"ignored {len(garbage)} advertisement(s)" in text
    assert all(c.isprintable() for c in text.replace("\n", ""))
