"""Section `proxy`: one node on the demo model, direct-to-llama-server vs through the node.

Everything is measured in one run against the same llama-server, with the two
paths interleaved so that machine noise (other processes on a shared box)
hits both equally; the figures that matter are differences and ratios.

1. Latency: non-streaming chat, max_tokens 1, sequential requests on one
   keep-alive connection per path, alternating direct / node (ABAB, BABA...).
   Added latency = node percentile - direct percentile (p50, p99); the median
   of the per-pair differences is reported too.
2. Streaming: max_tokens 64, alternating; time to first token (first SSE event
   carrying content) and the mean gap between content events. Each stream
   gets a fresh connection opened before its clock starts (llama-server closes
   the connection after a streamed response), identically for both paths.
   On a busy machine llama-server sometimes delivers a whole stream in one
   burst (its HTTP thread is not scheduled while the tiny model generates), so
   TTFT is bimodal; the median of per-pair differences is reported too.
3. Throughput: non-streaming, max_tokens 1, with 8 and 32 concurrent
   keep-alive connections; timed rounds alternate direct / node (ABBA order)
   and the medians over rounds are compared, with latency percentiles under
   that load. CPU seconds of the proxy actor, llama-server and the load
   generator are read from /proc around each round and reported per request.

The node's llama-server runs with `--threads 1 --threads-http 96` by default
(see `--help`): with its own defaults its CPU cost per request swings tenfold
with the machine's load (spinning worker threads), and its 6 HTTP threads,
each held by one keep-alive connection, queue 32 direct connections behind
each other (p99 ~0.5 s), which would make a poor baseline.

Writes `proxy.json` and `proxy.png` under the results directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Context,
    RunRecord,
    Section,
    cpu_seconds,
    machine_note,
    mean,
    median,
    percentile,
    publish,
    pyplot,
    ratio,
    table,
)
from bench.httpclient import Endpoint, HTTPError
from meshllm.testing import NodeProcess, running_node

CHAT = "/v1/chat/completions"
TARGET_ADDED_P50_MS = 1.0
TARGET_RPS_RATIO_C32 = 0.9
PATHS = ("direct", "node")


@dataclass(frozen=True)
class Plan:
    warmup: int
    latency_pairs: int
    stream_pairs: int
    stream_tokens: int
    concurrency: tuple[int, ...]
    rounds: int
    round_s: float


FULL = Plan(
    warmup=100,
    latency_pairs=1500,
    stream_pairs=60,
    stream_tokens=64,
    concurrency=(8, 32),
    rounds=8,
    round_s=2.5,
)
QUICK = Plan(
    warmup=20,
    latency_pairs=150,
    stream_pairs=8,
    stream_tokens=64,
    concurrency=(8, 32),
    rounds=2,
    round_s=1.0,
)


def chat_body(model: str, max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "mean": mean(ms),
        "min": min(ms) if ms else float("nan"),
        "max": max(ms) if ms else float("nan"),
    }


class Paths:
    """The two endpoints under test and the processes whose CPU time we watch."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.ports = {"direct": node.server_port, "node": node.port}
        self.proxy_pid = node.actor_pids.get("proxy", 0)

    def endpoint(self, path: str) -> Endpoint:
        return Endpoint("127.0.0.1", self.ports[path])

    def cpu(self) -> dict[str, float]:
        return {
            "proxy": cpu_seconds(self.proxy_pid) if self.proxy_pid else 0.0,
            "llama_server": cpu_seconds(self.node.server_pid) if self.node.server_pid else 0.0,
            "client": time.process_time(),
        }


# -- the three measurements ------------------------------------------------------


