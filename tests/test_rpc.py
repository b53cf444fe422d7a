"""llama.cpp's RPC server as a worker runs it (meshllm.runtime.rpc), with real processes:
it listens on loopback only, and a llama-server that offloads its layers to it answers
exactly as the same model served alone (temperature 0)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshllm.runtime.binaries import BinaryNotFound, find_binary
from meshllm.runtime.procutil import _proc_address, free_port, listening_addresses
from meshllm.runtime.rpc import rpc_server_command, split_args

START_S = 30.0


def test_proc_addresses_read_as_written() -> None:
    assert _proc_address("0100007F") == "127.0.0.1"
    assert _proc_address("00000000") == "0.0.0.0"
    assert _proc_address("00000000000000000000000001000000") == "::1"
    assert _proc_address("00000000000000000000000000000000") == "::"


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_split_args_name_every_worker_and_give_the_host_its_share() -> None:
    # A GPU host: llama-server lists the RPC servers first, then the host's GPUs.
    args = split_args([5001, 5002], [0.5, 0.25, 0.25], host_gpus=2)
    assert flag(args, "--rpc") == "127.0.0.1:5001,127.0.0.1:5002"
    assert flag(args, "--tensor-split") == "0.2500,0.2500,0.2500,0.2500"
    assert flag(args, "--n-gpu-layers") == "999"
    # A host without a GPU keeps its share as the layers not offloaded.
    args = split_args([5001, 5002], [0.5, 0.25, 0.25], layers=24)
    assert flag(args, "--tensor-split") == "0.2500,0.2500"
    assert flag(args, "--n-gpu-layers") == "13"  # 12 layers and the output layer
    assert flag(split_args([5001], [0.9, 0.1], layers=2), "--n-gpu-layers") == "2"  # one at least
    with pytest.raises(ValueError):
        split_args([], [1.0])
    with pytest.raises(ValueError):
        split_args([5001], [1.0])


def test_the_rpc_server_binds_loopback_and_keeps_a_cache() -> None:
    command = rpc_server_command("rpc", 5001)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--cache" in command


@pytest.fixture
def rpc_binary() -> str:
    try:
        return find_binary("rpc-server")
    except BinaryNotFound as exc:
        pytest.fail(f"integration tests need the RPC server: {exc}")


class Started:
    """Processes a test started, all stopped at its end whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
        import os

        proc = subprocess.Popen(
            command,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)


@pytest.fixture
def started() -> Iterator[Started]:
    procs = Started()
    try:
        yield procs
    finally:
        procs.stop()


def wait_until(check: object, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited: {log.read_text()[-2000:]}")
        if callable(check) and check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-2000:]}")


