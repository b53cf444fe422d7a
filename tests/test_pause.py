"""Giving the machine back (`meshllm ctl pause`, `--pause-when-busy`), sans-I/O: the
election and the route table count a paused node out, status shows it, and the busy
watcher decides with hysteresis from fake samples."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import pytest

from meshllm.http.routing import Serving, build_route_table
from meshllm.mesh import wire
from meshllm.mesh.status import build_mesh_status, own_card, peer_card
from meshllm.placement.election import COLD_GRACE_S, Decision, Elector, Reason, serving_counts
from meshllm.runtime import messages as m
from meshllm.runtime.busy import (
    BusyWatcher,
    CpuSample,
    GpuSampler,
    descendants,
    gpu_others_percent,
    machine_ticks,
    others_percent,
    parent_of,
    process_ticks,
    sample_cpu,
)
from meshllm.status import format_status, shown_state
from tests.test_election import ann, on_disk, online, view


def paused(a: wire.PeerAnnouncement) -> wire.PeerAnnouncement:
    return msgspec.structs.replace(a, paused=True)


# -- election --------------------------------------------------------------------------------


def test_a_paused_server_does_not_count() -> None:
    anns = [ann("a", "M", vram=8), paused(ann("b", "M", vram=8)), paused(ann("c", "N"))]
    assert serving_counts(anns) == {"M": 1}


def test_a_waiting_node_takes_the_model_of_a_paused_one_at_once() -> None:
    models = [online("M", 1)]
    anns = [paused(ann("a", "M", vram=8, requested=("M",))), ann("n", vram=8)]
    decision = Elector().update(view("n", 8, models, anns), 0)
    assert decision == Decision("M", Reason.UNSERVED_DOWNLOAD, download=True)


def test_a_paused_waiting_node_is_no_contender() -> None:
    # As in test_election: n2 leaves cold C to the lower id n1 and waits; unless n1 is paused.
    seed = ann("s", "A", vram=8, requested=("A", "C"))
    n1 = ann("n1", vram=8, disk=("C",))
    n2 = ann("n2", vram=8, disk=("A", "C"))
    models = [on_disk("A", 1), on_disk("C", 1)]
    waiting = Elector().update(view("n2", 8, models, [seed, n1, n2]), 0)
    assert waiting == Decision(None, Reason.WAITING, detail="C left to n1")
    taken = Elector().update(view("n2", 8, models, [seed, paused(n1), n2]), 0)
    assert taken == Decision("C", Reason.UNSERVED_ON_DISK)


def test_a_redundant_server_moves_to_a_paused_nodes_model_after_the_grace() -> None:
    models = [online("A", 1), online("C", 1)]

    def mesh(c_paused: bool) -> list[wire.PeerAnnouncement]:
        c = ann("c", "C", vram=8, requested=("C",))
        return [
            ann("s", "A", vram=48, requested=("A", "C")),
            ann("r1", "A", vram=8),
            paused(c) if c_paused else c,
        ]

    el = Elector()
    el.update(view("r1", 8, models, mesh(False)), 0)
    assert el.update(view("r1", 8, models, mesh(True)), 10) is None
    moved = el.update(view("r1", 8, models, mesh(True)), 10 + COLD_GRACE_S)
    assert moved is not None and moved.model == "C"


# -- routes and status -----------------------------------------------------------------------


READY = m.LocalServerState(model="M", path="/m/M.gguf", state="ready", port=8001)


def test_a_paused_local_server_is_no_target() -> None:
    table = build_route_table("me", msgspec.structs.replace(READY, paused=True), (), {"M"})
    assert table == m.RouteTable((m.ModelRoute("M"),))
    remote = [Serving("M", "peer", 9000)]
    table = build_route_table("me", msgspec.structs.replace(READY, paused=True), remote)
    (route,) = table.models
    assert [t.node_id for t in route.targets] == ["peer"]


def test_paused_survives_the_wire_and_old_announcements_are_not_paused() -> None:
    a = paused(ann("0123456789abcdef", "M"))
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=wire.PeerAnnouncement)
    assert decoded.paused
    old = {k: v for k, v in msgspec.structs.asdict(a).items() if k != "paused"}
    from_old = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=wire.PeerAnnouncement)
    assert not from_old.paused


def test_status_and_console_show_paused() -> None:
    assert shown_state("ready", False) == "ready"
    assert shown_state("ready", True) == "paused (draining)"
    assert shown_state("stopped", True) == "paused"
    status = m.NodeStatus(
        node_id="n",
        role="idle",
        home="/h",
        http="127.0.0.1:9337",
        server=m.LocalServerState(paused=True),
        routes=m.RouteTable(),
        peers=(paused(ann("0123456789abcdef", "M")),),
    )
    lines = format_status(status).splitlines()
    assert "paused" in lines[1]
    assert any(line.startswith("0123456789abcdef") and "paused" in line for line in lines)
    me = own_card("n", False, m.LocalServerState(model="M", state="stopped", paused=True), 0, 1)
    assert me.paused and peer_card(paused(ann("0123456789abcdef", "M"))).paused
    mesh = build_mesh_status(me, m.MeshView("n"), m.RouteTable((m.ModelRoute("M"),)), "")
    assert mesh.models[0].loading == ()  # a paused node is not about to serve it


# -- the busy watcher ------------------------------------------------------------------------


def feed(watcher: BusyWatcher, samples: Sequence[tuple[float, float]]) -> list[tuple[float, str]]:
    """(time, use) samples in; the (time, action) of each decision out."""
    out: list[tuple[float, str]] = []
    for now, use in samples:
        action = watcher.observe(use, now)
        if action is not None:
            out.append((now, action))
    return out


def test_pauses_only_after_staying_busy_for_the_window() -> None:
    w = BusyWatcher(50, busy_for_s=30, calm_for_s=60, margin=10)
    # A spike, a dip that restarts the count, then a run of busy samples.
    samples = [(0, 90), (10, 90), (20, 40), (30, 90), (50, 80), (59, 80), (60, 51), (70, 95)]
    assert feed(w, samples) == [(60, "pause")]
    assert w.paused


def test_resumes_only_after_staying_under_the_margin() -> None:
    w = BusyWatcher(50, busy_for_s=30, calm_for_s=60, margin=10)
    feed(w, [(0, 90), (30, 90)])
    # 45% is under 50 but inside the band: not calm; 39% is.
    samples = [(40, 45), (100, 45), (110, 39), (150, 39), (160, 41), (170, 30), (229, 30)]
    assert feed(w, samples) == []
    assert feed(w, [(230, 20)]) == [(230, "resume")]
    assert not w.paused
    # Back to watching for busy: it takes the whole window again.
    assert feed(w, [(240, 99), (269, 99), (270, 99)]) == [(270, "pause")]


def test_bursty_use_never_flaps() -> None:
    w = BusyWatcher(50, busy_for_s=30, calm_for_s=60, margin=10)
    # Busy 20 s out of every 40 s, for a day, sampled every 2 s: never 30 s in a row.
    samples = [(t, 100.0 if t % 40 < 20 else 0.0) for t in range(0, 86400, 2)]
    assert feed(w, samples) == []


def test_a_hand_resume_resets_the_watcher() -> None:
    w = BusyWatcher(50, busy_for_s=30)
    feed(w, [(0, 90), (30, 90)])
    w.reset()
    assert not w.paused and w.since is None
    assert feed(w, [(31, 90), (60, 90), (61, 90)]) == [(61, "pause")]


PROC_STAT = """cpu  100 5 50 800 20 1 2 3 0 0
cpu0 50 2 25 400 10 0 1 1 0 0
intr 12345
"""


def test_machine_ticks_count_busy_without_idle_and_iowait() -> None:
    assert machine_ticks(PROC_STAT) == (161, 981)
    with pytest.raises(ValueError):
        machine_ticks("intr 1\n")


def test_process_stat_with_a_tricky_name() -> None:
    stat = "4242 (llama server) x) S 17 4242 4242 0 -1 4194560 1 0 0 0 70 30 5 5 20 0 9 0 1"
    assert parent_of(stat) == 17
    assert process_ticks(stat) == 100


def test_descendants_follow_the_whole_tree() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1, 21: 20}
    assert descendants(10, parents) == {10, 11, 12, 13}


def test_others_use_leaves_out_this_nodes_processes() -> None:
    before = CpuSample(busy=1000, total=10000, own={1: 100, 2: 300})
    # 400 busy ticks of 1000, 150 of them ours: others used 25%.
    after = CpuSample(busy=1400, total=11000, own={1: 150, 2: 400})
    assert others_percent(before, after) == pytest.approx(25.0)
    # llama-server (pid 2) stopped in between: its past ticks are not taken off.
    gone = CpuSample(busy=1400, total=11000, own={1: 150})
    assert others_percent(before, gone) == pytest.approx(35.0)
    # A new process of ours counts from zero; no time passed: 0.
    new = CpuSample(busy=1400, total=11000, own={1: 150, 2: 400, 3: 50})
    assert others_percent(before, new) == pytest.approx(20.0)
    assert others_percent(after, after) == 0.0


def test_sample_cpu_reads_this_machine_and_finds_our_own_processes() -> None:
    sample = sample_cpu(os.getpid())
    assert 0 < sample.busy <= sample.total
    assert os.getpid() in sample.own


def test_gpu_use_of_other_processes() -> None:
    assert gpu_others_percent([(1, 30), (1, 50), (2, 20), (9, 99)], own={9}) == 60.0
    assert gpu_others_percent([(1, 90), (2, 80)], own=set()) == 100.0
    assert gpu_others_percent([], own=set()) == 0.0


@dataclass
class FakeSample:
    pid: int
    timeStamp: int  # NVML's field names
    smUtil: int


class FakeNvml:
    """pynvml's calls that GpuSampler makes, over two devices."""

    def __init__(self, samples: dict[int, list[FakeSample]]) -> None:
        self.samples = samples
        self.asked: list[tuple[int, int]] = []

    def nvmlInit(self) -> None:  # pynvml's names
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.samples)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetProcessUtilization(self, handle: int, since: int) -> list[FakeSample]:
        self.asked.append((handle, since))
        if not self.samples[handle]:
            raise RuntimeError("Not Found")
        return self.samples[handle]


def test_gpu_sampler_takes_the_busiest_device_and_moves_its_window() -> None:
    nvml = FakeNvml({0: [FakeSample(5, 100, 40), FakeSample(6, 120, 70)], 1: []})
    gpu = GpuSampler(nvml)
    assert gpu.others_percent(own={6}) == 40.0
    assert gpu.others_percent(own=set()) == 100.0
    assert nvml.asked == [(0, 0), (1, 0), (0, 120), (1, 0)]


def test_no_gpu_no_sample() -> None:
    class Broken(FakeNvml):
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    assert GpuSampler(Broken({})).others_percent(set()) is None
