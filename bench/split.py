"""Section `split`: tensor split over llama.cpp's RPC, tunnelled over QUIC (issue 10, item 9).

A model of realistic shape (`meshllm.models.demo.DANUBE3_500M_SHAPE`: the 16
layers, 1536 wide, of a real ~0.5 B llama model, with the demo's vocabulary;
~830 MB in F16, generated on demand into the cache, never committed) is served
four ways at once, all on loopback, and driven side by side:

    tunnel:     llama-server --rpc PORT_F -ngl HALF -> RpcForwarder (host tunnel
                process) -> QUIC stream (two admitted MeshEndpoints) -> serve_rpc_stream
                (worker tunnel process) -> rpc-server --cache
    tcp:        llama-server --rpc PORT_R -ngl HALF -> rpc-server --cache (llama.cpp's
                RPC without the mesh: what the tunnel costs is tunnel vs tcp)
    solo:       llama-server alone, with the threads of host and worker together
    solo_node:  llama-server alone, with one node's threads (what each split member has)

The tunnel's two sides run in their own processes on uvloop, as two nodes'
Tunnel actors would, each with one event loop. Host and worker get
`--llama-threads` threads each (1 by default: the machine has 2 cores). The
worker holds the last half of the layers and the output layer (`-ngl HALF`):
on a host without a GPU llama-server lists no device for its own CPU, so
`--tensor-split` alone would send every layer to the worker.

1. Decode: streamed chat completions at temperature 0, `max_tokens` fixed,
   the prompt never cached (`cache_prompt: false`, so every request also
   measures the prompt's pass through the split); the order of the paths
   rotates from round to round. Decode tokens/s = (tokens - 1) / (last token
   - first token); time to first token from the request's first byte, on a
   connection opened before the clock. Medians; ratios tunnel/tcp (target
   >= 0.9), tunnel/solo and tunnel/solo_node (target >= 0.8). One greedy
   reply per path is compared too: a split answers as the model alone. The
   bytes through the tunnel of a prompt's pass and of each decoded token.
2. Load: the tunnel's host llama-server is started, stopped and started again;
   the RPC server keeps its `--cache` directory (`LLAMA_CACHE`), so the second
   load sends only the tensors it does not cache (llama.cpp caches tensors
   over 10 MiB, a compile-time constant of this build: the FFN matrices
   here). Bytes through the tunnel (`RpcForwarder.relayed`) and time to
   /health, for both loads, and for the tcp path's (cold) load.
3. Bulk: MB/s host -> worker of one stream: through the RPC relay (a TCP
   sink behind `serve_rpc_stream`), over plain aioquic between the same two
   processes (same `QuicConfiguration` as the endpoints, no relay) and over
   plain loopback TCP; CPU per MB of the two tunnel processes. And the round
   trip of a decode step's sizes (`STEP_OUT_BYTES` out, `STEP_BACK_BYTES`
   back) on one connection, through the relay and over TCP.

On one machine the split's two halves run one after the other, each on one
member's threads, so against `solo` (the same threads in one llama-server)
a split can reach about 1 / (members) of its speed; `solo_node` is what each
member alone would do, the figure a mesh of separate machines compares with.
Writes `split.json` and `split.png` under the results directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, connect, serve

from bench.common import (
    Context,
    RunRecord,
    Section,
    cpu_seconds,
    machine_note,
    median,
    percentile,
    publish,
    pyplot,
    ratio,
    table,
)
from bench.httpclient import Endpoint, HTTPError
from bench.mesh import http_get_status
from bench.proxy import new_loop
from meshllm.mesh import wire
from meshllm.mesh.identity import load_or_create_key, node_id_of
from meshllm.mesh.quic import Link, MeshEndpoint, key_from_pem, key_to_pem, release_stream
from meshllm.models.demo import DANUBE3_500M_SHAPE, ModelShape, ensure_shaped_model
from meshllm.runtime.binaries import find_binary
from meshllm.runtime.paths import cache_dir
from meshllm.runtime.procutil import die_with_parent, free_port
from meshllm.runtime.rpc import LOOPBACK, rpc_server_command, split_args, worker_layers
from meshllm.tunnel.client import KEEPALIVE_S
from meshllm.tunnel.rpc import RpcForwarder, serve_rpc_stream

PATHS = ("tunnel", "tcp", "solo", "solo_node")
SPLIT_PATHS = ("tunnel", "tcp")
BULK_PATHS = ("tcp", "aioquic", "tunnel")
TARGET_VS_TCP = 0.9
TARGET_VS_SOLO = 0.8
MB = 1_000_000
MIB = 1 << 20
PIECE = 256 * 1024
STEP_OUT_BYTES = 17_000
STEP_BACK_BYTES = 1_452
"""What one decode step of the realistic model moves between host and worker (measured
through the tunnel: activations and commands out, the logits of 361 tokens back)."""
CTX_SIZE = 1024
START_TIMEOUT_S = 600.0
"""A first load through the tunnel moves ~400 MB at aioquic's pace (~10 MB/s here)."""
PROMPT = (
    "The mesh pools the machines of a small group into one service. Tell me, in a few "
    "words, how a model that fits on no single machine is served."
)
QUICK_SHAPE = ModelShape(
    name="bench-quick",
    n_layer=2,
    n_embd=512,
    n_head=8,
    n_head_kv=4,
    n_ff=5632,
    n_ctx=2048,
    rope_freq_base=10000.0,
    f16=False,
)
"""Small but with FFN matrices (11.5 MB in F32) over the RPC cache's 10 MiB, so the
quick run's second load still shows the cache at work."""


