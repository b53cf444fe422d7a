"""Section `tunnel`: bulk throughput of the Tunnel against a raw aioquic stream.

Two processes on loopback, one event loop each, as two nodes' Tunnel actors
are (the remote side is a child process of the bench):

    tunnel: fetcher -> unix socket -> TunnelClient -> QUIC stream (MeshEndpoint,
            admitted) -> TunnelServer -> TCP -> a fake upstream HTTP server on
            127.0.0.1 that answers `size` bytes in 64 KiB chunks
    raw:    aioquic client -> one QUIC stream -> aioquic server whose stream
            handler writes the same `size` bytes in 64 KiB chunks

(fetcher, TunnelClient and raw client in the bench process; upstream,
TunnelServer and raw server in the child.) Both use the same QUIC
configuration: the raw pair's `QuicConfiguration`s are made by the tunnel's
own `MeshEndpoint`s (`_config`), so datagram size (aioquic's 1200-byte
default), congestion control, flow-control windows and TLS are identical.

Every repetition uses a fresh QUIC connection on both paths (handshake, and
for the tunnel admission, plus one tiny transfer, before the clock starts),
so each timed transfer starts from the same congestion state; repetitions
alternate raw / tunnel (ABBA). CPU per MB is both processes' user+system time.
After each transfer the sender's congestion state (window, smoothed RTT,
ssthresh, packets the pacer may send per refill) is recorded.

It runs twice: on uvloop (what the nodes run; the target applies to it) and
on asyncio's own loop (reference). Why both: aioquic's pacer reads
`loop.time()`, which on uvloop has millisecond resolution, so the pacer's
bucket refills once per millisecond and holds at most 16 datagrams (~19 MB/s
at 1200 bytes); on a lossless link the window keeps growing in slow start,
the bucket shrinks with it, and a long-lived connection ends near one
datagram per millisecond (~1.2 MB/s), raw aioquic and tunnel alike.

The code measured is this tree's (`--node-repo` does not apply).
Target (issue 3): the tunnel keeps >= 80% of raw aioquic's throughput.
Writes `tunnel.json` and `tunnel.png` under the results directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration

from bench.common import (
    Context,
    RunRecord,
    Section,
    cpu_seconds,
    machine_note,
    median,
    publish,
    pyplot,
    ratio,
    table,
)
from bench.proxy import new_loop
from meshllm.http.upstream import Pool
from meshllm.mesh.identity import load_or_create_key, node_id_of
from meshllm.mesh.quic import Link, MeshEndpoint, key_from_pem, key_to_pem
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.runtime.messages import LocalServerState, MeshView
from meshllm.runtime.procutil import die_with_parent
from meshllm.tunnel.client import CHUNK, TunnelClient
from meshllm.tunnel.hop import TunnelRoute
from meshllm.tunnel.server import TunnelServer

PATHS = ("raw", "tunnel")
LOOPS = ("uvloop", "asyncio")
TARGET_LOOP = "uvloop"
TARGET_RATIO = 0.8
MODEL = "bulk"
_CONTENT_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)")
MB = 1_000_000
WARM_BYTES = 4096
PROBE_BYTES = 64_000
"""The response whose latency is compared on a fresh link and on a well-used one."""
AGE_STEP_MB = 4
CONFIG_KEYS = (
    "max_datagram_size",
    "congestion_control_algorithm",
    "max_data",
    "max_stream_data",
    "idle_timeout",
    "alpn_protocols",
)


@dataclass(frozen=True)
class Plan:
    size_mb: int
    reps: int
    loops: tuple[str, ...]
    age_mb: int
    """Bytes pushed through one tunnel link before the 'used link' latency is taken."""
    probes: int


FULL = Plan(size_mb=8, reps=5, loops=LOOPS, age_mb=16, probes=10)
QUICK = Plan(size_mb=4, reps=2, loops=LOOPS, age_mb=8, probes=5)


def _say(msg: str) -> None:
    print(f"  [tunnel] {msg}", file=sys.stderr, flush=True)


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    return new_loop if kind == "uvloop" else asyncio.new_event_loop


# -- the remote side: fake upstream (llama-server's place), TunnelServer, raw server ------------


async def _send_body(writer: asyncio.StreamWriter, size: int, chunk: bytes, drain: bool) -> None:
    left = size
    while left > 0:
        piece = chunk if left >= len(chunk) else chunk[:left]
        writer.write(piece)
        left -= len(piece)
        if drain:
            await writer.drain()
        else:
            await asyncio.sleep(0)  # a producer, not one giant write


async def upstream_handler(
    chunk: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A request whose body is SIZE in decimal -> SIZE bytes with a Content-Length, then
    close. (A completion endpoint's path: the tunnel carries only what the Proxy forwards.)"""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = _CONTENT_LENGTH.search(head)
        size = int(await reader.readexactly(int(length[1]) if length else 0))
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % size
        )
        await _send_body(writer, size, chunk, drain=True)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def raw_stream_handler(chunk: bytes, tasks: set[asyncio.Task[None]]) -> Any:
    """Each raw stream: an 8-byte size in, that many bytes out, then the stream's end."""

    def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def serve_one() -> None:
            request = await reader.readexactly(8)
            await _send_body(writer, int.from_bytes(request, "big"), chunk, drain=False)
            writer.write_eof()

        task = asyncio.ensure_future(serve_one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return handler


def sender_state(protocol: QuicConnectionProtocol | None) -> dict[str, Any]:
    """The congestion state of a connection's sending side (aioquic internals)."""
    if protocol is None:
        return {}
    try:
        loss = protocol._quic._loss
        pacer = loss._pacer
        packet_time = pacer.packet_time or 0.0
        return {
            "cwnd_bytes": loss.congestion_window,
            "srtt_ms": round(loss._rtt_smoothed * 1000, 3),
            "ssthresh": getattr(loss._cc, "ssthresh", None),
            "pacer_burst_packets": round(pacer.bucket_max / packet_time, 2)
            if packet_time
            else None,
        }
    except AttributeError:
        return {}


async def _accept(link: Link) -> None:
    pass


def remote_main(secret: bytes, kind: str, conn: Connection, key_pem: bytes) -> None:
    """The remote side, in its own process, until the bench says stop (or dies)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the bench; it stops us

    async def main() -> None:
        loop = asyncio.get_running_loop()
        chunk = os.urandom(CHUNK)  # incompressible; nothing on the path compresses anyway
        upstream = await asyncio.start_server(
            lambda r, w: upstream_handler(chunk, r, w), "127.0.0.1", 0
        )
        upstream_port = upstream.sockets[0].getsockname()[1]
        server = TunnelServer(LocalServerState(model=MODEL, state="ready", port=upstream_port))
        key = key_from_pem(key_pem)
        remote = MeshEndpoint(node_id_of(key), secret, key, _accept, server.handle_stream)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        await remote.listen(udp)
        raw_tasks: set[asyncio.Task[None]] = set()
        raw_protocols: list[QuicConnectionProtocol] = []

        def raw_protocol(*args: Any, **kwargs: Any) -> QuicConnectionProtocol:
            protocol = QuicConnectionProtocol(*args, **kwargs)
            raw_protocols.append(protocol)
            return protocol

        # The raw server gets the very configuration the tunnel's endpoint uses.
        raw_server: QuicServer = await serve(
            "127.0.0.1",
            0,
            configuration=remote._config(False),
            create_protocol=raw_protocol,
            stream_handler=raw_stream_handler(chunk, raw_tasks),
        )
        raw_port = raw_server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        conn.send((udp.getsockname()[1], raw_port))
        done = loop.create_future()

        def on_message() -> None:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = "stop"
            if msg == "state":
                tunnels = [p for p in remote.protocols if not p.closed.is_set()]
                conn.send(
                    {
                        "raw": sender_state(raw_protocols[-1] if raw_protocols else None),
                        "tunnel": sender_state(tunnels[-1] if tunnels else None),
                    }
                )
            elif not done.done():
                done.set_result(None)

        loop.add_reader(conn.fileno(), on_message)
        await done
        remote.close()
        raw_server.close()
        upstream.close()

    with (
        contextlib.suppress(EOFError, OSError),
        asyncio.Runner(loop_factory=loop_factory(kind)) as r,
    ):
        r.run(main())


# -- the local side -------------------------------------------------------------------------------


@dataclass
class Rig:
    """Both paths, ready, seen from the bench process."""

    unix_path: str
    client: TunnelClient
    raw_port: int
    raw_config: QuicConfiguration
    remote_pid: int
    pipe: Connection
    remote_id: str

    def remote_state(self) -> dict[str, Any]:
        self.pipe.send("state")
        if not self.pipe.poll(5):
            return {}
        state: dict[str, Any] = self.pipe.recv()
        return state


@contextlib.asynccontextmanager
async def rig(tmp: Path, kind: str) -> AsyncIterator[Rig]:
    secret = os.urandom(32)
    remote_key = load_or_create_key(None)  # a node's id is its key's: admission checks it
    remote_id = node_id_of(remote_key)
    mp = multiprocessing.get_context("spawn")
    ours, theirs = mp.Pipe()
    proc = mp.Process(
        target=remote_main,
        args=(secret, kind, theirs, key_to_pem(remote_key)),
        name="bench-tunnel-remote",
        daemon=True,
    )
    proc.start()
    local: MeshEndpoint | None = None
    client: TunnelClient | None = None
    try:
        deadline = time.monotonic() + 30
        while not ours.poll():
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError("the remote side did not start")
            await asyncio.sleep(0.02)
        tunnel_port, raw_port = ours.recv()
        local_key = load_or_create_key(None)
        local = MeshEndpoint(node_id_of(local_key), secret, local_key, _accept)
        client = TunnelClient(local)
        peer = PeerAnnouncement(
            node_id=remote_id, generation=1, addresses=("127.0.0.1:1",), tunnel_port=tunnel_port
        )
        client.set_view(MeshView("local", (peer,)))
        unix_path = str(tmp / "tunnel.sock")
        await client.serve(unix_path)
        # The raw client gets the very configuration the tunnel dials with.
        raw_config = local._config(True)
        raw_config.server_name = "127.0.0.1"
        assert proc.pid is not None
        yield Rig(unix_path, client, raw_port, raw_config, proc.pid, ours, remote_id)
    finally:
        if client is not None:
            await client.close()
        if local is not None:
            local.close()
        await asyncio.sleep(0.05)  # let the close frames go
        with contextlib.suppress(OSError):
            ours.send("stop")
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        ours.close()


async def fetch_tunnel(rig: Rig, size: int) -> tuple[int, float]:
    """Body bytes and seconds of one `size`-byte response through the tunnel.

    Sent as the Proxy sends it: a request frame on a unix connection of a pool.
    """
    pool = Pool("meshllm-tunnel", 0, unix_path=rig.unix_path)
    try:
        t0 = time.perf_counter()
        route = TunnelRoute(pool, rig.remote_id, MODEL)
        resp = await route.request("POST", "/v1/completions", str(size).encode())
        if resp.status != 200:
            raise RuntimeError(f"tunnel answered {resp.status}: {(await resp.body())[:200]!r}")
        got = 0
        async for data in resp.iter_body():
            got += len(data)
        return got, time.perf_counter() - t0
    finally:
        pool.close()


async def fetch_raw(protocol: QuicConnectionProtocol, size: int) -> tuple[int, float]:
    reader, writer = await protocol.create_stream()
    t0 = time.perf_counter()
    writer.write(size.to_bytes(8, "big"))
    writer.write_eof()
    got = 0
    while data := await reader.read(1 << 20):
        got += len(data)
    return got, time.perf_counter() - t0


async def one_transfer(rig: Rig, path: str, size: int) -> tuple[int, float, float]:
    """A fresh connection (set up and warmed off the clock), then one timed transfer.

    Returns (bytes, seconds, CPU seconds of both processes during the transfer).
    """

    def cpu() -> float:
        return time.process_time() + cpu_seconds(rig.remote_pid)

    if path == "tunnel":
        rig.client.drop_peer(rig.remote_id, "bench: a fresh connection per repetition")
        await fetch_tunnel(rig, WARM_BYTES)  # dial, admission, first stream
        c0 = cpu()
        got, secs = await fetch_tunnel(rig, size)
        return got, secs, cpu() - c0
    async with connect("127.0.0.1", rig.raw_port, configuration=rig.raw_config) as raw:
        await fetch_raw(raw, WARM_BYTES)
        c0 = cpu()
        got, secs = await fetch_raw(raw, size)
        used = cpu() - c0
        raw.close()
    return got, secs, used


async def probe_latency(rig: Rig, n: int) -> float:
    """Median ms of `n` PROBE_BYTES responses through the tunnel's current link."""
    times = []
    for _ in range(n):
        got, secs = await fetch_tunnel(rig, PROBE_BYTES)
        if got != PROBE_BYTES:
            raise RuntimeError(f"tunnel: got {got} bytes, expected {PROBE_BYTES}")
        times.append(secs * 1000)
    return median(times)


async def used_link(rig: Rig, plan: Plan) -> dict[str, Any]:
    """A 64 kB response on a fresh tunnel link, then again after `age_mb` went through it.

    Tunnel links are long-lived (one per peer). Without loss (loopback, a
    quiet LAN) aioquic's window keeps growing in slow start; what that does
    to the pacer depends on the event loop's clock (see the module docstring).
    """
    rig.client.drop_peer(rig.remote_id, "bench: a fresh link")
    await fetch_tunnel(rig, WARM_BYTES)
    fresh_ms = await probe_latency(rig, plan.probes)
    fresh_state = rig.remote_state().get("tunnel", {})
    steps: list[float] = []
    pushed = 0
    while pushed < plan.age_mb:
        step = min(AGE_STEP_MB, plan.age_mb - pushed)
        got, secs = await fetch_tunnel(rig, step * MB)
        if got != step * MB:
            raise RuntimeError(f"tunnel: got {got} bytes, expected {step * MB}")
        steps.append(step / secs)
        pushed += step
    used_ms = await probe_latency(rig, plan.probes)
    return {
        "probe_bytes": PROBE_BYTES,
        "fresh_ms": fresh_ms,
        "used_ms": used_ms,
        "pushed_mb": pushed,
        "step_mb": AGE_STEP_MB,
        "step_mb_per_s": steps,
        "sender_fresh": fresh_state,
        "sender_used": rig.remote_state().get("tunnel", {}),
    }


async def measure(plan: Plan, kind: str) -> dict[str, Any]:
    size = plan.size_mb * MB
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    with tempfile.TemporaryDirectory(prefix="meshllm-bench-tunnel-") as tmp:
        async with rig(Path(tmp), kind) as r:
            config = {key: getattr(r.raw_config, key) for key in CONFIG_KEYS}
            config["verify_mode"] = "none" if r.raw_config.verify_mode == ssl.CERT_NONE else "ca"
            for p in PATHS:  # warm-up: imports, TLS, the code paths
                await one_transfer(r, p, size // 8)
            gc.collect()
            for i in range(plan.reps):
                for p in PATHS if i % 2 == 0 else PATHS[::-1]:
                    got, secs, used = await one_transfer(r, p, size)
                    if got != size:
                        raise RuntimeError(f"{p}: got {got} bytes, expected {size}")
                    runs[p].append(
                        {
                            "seconds": secs,
                            "mb_per_s": size / MB / secs,
                            "cpu_ms_per_mb": used * 1000 / (size / MB),
                            "sender": r.remote_state().get(p, {}),
                        }
                    )
            aged = await used_link(r, plan)
    mbps = {p: median([x["mb_per_s"] for x in runs[p]]) for p in PATHS}
    cpu = {p: median([x["cpu_ms_per_mb"] for x in runs[p]]) for p in PATHS}
    rep_ratios = [
        ratio(t["mb_per_s"], w["mb_per_s"])
        for w, t in zip(runs["raw"], runs["tunnel"], strict=True)
    ]
    return {
        "loop": kind,
        "quic_configuration": config,
        "raw_mb_per_s": mbps["raw"],
        "tunnel_mb_per_s": mbps["tunnel"],
        "ratio": ratio(mbps["tunnel"], mbps["raw"]),
        "rep_ratios": rep_ratios,
        "rep_ratios_median": median(rep_ratios),
        "cpu_ms_per_mb": cpu,
        "runs": runs,
        "used_link": aged,
    }


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("tunnel", ctx.quick)
    loops: dict[str, Any] = {}
    for kind in plan.loops:
        _say(f"{kind}: {plan.reps} x {plan.size_mb} MB per path, alternating, fresh connections")
        with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
            loops[kind] = runner.run(measure(plan, kind))
    main = loops.get(TARGET_LOOP) or next(iter(loops.values()))
    result: dict[str, Any] = {
        **record.header(),
        "setup": "two processes on loopback (local side: the bench; remote side: a child), one "
        "event loop each; a fresh QUIC connection per transfer; MB = 10^6 bytes",
        "size_bytes": plan.size_mb * MB,
        "plan": asdict(plan),
        "quic_configuration": main["quic_configuration"],
        "loops": loops,
    }
    result["targets"] = {
        "ratio": {
            "loop": main["loop"],
            "value": main["ratio"],
            "target": f">= {TARGET_RATIO}",
            "met": main["ratio"] >= TARGET_RATIO,
        }
    }
    return publish(ctx, "tunnel", result, render_table, plot)


def render_table(r: dict[str, Any]) -> str:
    target = r["targets"]["ratio"]
    rows = []
    for kind, f in r["loops"].items():
        goal = ""
        if kind == target["loop"]:
            goal = f">= {TARGET_RATIO:g}x: {'met' if target['met'] else 'MISSED'}"
        rows.append(
            [
                f"MB/s, {r['plan']['size_mb']} MB on one stream ({kind})",
                f"{f['raw_mb_per_s']:.1f}",
                f"{f['tunnel_mb_per_s']:.1f}",
                f"{f['ratio']:.2f}x",
                goal,
            ]
        )
        rows.append(
            [
                f"CPU ms per MB, both processes ({kind})",
                f"{f['cpu_ms_per_mb']['raw']:.0f}",
                f"{f['cpu_ms_per_mb']['tunnel']:.0f}",
                f"{ratio(f['cpu_ms_per_mb']['tunnel'], f['cpu_ms_per_mb']['raw']):.2f}x",
                "",
            ]
        )
    for kind, f in r["loops"].items():
        u = f["used_link"]
        rows.append(
            [
                f"{u['probe_bytes'] // 1000} kB response, fresh link -> after {u['pushed_mb']} MB "
                f"({kind})",
                "",
                f"{u['fresh_ms']:.1f} -> {u['used_ms']:.1f} ms",
                f"used/fresh {ratio(u['used_ms'], u['fresh_ms']):.1f}x",
                "",
            ]
        )
        rows.append(
            [
                f"MB/s of the last {u['step_mb']} MB of {u['pushed_mb']} on one link ({kind})",
                "",
                f"{u['step_mb_per_s'][-1]:.1f}",
                "",
                "",
            ]
        )
    qc = r["quic_configuration"]
    ratios = "; ".join(
        f"{kind}: {', '.join(f'{x:.2f}' for x in f['rep_ratios'])}"
        for kind, f in r["loops"].items()
    )
    note = (
        f"Medians of {r['plan']['reps']} alternating transfers per path, each on a fresh "
        f"connection. QUIC: max_datagram_size {qc['max_datagram_size']}, "
        f"{qc['congestion_control_algorithm']}, stream window {qc['max_stream_data']} B. "
        f"Per-repetition tunnel/raw: {ratios}.\n" + machine_note(r)
    )
    head = ["measure", "raw aioquic", "tunnel", "tunnel vs raw", "target"]
    return table(rows, head) + "\n\n" + note


def plot(r: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    colors = {"raw": "#4c72b0", "tunnel": "#dd8452"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    loops = list(r["loops"])
    width = 0.38
    for ax, key, label in (
        (axes[0], "mb_per_s", "MB/s (bars: median; dots: transfers)"),
        (axes[1], "cpu_ms_per_mb", "CPU ms per MB, both processes"),
    ):
        for j, p in enumerate(PATHS):
            for i, kind in enumerate(loops):
                vals = [x[key] for x in r["loops"][kind]["runs"][p]]
                x = i + (j - 0.5) * width
                ax.bar(x, median(vals), width, color=colors[p], label=p if i == 0 else None)
                ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(loops)), loops)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    main = r["loops"][r["targets"]["ratio"]["loop"]]
    axes[0].set_title(
        f"Bulk throughput: tunnel keeps {main['ratio']:.0%} on {main['loop']} (target >= 80%)"
    )
    axes[1].set_title("CPU cost of moving the bytes")
    fig.suptitle(
        f"Tunnel vs raw aioquic, {r['plan']['size_mb']} MB per transfer, "
        f"{r['quic_configuration']['max_datagram_size']}-byte datagrams ({r['started']})"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


SECTION = Section("tunnel", "tunnel bulk throughput vs a raw aioquic stream, same QUIC config", run)
