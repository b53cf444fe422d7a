"""Section `router`: two replicas against one, and a load run (issue 11, item 8).

Real nodes on loopback: host A serves the demo model, a lite client C
(`--client --join TOKEN`, no llama-server) is the entry node the benchmark
talks to, and later host B joins and serves the same model:

1. Replicas: concurrency 8, non-streaming chats of max_tokens 32, each with a
   distinct prompt (so prompt affinity spreads them), first with A alone, then
   with A and B. Requests per second of each, their ratio (target >= 1.6x), and
   the share each replica took (lines with "total time =" added to each
   host's `logs/llama-server.log`).
2. Load: N concurrent streaming clients (full 200 for 60 s, quick 20 for 5 s)
   through C into the two-replica mesh, each stream on a fresh connection:
   errors (target 0), p50/p99 time to first token, RSS and open file
   descriptors of C's processes before/after (growth target < 10%, no leak),
   and the processes of every node before/after (no leak).

Writes `router.json` under the results directory.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import (
    Context,
    RunRecord,
    Section,
    machine_note,
    publish,
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
from bench.proxy import CHAT, summary
from meshllm.testing import group_pids, group_rss_kib, open_fds, process_names, served_count
from meshllm.up import demo_model

TARGET_RATIO = 1.6
TARGET_RSS_GROWTH_PCT = 10.0
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Plan:
    concurrency: int
    replica_s: float
    max_tokens: int
    load_clients: int
    load_s: float
    load_tokens: int


FULL = Plan(concurrency=8, replica_s=30, max_tokens=32, load_clients=200, load_s=60, load_tokens=16)
QUICK = Plan(concurrency=8, replica_s=6, max_tokens=32, load_clients=20, load_s=5, load_tokens=16)


def _say(msg: str) -> None:
    print(f"  [router] {msg}", file=sys.stderr, flush=True)


def body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> bytes:
    b: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        b["stream"] = True
    return json.dumps(b, separators=(",", ":")).encode()


def snapshot(entry: MeshNode, nodes: list[MeshNode]) -> dict[str, Any]:
    return {
        "entry_rss_kib": group_rss_kib(entry),
        "entry_fds": open_fds(entry),
        "entry_processes": len(group_pids(entry)),
        "processes": process_names(nodes),
    }


# -- measurements ---------------------------------------------------------------------


async def replicas_run(
    port: int, model: str, plan: Plan, hosts: list[MeshNode], tag: str
) -> dict[str, Any]:
    """Concurrency-`plan.concurrency` distinct-prompt chats for `plan.replica_s` seconds."""
    before = [served_count(h) for h in hosts]
    counter = iter(range(10**9))
    ok, errors = 0, Counter[str]()
    latencies: list[float] = []
    stop = time.monotonic() + plan.replica_s

    async def worker() -> None:
        nonlocal ok
        ep = Endpoint("127.0.0.1", port)
        while time.monotonic() < stop:
            prompt = f"{tag} request {next(counter)}: tell me something about the number"
            data = ep.request_bytes(CHAT, body(model, prompt, plan.max_tokens))
            t0 = time.perf_counter()
            try:
                reply = await ep.call(data)
            except (HTTPError, OSError) as exc:
                errors[str(exc)[:80]] += 1
                ep.close()
                continue
            latencies.append((reply.t_done - t0) * 1000)
            ok += 1
        ep.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(0.5)  # let the logs catch up
    took = [served_count(h) - b for h, b in zip(hosts, before, strict=True)]
    total = sum(took) or 1
    return {
        "replicas": len(hosts),
        "requests": ok,
        "elapsed_s": elapsed,
        "rps": ok / elapsed,
        "latency_ms": summary(latencies),
        "errors": dict(errors),
        "served": {h.name: n for h, n in zip(hosts, took, strict=True)},
        "share": {h.name: n / total for h, n in zip(hosts, took, strict=True)},
    }


async def load_run(port: int, model: str, plan: Plan) -> dict[str, Any]:
    """`load_clients` streaming clients in a loop, each stream on a fresh connection."""
    ttft: list[float] = []
    errors: Counter[str] = Counter()
    ok = 0
    stop = time.monotonic() + plan.load_s

    async def client(i: int) -> None:
        nonlocal ok
        ep = Endpoint("127.0.0.1", port)
        n = 0
        while time.monotonic() < stop:
            data = ep.request_bytes(
                CHAT, body(model, f"load client {i} stream {n}", plan.load_tokens, stream=True)
            )
            n += 1
            t0 = time.perf_counter()
            try:
                reply = await ep.call(data, sse=True)
                if reply.tokens == 0:
                    raise HTTPError("a stream without any content event")
            except (HTTPError, OSError) as exc:
                errors[str(exc)[:80]] += 1
                continue
            finally:
                ep.close()
            ttft.append((reply.t_first_token - t0) * 1000)
            ok += 1

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(plan.load_clients)))
    elapsed = time.monotonic() - t0
    return {
        "clients": plan.load_clients,
        "streams": ok,
        "elapsed_s": elapsed,
        "streams_per_s": ok / elapsed,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "ttft_ms": summary(ttft),
    }


async def routed_targets(status: StatusClient, node: MeshNode, model: str, n: int) -> Any:
    st = await status.status(node)
    if st is None:
        return None
    for route in st.routes.models:
        if route.name == model and len([t for t in route.targets if not t.local]) >= n:
            return st
    return None


async def start_host(
    ctx: Context, name: str, nodes: list[MeshNode], status: StatusClient, *join: str
) -> Any:
    node = start_node(name, *join, *LOOPBACK_BIND, *ctx.node_args(), repo=ctx.node_repo)
    nodes.append(node)
    await wait_api(node, START_TIMEOUT_S)

    async def ready() -> Any:
        st = await status.status(node)
        return st if st and st.server.state == "ready" and st.server.port else None

    return node, await wait_until(f"{name}'s llama-server", [node], START_TIMEOUT_S, ready)


async def measure(ctx: Context, plan: Plan, nodes: list[MeshNode]) -> dict[str, Any]:
    status = StatusClient()
    try:
        _say("starting host A (demo model) and a lite client C joined to it")
        a, a_st = await start_host(ctx, "host-a", nodes, status)
        model = a_st.server.model
        demo = demo_model().path
        token = await wait_until("A's invite token", [a], 10, a.token)
        c = start_node("client", "--client", "--join", token, *LOOPBACK_BIND, repo=ctx.node_repo)
        nodes.append(c)
        await wait_api(c, START_TIMEOUT_S)
        await wait_until(
            f"C to route {model}", [c], 30, lambda: routed_targets(status, c, model, 1)
        )
        _say(f"one replica: concurrency {plan.concurrency} for {plan.replica_s:g} s")
        await replicas_run(c.api_port, model, Plan(**{**asdict(plan), "replica_s": 2}), [a], "w")
        one = await replicas_run(c.api_port, model, plan, [a], "one")

        _say("starting host B (demo model) joined to A")
        b, _ = await start_host(ctx, "host-b", nodes, status, "--join", token, "--model", demo)
        await wait_until(
            "C to route to A and B", [c], 60, lambda: routed_targets(status, c, model, 2)
        )
        await replicas_run(c.api_port, model, Plan(**{**asdict(plan), "replica_s": 2}), [a, b], "v")
        _say(f"two replicas: concurrency {plan.concurrency} for {plan.replica_s:g} s")
        two = await replicas_run(c.api_port, model, plan, [a, b], "two")

        _say(f"load: {plan.load_clients} streaming clients for {plan.load_s:g} s")
        await load_run(c.api_port, model, Plan(**{**asdict(plan), "load_s": 2}))
        await asyncio.sleep(3)  # the warm-up fills connection pools before the snapshot
        before = snapshot(c, nodes)
        load = await load_run(c.api_port, model, plan)
        await asyncio.sleep(3)  # let closed connections and finished requests settle
        after = snapshot(c, nodes)
    finally:
        status.close()
    load["before"], load["after"] = before, after
    load["rss_growth_pct"] = 100 * ratio(
        after["entry_rss_kib"] - before["entry_rss_kib"], before["entry_rss_kib"]
    )
    return {"model": model, "one": one, "two": two, "load": load}


# -- orchestration ----------------------------------------------------------------------


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("router", ctx.quick)
    figures = run_on_mesh("router", lambda nodes: measure(ctx, plan, nodes))
    result: dict[str, Any] = {
        **record.header(),
        "llama_server_settings": ctx.llama_settings(),
        "plan": asdict(plan),
        **figures,
    }
    rps_ratio = ratio(result["two"]["rps"], result["one"]["rps"])
    load = result["load"]
    result["rps_ratio"] = rps_ratio
    result["targets"] = {
        "rps_ratio": {"value": rps_ratio, "target": f">= {TARGET_RATIO}"},
        "load_errors": {"value": load["errors"], "target": "0"},
        "rss_growth_pct": {"value": load["rss_growth_pct"], "target": f"< {TARGET_RSS_GROWTH_PCT}"},
        "fd_leak": {
            "value": load["after"]["entry_fds"] - load["before"]["entry_fds"],
            "target": "<= 0",
        },
        "process_leak": {
            "value": load["after"]["processes"] != load["before"]["processes"],
            "target": "False",
        },
    }
    t = result["targets"]
    t["rps_ratio"]["met"] = rps_ratio >= TARGET_RATIO
    t["load_errors"]["met"] = load["errors"] == 0
    t["rss_growth_pct"]["met"] = load["rss_growth_pct"] < TARGET_RSS_GROWTH_PCT
    t["fd_leak"]["met"] = t["fd_leak"]["value"] <= 0
    t["process_leak"]["met"] = not t["process_leak"]["value"]
    return publish(ctx, "router", result, render_table, lambda r, out: None)


def render_table(r: dict[str, Any]) -> str:
    one, two, load, t = r["one"], r["two"], r["load"], r["targets"]

    def met(key: str) -> str:
        return f"{t[key]['target']}: {'met' if t[key]['met'] else 'MISSED'}"

    def share(run: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.0%}" for k, v in run["share"].items())

    def errs(run: dict[str, Any]) -> str:
        return str(sum(run["errors"].values()))

    b, a = load["before"], load["after"]
    procs = lambda s: ", ".join(f"{k} {v}" for k, v in sorted(s["processes"].items()))  # noqa: E731
    rows = [
        [
            f"1 replica, c={r['plan']['concurrency']}",
            f"{one['rps']:.2f} req/s ({one['requests']} reqs, {errs(one)} errors)",
            share(one),
        ],
        [
            f"2 replicas, c={r['plan']['concurrency']}",
            f"{two['rps']:.2f} req/s ({two['requests']} reqs, {errs(two)} errors)",
            share(two),
        ],
        ["2 vs 1 replicas", f"{r['rps_ratio']:.2f}x", met("rps_ratio")],
        [
            f"load: {load['clients']} streams, {r['plan']['load_s']:g} s",
            f"{load['streams']} streams, {load['errors']} errors",
            met("load_errors"),
        ],
        [
            "load: TTFT p50 / p99",
            f"{load['ttft_ms']['p50']:.0f} / {load['ttft_ms']['p99']:.0f} ms",
            "",
        ],
        [
            "entry node RSS before -> after",
            f"{b['entry_rss_kib'] / 1024:.0f} -> {a['entry_rss_kib'] / 1024:.0f} MiB "
            f"({load['rss_growth_pct']:+.1f}%)",
            met("rss_growth_pct"),
        ],
        [
            "entry node open fds before -> after",
            f"{b['entry_fds']} -> {a['entry_fds']}",
            met("fd_leak"),
        ],
        ["processes before", procs(b), ""],
        [
            "processes after",
            procs(a),
            "no leak: " + ("met" if t["process_leak"]["met"] else "MISSED"),
        ],
    ]
    return table(rows, ["measure", "value", "target / share"]) + "\n\n" + machine_note(r)


SECTION = Section(
    "router",
    "two replicas vs one at concurrency 8, and a load run of many streams",
    run,
)