SHARES = (0.5, 0.5)
"""Host and worker hold half the layers each."""


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    max_tokens: int
    rounds: int
    bulk_mb: int
    bulk_reps: int
    round_trips: int


FULL = Plan(
    shape=DANUBE3_500M_SHAPE, max_tokens=64, rounds=6, bulk_mb=32, bulk_reps=3, round_trips=400
)
QUICK = Plan(shape=QUICK_SHAPE, max_tokens=8, rounds=1, bulk_mb=4, bulk_reps=1, round_trips=40)


def _say(msg: str) -> None:
    print(f"  [split] {msg}", file=sys.stderr, flush=True)


def orders(n: int) -> list[tuple[str, ...]]:
    """The order of the paths in each round: rotations, every other one reversed, so
    each path takes each place equally often."""
    out = []
    for i in range(n):
        k = (i // 2) % len(PATHS)
        turned = PATHS[k:] + PATHS[:k]
        out.append(turned if i % 2 == 0 else turned[::-1])
    return out


# -- the two tunnel sides, each in its own process -------------------------------------------------


async def _no_link(link: Link) -> None:
    pass


def _raw_sink(tasks: set[asyncio.Task[None]]) -> Callable[..., None]:
    """Plain aioquic's stream handler: read to the end, answer the byte count."""

    def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def sink() -> None:
            got = 0
            while data := await reader.read(MIB):
                got += len(data)
            writer.write(got.to_bytes(8, "big"))
            writer.write_eof()

        task = asyncio.ensure_future(sink())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return handler


def _serve_pipe(conn: Connection, handle: Callable[[Any], None]) -> asyncio.Future[None]:
    """Feed the bench's messages to `handle` until it says stop (or goes away)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_message() -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            msg = "stop"
        if msg == "stop":
            loop.remove_reader(conn.fileno())
            if not done.done():
                done.set_result(None)
        else:
            handle(msg)

    loop.add_reader(conn.fileno(), on_message)
    return done


def worker_side_main(secret: bytes, key_pem: bytes, conn: Connection) -> None:
    """The worker's Tunnel: RpcOpen streams go to the RPC server on `target` (set by the
    bench: a sink for the bulk test, then rpc-server); plain aioquic streams to a sink."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        target = {"port": 0}

        async def on_stream(
            link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            try:
                first = await wire.read_frame(reader)
            except (wire.WireError, asyncio.IncompleteReadError, ConnectionError):
                first = None
            if isinstance(first, wire.RpcOpen):
                await serve_rpc_stream(reader, writer, target["port"])
            else:
                release_stream(reader, writer, abort=True)

        key = key_from_pem(key_pem)
        endpoint = MeshEndpoint(node_id_of(key), secret, key, _no_link, on_stream)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((LOOPBACK, 0))
        await endpoint.listen(udp)
        tasks: set[asyncio.Task[None]] = set()
        raw = await serve(
            LOOPBACK, 0, configuration=endpoint._config(False), stream_handler=_raw_sink(tasks)
        )
        raw_port = raw._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]

        def handle(msg: Any) -> None:
            if isinstance(msg, tuple) and msg[0] == "target":
                target["port"] = msg[1]
                conn.send("ok")

        done = _serve_pipe(conn, handle)
        conn.send((udp.getsockname()[1], raw_port))
        await done
        endpoint.close()
        raw.close()

    with contextlib.suppress(EOFError, OSError), asyncio.Runner(loop_factory=new_loop) as r:
        r.run(main())


async def _raw_upload(protocol: QuicConnectionProtocol, size: int) -> float:
    """Seconds to send `size` bytes on a new plain aioquic stream until the sink's answer."""
    reader, writer = await protocol.create_stream()
    chunk = os.urandom(PIECE)
    t0 = time.perf_counter()
    left = size
    while left > 0:
        piece = chunk if left >= PIECE else chunk[:left]
        writer.write(piece)
        left -= len(piece)
        await asyncio.sleep(0)  # a producer, not one giant write (plain aioquic never blocks)
    writer.write_eof()
    got = int.from_bytes(await reader.readexactly(8), "big")
    secs = time.perf_counter() - t0
    if got != size:
        raise RuntimeError(f"aioquic: the sink got {got} bytes of {size}")
    return secs


