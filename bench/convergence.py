"""Section `convergence`: how fast N real nodes agree after a join and after a kill -9.

Real `meshllm up` processes on loopback (default probe settings: every 0.5 s,
1 s timeout). To stay light on a small machine, most nodes are lite clients
(`--client`, no llama-server): node 0 is a host serving the demo model, node 1
(from N = 3 on) a host serving a second demo model (`meshllm-demo-b`), the
rest lite clients; llama-server runs with `--threads 1`. The mesh grows
in place (2, then 4, then 8 nodes): for each N a base of N-1 nodes is brought
up and left to converge and settle, then, `reps` times:

1. Join: a new lite client joins with node 0's invite token. Timed from the
   moment its process is started, and separately from the moment its API
   first answers `GET /v1/models` (200), until every one of the N nodes lists
   every other as a peer (`meshllm ctl status`: `peers`). Also: until all old
   nodes list the newcomer, and until the newcomer lists all old nodes.
2. kill -9: that newcomer's whole process tree is SIGSTOPped (so nothing can
   say goodbye) and then SIGKILLed; timed until the first, and until the
   last, of the other nodes no longer lists it. Target: gone from
   every node within 5 s.

Statuses are polled from every node's control socket (what `meshllm ctl
status --json` asks) every `poll_s` seconds, all nodes at once, so each time
is an upper bound, late by at most one poll interval plus the poll's own time.
Writes `convergence.json` and `convergence.png` under the results directory.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    RunRecord,
    Section,
    machine_note,
    median,
    publish,
    pyplot,
    table,
)
from bench.mesh import (
    LOOPBACK_BIND,
    MeshError,
    MeshNode,
    StatusClient,
    http_get_status,
    kill_tree,
    peer_ids,
    start_node,
    stop_all,
    wait_api,
    wait_until,
)
from meshllm.models.demo import write_demo_model

TARGET_KILL_S = 5.0
LLAMA_ARGS = ("--llama-arg=--threads", "--llama-arg=1")
START_TIMEOUT_S = 90.0
CONVERGE_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    reps: int
    poll_s: float
    settle_s: float


FULL = Plan(sizes=(2, 4, 8), reps=3, poll_s=0.05, settle_s=1.5)
QUICK = Plan(sizes=(2, 4), reps=1, poll_s=0.05, settle_s=1.0)


def _say(msg: str) -> None:
    print(f"  [convergence] {msg}", file=sys.stderr, flush=True)


class Mesh:
    """The nodes of this section, in start order; every one is stopped at the end."""

    def __init__(self, ctx: Context, tmp: Path, nodes: list[MeshNode]) -> None:
        self.ctx = ctx
        self.tmp = tmp
        self.all = nodes
        """Every node ever started (also the killed ones), for the final stop."""
        self.base: list[MeshNode] = []
        """The live nodes that stay for the whole run."""
        self.token = ""
        self.status = StatusClient()
        self.joiners = 0

    def _start(self, name: str, *args: str) -> MeshNode:
        node = start_node(name, *args, repo=self.ctx.node_repo)
        self.all.append(node)
        return node

    async def start_first(self) -> None:
        first = self._start("host-a", *LOOPBACK_BIND, *LLAMA_ARGS)
        await wait_api(first, START_TIMEOUT_S)
        self.token = await wait_until("the invite token", [first], 10, first.token)
        self.base.append(first)

    async def grow(self, size: int) -> None:
        """Bring the base up to `size` live nodes and wait until they all agree."""
        new: list[MeshNode] = []
        while len(self.base) + len(new) < size:
            index = len(self.base) + len(new)
            if index == 1:
                model = write_demo_model(
                    self.tmp / "meshllm-demo-b.gguf", seed=1, name="meshllm-demo-b"
                )
                args: tuple[str, ...] = ("--model", str(model), *LLAMA_ARGS)
                name = "host-b"
            else:
                args, name = ("--client",), f"client-{index}"
            new.append(self._start(name, *args, "--join", self.token, *LOOPBACK_BIND))
        for node in new:
            await wait_api(node, START_TIMEOUT_S)
        self.base += new

        async def agreed() -> bool:
            statuses = await self.status.statuses(self.base)
            if any(st is None for st in statuses):
                return False
            ids = {n.node_id for n in self.base}
            return all(
                peer_ids(st) == ids - {n.node_id} for n, st in zip(self.base, statuses, strict=True)
            )

        await wait_until(f"{size} nodes to agree", self.base, CONVERGE_TIMEOUT_S, agreed)

    def composition(self, n: int) -> dict[str, Any]:
        hosts = [x for x in self.base if "--client" not in x.args]
        return {
            "nodes": n,
            "hosts": len(hosts),
            "lite_clients": n - len(hosts),
            "llama_servers": len(hosts),
            "joiner": "lite client",
        }

    def new_joiner(self) -> MeshNode:
        self.joiners += 1
        return self._start(
            f"joiner-{self.joiners}", "--client", "--join", self.token, *LOOPBACK_BIND
        )


async def api_up(node: MeshNode) -> float:
    """perf_counter() when the node's API first answers `GET /v1/models` with 200."""
    while True:
        node.check_alive()
        port = node.api_port or node.port_from_log()
        if port:
            node.api_port = port
            if await http_get_status(port, "/v1/models", timeout=1.0) == 200:
                return time.perf_counter()
        await asyncio.sleep(0.01)


