"""Section `affinity`: prompt-cache affinity against plain least-outstanding (issue 11, item 2).

Real nodes on loopback: hosts A and B serve the demo model (llama-server with
its defaults: 4 slots, each keeping the KV cache of its last prompt, and an
8 GiB host-memory prompt cache, `--cache-ram`); two lite clients joined to A are
the entry nodes, one with affinity (the default) and one with `--no-affinity`.
The same workload goes through each, the modes alternating (ABBA over rounds,
each round with fresh system prompts, so neither finds the other's cached):

- 8 conversations, each with a long system prompt of its own (`system_chars`
  characters, about 0.9 demo-model tokens each: ~1,800 tokens in the full run,
  ~550 in the quick one) and several turns; their turns interleave in a
  shuffled order, 4 in flight at a time (as many users' would). Each turn is a
  streamed chat that resends the whole conversation (the assistant's earlier
  turns as a fixed short text), so everything but the newest messages is cached
  on a replica that served the conversation before.

Per mode: time to first token (p50/p90, every turn and follow-up turns only),
the prompt tokens llama-server actually evaluated and those it took from its
cache (each stream's last event: `timings.prompt_n` and `timings.cache_n`), the
share of follow-up turns that found their conversation cached, and the requests
each replica served (lines with "total time =" in its `logs/llama-server.log`).

Writes `affinity.json` under the results directory.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import Context, RunRecord, Section, machine_note, publish, ratio, table
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
from bench.router import START_TIMEOUT_S, routed_targets, start_host
from meshllm.testing import served_count
from meshllm.up import demo_model

MODES = ("affinity", "no-affinity")
ASSISTANT_TURN = "Noted, I will keep that in mind."
TEMPLATE_TOKENS = 64
"""A follow-up turn "found its conversation cached" with more cached tokens than this:
more than the chat template's and the system prompt's first words, which every
conversation shares."""
WORDS = [
    "mesh",
    "node",
    "replica",
    "cache",
    "prompt",
    "token",
    "route",
    "balance",
    "gossip",
    "tunnel",
    "stream",
    "model",
    "server",
    "slot",
    "queue",
    "health",
    "probe",
    "latency",
    "budget",
    "policy",
    "memory",
    "thread",
    "socket",
    "answer",
]


@dataclass(frozen=True)
class Plan:
    conversations: int
    """Conversations per mode and round, each with a system prompt of its own; their
    turns are interleaved in a shuffled order."""
    at_once: int
    """Turns (of different conversations) in flight at the same time."""
    turns: int
    system_chars: int
    max_tokens: int
    rounds: int
    """Rounds per mode; the modes alternate ABBA over them."""


FULL = Plan(conversations=8, at_once=4, turns=6, system_chars=2000, max_tokens=16, rounds=2)
QUICK = Plan(conversations=8, at_once=4, turns=3, system_chars=600, max_tokens=16, rounds=1)


def _say(msg: str) -> None:
    print(f"  [affinity] {msg}", file=sys.stderr, flush=True)


def system_prompt(tag: str, chars: int) -> str:
    """A long system prompt of its own for conversation `tag` (the tag leads, so the
    affinity key, which reads the prompt's first 2 kB, differs between conversations)."""
    rng = random.Random(tag)
    words = [f"You are assistant {tag}. Follow these rules."]
    while sum(len(w) + 1 for w in words) < chars:
        words.append(f"Rule {len(words)}: {' '.join(rng.choices(WORDS, k=6))}.")
    return " ".join(words)


def turn_body(model: str, messages: list[dict[str, str]], max_tokens: int) -> bytes:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def timings(last_data: bytes) -> tuple[int, int]:
    """(prompt tokens evaluated, prompt tokens from the cache) of a stream's last event."""
    try:
        t = json.loads(last_data.removeprefix(b"data: "))["timings"]
        return int(t["prompt_n"]), int(t["cache_n"])
    except (ValueError, KeyError, TypeError):
        return -1, -1


async def run_phase(
    port: int, model: str, plan: Plan, hosts: list[MeshNode], tag: str
) -> dict[str, Any]:
    """Every turn of `plan.conversations` conversations through the entry node on `port`,
    `plan.at_once` at a time, the conversations' turns interleaved in a shuffled order
    (as many users' would be); one record per turn."""
    before = [served_count(h) for h in hosts]
    schedule = [conv for conv in range(plan.conversations) for _ in range(plan.turns)]
    random.Random(tag).shuffle(schedule)
    chats = [
        [{"role": "system", "content": system_prompt(f"{tag}-{conv}", plan.system_chars)}]
        for conv in range(plan.conversations)
    ]
    # One turn of a conversation at a time, in order (asyncio's locks are fair).
    locks = [asyncio.Lock() for _ in chats]
    turns: list[dict[str, Any]] = []
    errors: Counter[str] = Counter()

    async def worker() -> None:
        ep = Endpoint("127.0.0.1", port)
        while schedule:
            conv = schedule.pop()
            async with locks[conv]:
                messages = chats[conv]
                turn = len(messages) // 2
                messages.append({"role": "user", "content": f"Question {turn}: what about {conv}?"})
                data = ep.request_bytes(CHAT, turn_body(model, messages, plan.max_tokens))
                await ep.ready()  # a fresh connection, opened before the clock starts
                t0 = time.perf_counter()
                try:
                    reply = await ep.call(data, sse=True)
                    if reply.tokens == 0:
                        raise HTTPError("a stream without any content event")
                except (HTTPError, OSError) as exc:
                    errors[str(exc)[:80]] += 1
                    messages.pop()
                    continue
                finally:
                    ep.close()
                evaluated, cached = timings(reply.last_data)
                turns.append(
                    {
                        "conversation": conv,
                        "turn": turn,
                        "ttft_ms": (reply.t_first_token - t0) * 1000,
                        "prompt_n": evaluated,
                        "cache_n": cached,
                    }
                )
                messages.append({"role": "assistant", "content": ASSISTANT_TURN})

    await asyncio.gather(*(worker() for _ in range(plan.at_once)))
    await asyncio.sleep(0.5)  # let the llama-server logs catch up
    return {
        "turns": turns,
        "errors": dict(errors),
        "served": {h.name: served_count(h) - b for h, b in zip(hosts, before, strict=True)},
    }


def aggregate(phases: list[dict[str, Any]]) -> dict[str, Any]:
    turns = [t for p in phases for t in p["turns"]]
    follow = [t for t in turns if t["turn"] > 0]
    served: Counter[str] = Counter()
    for p in phases:
        served.update(p["served"])
    evaluated = sum(t["prompt_n"] for t in turns)
    cached = sum(t["cache_n"] for t in turns)
    return {
        "requests": len(turns),
        "errors": sum(sum(p["errors"].values()) for p in phases),
        "ttft_ms": summary([t["ttft_ms"] for t in turns]),
        "ttft_follow_up_ms": summary([t["ttft_ms"] for t in follow]),
        "prompt_evaluated": evaluated,
        "prompt_cached": cached,
        "evaluated_share": ratio(evaluated, evaluated + cached),
        "evaluated_per_follow_up": ratio(sum(t["prompt_n"] for t in follow), len(follow)),
        "follow_ups_cached": ratio(
            sum(1 for t in follow if t["cache_n"] > TEMPLATE_TOKENS), len(follow)
        ),
        "served": dict(served),
    }


async def measure(ctx: Context, plan: Plan, nodes: list[MeshNode]) -> dict[str, Any]:
    status = StatusClient()
    try:
        _say("starting hosts A and B (demo model) and two lite clients")
        a, a_st = await start_host(ctx, "host-a", nodes, status)
        model = a_st.server.model
        token = await wait_until("A's invite token", [a], 10, a.token)
        b, _ = await start_host(
            ctx, "host-b", nodes, status, "--join", token, "--model", demo_model().path
        )
        entries: dict[str, MeshNode] = {}
        for mode in MODES:
            extra = ["--no-affinity"] if mode == "no-affinity" else []
            entry = start_node(
                f"client-{mode}",
                "--client",
                "--join",
                token,
                *extra,
                *LOOPBACK_BIND,
                repo=ctx.node_repo,
            )
            nodes.append(entry)
            entries[mode] = entry
        for mode, entry in entries.items():
            await wait_api(entry, START_TIMEOUT_S)
            await wait_until(
                f"the {mode} client to route to A and B",
                [entry],
                60,
                lambda: routed_targets(status, entry, model, 2),  # noqa: B023 (awaited here)
            )
        hosts = [a, b]
        for mode, entry in entries.items():  # a warm-up through each, on prompts of its own
            await run_phase(entry.api_port, model, QUICK, hosts, f"warm-{mode}")
        phases: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        for r in range(plan.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                _say(
                    f"round {r + 1}/{plan.rounds}, {mode}: {plan.conversations} conversations "
                    f"of {plan.turns} turns, {plan.at_once} at once"
                )
                phases[mode].append(
                    await run_phase(entries[mode].api_port, model, plan, hosts, f"r{r}-{mode}")
                )
    finally:
        status.close()
    return {"model": model, **{mode: aggregate(p) for mode, p in phases.items()}}


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("affinity", ctx.quick)
    figures = run_on_mesh("affinity", lambda nodes: measure(ctx, plan, nodes))
    aff, plain = figures["affinity"], figures["no-affinity"]
    result: dict[str, Any] = {
        **record.header(),
        "llama_server_settings": ctx.llama_settings(),
        "plan": asdict(plan),
        **figures,
        "ratios": {
            "ttft_p50": ratio(plain["ttft_ms"]["p50"], aff["ttft_ms"]["p50"]),
            "ttft_follow_up_p50": ratio(
                plain["ttft_follow_up_ms"]["p50"], aff["ttft_follow_up_ms"]["p50"]
            ),
            "prompt_evaluated": ratio(plain["prompt_evaluated"], aff["prompt_evaluated"]),
        },
    }
    return publish(ctx, "affinity", result, render_table, lambda r, out: None)


def render_table(r: dict[str, Any]) -> str:
    aff, plain, q = r["affinity"], r["no-affinity"], r["ratios"]

    def ms(s: dict[str, float]) -> str:
        return f"{s['p50']:.0f} / {s['p90']:.0f} ms"

    def share(m: dict[str, Any]) -> str:
        total = sum(m["served"].values()) or 1
        return " / ".join(f"{n} ({n / total:.0%})" for n in m["served"].values())

    rows = [
        [
            "requests (errors)",
            f"{aff['requests']} ({aff['errors']})",
            f"{plain['requests']} ({plain['errors']})",
            "",
        ],
        [
            "time to first token p50 / p90",
            ms(aff["ttft_ms"]),
            ms(plain["ttft_ms"]),
            f"{q['ttft_p50']:.2f}x",
        ],
        [
            "the same, follow-up turns",
            ms(aff["ttft_follow_up_ms"]),
            ms(plain["ttft_follow_up_ms"]),
            f"{q['ttft_follow_up_p50']:.2f}x",
        ],
        [
            "prompt tokens evaluated (cached)",
            f"{aff['prompt_evaluated']} ({aff['prompt_cached']})",
            f"{plain['prompt_evaluated']} ({plain['prompt_cached']})",
            f"{q['prompt_evaluated']:.2f}x",
        ],
        [
            "evaluated per follow-up turn",
            f"{aff['evaluated_per_follow_up']:.0f}",
            f"{plain['evaluated_per_follow_up']:.0f}",
            "",
        ],
        [
            "follow-up turns that found their conversation cached",
            f"{aff['follow_ups_cached']:.0%}",
            f"{plain['follow_ups_cached']:.0%}",
            "",
        ],
        ["requests served, " + " / ".join(aff["served"]), share(aff), share(plain), ""],
    ]
    return (
        table(rows, ["measure", "affinity", "--no-affinity", "no-affinity / affinity"])
        + "\n\n"
        + machine_note(r)
    )


SECTION = Section(
    "affinity",
    "prompt-cache affinity vs plain least-outstanding: conversations with long system prompts",
    run,
)