async def warmup(paths: Paths, model: str, n: int) -> None:
    for path in PATHS:
        ep = paths.endpoint(path)
        data = ep.request_bytes(CHAT, chat_body(model, 1))
        for _ in range(n):
            await ep.call(data)
        sdata = ep.request_bytes(CHAT, chat_body(model, 8, stream=True))
        for _ in range(max(2, n // 20)):
            await ep.call(sdata, sse=True)
            ep.close()
        ep.close()


async def measure_latency(paths: Paths, model: str, pairs: int) -> dict[str, Any]:
    eps = {p: paths.endpoint(p) for p in PATHS}
    data = {p: eps[p].request_bytes(CHAT, chat_body(model, 1)) for p in PATHS}
    samples: dict[str, list[float]] = {p: [] for p in PATHS}
    diffs: list[float] = []
    for i in range(pairs):
        order = PATHS if i % 2 == 0 else PATHS[::-1]
        pair: dict[str, float] = {}
        for p in order:
            ep = eps[p]
            await ep.ready()
            t0 = time.perf_counter()
            reply = await ep.call(data[p])
            pair[p] = (reply.t_done - t0) * 1000
        for p in PATHS:
            samples[p].append(pair[p])
        diffs.append(pair["node"] - pair["direct"])
    for ep in eps.values():
        ep.close()
    stats = {p: summary(samples[p]) for p in PATHS}
    return {
        "direct": stats["direct"],
        "node": stats["node"],
        "added_p50_ms": stats["node"]["p50"] - stats["direct"]["p50"],
        "added_p99_ms": stats["node"]["p99"] - stats["direct"]["p99"],
        "paired_diff_p50_ms": median(diffs),
        "target_added_p50_ms": TARGET_ADDED_P50_MS,
        "retries": {p: eps[p].retries for p in PATHS},
        "samples_ms": {p: [round(x, 4) for x in samples[p]] for p in PATHS},
    }


async def measure_streaming(paths: Paths, model: str, pairs: int, tokens: int) -> dict[str, Any]:
    eps = {p: paths.endpoint(p) for p in PATHS}
    data = {p: eps[p].request_bytes(CHAT, chat_body(model, tokens, stream=True)) for p in PATHS}
    ttft: dict[str, list[float]] = {p: [] for p in PATHS}
    gap: dict[str, list[float]] = {p: [] for p in PATHS}
    total: dict[str, list[float]] = {p: [] for p in PATHS}
    got_tokens: dict[str, list[int]] = {p: [] for p in PATHS}
    for i in range(pairs):
        order = PATHS if i % 2 == 0 else PATHS[::-1]
        for p in order:
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
            got_tokens[p].append(reply.tokens)
    out: dict[str, Any] = {"max_tokens": tokens}
    for p in PATHS:
        out[p] = {
            "ttft_ms": summary(ttft[p]),
            "gap_ms": summary(gap[p]),
            "total_ms": summary(total[p]),
            "tokens_mean": mean([float(t) for t in got_tokens[p]]),
        }
    out["added_ttft_p50_ms"] = out["node"]["ttft_ms"]["p50"] - out["direct"]["ttft_ms"]["p50"]
    out["paired_ttft_diff_p50_ms"] = median(
        [n - d for d, n in zip(ttft["direct"], ttft["node"], strict=True)]
    )
    out["added_gap_mean_ms"] = out["node"]["gap_ms"]["mean"] - out["direct"]["gap_ms"]["mean"]
    out["gap_ratio"] = ratio(out["node"]["gap_ms"]["mean"], out["direct"]["gap_ms"]["mean"])
    return out


async def throughput_round(
    paths: Paths, path: str, body: bytes, concurrency: int, seconds: float
) -> dict[str, Any]:
    eps = [paths.endpoint(path) for _ in range(concurrency)]
    data = eps[0].request_bytes(CHAT, body)
    await asyncio.gather(*(ep.ready() for ep in eps))
    errors: list[str] = []
    counts = [0] * concurrency
    retries = [0] * concurrency

    latencies: list[float] = []

    async def worker(i: int, ep: Endpoint) -> None:
        while (start := time.perf_counter()) < stop_at:
            try:
                reply = await ep.call(data)
            except (HTTPError, OSError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                ep.close()
                if len(errors) > 100:
                    raise
                continue
            latencies.append(reply.t_done - start)
            counts[i] += 1
        # Close at once: an idle keep-alive connection pins one of llama-server's
        # HTTP threads, which would stall the workers still waiting for one.
        retries[i] = ep.retries
        ep.close()

    cpu0 = paths.cpu()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(worker(i, ep) for i, ep in enumerate(eps)))
    elapsed = time.perf_counter() - t0
    cpu1 = paths.cpu()
    done = sum(counts)
    cpu_us = {
        k: (cpu1[k] - cpu0[k]) * 1e6 / done if done else float("nan")
        for k in cpu0
        if k != "proxy" or path == "node"
    }
    return {
        "path": path,
        "rps": done / elapsed,
        "requests": done,
        "seconds": elapsed,
        "errors": len(errors),
        "first_errors": errors[:3],
        "retries": sum(retries),
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": max(latencies, default=float("nan")) * 1000,
        },
        "cpu_us_per_request": cpu_us,
    }


async def measure_throughput(
    paths: Paths, model: str, concurrency: int, rounds: int, seconds: float
) -> dict[str, Any]:
    body = chat_body(model, 1)
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    for r in range(rounds):
        # ABBA order: a slow drift of the machine favours neither path.
        for p in PATHS if r % 2 == 0 else PATHS[::-1]:
            results[p].append(await throughput_round(paths, p, body, concurrency, seconds))
    rps = {p: median([x["rps"] for x in results[p]]) for p in PATHS}
    round_ratios = [
        ratio(n["rps"], d["rps"]) for d, n in zip(results["direct"], results["node"], strict=True)
    ]

    def cpu_median(p: str, key: str) -> float:
        return median([x["cpu_us_per_request"][key] for x in results[p]])

    return {
        "concurrency": concurrency,
        "direct_rps": rps["direct"],
        "node_rps": rps["node"],
        "ratio": ratio(rps["node"], rps["direct"]),
        "round_ratios": round_ratios,
        "round_ratios_median": median(round_ratios),
        "latency_under_load_ms": {
            p: {q: median([x["latency_ms"][q] for x in results[p]]) for q in ("p50", "p99", "max")}
            for p in PATHS
        },
        "cpu_us_per_request": {
            "proxy": cpu_median("node", "proxy"),
            "llama_server_direct": cpu_median("direct", "llama_server"),
            "llama_server_node": cpu_median("node", "llama_server"),
            "client_direct": cpu_median("direct", "client"),
            "client_node": cpu_median("node", "client"),
        },
        "errors": sum(x["errors"] for p in PATHS for x in results[p]),
        "rounds": results,
    }


# -- orchestration --------------------------------------------------------------


@contextlib.contextmanager
def py_spy(pid: int, out: Path, enabled: bool) -> Iterator[None]:
    """Sample the proxy actor with py-spy while the block runs (when asked and installed)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not enabled or not pid or not os.access(exe, os.X_OK):
        if enabled:
            print("  (profiling skipped: install py-spy into the venv)", file=sys.stderr)
        yield
        return
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "flamegraph",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # let it attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if out.exists():
            print(f"  py-spy profile of the proxy actor: {out}", file=sys.stderr)
        else:
            why = (err or "").strip()[-2000:] or f"exit code {proc.returncode}"
            print(f"  py-spy wrote no profile:\n{why}", file=sys.stderr)


async def measure(node: NodeProcess, plan: Plan, ctx: Context) -> dict[str, Any]:
    paths = Paths(node)
    model = node.model
    say = _say
    await warmup(paths, model, plan.warmup)
    gc.collect()
    gc.freeze()
    gc.disable()  # no collector pauses in the middle of a timed request
    try:
        say(f"latency: {plan.latency_pairs} pairs of 1-token chats")
        latency = await measure_latency(paths, model, plan.latency_pairs)
        say(f"streaming: {plan.stream_pairs} pairs of {plan.stream_tokens}-token streams")
        streaming = await measure_streaming(paths, model, plan.stream_pairs, plan.stream_tokens)
        throughput: dict[str, Any] = {}
        profile = ctx.results_dir / "proxy-profile.svg"
        for c in plan.concurrency:
            say(f"throughput: concurrency {c}, {plan.rounds} x {plan.round_s:g} s rounds per path")
            with py_spy(paths.proxy_pid, profile, ctx.profile and c == max(plan.concurrency)):
                throughput[f"c{c}"] = await measure_throughput(
                    paths, model, c, plan.rounds, plan.round_s
                )
    finally:
        gc.enable()
        gc.unfreeze()
    return {"latency": latency, "streaming": streaming, "throughput": throughput}


def _say(msg: str) -> None:
    print(f"  [proxy] {msg}", file=sys.stderr, flush=True)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("proxy", ctx.quick)
    _say("starting a node on the demo model")
    node_args = ctx.node_args()
    with running_node(*node_args, repo=ctx.node_repo or REPO) as node:
        _say(
            f"node API :{node.port}, llama-server :{node.server_port}, "
            f"proxy pid {node.actor_pids.get('proxy')}"
        )
        with asyncio.Runner(loop_factory=new_loop) as runner:
            figures = runner.run(measure(node, plan, ctx))
        model = node.model
    result: dict[str, Any] = {
        **record.header(),
        "model": model,
        "node_args": node_args,
        "node_repo": str(ctx.node_repo or REPO),
        "llama_server_settings": ctx.llama_settings(),
        "plan": asdict(plan),
        **figures,
    }
    result["targets"] = targets(result)
    return publish(ctx, "proxy", result, render_table, plot)


def targets(r: dict[str, Any]) -> dict[str, Any]:
    added = r["latency"]["added_p50_ms"]
    c32 = r["throughput"].get("c32", {}).get("ratio", float("nan"))
    return {
        "added_p50_ms": {"value": added, "target": f"<= {TARGET_ADDED_P50_MS}", "met": added <= 1},
        "rps_ratio_c32": {
            "value": c32,
            "target": f">= {TARGET_RPS_RATIO_C32}",
            "met": c32 >= TARGET_RPS_RATIO_C32,
        },
    }


def render_table(r: dict[str, Any]) -> str:
    lat, st, tp, tg = r["latency"], r["streaming"], r["throughput"], r["targets"]

    def ms(x: float) -> str:
        return f"{x:.2f} ms"

    def mark(met: bool) -> str:
        return "met" if met else "MISSED"

    rows = [
        [
            "latency p50 (1 token)",
            ms(lat["direct"]["p50"]),
            ms(lat["node"]["p50"]),
            f"{lat['added_p50_ms']:+.2f} ms",
            f"<= +{TARGET_ADDED_P50_MS:g} ms: {mark(tg['added_p50_ms']['met'])}",
        ],
        [
            "latency p99 (1 token)",
            ms(lat["direct"]["p99"]),
            ms(lat["node"]["p99"]),
            f"{lat['added_p99_ms']:+.2f} ms",
            "",
        ],
        [
            f"stream TTFT p50 ({st['max_tokens']} tokens)",
            ms(st["direct"]["ttft_ms"]["p50"]),
            ms(st["node"]["ttft_ms"]["p50"]),
            f"{st['added_ttft_p50_ms']:+.2f} ms",
            "",
        ],
        [
            "stream inter-chunk gap (mean)",
            ms(st["direct"]["gap_ms"]["mean"]),
            ms(st["node"]["gap_ms"]["mean"]),
            f"{st['gap_ratio']:.2f}x",
            "",
        ],
    ]
    for key, t in tp.items():
        goal = ""
        if key == "c32":
            goal = f">= {TARGET_RPS_RATIO_C32:g}x: {mark(tg['rps_ratio_c32']['met'])}"
        rows.append(
            [
                f"requests/s, concurrency {t['concurrency']}",
                f"{t['direct_rps']:.0f}",
                f"{t['node_rps']:.0f}",
                f"{t['ratio']:.3f}x",
                goal,
            ]
        )
    if tp:
        last = tp[max(tp, key=lambda k: tp[k]["concurrency"])]
        loaded = last["latency_under_load_ms"]
        rows.append(
            [
                f"latency p99 at concurrency {last['concurrency']}",
                ms(loaded["direct"]["p99"]),
                ms(loaded["node"]["p99"]),
                f"{loaded['node']['p99'] - loaded['direct']['p99']:+.2f} ms",
                "",
            ]
        )
        cpu = last["cpu_us_per_request"]
        rows.append(
            [
                f"llama-server CPU per request (c{last['concurrency']})",
                f"{cpu['llama_server_direct']:.0f} us",
                f"{cpu['llama_server_node']:.0f} us",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"proxy CPU per request (c{last['concurrency']})",
                "",
                f"{cpu['proxy']:.0f} us",
                "",
                "",
            ]
        )
    head = ["measure", "direct", "through node", "node vs direct", "target"]
    return table(rows, head) + "\n\n" + machine_note(r)


def plot(r: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    colors = {"direct": "#4c72b0", "node": "#dd8452"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    lat = r["latency"]
    ax = axes[0]
    for p in PATHS:
        xs = sorted(lat["samples_ms"][p])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"{p}  p50 {lat[p]['p50']:.2f} ms", color=colors[p])
    hi = max(lat["direct"]["p99"], lat["node"]["p99"]) * 1.3
    ax.set_xlim(0, hi)
    ax.set_xlabel("latency (ms), 1-token chat")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Latency CDF: added p50 {lat['added_p50_ms']:+.2f} ms")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")

    st = r["streaming"]
    ax = axes[1]
    labels = ["TTFT p50", "gap mean x10"]
    width = 0.38
    for j, p in enumerate(PATHS):
        vals = [st[p]["ttft_ms"]["p50"], st[p]["gap_ms"]["mean"] * 10]
        xs = [i + (j - 0.5) * width for i in range(len(labels))]
        ax.bar(xs, vals, width, label=p, color=colors[p])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms")
    ax.set_title(f"Streaming, {st['max_tokens']} tokens")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()

    tp = r["throughput"]
    ax = axes[2]
    keys = list(tp)
    for j, p in enumerate(PATHS):
        xs = [i + (j - 0.5) * width for i in range(len(keys))]
        ax.bar(xs, [tp[k][f"{p}_rps"] for k in keys], width, label=p, color=colors[p])
        for x, k in zip(xs, keys, strict=True):
            pts = [rd["rps"] for rd in tp[k]["rounds"][p]]
            ax.scatter([x] * len(pts), pts, color="black", s=8, zorder=3)
    ax.set_xticks(
        range(len(keys)), [f"c={tp[k]['concurrency']}\n{tp[k]['ratio']:.2f}x" for k in keys]
    )
    ax.set_ylabel("requests/s (median of rounds; dots: rounds)")
    ax.set_title("Throughput, 1-token chats")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()

    fig.suptitle(f"meshllm proxy vs direct llama-server ({r['started']})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


SECTION = Section("proxy", "one node: added latency, streaming and throughput vs direct", run)