async def measure_join(mesh: Mesh, plan: Plan) -> tuple[MeshNode, dict[str, Any]]:
    joiner = mesh.new_joiner()
    t0 = joiner.started_at
    api_task = asyncio.ensure_future(api_up(joiner))
    base_ids = {n.node_id for n in mesh.base}
    everyone = [*mesh.base, joiner]
    times: dict[str, float] = {}
    polls = 0
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while "converged" not in times:
            if time.monotonic() > deadline:
                raise MeshError(f"no convergence within {JOIN_TIMEOUT_S:g} s after a join")
            joiner.check_alive()
            statuses = await mesh.status.statuses(everyone)
            now = time.perf_counter()
            polls += 1
            new_id = joiner.node_id
            if new_id:
                old_views = [peer_ids(st) for st in statuses[:-1]]
                if "known_by_all" not in times and all(new_id in v for v in old_views):
                    times["known_by_all"] = now
                if "joiner_knows_all" not in times and base_ids <= peer_ids(statuses[-1]):
                    times["joiner_knows_all"] = now
                ids = base_ids | {new_id}
                if all(
                    st is not None and peer_ids(st) == ids - {n.node_id}
                    for n, st in zip(everyone, statuses, strict=True)
                ):
                    times["converged"] = now
            await asyncio.sleep(plan.poll_s)
        t_api = await asyncio.wait_for(api_task, 10)
    finally:
        api_task.cancel()
    out = {
        "joiner": joiner.node_id,
        "api_up_s": t_api - t0,
        "converged_from_start_s": times["converged"] - t0,
        "converged_from_api_s": times["converged"] - t_api,
        "known_by_all_from_start_s": times["known_by_all"] - t0,
        "joiner_knows_all_from_start_s": times["joiner_knows_all"] - t0,
        "polls": polls,
    }
    return joiner, out


async def measure_kill(mesh: Mesh, victim: MeshNode, plan: Plan) -> dict[str, Any]:
    mesh.status.forget(victim)
    t0 = time.perf_counter()
    pids = kill_tree(victim)
    first = 0.0
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while True:
        statuses = await mesh.status.statuses(mesh.base)
        now = time.perf_counter()
        listing = [st is None or victim.node_id in peer_ids(st) for st in statuses]
        if not first and not all(listing):
            first = now
        if not any(listing):
            break
        if time.monotonic() > deadline:
            raise MeshError(f"node {victim.node_id} still listed {KILL_TIMEOUT_S:g} s after kill")
        for node in mesh.base:
            node.check_alive()
        await asyncio.sleep(plan.poll_s)
    victim.proc.wait(5)
    return {
        "victim": victim.node_id,
        "processes_killed": len(pids),
        "first_removed_s": first - t0,
        "gone_everywhere_s": now - t0,
    }


