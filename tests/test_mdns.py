"""LAN discovery's zeroconf glue (meshllm.mesh.mdns), in one process on loopback: an
advertised node is heard, and so is its update. Every zeroconf instance here is bound
to 127.0.0.1 (`MESHLLM_MDNS_INTERFACES`), so nothing is sent beyond loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from meshllm.mesh import mdns
from meshllm.mesh.discovery import Advert, Nearby
from meshllm.mesh.token import mesh_id_of

WAIT_S = 20.0
"""Deadline for hearing what was advertised (a loaded machine)."""


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mdns.ENV_INTERFACES, "127.0.0.1")


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


def test_advertised_nodes_are_heard_updated_and_withdrawn() -> None:
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


def test_garbage_from_a_hostile_host_is_counted_and_ignored() -> None:
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
