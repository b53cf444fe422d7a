"""Human-readable rendering of a node's status (`meshllm ctl status`)."""

from __future__ import annotations

from meshllm.placement.demand import mesh_rpm
from meshllm.placement.memory import format_bytes
from meshllm.runtime.messages import ModelRoute, NodeStatus


def printable(text: str, limit: int = 64) -> str:
    """`text` safe for a terminal: what peers announce could hold escape sequences
    (a hostile member could rewrite the screen), so control characters become `?`,
    and the cell is cut at `limit` characters."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def table(rows: list[list[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def shown_state(state: str, paused: bool) -> str:
    """A server's state as shown: `paused` (`meshllm ctl pause`), `paused (draining)`
    while its last requests end."""
    if not paused:
        return state
    return "paused (draining)" if state in ("ready", "loading") else "paused"


def format_status(s: NodeStatus) -> str:
    server = s.server
    worker = server.split is not None and server.split.part == "worker"
    program = "rpc-server" if worker else "llama-server"
    llama = f"{program} :{server.port}" if server.port else "-"
    state = "-" if s.role == "client" else shown_state(server.state, server.paused)
    rows = [
        ["NODE", "ROLE", "MODEL", "STATE", "API", "PORTS"],
        [s.node_id, s.role, server.model or "-", state, s.http, llama],
    ]
    for x in server.extras:  # `--models-dir`: its other llama-servers
        port = f"llama-server :{x.port}" if x.port else "-"
        rows.append(["", "", x.model, shown_state(x.state, server.paused), "", port])
    out = [table(rows), ""]
    if server.state == "failed" and server.reason:
        # On a line of its own: a reason can be long, and the table stays readable.
        out[-1:] = [f"failed: {printable(server.reason, 400)}", ""]
    elif server.split is not None and server.split.part != "host":
        part = server.split
        doing = f"worker for {part.host}" if part.part == "worker" else part.note
        out[-1:] = [f"split: {printable(doing, 400)}", ""]
    if s.backends:
        backend_rows = [["BACKEND", "STATE", "MODELS"]]
        for b in s.backends:
            health = "up" if b.up else f"down: {b.reason}"
            backend_rows.append([b.url, health, ", ".join(b.models) or "-"])
        out += [table(backend_rows), ""]
    members = [*s.peers, *([s.me] if s.me else [])]
    if members:
        total = sum(p.vram_bytes for p in members)
        nodes = f"{len(members)} node" + ("" if len(members) == 1 else "s")
        out += [f"mesh: {nodes}, {format_bytes(total)} of model memory", ""]
    model_rows = [["MODEL", "STATUS", "REQ/MIN", "NODES"]]
    notes = []
    rpm = mesh_rpm(members)  # what every node announced (placement follows it)
    for route in s.routes.models:
        status = "warm" if route.targets else "cold"
        rate = f"{rpm.get(route.name, 0.0):g}"
        model_rows.append([route.name, status, rate, ", ".join(split_text(route)) or "-"])
        if route.note:
            notes.append(f"{printable(route.name)}: {printable(route.note, 400)}")
    if len(model_rows) > 1:
        out += [table(model_rows), *notes, ""]
    peer_rows = [["PEER", "ROLE", "MODEL", "STATE", "API PORT", "ADDRESS"]]
    for p in s.peers:
        address = p.addresses[0] if p.addresses else "-"
        names = [*([p.serving] if p.serving else []), *p.also_serving]
        names += [f"{name} (backend)" for name in p.backend_models]
        model = ", ".join(names)
        peer_rows.append(
            [
                p.node_id,
                p.role,
                model or "-",
                shown_state(p.server_state, p.paused),
                str(p.http_port),
                address,
            ]
        )
    if len(peer_rows) > 1:
        out += [table(peer_rows), ""]
    actor_rows = [["ACTOR", "PID", "ALIVE", "RESTARTS"]]
    for a in s.actors:
        actor_rows.append([a.name, str(a.pid), "yes" if a.alive else "no", str(a.restarts)])
    out.append(table(actor_rows))
    return "\n".join(out)


def split_text(route: ModelRoute) -> list[str]:
    """A model's servers for the table: a split one as its host and workers with their
    shares of the layers (`host 62% + worker 38%`)."""
    out = []
    for target in route.targets:
        members = (target.node_id, *target.workers)
        if target.workers:
            parts = zip(members, target.shares, strict=False)
            out.append(" + ".join(f"{node} {share:.0%}" for node, share in parts))
        elif target.backend:
            where = f" {target.host}:{target.port}" if target.host else ""
            out.append(f"{target.node_id} (backend{where})")
        else:
            out.append(target.node_id)
    return out or list(route.nodes)
