"""Human-readable rendering of a node's status (`meshllm ctl status`)."""

from __future__ import annotations

from meshllm.runtime.messages import NodeStatus


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


def format_status(s: NodeStatus) -> str:
    server = s.server
    llama = f"llama-server :{server.port}" if server.port else "-"
    state = "-" if s.role == "client" else server.state
    rows = [
        ["NODE", "ROLE", "MODEL", "STATE", "API", "PORTS"],
        [s.node_id, s.role, server.model or "-", state, s.http, llama],
    ]
    out = [table(rows), ""]
    if server.state == "failed" and server.reason:
        # On a line of its own: a reason can be long, and the table stays readable.
        out[-1:] = [f"failed: {printable(server.reason, 400)}", ""]
    members = [*s.peers, *([s.me] if s.me else [])]
    if members:
        total = sum(p.vram_bytes for p in members)
        nodes = f"{len(members)} node" + ("" if len(members) == 1 else "s")
        out += [f"mesh: {nodes}, {total / 1e9:.1f} GB of model memory", ""]
    model_rows = [["MODEL", "STATUS", "NODES"]]
    for route in s.routes.models:
        status = "warm" if route.targets else "cold"
        model_rows.append([route.name, status, ", ".join(route.nodes) or "-"])
    if len(model_rows) > 1:
        out += [table(model_rows), ""]
    peer_rows = [["PEER", "ROLE", "MODEL", "STATE", "API PORT", "ADDRESS"]]
    for p in s.peers:
        address = p.addresses[0] if p.addresses else "-"
        peer_rows.append(
            [p.node_id, p.role, p.serving or "-", p.server_state, str(p.http_port), address]
        )
    if len(peer_rows) > 1:
        out += [table(peer_rows), ""]
    actor_rows = [["ACTOR", "PID", "ALIVE", "RESTARTS"]]
    for a in s.actors:
        actor_rows.append([a.name, str(a.pid), "yes" if a.alive else "no", str(a.restarts)])
    out.append(table(actor_rows))
    return "\n".join(out)
