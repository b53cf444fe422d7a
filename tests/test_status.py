"""`meshllm ctl status` rendering (meshllm.status)."""

from __future__ import annotations

import msgspec

from meshllm.runtime import messages as m
from meshllm.status import format_status, table


def _status(server: m.LocalServerState, routes: m.RouteTable | None = None) -> m.NodeStatus:
    return m.NodeStatus(
        node_id="node-abc123",
        role="host",
        home="/home/u/.meshllm",
        http="127.0.0.1:9337",
        server=server,
        routes=routes or m.RouteTable(),
        actors=(
            m.ActorStatus("server_supervisor", 101, True, 0),
            m.ActorStatus("router", 102, True, 1),
            m.ActorStatus("proxy", 103, False, 12),
        ),
    )


def _column_starts(header: str, names: list[str]) -> list[int]:
    return [header.index(name) for name in names]


def _blocks(text: str) -> list[list[str]]:
    return [block.splitlines() for block in text.split("\n\n")]


def test_table_aligns_columns_and_strips_trailing_space() -> None:
    out = table([["A", "LONG HEADER", "C"], ["wide value", "x", ""]])
    lines = out.splitlines()
    assert lines[0] == "A           LONG HEADER  C"
    assert lines[1] == "wide value  x"


def test_format_status_ready_node() -> None:
    routes = m.RouteTable(
        (
            m.ModelRoute("demo", (m.RouteTarget("node-abc123", True, 8001),), ("node-abc123",)),
            m.ModelRoute("big-cold-model"),
        )
    )
    server = m.LocalServerState(model="demo", state="ready", port=8001, pid=99)
    text = format_status(_status(server, routes))
    node, models, actors = _blocks(text)

    header = ["NODE", "ROLE", "MODEL", "STATE", "API", "PORTS"]
    assert node[0].split() == header
    starts = _column_starts(node[0], header)
    row = node[1]
    for start, value in zip(
        starts,
        ["node-abc123", "host", "demo", "ready", "127.0.0.1:9337", "llama-server :8001"],
        strict=True,
    ):
        assert row[start:].startswith(value), (row, value)

    assert models[0].split() == ["MODEL", "STATUS", "REQ/MIN", "NODES"]
    assert models[1].split() == ["demo", "warm", "0", "node-abc123"]
    assert models[2].split() == ["big-cold-model", "cold", "0", "-"]

    assert actors[0].split() == ["ACTOR", "PID", "ALIVE", "RESTARTS"]
    assert [line.split() for line in actors[1:]] == [
        ["server_supervisor", "101", "yes", "0"],
        ["router", "102", "yes", "1"],
        ["proxy", "103", "no", "12"],
    ]
    # every line of a block has its columns at the same offsets
    for block in (node, models, actors):
        first = block[0].split()
        starts = _column_starts(block[0], first)
        for line in block[1:]:
            for start in starts[1:]:
                assert line[start - 2 : start] == "  ", (block, line)
    assert all(line == line.rstrip() for line in text.splitlines())


def test_format_status_failed_server_shows_reason_and_no_port() -> None:
    server = m.LocalServerState(model="demo", state="failed", reason="out of memory")
    text = format_status(_status(server))
    node = _blocks(text)[0]
    assert node[1].split()[3] == "failed"
    assert node[1].rstrip().endswith("-")  # no llama-server port
    assert node[2] == "failed: out of memory"  # the reason on a line of its own
    assert "MODEL  STATUS" not in text  # no routes: no model table


def test_format_status_node_serving_nothing() -> None:
    text = format_status(_status(m.LocalServerState()))
    row = _blocks(text)[0][1].split()
    assert row == ["node-abc123", "host", "-", "stopped", "127.0.0.1:9337", "-"]


def test_format_status_shows_the_mesh_memory_total() -> None:
    from meshllm.mesh.wire import PeerAnnouncement

    me = PeerAnnouncement(node_id="node-abc123", generation=1, vram_bytes=8_000_000_000)
    peer = PeerAnnouncement(node_id="node-def456", generation=1, vram_bytes=16_500_000_000)
    status = msgspec.structs.replace(_status(m.LocalServerState()), me=me, peers=(peer,))
    text = format_status(status)
    assert "mesh: 2 nodes, 24.50 GB of model memory" in text
    assert "node-def456" in text


def test_format_status_lite_client_has_no_server_state() -> None:
    status = msgspec.structs.replace(_status(m.LocalServerState()), role="client")
    row = _blocks(format_status(status))[0][1].split()
    assert row[1:4] == ["client", "-", "-"]


def test_peer_strings_cannot_drive_the_terminal() -> None:
    from meshllm.mesh.wire import PeerAnnouncement

    hostile = "\x1b[2J\x1b]0;owned\x07" + "x" * 500
    peer = PeerAnnouncement(node_id="node-def456", generation=1, server_state=hostile)
    status = msgspec.structs.replace(_status(m.LocalServerState()), peers=(peer,))
    text = format_status(status)
    assert "\x1b" not in text and "\x07" not in text
    assert all(len(line) < 300 for line in text.splitlines())
    assert "?[2J?]0;owned?" in text


def test_format_status_shows_the_meshs_demand_and_a_nodes_other_servers() -> None:
    from meshllm.mesh.wire import Demand, PeerAnnouncement

    routes = m.RouteTable((m.ModelRoute("demo", (m.RouteTarget("n1", True, 8001),), ("n1",)),))
    extra = m.ExtraServer("other", "ready", 8002)
    server = m.LocalServerState(model="demo", state="ready", port=8001, extras=(extra,))
    peer = PeerAnnouncement(
        node_id="b" * 16, generation=1, demand={"demo": Demand(7.5, 1)}, also_serving=("x",)
    )
    status = msgspec.structs.replace(_status(server, routes), peers=(peer,))
    node, _, models, peers = _blocks(format_status(status))[:4]
    assert node[2].split() == ["other", "ready", "llama-server", ":8002"]
    assert models[1].split() == ["demo", "warm", "7.5", "n1"]
    assert "x" in peers[1]