async def measure(ctx: Context, plan: Plan, nodes: list[MeshNode], tmp: Path) -> dict[str, Any]:
    mesh = Mesh(ctx, tmp, nodes)
    try:
        _say("starting the first node (host, demo model)")
        await mesh.start_first()
        sizes: dict[str, Any] = {}
        for n in plan.sizes:
            _say(f"N={n}: {n - 1} nodes up and agreed, then {plan.reps} x (join, kill -9)")
            await mesh.grow(n - 1)
            await asyncio.sleep(plan.settle_s)  # start-up CPU dies down
            reps: list[dict[str, Any]] = []
            for _ in range(plan.reps):
                joiner, join = await measure_join(mesh, plan)
                await asyncio.sleep(plan.settle_s)
                kill = await measure_kill(mesh, joiner, plan)
                reps.append({"join": join, "kill": kill})
                await asyncio.sleep(plan.settle_s / 2)

            def med(kind: str, key: str, reps: list[dict[str, Any]] = reps) -> float:
                return median([r[kind][key] for r in reps])

            sizes[str(n)] = {
                **mesh.composition(n),
                "join_from_start_s": med("join", "converged_from_start_s"),
                "join_from_api_s": med("join", "converged_from_api_s"),
                "api_up_s": med("join", "api_up_s"),
                "kill_first_removed_s": med("kill", "first_removed_s"),
                "kill_gone_everywhere_s": med("kill", "gone_everywhere_s"),
                "kill_gone_everywhere_max_s": max(r["kill"]["gone_everywhere_s"] for r in reps),
                "reps": reps,
            }
        return {"sizes": sizes, "status_asks": mesh.status.asks}
    finally:
        mesh.status.close()


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("convergence", ctx.quick)
    nodes: list[MeshNode] = []
    try:
        with tempfile.TemporaryDirectory(prefix="meshllm-bench-conv-") as tmp:
            try:
                figures = asyncio.run(measure(ctx, plan, nodes, Path(tmp)))
            finally:
                _say(f"stopping {sum(1 for n in nodes if n.proc.poll() is None)} nodes")
                stop_all(nodes)
    except MeshError as exc:
        raise SystemExit(f"convergence: {exc}") from None
    result: dict[str, Any] = {
        **record.header(),
        "setup": {
            "nodes": "node 0: host (demo model); node 1 (N >= 3): host (meshllm-demo-b); "
            "the rest, and every joiner/victim: lite clients (--client)",
            "llama_server_args": list(LLAMA_ARGS),
            "bind": "127.0.0.1:0",
            "probe": "node defaults (--probe-interval 0.5 --probe-timeout 1.0)",
            "kill": "SIGSTOP of the joiner's whole process tree, then SIGKILL",
            "poll_interval_s": plan.poll_s,
            "status_source": "each node's control socket (GetStatus, as `meshllm ctl status`)",
        },
        "plan": asdict(plan),
        **figures,
    }
    worst = max(s["kill_gone_everywhere_max_s"] for s in result["sizes"].values())
    result["targets"] = {
        "kill_gone_everywhere_s": {
            "value": worst,
            "target": f"<= {TARGET_KILL_S}",
            "met": worst <= TARGET_KILL_S,
        }
    }
    return publish(ctx, "convergence", result, render_table, plot)


def render_table(r: dict[str, Any]) -> str:
    rows = []
    for n, s in r["sizes"].items():
        worst = s["kill_gone_everywhere_max_s"]
        rows.append(
            [
                n,
                f"{s['hosts']} + {s['lite_clients']}",
                f"{s['api_up_s']:.2f} s",
                f"{s['join_from_start_s']:.2f} s",
                f"{s['join_from_api_s']:.2f} s",
                f"{s['kill_first_removed_s']:.2f} s",
                f"{s['kill_gone_everywhere_s']:.2f} s",
                f"<= {TARGET_KILL_S:g} s: {'met' if worst <= TARGET_KILL_S else 'MISSED'}",
            ]
        )
    head = [
        "N",
        "hosts + clients",
        "joiner API up",
        "join: all agree (from start)",
        "(from API up)",
        "kill -9: first removal",
        "gone everywhere",
        "target",
    ]
    note = (
        f"Medians of {r['plan']['reps']} joins and kills per N (the joiner is a lite client and "
        f"is the one killed; 'from API up' < 0: the mesh agreed before the joiner's API "
        f"answered); statuses polled every {r['plan']['poll_s'] * 1000:.0f} ms; "
        f"llama-server --threads 1; default probes (0.5 s / 1 s).\n" + machine_note(r)
    )
    return table(rows, head) + "\n\n" + note


def plot(r: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    series = [
        ("join: from start", "join", "converged_from_start_s", "#4c72b0"),
        ("join: from API up", "join", "converged_from_api_s", "#55a868"),
        ("kill -9: first removal", "kill", "first_removed_s", "#c44e52"),
        ("kill -9: gone everywhere", "kill", "gone_everywhere_s", "#dd8452"),
    ]
    sizes = list(r["sizes"])
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(series)
    for j, (label, kind, key, color) in enumerate(series):
        for i, n in enumerate(sizes):
            vals = [rep[kind][key] for rep in r["sizes"][n]["reps"]]
            x = i + (j - (len(series) - 1) / 2) * width
            ax.bar(x, median(vals), width, color=color, label=label if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
    ax.axhline(TARGET_KILL_S, color="#c44e52", linestyle="--", linewidth=1)
    ax.text(len(sizes) - 0.5, TARGET_KILL_S, "kill -9 target", va="bottom", ha="right")
    ax.set_xticks(range(len(sizes)), [f"N = {n}" for n in sizes])
    ax.set_ylabel("seconds (bars: median; dots: repetitions)")
    ax.set_title("Real nodes on loopback: convergence after a join and after a kill -9")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


SECTION = Section(
    "convergence", "N = 2, 4, 8 real nodes: time to agree after a join and a kill -9", run
)
