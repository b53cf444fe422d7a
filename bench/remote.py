"""Section `remote`: a lite client routing through the tunnel to a host, against direct.

Two real nodes on loopback: a host serving the demo model and a lite client
(`--client --join TOKEN`, no llama-server) that reaches it through the Tunnel:

    remote: bench -> client's Proxy -> client's Tunnel (unix socket) -> QUIC stream
            -> host's Tunnel -> host's llama-server
    local:  bench -> host's Proxy -> host's llama-server       (for reference)
    direct: bench -> host's llama-server

All three are driven in ONE run, interleaved request by request (the order
cycles through all six permutations), so machine noise hits each equally.

1. Latency: non-streaming chat, max_tokens 1, one keep-alive connection per
   path. Added latency = remote percentile - direct percentile (p50, p99),
   plus the median of per-round differences.
2. Streaming: max_tokens 64; time to first token and the mean gap between
   content events, each stream on a fresh connection opened before its clock.
3. CPU: user+system seconds of the client's Proxy and Tunnel, the host's
   Tunnel and Proxy, and llama-server, read from /proc around the latency
   run, per request of the path that uses them. (`--profile` also records
   py-spy flame graphs of the three processes on the remote path.)

Targets (issue 8): the remote path adds <= 1 ms p50 and <= 1.5 ms time to first
token over direct, and costs <= 1 ms of CPU per remote request in total across the
client's Proxy and Tunnel and the host's Tunnel, stated from a full run.
Writes `remote.json` and `remote.png` under the results directory.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    RunRecord,
    Section,
    cpu_seconds,
    machine_note,
    mean,
    median,
    publish,
    pyplot,
    ratio,
    table,
)
from bench.httpclient import Endpoint, HTTPError
from bench.mesh import (
    LOOPBACK_BIND,
    MeshNode,
    StatusClient,
    run_on_mesh,
    start_node,
    wait_api,
    wait_until,
)
from bench.proxy import CHAT, chat_body, py_spy, summary

PATHS = ("direct", "local", "remote")
ORDERS = list(itertools.permutations(PATHS))
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_TTFT_MS = 1.5
TARGET_CPU_US = 1000.0
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Plan:
    warmup: int
    latency_rounds: int
    stream_rounds: int
    stream_tokens: int


FULL = Plan(warmup=60, latency_rounds=1500, stream_rounds=60, stream_tokens=64)
QUICK = Plan(warmup=15, latency_rounds=120, stream_rounds=6, stream_tokens=64)


def _say(msg: str) -> None:
    print(f"  [remote] {msg}", file=sys.stderr, flush=True)


@dataclass
class Mesh:
    host: MeshNode
    client: MeshNode
    model: str
    server_port: int
    pids: dict[str, int]
    """Processes whose CPU time is read: client_proxy, client_tunnel, host_tunnel, ..."""

    def port(self, path: str) -> int:
        return {
            "direct": self.server_port,
            "local": self.host.api_port,
            "remote": self.client.api_port,
        }[path]

    def endpoint(self, path: str) -> Endpoint:
        return Endpoint("127.0.0.1", self.port(path))

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}


async def start_mesh(ctx: Context, nodes: list[MeshNode], status: StatusClient) -> Mesh:
    repo = ctx.node_repo
    host = start_node("host", *LOOPBACK_BIND, *ctx.node_args(), repo=repo)
    nodes.append(host)
    await wait_api(host, START_TIMEOUT_S)

    async def host_ready() -> Any:
        st = await status.status(host)
        return st if st and st.server.state == "ready" and st.server.port else None

    host_st = await wait_until("the host's llama-server", [host], START_TIMEOUT_S, host_ready)
    token = await wait_until("the host's invite token", [host], 10, host.token)
    model = host_st.server.model
    client = start_node("client", "--client", "--join", token, *LOOPBACK_BIND, repo=repo)
    nodes.append(client)
    await wait_api(client, START_TIMEOUT_S)

    async def routed() -> Any:
        st = await status.status(client)
        if st is None:
            return None
        for route in st.routes.models:
            if route.name == model and any(not t.local for t in route.targets):
                return st
        return None

    client_st = await wait_until(f"the client to route {model}", [client], 30, routed)
    host_pids = {a.name: a.pid for a in host_st.actors}
    client_pids = {a.name: a.pid for a in client_st.actors}
    pids = {
        "client_proxy": client_pids.get("proxy", 0),
        "client_tunnel": client_pids.get("tunnel", 0),
        "host_tunnel": host_pids.get("tunnel", 0),
        "host_proxy": host_pids.get("proxy", 0),
        "llama_server": host_st.server.pid,
    }
    return Mesh(host, client, model, host_st.server.port, pids)


# -- measurements ---------------------------------------------------------------------


async def warmup(mesh: Mesh, n: int) -> None:
    for path in PATHS:
        ep = mesh.endpoint(path)
        data = ep.request_bytes(CHAT, chat_body(mesh.model, 1))
        for _ in range(n):
            await ep.call(data)
        sdata = ep.request_bytes(CHAT, chat_body(mesh.model, 8, stream=True))
        for _ in range(max(2, n // 20)):
            await ep.call(sdata, sse=True)
            ep.close()
        ep.close()


async def measure_latency(mesh: Mesh, rounds: int) -> dict[str, Any]:
    eps = {p: mesh.endpoint(p) for p in PATHS}
    data = {p: eps[p].request_bytes(CHAT, chat_body(mesh.model, 1)) for p in PATHS}
    samples: dict[str, list[float]] = {p: [] for p in PATHS}
    cpu0, t0_all = mesh.cpu(), time.process_time()
    for i in range(rounds):
        for p in ORDERS[i % len(ORDERS)]:
            ep = eps[p]
            await ep.ready()
            t0 = time.perf_counter()
            reply = await ep.call(data[p])
            samples[p].append((reply.t_done - t0) * 1000)
    cpu1, bench_cpu = mesh.cpu(), time.process_time() - t0_all
    for ep in eps.values():
        ep.close()
    stats = {p: summary(samples[p]) for p in PATHS}
    used = {k: cpu1[k] - cpu0[k] for k in cpu0}
    per_path = {
        "client_proxy": "remote",
        "client_tunnel": "remote",
        "host_tunnel": "remote",
        "host_proxy": "local",
    }
    cpu_us = {k: used[k] * 1e6 / rounds for k in per_path if k in used}
    if "llama_server" in used:
        cpu_us["llama_server_any_path"] = used["llama_server"] * 1e6 / (rounds * len(PATHS))
    cpu_us["bench_client_any_path"] = bench_cpu * 1e6 / (rounds * len(PATHS))
    cpu_us["remote_path_total"] = sum(
        cpu_us.get(k, 0.0) for k in per_path if per_path[k] == "remote"
    )

    def diffs(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(samples[a], samples[b], strict=True)]

    return {
        **{p: stats[p] for p in PATHS},
        "added_p50_ms": stats["remote"]["p50"] - stats["direct"]["p50"],
        "added_p99_ms": stats["remote"]["p99"] - stats["direct"]["p99"],
        "paired_diff_p50_ms": median(diffs("remote", "direct")),
        "local_added_p50_ms": stats["local"]["p50"] - stats["direct"]["p50"],
        "remote_vs_local_p50_ms": stats["remote"]["p50"] - stats["local"]["p50"],
        "target_added_p50_ms": TARGET_ADDED_P50_MS,
        "retries": {p: eps[p].retries for p in PATHS},
        "cpu_us_per_request": cpu_us,
        "samples_ms": {p: [round(x, 4) for x in samples[p]] for p in PATHS},
    }


async def measure_streaming(mesh: Mesh, rounds: int, tokens: int) -> dict[str, Any]:
    eps = {p: mesh.endpoint(p) for p in PATHS}
    data = {
        p: eps[p].request_bytes(CHAT, chat_body(mesh.model, tokens, stream=True)) for p in PATHS
    }
    ttft: dict[str, list[float]] = {p: [] for p in PATHS}
    gap: dict[str, list[float]] = {p: [] for p in PATHS}
    total: dict[str, list[float]] = {p: [] for p in PATHS}
    got: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(rounds):
        for p in ORDERS[i % len(ORDERS)]:
            ep = eps[p]
            await ep.ready()  # a fresh connection, opened before the clock starts
            t0 = time.perf_counter()
            reply = await ep.call(data[p], sse=True)
            ep.close()
            if reply.tokens == 0:
                raise HTTPError(f"{p}: a stream without any content event")
            ttft[p].append((reply.t_first_token - t0) * 1000)
            if reply.tokens > 1:
                gap[p].append(
                    (reply.t_last_token - reply.t_first_token) * 1000 / (reply.tokens - 1)
                )
            total[p].append((reply.t_done - t0) * 1000)
            got[p].append(float(reply.tokens))
    out: dict[str, Any] = {"max_tokens": tokens}
    for p in PATHS:
        out[p] = {
            "ttft_ms": summary(ttft[p]),
            "gap_ms": summary(gap[p]),
            "total_ms": summary(total[p]),
            "tokens_mean": mean(got[p]),
        }
    out["added_ttft_p50_ms"] = out["remote"]["ttft_ms"]["p50"] - out["direct"]["ttft_ms"]["p50"]
    out["paired_ttft_diff_p50_ms"] = median(
        [r - d for d, r in zip(ttft["direct"], ttft["remote"], strict=True)]
    )
    out["added_gap_mean_ms"] = out["remote"]["gap_ms"]["mean"] - out["direct"]["gap_ms"]["mean"]
    out["gap_ratio"] = ratio(out["remote"]["gap_ms"]["mean"], out["direct"]["gap_ms"]["mean"])
    return out


async def measure(ctx: Context, plan: Plan, nodes: list[MeshNode]) -> dict[str, Any]:
    status = StatusClient()
    try:
        _say("starting a host (demo model) and a lite client joined to it")
        mesh = await start_mesh(ctx, nodes, status)
    finally:
        status.close()
    _say(
        f"llama-server :{mesh.server_port}, host API :{mesh.host.api_port}, "
        f"client API :{mesh.client.api_port}; pids {mesh.pids}"
    )
    await warmup(mesh, plan.warmup)
    gc.collect()
    gc.freeze()
    gc.disable()  # no collector pauses in the middle of a timed request
    try:
        _say(f"latency: {plan.latency_rounds} rounds of 1-token chats on {len(PATHS)} paths")
        if ctx.profile:
            ctx.results_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for who in ("client_proxy", "client_tunnel", "host_tunnel"):
                out = ctx.results_dir / f"remote-profile-{who}.svg"
                stack.enter_context(py_spy(mesh.pids.get(who, 0), out, ctx.profile))
            latency = await measure_latency(mesh, plan.latency_rounds)
        _say(f"streaming: {plan.stream_rounds} rounds of {plan.stream_tokens}-token streams")
        streaming = await measure_streaming(mesh, plan.stream_rounds, plan.stream_tokens)
    finally:
        gc.enable()
        gc.unfreeze()
    return {
        "model": mesh.model,
        "nodes": {
            "host": {"args": list(mesh.host.args), "node_id": mesh.host.node_id},
            "client": {"args": list(mesh.client.args), "node_id": mesh.client.node_id},
        },
        "pids": mesh.pids,
        "latency": latency,
        "streaming": streaming,
    }


# -- orchestration ----------------------------------------------------------------------


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("remote", ctx.quick)
    figures = run_on_mesh("remote", lambda nodes: measure(ctx, plan, nodes))
    result: dict[str, Any] = {
        **record.header(),
        "paths": {
            "direct": "bench -> host's llama-server",
            "local": "bench -> host's Proxy -> host's llama-server",
            "remote": "bench -> client's Proxy -> client's Tunnel -> QUIC -> host's Tunnel "
            "-> host's llama-server",
        },
        "llama_server_settings": ctx.llama_settings(),
        "plan": asdict(plan),
        **figures,
    }
    added = result["latency"]["added_p50_ms"]
    ttft = result["streaming"]["added_ttft_p50_ms"]
    cpu = result["latency"]["cpu_us_per_request"].get("remote_path_total", float("nan"))
    result["targets"] = {
        "added_p50_ms": {
            "value": added,
            "target": f"<= {TARGET_ADDED_P50_MS}",
            "met": added <= TARGET_ADDED_P50_MS,
        },
        "added_ttft_p50_ms": {
            "value": ttft,
            "target": f"<= {TARGET_ADDED_TTFT_MS}",
            "met": ttft <= TARGET_ADDED_TTFT_MS,
        },
        "cpu_us_per_remote_request": {
            "value": cpu,
            "target": f"<= {TARGET_CPU_US:g}",
            "met": cpu <= TARGET_CPU_US,
        },
    }
    return publish(ctx, "remote", result, render_table, plot)


def render_table(r: dict[str, Any]) -> str:
    lat, st = r["latency"], r["streaming"]
    targets = r["targets"]
    met = targets["added_p50_ms"]["met"]
    ttft_met = targets.get("added_ttft_p50_ms", {}).get("met")
    cpu_met = targets.get("cpu_us_per_remote_request", {}).get("met")

    def ms(x: float) -> str:
        return f"{x:.2f} ms"

    rows = [
        [
            "latency p50 (1 token)",
            *(ms(lat[p]["p50"]) for p in PATHS),
            f"{lat['added_p50_ms']:+.2f} ms",
            f"<= +{TARGET_ADDED_P50_MS:g} ms: {'met' if met else 'MISSED'}",
        ],
        [
            "latency p99 (1 token)",
            *(ms(lat[p]["p99"]) for p in PATHS),
            f"{lat['added_p99_ms']:+.2f} ms",
            "",
        ],
        [
            "per-round difference, p50",
            "",
            "",
            "",
            f"{lat['paired_diff_p50_ms']:+.2f} ms",
            "",
        ],
        [
            f"stream TTFT p50 ({st['max_tokens']} tokens)",
            *(ms(st[p]["ttft_ms"]["p50"]) for p in PATHS),
            f"{st['added_ttft_p50_ms']:+.2f} ms",
            f"<= +{TARGET_ADDED_TTFT_MS:g} ms: {'met' if ttft_met else 'MISSED'}",
        ],
        [
            "stream inter-chunk gap (mean)",
            *(ms(st[p]["gap_ms"]["mean"]) for p in PATHS),
            f"{st['added_gap_mean_ms']:+.3f} ms ({st['gap_ratio']:.2f}x)",
            "",
        ],
    ]
    cpu = lat["cpu_us_per_request"]
    parts = ", ".join(
        f"{k.replace('_', ' ')} {cpu[k]:.0f} us"
        for k in ("client_proxy", "client_tunnel", "host_tunnel")
        if k in cpu
    )
    head = ["measure", "direct", "host API", "via client (remote)", "remote vs direct", "target"]
    note = (
        f"CPU per remote request: {parts} (total {cpu.get('remote_path_total', 0):.0f} us, "
        f"target <= {TARGET_CPU_US:.0f} us: {'met' if cpu_met else 'MISSED'}); "
        f"host Proxy per local request {cpu.get('host_proxy', float('nan')):.0f} us.\n"
        + machine_note(r)
    )
    return table(rows, head) + "\n\n" + note


def plot(r: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    colors = {"direct": "#4c72b0", "local": "#55a868", "remote": "#dd8452"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    lat = r["latency"]
    ax = axes[0]
    for p in PATHS:
        xs = sorted(lat["samples_ms"][p])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"{p}  p50 {lat[p]['p50']:.2f} ms", color=colors[p])
    ax.set_xlim(0, max(lat[p]["p99"] for p in PATHS) * 1.3)
    ax.set_xlabel("latency (ms), 1-token chat")
    ax.set_ylabel("fraction of requests")
    ax.set_title(
        f"Latency CDF: remote adds {lat['added_p50_ms']:+.2f} ms p50 "
        f"(target <= {TARGET_ADDED_P50_MS:g})"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")

    st = r["streaming"]
    ax = axes[1]
    labels = ["TTFT p50", "gap mean x10"]
    width = 0.27
    for j, p in enumerate(PATHS):
        vals = [st[p]["ttft_ms"]["p50"], st[p]["gap_ms"]["mean"] * 10]
        xs = [i + (j - 1) * width for i in range(len(labels))]
        ax.bar(xs, vals, width, label=p, color=colors[p])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms")
    ax.set_title(f"Streaming, {st['max_tokens']} tokens")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()

    ax = axes[2]
    cpu = lat["cpu_us_per_request"]
    names = [k for k in ("client_proxy", "client_tunnel", "host_tunnel", "host_proxy") if k in cpu]
    ax.bar(
        [n.replace("_", "\n") for n in names],
        [cpu[n] for n in names],
        color=[colors["local"] if n == "host_proxy" else colors["remote"] for n in names],
    )
    ax.set_ylabel("CPU us per request of its path")
    ax.set_title("Where the CPU goes (orange: remote path)")
    ax.grid(alpha=0.3, axis="y")

    fig.suptitle(f"meshllm remote path (lite client -> tunnel -> host) vs direct ({r['started']})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


SECTION = Section(
    "remote", "lite client -> tunnel -> host vs direct: added latency, streaming, CPU", run
)
