"""The zeroconf glue of LAN discovery: advertise a node (`Advertiser`), listen for
meshes nearby (`browse`). What is sent and what is heard is decided and checked in
`meshllm.mesh.discovery`.

`MESHLLM_MDNS_INTERFACES` (comma-separated IPv4 addresses) limits mDNS to those
interfaces; the tests set it to 127.0.0.1 so that nothing leaves the machine.
By default every IPv4 interface is used.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable

from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceListener, Zeroconf
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshllm.mesh.discovery import SERVICE_TYPE, Advert, Nearby, encode_txt, instance_name
from meshllm.mesh.token import split_address

ENV_INTERFACES = "MESHLLM_MDNS_INTERFACES"


class MdnsError(RuntimeError):
    """mDNS cannot be used as asked (a bad interface, no address to advertise)."""


def interfaces() -> list[str] | InterfaceChoice:
    """The interfaces mDNS uses: `MESHLLM_MDNS_INTERFACES`, else all (IPv4)."""
    text = os.environ.get(ENV_INTERFACES, "").strip()
    if not text:
        return InterfaceChoice.All
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    for address in chosen:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise MdnsError(
                f"{ENV_INTERFACES} takes IPv4 addresses separated by commas, not {address[:40]!r}"
            ) from None
    return chosen


def _ipv4_of(address: str) -> bytes:
    """The IPv4 address an advertised `host:port` resolves to (an A record needs one)."""
    host, _port = split_address(address)
    try:
        return socket.inet_aton(socket.gethostbyname(host))
    except OSError as exc:
        raise MdnsError(f"cannot advertise {address}: {host} has no IPv4 address ({exc})") from None


def service_info(advert: Advert, name: str = "") -> AsyncServiceInfo:
    """The service of `advert`, under `name` (the full service name) if given."""
    instance = instance_name(advert)
    _host, port = split_address(advert.addresses[0])
    return AsyncServiceInfo(
        SERVICE_TYPE,
        name or f"{instance}.{SERVICE_TYPE}",
        addresses=[_ipv4_of(advert.addresses[0])],
        port=port,
        properties=encode_txt(advert),
        server=f"{instance}.local.",
    )


class Advertiser:
    """One node's advertisement on the LAN: `start`, `update` as it changes, `close`."""

    def __init__(self, advert: Advert) -> None:
        self.advert = advert
        self.info = service_info(advert)
        self.zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        self.zeroconf = AsyncZeroconf(interfaces=interfaces(), ip_version=IPVersion.V4Only)
        announced = await self.zeroconf.async_register_service(self.info, allow_name_change=True)
        await announced

    async def update(self, advert: Advert) -> None:
        if advert == self.advert or self.zeroconf is None:
            return
        # The registered name: a name taken by another responder was changed at start.
        info = service_info(advert, self.info.name)
        self.advert, self.info = advert, info
        await (await self.zeroconf.async_update_service(info))

    async def close(self) -> None:
        """Say goodbye (the service is withdrawn at once on listeners) and close the sockets."""
        if self.zeroconf is not None:
            zeroconf, self.zeroconf = self.zeroconf, None
            await zeroconf.async_close()


class _Listener(ServiceListener):
    """Feeds `Nearby` from the browser's thread until the deadline."""

    def __init__(
        self, nearby: Nearby, deadline: float, done: Callable[[Nearby], bool] | None
    ) -> None:
        self.nearby = nearby
        self.deadline = deadline
        self.done = done
        self.finished = threading.Event()

    def _resolve(self, zc: Zeroconf, type_: str, name: str) -> None:
        left_ms = int((self.deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            return
        if self.nearby.full and name not in self.nearby.adverts:
            self.nearby.over_limit()  # not even asked for: the bound is reached
            return
        info = zc.get_service_info(type_, name, timeout=left_ms)
        if info is not None:
            self.nearby.heard(name, info.properties)
            if self.done is not None and self.done(self.nearby):
                self.finished.set()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.nearby.gone(name)


def browse(timeout: float, done: Callable[[Nearby], bool] | None = None) -> Nearby:
    """Listen for `timeout` seconds, or until `done` says that what was heard is enough;
    what was heard."""
    nearby = Nearby()
    zeroconf = Zeroconf(interfaces=interfaces(), ip_version=IPVersion.V4Only)
    try:
        listener = _Listener(nearby, time.monotonic() + timeout, done)
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, listener)
        try:
            listener.finished.wait(timeout)
        finally:
            browser.cancel()  # joins the browser's thread: `nearby` is ours again
    finally:
        zeroconf.close()
    return nearby
