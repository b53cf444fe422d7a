"""Section `versions`: this tree's node against another source tree's node, side by side.

`python -m bench versions --base-repo DIR` starts one node from DIR (the base,
e.g. a `git worktree` of the commit before a change) and one from this
repository, both on the demo model, and drives their OpenAI APIs alternately:
1-token chat latency in interleaved pairs, then ABBA rounds at concurrency 32
with the proxy actor's CPU time per request. On a small shared machine this
is the way to tell whether a proxy change helps: runs minutes apart differ
more than the change does. Not part of `all`; writes `versions.json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

from bench.common import (
    REPO,
    Context,
    RunRecord,
    Section,
    median,
    ratio,
    table,
    write_json,
)
from bench.proxy import CHAT, Paths, chat_body, new_loop, summary, throughput_round, warmup
from meshllm.testing import running_node

NAMES = ("base", "this")


def _say(msg: str) -> None:
    print(f"  [versions] {msg}", file=sys.stderr, flush=True)


async def measure(paths: dict[str, Paths], model: str, quick: bool) -> dict[str, Any]:
    for p in paths.values():
        await warmup(p, model, 20 if quick else 100)
    eps = {n: paths[n].endpoint("node") for n in NAMES}
    data = {n: eps[n].request_bytes(CHAT, chat_body(model, 1)) for n in NAMES}
    lat: dict[str, list[float]] = {n: [] for n in NAMES}
    pairs = 150 if quick else 1500
    _say(f"latency: {pairs} pairs of 1-token chats")
    for i in range(pairs):
        for n in NAMES if i % 2 == 0 else NAMES[::-1]:
            await eps[n].ready()
            t0 = time.perf_counter()
            reply = await eps[n].call(data[n])
            lat[n].append((reply.t_done - t0) * 1000)
    for ep in eps.values():
        ep.close()
    concurrency = 32
    rounds_n, round_s = (2, 1.0) if quick else (10, 2.0)
    _say(f"throughput: concurrency {concurrency}, {rounds_n} x {round_s:g} s rounds per version")
    body = chat_body(model, 1)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in NAMES}
    for r in range(rounds_n):
        for n in NAMES if r % 2 == 0 else NAMES[::-1]:
            results[n].append(await throughput_round(paths[n], "node", body, concurrency, round_s))
    out: dict[str, Any] = {"concurrency": concurrency}
    for n in NAMES:
        out[n] = {
            "latency_ms": summary(lat[n]),
            "rps": median([x["rps"] for x in results[n]]),
            "proxy_cpu_us_per_request": median(
                [x["cpu_us_per_request"]["proxy"] for x in results[n]]
            ),
            "rounds": results[n],
        }
    pairs_of_rounds = list(zip(results["base"], results["this"], strict=True))
    out["rps_ratio_paired_median"] = median([ratio(t["rps"], b["rps"]) for b, t in pairs_of_rounds])
    out["proxy_cpu_ratio_paired_median"] = median(
        [
            ratio(t["cpu_us_per_request"]["proxy"], b["cpu_us_per_request"]["proxy"])
            for b, t in pairs_of_rounds
        ]
    )
    return out


def run(ctx: Context) -> str:
    if ctx.base_repo is None:
        raise SystemExit("bench versions: give the base source tree with --base-repo DIR")
    record = RunRecord("versions", ctx.quick)
    args = ctx.node_args()
    with contextlib.ExitStack() as stack:
        _say(f"starting a node from {ctx.base_repo} (base) and one from {REPO} (this)")
        base = stack.enter_context(running_node(*args, repo=ctx.base_repo))
        this = stack.enter_context(running_node(*args, repo=REPO))
        paths = {"base": Paths(base), "this": Paths(this)}
        with asyncio.Runner(loop_factory=new_loop) as runner:
            figures = runner.run(measure(paths, this.model, ctx.quick))
    result: dict[str, Any] = {
        **record.header(),
        "base_repo": str(ctx.base_repo),
        "this_repo": str(REPO),
        "node_args": args,
        **figures,
    }
    b, t = figures["base"], figures["this"]
    rows = [
        [
            "latency p50 (1 token)",
            f"{b['latency_ms']['p50']:.3f} ms",
            f"{t['latency_ms']['p50']:.3f} ms",
            f"{t['latency_ms']['p50'] - b['latency_ms']['p50']:+.3f} ms",
        ],
        [
            "latency p99 (1 token)",
            f"{b['latency_ms']['p99']:.2f} ms",
            f"{t['latency_ms']['p99']:.2f} ms",
            f"{t['latency_ms']['p99'] - b['latency_ms']['p99']:+.2f} ms",
        ],
        [
            f"requests/s, concurrency {figures['concurrency']}",
            f"{b['rps']:.0f}",
            f"{t['rps']:.0f}",
            f"{figures['rps_ratio_paired_median']:.3f}x",
        ],
        [
            "proxy CPU per request",
            f"{b['proxy_cpu_us_per_request']:.0f} us",
            f"{t['proxy_cpu_us_per_request']:.0f} us",
            f"{figures['proxy_cpu_ratio_paired_median']:.3f}x",
        ],
    ]
    text = table(rows, ["through the node", "base", "this tree", "this vs base"])
    text += f"\n\nbase: {ctx.base_repo}; load {record.load_before}; {record.started}"
    result["table"] = text
    write_json(ctx.results_dir / "versions.json", result)
    return text


SECTION = Section(
    "versions",
    "this tree's node vs one from --base-repo DIR, side by side (not in `all`)",
    run,
    in_all=False,
)