async def _keep_alive(protocol: QuicConnectionProtocol) -> None:
    with contextlib.suppress(ConnectionError, TimeoutError):
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            await asyncio.wait_for(protocol.ping(), KEEPALIVE_S)


def host_side_main(
    secret: bytes, key_pem: bytes, worker_port: int, raw_port: int, conn: Connection
) -> None:
    """The host's Tunnel: an RpcForwarder over one admitted link to the worker's side,
    and a plain aioquic connection to it for the bulk baseline."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        key = key_from_pem(key_pem)
        endpoint = MeshEndpoint(node_id_of(key), secret, key, _no_link)
        link = await endpoint.dial(LOOPBACK, worker_port)
        forwarder = RpcForwarder(link.open_stream)
        port = await forwarder.listen()
        raw_config = endpoint._config(True)
        raw_config.server_name = LOOPBACK
        tasks: set[asyncio.Task[None]] = set()
        async with connect(LOOPBACK, raw_port, configuration=raw_config) as raw:
            # Both connections idle while other paths are measured: pinged as the
            # TunnelClient pings its links, or QUIC's idle timeout would close them.
            for protocol in (link.protocol, raw):
                task = asyncio.ensure_future(_keep_alive(protocol))
                tasks.add(task)

            async def upload(size: int) -> None:
                try:
                    conn.send(await _raw_upload(raw, size))
                except Exception as exc:
                    conn.send(f"error: {exc!r}")

            def handle(msg: Any) -> None:
                if msg == "relayed":
                    conn.send((forwarder.relayed.to_worker, forwarder.relayed.from_worker))
                elif isinstance(msg, tuple) and msg[0] == "raw":
                    task = asyncio.ensure_future(upload(msg[1]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

            done = _serve_pipe(conn, handle)
            conn.send(port)
            await done
            for task in tasks:
                task.cancel()
            await forwarder.close()
            raw.close()
        endpoint.close()

    with contextlib.suppress(EOFError, OSError), asyncio.Runner(loop_factory=new_loop) as r:
        r.run(main())


@dataclass
class TunnelPair:
    """The two tunnel processes, seen from the bench."""

    forwarder_port: int
    host_pid: int
    worker_pid: int
    host_pipe: Connection
    worker_pipe: Connection

    def ask(self, pipe: Connection, msg: Any, timeout: float = 600.0) -> Any:
        pipe.send(msg)
        if not pipe.poll(timeout):
            raise RuntimeError(f"a tunnel process did not answer {msg!r}")
        answer = pipe.recv()
        if isinstance(answer, str) and answer.startswith("error"):
            raise RuntimeError(answer)
        return answer

    def relayed(self) -> tuple[int, int]:
        to_worker, from_worker = self.ask(self.host_pipe, "relayed")
        return int(to_worker), int(from_worker)

    def target(self, port: int) -> None:
        self.ask(self.worker_pipe, ("target", port))

    def cpu(self) -> float:
        return cpu_seconds(self.host_pid) + cpu_seconds(self.worker_pid)


def _wait_pipe(pipe: Connection, proc: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.05):
        if time.monotonic() > deadline or not proc.is_alive():
            raise RuntimeError(f"the {what} did not start")
    return pipe.recv()


@contextlib.contextmanager
def tunnel_pair() -> Any:
    secret = os.urandom(32)
    mp = multiprocessing.get_context("spawn")
    procs = []
    pipes: list[Connection] = []
    try:
        w_ours, w_theirs = mp.Pipe()
        pipes.append(w_ours)
        worker = mp.Process(
            target=worker_side_main,
            args=(secret, key_to_pem(load_or_create_key(None)), w_theirs),
            name="bench-split-worker-tunnel",
            daemon=True,
        )
        worker.start()
        procs.append(worker)
        udp_port, raw_port = _wait_pipe(w_ours, worker, "worker's tunnel process")
        h_ours, h_theirs = mp.Pipe()
        pipes.append(h_ours)
        host = mp.Process(
            target=host_side_main,
            args=(secret, key_to_pem(load_or_create_key(None)), udp_port, raw_port, h_theirs),
            name="bench-split-host-tunnel",
            daemon=True,
        )
        host.start()
        procs.append(host)
        forwarder_port = _wait_pipe(h_ours, host, "host's tunnel process")
        assert host.pid is not None and worker.pid is not None
        yield TunnelPair(forwarder_port, host.pid, worker.pid, h_ours, w_ours)
    finally:
        for pipe in reversed(pipes):
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for proc in reversed(procs):
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for pipe in pipes:
            pipe.close()


# -- bulk ------------------------------------------------------------------------------------------


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The RPC server's place for the bulk test: read to the end, answer the count."""
    got = 0
    try:
        while data := await reader.read(MIB):
            got += len(data)
        writer.write(got.to_bytes(8, "big"))
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _tcp_upload(port: int, size: int) -> float:
    """Seconds to send `size` bytes to 127.0.0.1:port until the sink's answer."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    chunk = os.urandom(PIECE)
    try:
        t0 = time.perf_counter()
        left = size
        while left > 0:
            piece = chunk if left >= PIECE else chunk[:left]
            writer.write(piece)
            left -= len(piece)
            await writer.drain()
        writer.write_eof()
        got = int.from_bytes(await reader.readexactly(8), "big")
        secs = time.perf_counter() - t0
    finally:
        writer.close()
    if got != size:
        raise RuntimeError(f"the sink got {got} bytes of {size}")
    return secs


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The RPC server's place for the round-trip test: each request says how many bytes
    follow and how many to answer (as a decode step: activations out, logits back)."""
    try:
        while True:
            out, back = struct.unpack(">II", await reader.readexactly(8))
            await reader.readexactly(out)
            writer.write(bytes(back))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _round_trips(port: int, n: int) -> list[float]:
    """Milliseconds of `n` request/answer exchanges of a decode step's sizes on one
    connection (after a few off the clock)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    request = struct.pack(">II", STEP_OUT_BYTES, STEP_BACK_BYTES) + os.urandom(STEP_OUT_BYTES)
    times = []
    try:
        for i in range(n + 5):
            t0 = time.perf_counter()
            writer.write(request)
            await reader.readexactly(STEP_BACK_BYTES)
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        writer.close()
    return times


async def measure_round_trips(pair: TunnelPair, plan: Plan) -> dict[str, Any]:
    echo = await asyncio.start_server(_echo, LOOPBACK, 0)
    pair.target(echo.sockets[0].getsockname()[1])
    ports = {"tcp": echo.sockets[0].getsockname()[1], "tunnel": pair.forwarder_port}
    ms: dict[str, list[float]] = {"tcp": [], "tunnel": []}
    try:
        for i in range(2):  # alternating halves
            for p in ("tcp", "tunnel") if i == 0 else ("tunnel", "tcp"):
                ms[p] += await _round_trips(ports[p], plan.round_trips // 2)
    finally:
        echo.close()
    out: dict[str, Any] = {"out_bytes": STEP_OUT_BYTES, "back_bytes": STEP_BACK_BYTES}
    for p in ms:
        out[p] = {"p50_ms": median(ms[p]), "p90_ms": percentile(ms[p], 90), "n": len(ms[p])}
    out["added_p50_ms"] = out["tunnel"]["p50_ms"] - out["tcp"]["p50_ms"]
    return out


async def measure_bulk(pair: TunnelPair, plan: Plan) -> dict[str, Any]:
    sink = await asyncio.start_server(_sink, LOOPBACK, 0)
    sink_port = sink.sockets[0].getsockname()[1]
    pair.target(sink_port)
    size = plan.bulk_mb * MB
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in BULK_PATHS}

    async def one(path: str, nbytes: int) -> tuple[float, float]:
        c0 = pair.cpu()
        if path == "tcp":
            secs = await _tcp_upload(sink_port, nbytes)
        elif path == "tunnel":
            secs = await _tcp_upload(pair.forwarder_port, nbytes)
        else:
            secs = float(await asyncio.to_thread(pair.ask, pair.host_pipe, ("raw", nbytes)))
        return secs, pair.cpu() - c0

    try:
        for p in BULK_PATHS:  # warm-up: the code paths, the congestion windows
            await one(p, size // 8)
        for i in range(plan.bulk_reps):
            for p in BULK_PATHS if i % 2 == 0 else BULK_PATHS[::-1]:
                secs, cpu = await one(p, size)
                runs[p].append(
                    {
                        "seconds": secs,
                        "mb_per_s": size / MB / secs,
                        "tunnel_processes_cpu_ms_per_mb": cpu * 1000 / (size / MB),
                    }
                )
    finally:
        sink.close()
    out: dict[str, Any] = {"size_bytes": size, "runs": runs}
    for p in BULK_PATHS:
        out[p] = {
            "mb_per_s": median([x["mb_per_s"] for x in runs[p]]),
            "tunnel_processes_cpu_ms_per_mb": median(
                [x["tunnel_processes_cpu_ms_per_mb"] for x in runs[p]]
            ),
        }
    out["tunnel_vs_aioquic"] = ratio(out["tunnel"]["mb_per_s"], out["aioquic"]["mb_per_s"])
    out["tunnel_vs_tcp"] = ratio(out["tunnel"]["mb_per_s"], out["tcp"]["mb_per_s"])
    return out


# -- llama.cpp processes ---------------------------------------------------------------------------


@dataclass
class Processes:
    """llama-server and rpc-server processes; all stopped at the end, whatever happens."""

    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            preexec_fn=die_with_parent,
        )
        log.close()

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # llama-servers before their RPC servers
            self.stop(name)

    def tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-1500:]

    async def wait_healthy(self, name: str, port: int) -> float:
        """Seconds from now until llama-server's /health answers 200."""
        t0 = time.monotonic()
        proc = self.procs[name]
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}): {self.tail(name)}")
            if await http_get_status(port, "/health") == 200:
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{name}: not healthy within {START_TIMEOUT_S:g} s: {self.tail(name)}")

    async def wait_listening(self, name: str, port: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {self.tail(name)}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(LOOPBACK, port)
                writer.close()
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{name} does not listen on {port}: {self.tail(name)}")


@dataclass(frozen=True)
class Servers:
    """What each path's llama-server is started with."""

    llama_server: str
    model: Path
    shape: ModelShape
    node_threads: int
    """llama-server's and rpc-server's --threads on each split member (0: defaults)."""

    def command(self, port: int, threads: int, *extra: str) -> list[str]:
        command = [self.llama_server, "--model", str(self.model), "--host", LOOPBACK]
        command += ["--port", str(port), "--no-webui", "--ctx-size", str(CTX_SIZE)]
        command += ["--parallel", "1"]
        if threads > 0:
            command += ["--threads", str(threads)]
        return [*command, *extra]

    def worker_layers(self) -> int:
        """Repeating layers on the worker: the last half (`split_args` with even shares)."""
        return worker_layers(self.shape.n_layer, SHARES)

    def split(self, port: int, rpc_port: int) -> list[str]:
        # The flags a split host runs (meshllm.runtime.rpc.split_args): half the
        # layers each; on this CPU host the worker takes the last half and the output.
        rpc = split_args([rpc_port], SHARES, layers=self.shape.n_layer)
        return self.command(port, self.node_threads, *rpc)

    def solo(self, port: int, threads: int) -> list[str]:
        return self.command(port, threads, "--n-gpu-layers", "0")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def load_split(
    procs: Processes, servers: Servers, pair: TunnelPair, cache: Path, rpc_port: int
) -> tuple[int, dict[str, Any]]:
    """Start the tunnel's host llama-server twice (stopped in between): the RPC server
    keeps its cache. Returns its port (the second one, left running) and the figures."""
    loads: list[dict[str, Any]] = []
    port = 0
    for i in range(2):
        port = free_port()
        before = pair.relayed()
        c0 = pair.cpu()
        procs.start(f"tunnel-host-{i + 1}", servers.split(port, pair.forwarder_port))
        secs = await procs.wait_healthy(f"tunnel-host-{i + 1}", port)
        after = pair.relayed()
        loads.append(
            {
                "seconds": secs,
                "to_worker_bytes": after[0] - before[0],
                "from_worker_bytes": after[1] - before[1],
                "tunnel_processes_cpu_s": pair.cpu() - c0,
                "rpc_cache_bytes": _dir_bytes(cache),
            }
        )
        _say(
            f"load {i + 1} through the tunnel: {secs:.1f} s, "
            f"{loads[-1]['to_worker_bytes'] / MB:.1f} MB to the worker"
        )
        if i == 0:
            procs.stop(f"tunnel-host-{i + 1}")
    first, second = loads
    shape = servers.shape
    cacheable = servers.worker_layers() * sum(
        b for name, b in shape.matrix_bytes().items() if b > 10 * MIB and name.startswith("ffn")
    )
    return port, {
        "first": first,
        "second": second,
        "second_vs_first_bytes": ratio(second["to_worker_bytes"], first["to_worker_bytes"]),
        "worker_layers": servers.worker_layers(),
        "cacheable_bytes_expected": cacheable,
        "rpc_port": rpc_port,
    }


# -- decode ----------------------------------------------------------------------------------------


def _chat(max_tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "cache_prompt": False,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def _reply_text(port: int, max_tokens: int) -> str:
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{port}/v1/chat/completions",
        _chat(max_tokens, stream=False),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        text: str = json.load(response)["choices"][0]["message"]["content"]
        return text


async def measure_decode(ports: dict[str, int], pair: TunnelPair, plan: Plan) -> dict[str, Any]:
    texts = {
        p: await asyncio.to_thread(_reply_text, ports[p], min(plan.max_tokens, 16)) for p in PATHS
    }  # also the warm-up
    before = pair.relayed()
    await asyncio.to_thread(_reply_text, ports["tunnel"], 1)  # the prompt's pass, one token
    prefill = pair.relayed()[0] - before[0]
    eps = {p: Endpoint(LOOPBACK, ports[p]) for p in PATHS}
    data = {
        p: eps[p].request_bytes("/v1/chat/completions", _chat(plan.max_tokens, True)) for p in PATHS
    }
    ttft: dict[str, list[float]] = {p: [] for p in PATHS}
    rate: dict[str, list[float]] = {p: [] for p in PATHS}
    tokens: dict[str, list[int]] = {p: [] for p in PATHS}
    relay = {"tokens": 0, "to_worker": 0, "from_worker": 0, "cpu_s": 0.0}
    for i, order in enumerate(orders(plan.rounds)):
        _say(f"round {i + 1}/{plan.rounds}: {' '.join(order)}")
        for p in order:
            ep = eps[p]
            await ep.ready()
            if p == "tunnel":
                before, c0 = pair.relayed(), pair.cpu()
            t0 = time.perf_counter()
            reply = await ep.call(data[p], sse=True)
            ep.close()
            if p == "tunnel":
                after = pair.relayed()
                relay["cpu_s"] += pair.cpu() - c0
                relay["to_worker"] += after[0] - before[0]
                relay["from_worker"] += after[1] - before[1]
                relay["tokens"] += reply.tokens
            if reply.tokens < 2:
                raise HTTPError(f"{p}: {reply.tokens} content events, expected {plan.max_tokens}")
            ttft[p].append((reply.t_first_token - t0) * 1000)
            rate[p].append((reply.tokens - 1) / (reply.t_last_token - reply.t_first_token))
            tokens[p].append(reply.tokens)
    out: dict[str, Any] = {"max_tokens": plan.max_tokens, "prompt": PROMPT}
    for p in PATHS:
        out[p] = {
            "decode_tok_s": median(rate[p]),
            "ttft_ms": median(ttft[p]),
            "decode_tok_s_runs": [round(x, 3) for x in rate[p]],
            "ttft_ms_runs": [round(x, 2) for x in ttft[p]],
            "tokens": tokens[p],
        }
    out["ratios"] = {
        "tunnel_vs_tcp": ratio(out["tunnel"]["decode_tok_s"], out["tcp"]["decode_tok_s"]),
        "tunnel_vs_solo": ratio(out["tunnel"]["decode_tok_s"], out["solo"]["decode_tok_s"]),
        "tunnel_vs_solo_node": ratio(
            out["tunnel"]["decode_tok_s"], out["solo_node"]["decode_tok_s"]
        ),
        "tcp_vs_solo": ratio(out["tcp"]["decode_tok_s"], out["solo"]["decode_tok_s"]),
        "tunnel_vs_tcp_paired": median(
            [ratio(t, d) for t, d in zip(rate["tunnel"], rate["tcp"], strict=True)]
        ),
        "ttft_tunnel_minus_tcp_ms": out["tunnel"]["ttft_ms"] - out["tcp"]["ttft_ms"],
    }
    n = max(relay["tokens"], 1)
    out["tunnel_bytes"] = {
        "prompt_pass_to_worker": prefill,
        "per_token_to_worker": (relay["to_worker"] - plan.rounds * prefill)
        / max(n - plan.rounds, 1),
        "per_token_from_worker": relay["from_worker"] / n,
        "note": "a request moves the prompt's pass once (its first token), then per token",
    }
    out["tunnel_processes_cpu_ms_per_token"] = relay["cpu_s"] * 1000 / n
    out["replies"] = texts
    out["same_reply"] = len(set(texts.values())) == 1
    return out


# -- the section -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started(logs: Path) -> AsyncIterator[Processes]:
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.stop_all()


async def measure(ctx: Context, plan: Plan, model: Path) -> dict[str, Any]:
    node_threads = max(ctx.llama_threads, 0)
    servers = Servers(find_binary("llama-server"), model, plan.shape, node_threads)
    rpc_binary = find_binary("rpc-server")
    rpc_threads = node_threads or (os.cpu_count() or 1)
    with (
        tempfile.TemporaryDirectory(prefix="meshllm-bench-split-") as tmp_name,
        tunnel_pair() as pair,
    ):
        tmp = Path(tmp_name)
        _say(f"bulk: {plan.bulk_reps} x {plan.bulk_mb} MB per path ({', '.join(BULK_PATHS)})")
        bulk = await measure_bulk(pair, plan)
        _say(f"round trips: {plan.round_trips} of {STEP_OUT_BYTES} B out, {STEP_BACK_BYTES} back")
        bulk["round_trip"] = await measure_round_trips(pair, plan)
        async with started(tmp) as procs:
            caches = {p: tmp / f"cache-{p}" for p in SPLIT_PATHS}
            rpc_ports = {p: free_port() for p in SPLIT_PATHS}
            for p in SPLIT_PATHS:
                command = rpc_server_command(rpc_binary, rpc_ports[p], rpc_threads)
                procs.start(f"rpc-{p}", command, {"LLAMA_CACHE": str(caches[p])})
                await procs.wait_listening(f"rpc-{p}", rpc_ports[p])
            pair.target(rpc_ports["tunnel"])
            ports: dict[str, int] = {}
            ports["tunnel"], loads = await load_split(
                procs, servers, pair, caches["tunnel"], rpc_ports["tunnel"]
            )
            ports["tcp"] = free_port()
            procs.start("tcp-host", servers.split(ports["tcp"], rpc_ports["tcp"]))
            loads["tcp_first_seconds"] = await procs.wait_healthy("tcp-host", ports["tcp"])
            solo_threads = {"solo": 2 * node_threads, "solo_node": node_threads}
            for p, threads in solo_threads.items():
                ports[p] = free_port()
                procs.start(p, servers.solo(ports[p], threads))
                loads[f"{p}_seconds"] = await procs.wait_healthy(p, ports[p])
            _say(
                f"decode: {plan.rounds} rounds of {plan.max_tokens} tokens on each of "
                f"{', '.join(PATHS)}"
            )
            decode = await measure_decode(ports, pair, plan)
    return {
        "threads": {
            "host": node_threads or "default",
            "worker": rpc_threads,
            "solo": solo_threads["solo"] or "default",
            "solo_node": node_threads or "default",
        },
        "decode": decode,
        "loads": loads,
        "bulk": bulk,
    }


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("split", ctx.quick)
    t0 = time.monotonic()
    model = ensure_shaped_model(cache_dir() / "models", plan.shape)
    _say(f"model {model.name}: {model.stat().st_size / MB:.0f} MB ({time.monotonic() - t0:.1f} s)")
    with asyncio.Runner(loop_factory=new_loop) as runner:
        figures = runner.run(measure(ctx, plan, model))
    shape = plan.shape
    result: dict[str, Any] = {
        **record.header(),
        "setup": "one machine, loopback; the tunnel's host and worker sides in two processes "
        "(uvloop), llama-server and rpc-server from the same build; MB = 10^6 bytes",
        "plan": {**asdict(plan), "shape": asdict(shape)},
        "model": {
            "file": model.name,
            "bytes": model.stat().st_size,
            "ffn_matrix_bytes": shape.matrix_bytes()["ffn_up"],
            "rpc_cache_min_bytes": 10 * MIB,
        },
        "llama_server_settings": ctx.llama_settings(),
        **figures,
    }
    r = figures["decode"]["ratios"]
    result["targets"] = {
        "tunnel_vs_tcp": {
            "value": r["tunnel_vs_tcp"],
            "target": f">= {TARGET_VS_TCP}",
            "met": r["tunnel_vs_tcp"] >= TARGET_VS_TCP,
        },
        "tunnel_vs_solo": {
            "value": r["tunnel_vs_solo"],
            "target": f">= {TARGET_VS_SOLO}",
            "met": r["tunnel_vs_solo"] >= TARGET_VS_SOLO,
        },
        "tunnel_vs_solo_node": {
            "value": r["tunnel_vs_solo_node"],
            "target": f">= {TARGET_VS_SOLO}",
            "met": r["tunnel_vs_solo_node"] >= TARGET_VS_SOLO,
        },
    }
    return publish(ctx, "split", result, render_table, plot)


def render_table(r: dict[str, Any]) -> str:
    d, loads, bulk = r["decode"], r["loads"], r["bulk"]
    ratios, targets, rtt = d["ratios"], r["targets"], r["bulk"]["round_trip"]

    def mark(key: str) -> str:
        t = targets[key]
        return f"{t['target']}x: {'met' if t['met'] else 'MISSED'}"

    th = r["threads"]
    rows = [
        [
            "decode tok/s (median)",
            " / ".join(f"{d[p]['decode_tok_s']:.2f}" for p in PATHS),
            f"tunnel/tcp {ratios['tunnel_vs_tcp']:.2f}x",
            mark("tunnel_vs_tcp"),
        ],
        [
            "",
            "",
            f"tunnel/solo {ratios['tunnel_vs_solo']:.2f}x",
            mark("tunnel_vs_solo"),
        ],
        [
            "",
            "",
            f"tunnel/solo_node {ratios['tunnel_vs_solo_node']:.2f}x",
            mark("tunnel_vs_solo_node"),
        ],
        [
            "time to first token ms (median)",
            " / ".join(f"{d[p]['ttft_ms']:.0f}" for p in PATHS),
            f"tunnel - tcp {ratios['ttft_tunnel_minus_tcp_ms']:+.0f} ms",
            "",
        ],
        [
            "load s: tunnel 1st / 2nd, tcp 1st",
            f"{loads['first']['seconds']:.1f} / {loads['second']['seconds']:.1f} / "
            f"{loads['tcp_first_seconds']:.1f}",
            "",
            "",
        ],
        [
            "MB to the worker: 1st / 2nd load",
            f"{loads['first']['to_worker_bytes'] / MB:.1f} / "
            f"{loads['second']['to_worker_bytes'] / MB:.1f}",
            f"2nd/1st {loads['second_vs_first_bytes']:.2f}x",
            "",
        ],
        [
            "bulk MB/s: tcp / aioquic / tunnel",
            " / ".join(f"{bulk[p]['mb_per_s']:.1f}" for p in BULK_PATHS),
            f"tunnel/aioquic {bulk['tunnel_vs_aioquic']:.2f}x",
            "",
        ],
        [
            "tunnel processes' CPU ms per MB: aioquic / tunnel",
            f"{bulk['aioquic']['tunnel_processes_cpu_ms_per_mb']:.0f} / "
            f"{bulk['tunnel']['tunnel_processes_cpu_ms_per_mb']:.0f}",
            "",
            "",
        ],
        [
            "through the tunnel: prompt pass kB out; per token B out / back",
            f"{d['tunnel_bytes']['prompt_pass_to_worker'] / 1000:.0f}; "
            f"{d['tunnel_bytes']['per_token_to_worker']:.0f} / "
            f"{d['tunnel_bytes']['per_token_from_worker']:.0f}",
            f"CPU {d['tunnel_processes_cpu_ms_per_token']:.1f} ms/token",
            "",
        ],
        [
            f"round trip {rtt['out_bytes']} B out, {rtt['back_bytes']} B back: p50 ms",
            f"tcp {rtt['tcp']['p50_ms']:.2f} / tunnel {rtt['tunnel']['p50_ms']:.2f}",
            f"added {rtt['added_p50_ms']:+.2f} ms",
            "",
        ],
    ]
    shape = r["plan"]["shape"]
    note = (
        f"Paths: {' / '.join(PATHS)}. Model {r['model']['file']} "
        f"({r['model']['bytes'] / MB:.0f} MB; {shape['n_layer']} layers, {shape['n_embd']} wide, "
        f"FFN {shape['n_ff']}, {'F16' if shape['f16'] else 'F32'}); worker: last "
        f"{loads['worker_layers']} layers + output. Threads: host {th['host']}, worker "
        f"{th['worker']}, solo {th['solo']}, solo_node {th['solo_node']}. "
        f"{r['plan']['rounds']} rounds of {d['max_tokens']} tokens, temperature 0, prompt not "
        f"cached; same greedy reply on every path: {d['same_reply']}. Bulk: "
        f"{bulk['size_bytes'] // MB} MB host -> worker on one stream, medians of "
        f"{r['plan']['bulk_reps']}.\n" + machine_note(r)
    )
    return table(rows, ["measure", "figures", "ratio", "target"]) + "\n\n" + note


def plot(r: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    d, loads, bulk = r["decode"], r["loads"], r["bulk"]
    colors = {
        "tunnel": "#dd8452",
        "tcp": "#4c72b0",
        "solo": "#55a868",
        "solo_node": "#8c8c8c",
        "aioquic": "#8172b3",
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, key, runs, label in (
        (axes[0][0], "decode_tok_s", "decode_tok_s_runs", "decode tokens/s"),
        (axes[0][1], "ttft_ms", "ttft_ms_runs", "time to first token, ms"),
    ):
        for i, p in enumerate(PATHS):
            ax.bar(i, d[p][key], color=colors[p])
            ax.scatter([i] * len(d[p][runs]), d[p][runs], color="black", s=10, zorder=3)
        ax.set_xticks(range(len(PATHS)), PATHS)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    ratios = d["ratios"]
    axes[0][0].set_title(
        f"tunnel/tcp {ratios['tunnel_vs_tcp']:.2f}x, tunnel/solo {ratios['tunnel_vs_solo']:.2f}x"
    )
    axes[0][1].set_title(f"{d['max_tokens']} tokens, prompt not cached")
    ax = axes[1][0]
    for i, p in enumerate(BULK_PATHS):
        ax.bar(i, bulk[p]["mb_per_s"], color=colors[p])
    ax.set_xticks(range(len(BULK_PATHS)), BULK_PATHS)
    ax.set_yscale("log")
    ax.set_ylabel("MB/s, host -> worker, one stream")
    ax.set_title(f"bulk: tunnel/aioquic {bulk['tunnel_vs_aioquic']:.2f}x")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1][1]
    loads_mb = [loads["first"]["to_worker_bytes"] / MB, loads["second"]["to_worker_bytes"] / MB]
    ax.bar([0, 1], loads_mb, color=["#dd8452", "#f0b07f"])
    ax.set_xticks([0, 1], ["first load", "second load (cache)"])
    ax.set_ylabel("MB through the tunnel to the worker")
    ax.set_title(f"second/first {loads['second_vs_first_bytes']:.2f}x")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"Tensor split over the QUIC tunnel: {r['model']['file']} ({r['started']})", fontsize=11
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


SECTION = Section(
    "split",
    "tensor split over the QUIC tunnel vs plain TCP RPC and solo; load bytes; bulk MB/s",
    run,
)