def chat(port: int) -> str:
    body = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        body,
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        content: str = json.load(response)["choices"][0]["message"]["content"]
        return content


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def serve(
    started: Started, llama_server: str, model: Path, log: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [llama_server, "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    proc = started.start([*command, "--threads", "1", "--no-webui", *extra], log)
    wait_until(lambda: healthy(port), "llama-server's /health", proc, log)
    return proc, port


@pytest.mark.integration
def test_layers_on_an_rpc_worker_answer_as_the_model_alone(
    started: Started,
    rpc_binary: str,
    llama_server: str,
    demo_model: Path,
    tmp_path: Path,
) -> None:
    rpc_port = free_port()
    rpc_log = tmp_path / "rpc.log"
    rpc = started.start(
        rpc_server_command(rpc_binary, rpc_port), rpc_log, LLAMA_CACHE=str(tmp_path / "cache")
    )
    wait_until(lambda: listening_addresses(rpc.pid), "the RPC server to listen", rpc, rpc_log)
    # Never a network interface: the RPC server has no authentication.
    assert listening_addresses(rpc.pid) == {("127.0.0.1", rpc_port)}

    split_server, split_port = serve(
        started,
        llama_server,
        demo_model,
        tmp_path / "split.log",
        *split_args([rpc_port], [0.0, 1.0]),
    )
    split_answer = chat(split_port)
    assert "Accepted client connection" in rpc_log.read_text()  # the layers went there
    split_server.kill()
    _, solo_port = serve(started, llama_server, demo_model, tmp_path / "solo.log")
    assert split_answer == chat(solo_port)
    assert split_answer


# -- the RPC connection over QUIC (meshllm.tunnel.rpc) -----------------------------------


@pytest.mark.integration
def test_layers_on_a_worker_reached_through_quic_answer_as_the_model_alone(
    started: Started,
    rpc_binary: str,
    llama_server: str,
    demo_model: Path,
    tmp_path: Path,
) -> None:
    """The host's llama-server dials the forwarder's loopback port; each connection is
    a QUIC stream between two admitted endpoints to the worker's RPC server."""
    import asyncio

    from meshllm.mesh import wire
    from meshllm.mesh.identity import load_or_create_key, node_id_of
    from meshllm.mesh.quic import Link, MeshEndpoint
    from meshllm.tunnel.rpc import RpcForwarder, serve_rpc_stream

    rpc_port = free_port()
    rpc_log = tmp_path / "rpc.log"
    rpc = started.start(rpc_server_command(rpc_binary, rpc_port), rpc_log)
    wait_until(lambda: listening_addresses(rpc.pid), "the RPC server to listen", rpc, rpc_log)
    secret = b"s" * 32

    async def no_setup(link: Link) -> None:
        pass

    async def worker_stream(
        link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if isinstance(await wire.read_frame(reader), wire.RpcOpen):
            await serve_rpc_stream(reader, writer, rpc_port)

    async def main() -> tuple[str, int, int]:
        keys = [load_or_create_key(None) for _ in range(2)]
        worker = MeshEndpoint(node_id_of(keys[0]), secret, keys[0], no_setup, worker_stream)
        host = MeshEndpoint(node_id_of(keys[1]), secret, keys[1], no_setup)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        await worker.listen(udp)
        link = await host.dial("127.0.0.1", udp.getsockname()[1])
        forwarder = RpcForwarder(link.open_stream)
        try:
            port = await forwarder.listen()
            _, split_port = await asyncio.to_thread(
                serve,
                started,
                llama_server,
                demo_model,
                tmp_path / "split.log",
                *split_args([port], [0.0, 1.0]),
            )
            answer = await asyncio.wait_for(asyncio.to_thread(chat, split_port), 60)
            return answer, forwarder.relayed.to_worker, forwarder.relayed.from_worker
        finally:
            await forwarder.close()
            host.close()
            worker.close()
            await asyncio.sleep(0.05)

    split_answer, to_worker, from_worker = asyncio.run(main())
    # The weights crossed the tunnel: at least the model's tensors went to the worker.
    assert to_worker > demo_model.stat().st_size // 2, (to_worker, from_worker)
    _, solo_port = serve(started, llama_server, demo_model, tmp_path / "solo.log")
    assert split_answer == chat(solo_port) and split_answer


# -- the worker's side of the Tunnel (meshllm.tunnel.server) ------------------------------


def test_rpc_streams_reach_a_worker_only_from_its_host() -> None:
    """A worker's Tunnel relays an `RpcOpen` stream to its RPC server (here a TCP echo
    server standing in for it) only from the host it serves, once ready; any other
    member's stream, or one before the server is ready, is dropped unrelayed."""
    import asyncio

    from meshllm.mesh import wire
    from meshllm.mesh.identity import load_or_create_key, node_id_of
    from meshllm.mesh.quic import Link, MeshEndpoint, release_stream
    from meshllm.placement.split import SplitRole
    from meshllm.runtime.messages import LocalServerState
    from meshllm.tunnel.server import TunnelServer

    async def no_setup(link: Link) -> None:
        pass

    async def main() -> list[bytes]:
        accepted: list[bytes] = []

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(100)
            accepted.append(data)
            writer.write(data)
            await writer.drain()
            writer.close()

        rpc = await asyncio.start_server(echo, "127.0.0.1", 0)
        rpc_port = rpc.sockets[0].getsockname()[1]
        keys = [load_or_create_key(None) for _ in range(3)]
        worker_id, host_id, other_id = (node_id_of(k) for k in keys)
        server = TunnelServer()
        worker = MeshEndpoint(worker_id, b"s" * 32, keys[0], no_setup, server.handle_stream)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        await worker.listen(udp)
        dialers = [
            MeshEndpoint(i, b"s" * 32, k, no_setup)
            for i, k in zip((host_id, other_id), keys[1:], strict=True)
        ]
        host, other = [await d.dial("127.0.0.1", udp.getsockname()[1]) for d in dialers]
        part = SplitRole("worker", host=host_id)

        async def attempt(link: Link) -> bytes:
            reader, writer = await link.open_stream()
            try:
                writer.write(wire.encode_frame(wire.RpcOpen()) + b"hello")
                return await asyncio.wait_for(reader.read(100), 10)
            finally:
                release_stream(reader, writer, abort=True)

        try:
            server.local = LocalServerState("m", state="loading", port=rpc_port, split=part)
            before_ready = await attempt(host)
            server.local = LocalServerState("m", state="ready", port=rpc_port, split=part)
            from_other = await attempt(other)
            from_host = await attempt(host)
            return [before_ready, from_other, from_host, *accepted]
        finally:
            for d in dialers:
                d.close()
            worker.close()
            rpc.close()
            await asyncio.sleep(0.05)  # the closed streams' writers go before the loop

    before_ready, from_other, from_host, *accepted = asyncio.run(main())
    assert before_ready == b"" and from_other == b""  # dropped: nothing came back
    assert from_host == b"hello" and accepted == [b"hello"]  # only the host's got through


def test_the_forwarder_serves_this_user_only() -> None:
    """Another user of the machine connecting to a host's RPC port is closed unrelayed;
    this node's own user (its llama-server) is carried to the worker."""
    import asyncio
    import os
    import shutil
    import sys

    from meshllm.tunnel.rpc import RpcForwarder

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to connect as another user")

    async def main() -> tuple[int, int]:
        opened: list[int] = []

        async def open_stream() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            opened.append(1)
            raise ConnectionError("no worker in this test")

        forwarder = RpcForwarder(open_stream)
        port = await forwarder.listen()
        connect = (
            f"import socket, contextlib; s = socket.create_connection(('127.0.0.1', {port})); "
            "s.sendall(b'x'); s.settimeout(5)\nwith contextlib.suppress(OSError): s.recv(1)"
        )
        stranger = await asyncio.create_subprocess_exec(
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            connect,
        )
        await asyncio.wait_for(stranger.wait(), 10)
        refused = forwarder.refused
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if opened:
                break
            await asyncio.sleep(0.02)
        writer.close()
        await forwarder.close()
        return refused, len(opened)

    refused, opened = asyncio.run(main())
    assert refused == 1  # the other user's connection, closed before any stream
    assert opened == 1  # this user's: the forwarder went for the worker
