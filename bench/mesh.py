"""Several real nodes on loopback for the mesh sections: start, ask, kill -9, always stop.

Built on `meshllm.testing.NodeProcess`, the harness the tests use too. The
mesh sections also need lite clients (no llama-server), nodes that are started
without waiting (to time a join), a kill -9 of a node's whole process tree, and
cheap status polls. Polls go to each node's control socket (what `meshllm ctl
status --json` asks) over one persistent ZeroMQ socket per node, so polling
every few tens of milliseconds costs the nodes little.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from bench.common import REPO
from bench.proxy import new_loop
from meshllm.runtime import messages
from meshllm.runtime.bus import ASK, REPLY
from meshllm.testing import NodeError, NodeProcess

LOOPBACK_BIND = ("--bind", "127.0.0.1:0")
T = TypeVar("T")

MeshError = NodeError
"""What the mesh sections catch: a node exited, or a wait ran out."""


class MeshNode(NodeProcess):
    """One `meshllm up` process of a mesh section, known by a short name."""

    def __init__(self, name: str, home: Path, *args: str, repo: Path | None = None) -> None:
        super().__init__(home, *args, cwd=repo or REPO)
        self.name = name
        self.node_id = ""
        """Filled in by the first status that answers (`StatusClient.status`)."""
        self.extra: dict[str, Any] = {}

    @property
    def api_port(self) -> int:
        """The API port once known (`NodeProcess.port`)."""
        return self.port

    @api_port.setter
    def api_port(self, port: int) -> None:
        self.port = port

    def token(self) -> str:
        return self.token_from_log()


def start_node(
    name: str, *args: str, repo: Path | None = None, home: Path | None = None
) -> MeshNode:
    """Start `meshllm up --home TMP --port 0 ARGS` and return at once (nothing awaited)."""
    home = home or Path(tempfile.mkdtemp(prefix=f"meshllm-bench-{name}-"))
    node = MeshNode(name, home, *args, repo=repo)
    node.start(wait=False)
    return node


async def wait_until(what: str, nodes: Iterable[MeshNode], timeout: float, probe: Any) -> Any:
    """Poll `probe()` (sync or async) every 20 ms until truthy; fail if a node exits."""
    deadline = time.monotonic() + timeout
    last: Any = None
    watched = list(nodes)
    while time.monotonic() < deadline:
        for node in watched:
            node.check_alive()
        try:
            last = probe()
            if asyncio.iscoroutine(last):
                last = await last
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.02)
    raise MeshError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")


async def wait_api(node: MeshNode, timeout: float = 60) -> int:
    """The node's API port once it answers `GET /v1/models` (200)."""

    async def probe() -> int:
        port = node.api_port or node.port_from_log()
        if not port:
            return 0
        node.api_port = port
        return port if await http_get_status(port, "/v1/models") == 200 else 0

    port: int = await wait_until(f"the API of {node.name}", [node], timeout, probe)
    return port


async def http_get_status(port: int, path: str, timeout: float = 2.0) -> int:
    """The status code of `GET path` on 127.0.0.1:port (0 when nothing answers)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode()
                )
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return 0
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


def kill_tree(node: MeshNode) -> list[int]:
    """kill -9 as a machine losing power (`NodeProcess.kill_tree`); returns the pids."""
    return node.kill_tree()


def run_on_mesh(section: str, measure: Callable[[list[MeshNode]], Coroutine[Any, Any, T]]) -> T:
    """Run a mesh section's `measure(nodes)` on a fresh uvloop; the nodes it adds to the
    list are always stopped, and a node failing ends the section with its message."""
    nodes: list[MeshNode] = []
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            return runner.run(measure(nodes))
    except MeshError as exc:
        raise SystemExit(f"{section}: {exc}") from None
    finally:
        stop_all(nodes)


def stop_all(nodes: Iterable[MeshNode], grace_s: float = 15.0) -> None:
    """SIGTERM every node at once, wait, then SIGKILL each process group; remove the homes."""
    nodes = list(nodes)
    for node in nodes:
        node.terminate()
    deadline = time.monotonic() + grace_s
    for node in nodes:
        node.stop(grace_s=max(0.1, deadline - time.monotonic()))
        shutil.rmtree(node.home, ignore_errors=True)


class StatusClient:
    """`meshllm ctl status` without a subprocess: one DEALER socket per node's control socket."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.socks: dict[Path, zmq.asyncio.Socket] = {}
        self.ids = itertools.count(1)
        self.asks = 0

    def _sock(self, node: MeshNode) -> zmq.asyncio.Socket:
        sock = self.socks.get(node.home)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 10)
            sock.connect(f"ipc://{node.control_path}")
            self.socks[node.home] = sock
        return sock

    def forget(self, node: MeshNode) -> None:
        sock = self.socks.pop(node.home, None)
        if sock is not None:
            sock.close(0)

    async def status(self, node: MeshNode, timeout: float = 2.0) -> messages.NodeStatus | None:
        """The node's status, or None if it did not answer in time (or is not up yet)."""
        if node.killed or not node.control_path.exists():
            return None
        sock = self._sock(node)
        rid = str(next(self.ids)).encode()
        self.asks += 1
        await sock.send_multipart([ASK, rid, messages.encode(messages.GetStatus())])
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not await sock.poll(int(left * 1000) + 1):
                break
            frames = await sock.recv_multipart()
            if len(frames) == 3 and frames[0] == REPLY and frames[1] == rid:
                reply = messages.decode(frames[2])
                if isinstance(reply, messages.NodeStatus):
                    if not node.node_id:
                        node.node_id = reply.node_id
                    return reply
                return None
            # else: a late reply to an ask that timed out earlier; skip it
        self.forget(node)  # a fresh socket next time: no stale replies queue up
        return None

    async def statuses(self, nodes: list[MeshNode]) -> list[messages.NodeStatus | None]:
        return list(await asyncio.gather(*(self.status(n) for n in nodes)))

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(0)
        self.socks.clear()
        self.ctx.term()


def peer_ids(status: messages.NodeStatus | None) -> set[str]:
    return {p.node_id for p in status.peers} if status is not None else set()
