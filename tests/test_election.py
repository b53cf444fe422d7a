"""Auto-assignment, elections and re-decisions, sans-I/O.

The core is meshllm.placement.election.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from meshllm.mesh.wire import PeerAnnouncement, Role
from meshllm.placement.election import (
    COLD_GRACE_S,
    DEFER_STAGGER_S,
    DEFER_TIMEOUT_S,
    Decision,
    Elector,
    ModelInfo,
    NodeView,
    Reason,
    choose,
    choose_model,
    decide,
    elect_hosts,
    fits,
    need_bytes,
    serving_counts,
)

GB = 10**9
ON_DISK = "is on its disk or downloadable"


def ann(
    node_id: str,
    serving: str | None = None,
    *,
    vram: float = 0,
    disk: tuple[str, ...] = (),
    requested: tuple[str, ...] = (),
    role: Role | None = None,
    state: str = "ready",
) -> PeerAnnouncement:
    if role is None:
        role = "host" if serving else "idle"
    return PeerAnnouncement(
        node_id=node_id,
        generation=1,
        role=role,
        serving=serving,
        server_state=state if serving else "stopped",
        available_models=disk,
        requested_models=requested,
        vram_bytes=int(vram * GB),
    )


def on_disk(name: str, gb: float | None) -> ModelInfo:
    return ModelInfo(name, None if gb is None else int(gb * GB), on_disk=True)


def online(name: str, gb: float | None) -> ModelInfo:
    return ModelInfo(name, None if gb is None else int(gb * GB), downloadable=True)


def view(
    node_id: str,
    budget_gb: float,
    models: list[ModelInfo] | None = None,
    anns: list[PeerAnnouncement] | None = None,
    *,
    explicit: str | None = None,
    excluded: frozenset[str] = frozenset(),
) -> NodeView:
    return NodeView(
        node_id,
        int(budget_gb * GB),
        {m.name: m for m in models or []},
        tuple(anns or []),
        explicit=explicit,
        excluded=excluded,
    )


# -- fit -----------------------------------------------------------------------------


def test_fit_uses_the_overhead_factor() -> None:
    assert need_bytes(10 * GB) == 11 * GB
    assert fits(10 * GB, 11 * GB)
    assert not fits(10 * GB, 11 * GB - 1)
    assert not fits(10 * GB, 10 * GB)  # the file alone is not enough


def test_unknown_size_fits_any_nonzero_budget() -> None:
    assert fits(None, 1)
    assert not fits(None, 0)
    assert not fits(1, 0)


# -- the priority, one rule at a time ------------------------------------------------


def test_rule1_unserved_on_disk_comes_first() -> None:
    v = view(
        "n",
        48,
        [on_disk("A", 4), on_disk("B", 4), online("C", 30)],
        [ann("s", "A", vram=24, requested=("A", "B", "C"))],
    )
    assert choose(v) == Decision("B", Reason.UNSERVED_ON_DISK, download=False)


def test_rule2_unserved_download_beats_adding_capacity() -> None:
    v = view(
        "n",
        48,
        [on_disk("A", 4), online("C", 30)],
        [ann("s", "A", vram=24, requested=("A", "C"))],
    )
    assert choose(v) == Decision("C", Reason.UNSERVED_DOWNLOAD, download=True)


def test_rule3_least_served_on_disk_beats_less_served_download() -> None:
    anns = [
        ann("s1", "A", vram=24, requested=("A", "B")),
        ann("s2", "A", vram=24),
        ann("s3", "B", vram=24),
    ]
    # B (1 server) needs a download; A (2 servers) is on disk: the seed's order puts 3 before 4.
    v = view("n", 48, [on_disk("A", 4), online("B", 4)], anns)
    assert choose(v) == Decision("A", Reason.LEAST_SERVED_ON_DISK)


def test_rule3_takes_the_least_served_of_the_disk_models() -> None:
    anns = [
        ann("s1", "A", vram=24, requested=("A", "B")),
        ann("s2", "A", vram=24),
        ann("s3", "B", vram=24),
    ]
    v = view("n", 48, [on_disk("A", 4), on_disk("B", 4)], anns)
    assert choose_model(v) == "B"


def test_rule4_least_served_overall() -> None:
    anns = [
        ann("s1", "A", vram=24, requested=("A", "B", "C")),
        ann("s2", "A", vram=24),
        ann("s3", "B", vram=24),
        ann("s4", "B", vram=24),
        ann("s5", "C", vram=24),
    ]
    v = view("n", 48, [online("A", 4), online("B", 4), online("C", 4)], anns)
    assert choose(v) == Decision("C", Reason.LEAST_SERVED, download=True)


def test_models_that_do_not_fit_are_skipped() -> None:
    anns = [ann("s", "A", vram=24, requested=("A", "BIG", "MID"))]
    models = [on_disk("A", 4), on_disk("BIG", 40), online("MID", 9)]
    assert choose_model(view("n", 9.8, models, anns)) == "A"  # MID needs 9.9 GB
    assert choose_model(view("n", 10, models, anns)) == "MID"
    assert choose_model(view("n", 9.9, models, anns)) == "MID"
    assert choose_model(view("n", 44, models, anns)) == "BIG"


def test_nothing_fits_and_empty_catalog() -> None:
    anns = [ann("s", "BIG", vram=80, requested=("BIG",))]
    none = choose(view("n", 8, [online("BIG", 40)], anns))
    assert (none.model, none.reason) == (None, Reason.NOTHING_FITS)
    empty = choose(view("n", 8, [online("X", 1)], [ann("s")]))
    assert empty == Decision(None, Reason.EMPTY_CATALOG)
    assert choose(view("n", 0, [on_disk("X", 1)])).reason == Reason.NOTHING_FITS


def test_only_obtainable_models_are_chosen() -> None:
    # Q is in the catalog (someone has it on disk) but this node can neither find nor fetch it.
    anns = [ann("s", "A", vram=24, requested=("A",)), ann("t", None, vram=24, disk=("Q",))]
    assert choose_model(view("n", 48, [on_disk("A", 4)], anns)) == "A"
    assert choose_model(view("n", 48, [ModelInfo("A", 4 * GB)], anns)) is None


def test_excluded_models_are_never_chosen() -> None:
    anns = [ann("s", None, vram=24, requested=("A", "B"))]
    v = view("n", 48, [on_disk("A", 4), on_disk("B", 2)], anns, excluded=frozenset({"A"}))
    assert choose_model(v) == "B"


def test_own_disk_joins_the_catalog() -> None:
    assert choose(view("n", 8, [on_disk("MINE", 1)])) == Decision("MINE", Reason.UNSERVED_ON_DISK)


def test_unknown_size_is_assumed_to_fit() -> None:
    anns = [ann("s", None, requested=("hf/repo/x.gguf",))]
    v = view("n", 8, [online("hf/repo/x.gguf", None)], anns)
    assert choose_model(v) == "hf/repo/x.gguf"


# -- ties -------------------------------------------------------------------------------


def test_ties_go_to_the_largest_model_then_the_name() -> None:
    anns = [ann("s", None, requested=("a", "b", "c", "d", "u"))]
    models = [online("a", 2), online("b", 5), online("c", 5), online("d", 1), online("u", None)]
    assert choose_model(view("n", 48, models, anns)) == "b"
    assert choose_model(view("n", 5, models, anns)) == "a"  # b and c no longer fit
    assert choose_model(view("n", 48, [online("d", 1), online("u", None)], anns)) == "d"


def test_ties_in_least_served_go_to_the_largest() -> None:
    anns = [ann("s1", "small", requested=("small", "large")), ann("s2", "large")]
    models = [on_disk("small", 1), on_disk("large", 8)]
    assert choose(view("n", 48, models, anns)) == Decision("large", Reason.LEAST_SERVED_ON_DISK)


def test_same_inputs_same_answer_in_any_order() -> None:
    anns = [ann(f"s{i}", m, requested=("A", "B", "C")) for i, m in enumerate("ABCAB")]
    models = [online("A", 1), online("B", 1), online("C", 1)]
    answers = set()
    for seed in range(10):
        rng = random.Random(seed)
        shuffled_anns = rng.sample(anns, len(anns))
        shuffled_models = rng.sample(models, len(models))
        answers.add(choose_model(view("n", 48, shuffled_models, shuffled_anns)))
    assert answers == {"C"}


# -- counting ----------------------------------------------------------------------------


def test_counts_leave_out_self_clients_and_failed_servers() -> None:
    anns = [
        ann("me", "A"),
        ann("c", "A", role="client"),
        ann("f", "A", state="failed"),
        ann("ok", "A", state="loading"),
        ann("idle"),
    ]
    assert serving_counts(anns, exclude="me") == Counter({"A": 1})
    assert serving_counts(anns) == Counter({"A": 2})


def test_a_failed_only_server_leaves_the_model_unserved() -> None:
    anns = [ann("s", "A", state="failed", requested=("A",)), ann("t", "B", requested=("B",))]
    v = view("n", 48, [online("A", 1), online("B", 1)], anns)
    assert choose(v).reason == Reason.UNSERVED_DOWNLOAD
    assert choose_model(v) == "A"


# -- explicit ------------------------------------------------------------------------------


def test_explicit_model_is_served_whatever_the_mesh() -> None:
    anns = [ann("s", "X", requested=("X", "Y"))]
    v = view("n", 4, [online("X", 40), on_disk("Y", 1)], anns, explicit="X")
    assert decide(v) == Decision("X", Reason.EXPLICIT, download=True)
    assert decide(view("n", 4, [on_disk("X", 1)], explicit="X")).download is False
    # Not known here at all (a path the supervisor resolves): still served, no download asked.
    assert decide(view("n", 4, [], explicit="/models/z.gguf")).model == "/models/z.gguf"


def test_decide_without_explicit_is_the_priority() -> None:
    v = view("n", 8, [on_disk("M", 1)])
    assert decide(v) == choose(v)


# -- elections -----------------------------------------------------------------------------


def test_host_is_the_node_with_most_vram() -> None:
    anns = [ann("a", "M", vram=24), ann("b", "M", vram=80), ann("c", "M", vram=48)]
    assert elect_hosts(anns) == {"M": "b"}


def test_vram_ties_go_to_the_smallest_node_id() -> None:
    anns = [ann("c", "M", vram=24), ann("a", "M", vram=24), ann("b", "M", vram=24)]
    assert elect_hosts(anns) == {"M": "a"}
    assert elect_hosts(list(reversed(anns))) == {"M": "a"}


def test_groups_are_independent() -> None:
    anns = [
        ann("a", "M", vram=80),
        ann("b", "M", vram=24),
        ann("c", "N", vram=24),
        ann("d", "N", vram=48),
        ann("e", "O", vram=8),
        ann("z", None, vram=200),
        ann("cl", "M", vram=500, role="client"),
        ann("f", "N", vram=500, state="failed"),
    ]
    assert elect_hosts(anns) == {"M": "a", "N": "d", "O": "e"}
    # A new node in one group changes that group only.
    assert elect_hosts([*anns, ann("g", "N", vram=96)]) == {"M": "a", "N": "g", "O": "e"}


def test_no_servers_no_hosts() -> None:
    assert elect_hosts([]) == {}
    assert elect_hosts([ann("a"), ann("b")]) == {}


# -- the Elector: holding, re-deciding --------------------------------------------------------


def test_elector_explicit_never_changes() -> None:
    el = Elector()
    v = view("n", 8, [on_disk("X", 1)], [ann("n", "X", requested=("X",))], explicit="X")
    assert el.update(v, 0) == Decision("X", Reason.EXPLICIT)
    el.mark_failed("X")
    crowded = view("n", 8, [on_disk("X", 1)], [ann(f"p{i}", "X") for i in range(5)], explicit="X")
    assert el.update(crowded, 1) is None
    assert el.decision == Decision("X", Reason.EXPLICIT)


def test_elector_holds_its_choice_while_the_mesh_changes() -> None:
    el = Elector()
    models = [on_disk("A", 1), on_disk("B", 1)]
    seed = ann("s", "A", requested=("A", "B"))
    assert el.update(view("n", 8, models, [seed]), 0) == Decision("B", Reason.UNSERVED_ON_DISK)
    me = ann("n", "B")
    # More servers of B arrive, A gets crowded, then empties: this node stays on B.
    crowded = [seed, me, ann("p", "B"), ann("q", "B"), ann("r", "B")]
    assert el.update(view("n", 8, models, crowded), 1) is None
    left = [ann("s2", None, requested=("A", "B")), me]
    assert el.update(view("n", 8, models, left), 2) is None
    assert el.decision is not None and el.decision.model == "B"


def test_update_returns_nothing_when_nothing_changed() -> None:
    el = Elector()
    v = view("n", 8, [on_disk("A", 1)])
    assert el.update(v, 0) is not None
    for t in range(1, 20):
        assert el.update(v, t) is None


def test_a_waiting_node_takes_a_model_whose_last_server_left() -> None:
    el = Elector()
    big = [online("BIG", 30)]
    # BIG is served (by s) and this node does not fit it: waiting for capacity.
    anns = [ann("s", "BIG", vram=80, requested=("BIG",)), ann("n", vram=8)]
    assert el.update(view("n", 8, big, anns), 0) == Decision(
        None,
        Reason.NOTHING_FITS,
        detail=f"none of the mesh's 1 models both fits this node's 8 GB and {ON_DISK}",
    )
    # A small model appears (someone's disk), is served, its server leaves: this node takes it.
    small = [*big, online("S", 1)]
    with_s = [*anns, ann("t", "S", disk=("S",))]
    assert el.update(view("n", 8, small, with_s), 1) == Decision(
        "S", Reason.LEAST_SERVED, download=True
    )
    el2 = Elector()
    assert el2.update(view("n", 0.5, small, with_s), 1) is not None  # fits nothing either
    gone = [*anns, ann("u", None, disk=("S",))]
    assert el2.update(view("n", 0.5, small, gone), 2) is None
    assert el2.update(view("n", 8, small, gone), 3) == Decision(
        "S", Reason.UNSERVED_DOWNLOAD, download=True
    )


def test_a_failed_model_is_replaced_and_never_chosen_again() -> None:
    el = Elector()
    models = [online("A", 1), online("B", 1)]
    anns = [ann("s", None, requested=("A", "B"))]
    first = el.update(view("n", 8, models, anns), 0)
    assert first is not None and first.model == "A"
    el.mark_failed("A")
    me_failed = [*anns, ann("n", "A", state="failed")]
    assert el.update(view("n", 8, models, me_failed), 1) == Decision(
        "B", Reason.UNSERVED_DOWNLOAD, download=True
    )
    el.mark_failed("B")
    assert el.update(view("n", 8, models, anns), 2) == Decision(
        None,
        Reason.NOTHING_FITS,
        detail=f"none of the mesh's 2 models both fits this node's 8 GB and {ON_DISK}",
    )


def test_a_smaller_budget_drops_a_model_that_no_longer_fits() -> None:
    el = Elector()
    models = [online("A", 5), online("B", 1)]
    anns = [ann("s", None, requested=("A", "B"))]
    assert el.update(view("n", 8, models, anns), 0) == Decision(
        "A", Reason.UNSERVED_DOWNLOAD, download=True
    )
    assert el.update(view("n", 8, models, anns), 1) is None
    changed = el.update(view("n", 4, models, [*anns, ann("n", "A")]), 2)
    assert changed is not None and changed.model == "B"


def test_a_restarted_elector_resumes_what_the_node_serves() -> None:
    models = [on_disk("A", 1), on_disk("B", 1)]
    anns = [ann("s", "A", requested=("A", "B")), ann("n", "A"), ann("t", "B")]
    # From scratch this node would pick A or B by count; it serves A: keep it.
    el = Elector()
    assert el.update(view("n", 8, models, anns), 0) == Decision("A", Reason.RESUMED)
    # Unless A failed here.
    el2 = Elector()
    el2.mark_failed("A")
    resumed = el2.update(view("n", 8, models, anns), 0)
    assert resumed is not None and resumed.model == "B"


# -- contention and flapping -----------------------------------------------------------------


def test_two_waiting_nodes_split_two_cold_models_in_one_round() -> None:
    models = [online("A", 1), online("B", 1)]
    anns = [ann("s", None, requested=("A", "B")), ann("n1", vram=8), ann("n2", vram=8)]
    picks = {n: Elector().update(view(n, 8, models, anns), 0) for n in ("n1", "n2")}
    assert {n: d.model for n, d in picks.items() if d is not None} == {"n1": "A", "n2": "B"}


def test_the_higher_id_waits_instead_of_doubling_up_on_a_cold_model() -> None:
    # n1 and n2 both want cold C (on their disks); n2 could otherwise only add capacity to A.
    seed = ann("s", "A", vram=8, requested=("A", "C"))
    n1 = ann("n1", vram=8, disk=("C",))
    n2 = ann("n2", vram=8, disk=("A", "C"))
    models2 = [on_disk("A", 1), on_disk("C", 1)]
    models1 = [online("A", 1), on_disk("C", 1)]
    e1, e2 = Elector(), Elector()
    d1 = e1.update(view("n1", 8, models1, [seed, n1, n2]), 0)
    d2 = e2.update(view("n2", 8, models2, [seed, n1, n2]), 0)
    assert d1 == Decision("C", Reason.UNSERVED_ON_DISK)
    assert d2 == Decision(None, Reason.WAITING, detail="C left to n1")
    assert e2.next_deadline() == DEFER_TIMEOUT_S + DEFER_STAGGER_S
    # Next round n1 serves C; n2 now adds capacity, by the priority, and nobody moves again.
    after = [seed, ann("n1", "C", vram=8, disk=("C",)), n2]
    assert e2.update(view("n2", 8, models2, after), 1) == Decision("A", Reason.LEAST_SERVED_ON_DISK)
    assert e2.next_deadline() is None
    settled = [seed, ann("n1", "C", vram=8, disk=("C",)), ann("n2", "A", vram=8, disk=("A", "C"))]
    for t in range(2, 200, 7):
        assert e1.update(view("n1", 8, models1, settled), t) is None
        assert e2.update(view("n2", 8, models2, settled), t) is None


def test_a_claim_that_is_never_taken_runs_out() -> None:
    # n1 announces itself idle but never takes C (say C failed there): n2 takes it in the end.
    seed = ann("s", "A", vram=8, requested=("A", "C"))
    anns = [seed, ann("n1", vram=8, disk=("C",)), ann("n2", vram=8, disk=("A", "C"))]
    models = [on_disk("A", 1), on_disk("C", 1)]
    el = Elector()
    assert el.update(view("n2", 8, models, anns), 100.0) is not None
    assert el.decision is not None and el.decision.reason == Reason.WAITING
    deadline = el.next_deadline()
    assert deadline == 100.0 + DEFER_TIMEOUT_S + DEFER_STAGGER_S
    assert el.update(view("n2", 8, models, anns), deadline - 0.1) is None
    assert el.update(view("n2", 8, models, anns), deadline) == Decision(
        "C", Reason.UNSERVED_ON_DISK, detail="n1 did not take it"
    )
    assert el.next_deadline() is None


def test_waiters_queued_on_one_model_time_out_one_after_another() -> None:
    # Each wants cold C (a download) first; once C is claimed, X on disk beats a second C.
    seed = ann("s", "X", vram=8, requested=("X", "C"))
    waiting = [ann(f"n{i}", vram=8, disk=("X",)) for i in range(1, 5)]
    models = [on_disk("X", 1), online("C", 1)]
    deadlines = []
    for node in ("n2", "n3", "n4"):
        el = Elector()
        el.update(view(node, 8, models, [seed, *waiting]), 0)
        assert el.decision is not None and el.decision.reason == Reason.WAITING
        deadlines.append(el.next_deadline())
    assert deadlines == [DEFER_TIMEOUT_S + DEFER_STAGGER_S * k for k in (1, 2, 3)]


def test_clients_and_busy_nodes_do_not_contend() -> None:
    seed = ann("s", "A", vram=8, requested=("A", "C"))
    anns = [
        seed,
        ann("a", vram=80, role="client", disk=("C",)),
        ann("b", "A", vram=80, disk=("C",), requested=("A",)),
        ann("z", vram=8, disk=("C",)),
    ]
    assert Elector().update(view("z", 8, [on_disk("C", 1)], anns), 0) == Decision(
        "C", Reason.UNSERVED_ON_DISK
    )


# -- filling gaps: redundant servers move to a model gone cold --------------------------------


def gap_mesh(*, c_served: bool) -> list[PeerAnnouncement]:
    """s explicitly serves A (host, most VRAM), r1 and r2 auto-serve A too; C may have gone cold."""
    anns = [
        ann("s", "A", vram=48, requested=("A", "C")),
        ann("r1", "A", vram=8),
        ann("r2", "A", vram=8),
    ]
    if c_served:
        anns.append(ann("c", "C", vram=8, requested=("C",)))
    return anns


def test_a_redundant_server_moves_to_a_model_cold_for_the_grace() -> None:
    models = [online("A", 1), online("C", 1)]
    el = Elector()
    assert el.update(view("r1", 8, models, gap_mesh(c_served=True)), 0) == Decision(
        "A", Reason.RESUMED, download=True
    )
    assert el.update(view("r1", 8, models, gap_mesh(c_served=False)), 10) is None
    assert el.next_deadline() == 10 + COLD_GRACE_S
    assert el.update(view("r1", 8, models, gap_mesh(c_served=False)), 10 + COLD_GRACE_S - 1) is None
    moved = el.update(view("r1", 8, models, gap_mesh(c_served=False)), 10 + COLD_GRACE_S)
    assert moved == Decision("C", Reason.UNSERVED_DOWNLOAD, download=True, detail="moved from A")


def test_a_model_back_within_the_grace_moves_nobody() -> None:
    models = [online("A", 1), online("C", 1)]
    el = Elector()
    el.update(view("r1", 8, models, gap_mesh(c_served=True)), 0)
    el.update(view("r1", 8, models, gap_mesh(c_served=False)), 10)
    assert el.update(view("r1", 8, models, gap_mesh(c_served=True)), 20) is None
    assert el.update(view("r1", 8, models, gap_mesh(c_served=False)), 45) is None
    assert el.update(view("r1", 8, models, gap_mesh(c_served=False)), 45 + COLD_GRACE_S - 1) is None


def test_only_one_redundant_server_moves_to_one_cold_model() -> None:
    models = [online("A", 1), online("C", 1)]
    cold = gap_mesh(c_served=False)
    e1, e2 = Elector(), Elector()
    e1.update(view("r1", 8, models, cold), 0)
    e2.update(view("r2", 8, models, cold), 0)
    moved1 = e1.update(view("r1", 8, models, cold), COLD_GRACE_S)
    moved2 = e2.update(view("r2", 8, models, cold), COLD_GRACE_S)
    assert moved1 is not None and moved1.model == "C"
    assert moved2 is None  # r2 leaves C to r1 and keeps A
    after = [ann("s", "A", vram=48, requested=("A", "C")), ann("r1", "C", vram=8), ann("r2", "A")]
    for t in range(31, 300, 13):
        assert e1.update(view("r1", 8, models, after), t) is None
        assert e2.update(view("r2", 8, models, after), t) is None


def test_hosts_explicit_nodes_and_sole_servers_never_move() -> None:
    models = [online("A", 1), online("C", 1)]
    cold = gap_mesh(c_served=False)
    # s is the host of A and explicit; a lone auto server of B is B's host.
    host = Elector()
    host.update(view("s", 48, models, cold, explicit="A"), 0)
    assert host.update(view("s", 48, models, cold, explicit="A"), 100) is None
    lone = Elector()
    anns = [*cold, ann("b", "B", vram=8)]
    models_b = [*models, online("B", 1)]
    lone.update(view("b", 8, models_b, anns), 0)
    assert lone.update(view("b", 8, models_b, anns), 100) is None
    assert lone.decision is not None and lone.decision.model == "B"


def test_a_waiting_node_goes_before_a_redundant_server() -> None:
    models = [online("A", 1), online("C", 1)]
    cold = [*gap_mesh(c_served=False), ann("w", vram=8)]
    mover = Elector()
    mover.update(view("r1", 8, models, cold), 0)
    assert mover.update(view("r1", 8, models, cold), COLD_GRACE_S) is None
    assert mover.decision is not None and mover.decision.model == "A"
    waiter = Elector()
    assert waiter.update(view("w", 8, models, cold), 0) == Decision(
        "C", Reason.UNSERVED_DOWNLOAD, download=True
    )


def test_redundant_servers_do_not_move_between_served_models() -> None:
    models = [online("A", 1), online("B", 1)]
    anns = [
        ann("s", "A", vram=48, requested=("A", "B")),
        ann("r1", "A", vram=8),
        ann("r2", "A", vram=8),
        ann("t", "B", vram=8),
    ]
    el = Elector()
    el.update(view("r2", 8, models, anns), 0)
    for t in range(0, 500, 10):
        assert el.update(view("r2", 8, models, anns), t) is None or t == 0


# -- simulated meshes -------------------------------------------------------------------------


@dataclass
class SimNode:
    node_id: str
    budget: int
    disk: frozenset[str]
    explicit: str | None = None
    requested: tuple[str, ...] = ()
    elector: Elector = field(default_factory=Elector)
    serving: str | None = None
    history: list[str | None] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)

    def announcement(self) -> PeerAnnouncement:
        return PeerAnnouncement(
            node_id=self.node_id,
            generation=1,
            role="host" if self.serving else "idle",
            serving=self.serving,
            server_state="ready" if self.serving else "stopped",
            available_models=tuple(sorted(self.disk)),
            requested_models=self.requested,
            vram_bytes=self.budget,
        )


class Sim:
    """An in-memory mesh: every node sees every announcement at once; rounds are synchronous."""

    def __init__(self, sizes: dict[str, int], downloadable: set[str]) -> None:
        self.sizes = sizes
        self.downloadable = downloadable
        self.nodes: dict[str, SimNode] = {}
        self.now = 0.0

    def view(self, node: SimNode, anns: list[PeerAnnouncement]) -> NodeView:
        models = {
            name: ModelInfo(
                name, size, on_disk=name in node.disk, downloadable=name in self.downloadable
            )
            for name, size in self.sizes.items()
            if name in node.disk or name in self.downloadable
        }
        return NodeView(node.node_id, node.budget, models, tuple(anns), explicit=node.explicit)

    def round(self) -> int:
        anns = [n.announcement() for n in self.nodes.values()]
        changed = 0
        for node in self.nodes.values():
            decision = node.elector.update(self.view(node, anns), self.now)
            if decision is not None:
                node.reasons.append(decision.reason)
                if decision.model != node.serving:
                    node.serving = decision.model
                    node.history.append(decision.model)
                    changed += 1
        return changed

    def settle(self, max_rounds: int = 10, step: float = 1.0) -> int:
        for rounds in range(1, max_rounds + 1):
            self.now += step
            if self.round() == 0:
                return rounds
        raise AssertionError(f"no quiescence in {max_rounds} rounds: {self.assignment()}")

    def counts(self) -> Counter[str]:
        return Counter(n.serving for n in self.nodes.values() if n.serving)

    def assignment(self) -> dict[str, str | None]:
        return {n.node_id: n.serving for n in self.nodes.values()}

    def obtainable_fitting(self, node: SimNode) -> set[str]:
        catalog: set[str] = set()
        for n in self.nodes.values():
            catalog |= n.disk | set(n.requested)
        return {
            m
            for m in catalog
            if (m in node.disk or m in self.downloadable) and fits(self.sizes[m], node.budget)
        }

    def unserved(self) -> set[str]:
        catalog: set[str] = set()
        for n in self.nodes.values():
            catalog |= n.disk | set(n.requested)
        return catalog - set(self.counts())


def random_models(rng: random.Random, count: int) -> dict[str, int]:
    return {
        f"m{i:02d}": int(rng.choice([0.5, 1, 2, 4, 7, 13, 20, 35, 70]) * GB) for i in range(count)
    }


def random_budget(rng: random.Random) -> int:
    return int(rng.choice([0.4, 4, 8, 12, 16, 24, 24, 48, 80]) * GB)


def test_sixty_nodes_joining_one_by_one_fill_every_gap_first() -> None:
    for seed in range(5):
        rng = random.Random(seed)
        sizes = random_models(rng, 16)
        names = sorted(sizes)
        downloadable = {m for m in names if rng.random() < 0.7}
        sim = Sim(sizes, downloadable)
        seed_node = SimNode("n000", 80 * GB, frozenset(names[:3]), names[0], tuple(names[:8]))
        sim.nodes[seed_node.node_id] = seed_node
        sim.settle()
        for i in range(1, 60):
            disk = frozenset(m for m in names if rng.random() < 0.15)
            node = SimNode(f"n{rng.randrange(1000, 9999)}-{i:02d}", random_budget(rng), disk)
            sim.nodes[node.node_id] = node
            unserved_before = sim.unserved()
            rounds = sim.settle()
            assert rounds <= 2, "a lone joiner decides in one round"
            took = node.serving
            could = sim.obtainable_fitting(node)
            if took is None:
                assert not could, f"{node.node_id} idle though {could} fit"
            elif sim.counts()[took] > 1:
                # Capacity added only when no unserved model fits this node.
                assert not (unserved_before & could), (node.node_id, took, unserved_before & could)
            else:
                assert took in unserved_before
        # Stable under re-evaluation: nobody changes, however often or late we ask.
        before = sim.assignment()
        for _ in range(5):
            sim.now += COLD_GRACE_S + DEFER_TIMEOUT_S
            assert sim.round() == 0
        assert sim.assignment() == before
        assert all(len(n.history) <= 1 for n in sim.nodes.values())


def test_with_every_model_downloadable_the_biggest_gaps_go_to_the_biggest_nodes() -> None:
    exercised = 0
    for seed in range(8):
        rng = random.Random(100 + seed)
        sizes = random_models(rng, 20)
        names = sorted(sizes)
        joiners = 63 if seed % 2 else 12  # a big mesh, and one with fewer nodes than models
        sim = Sim(sizes, set(names))
        sim.nodes["a000"] = SimNode("a000", 80 * GB, frozenset(), names[0], tuple(names))
        sim.settle()
        for i in range(1, joiners + 1):
            sim.nodes[f"a{i:03d}"] = SimNode(f"a{i:03d}", random_budget(rng), frozenset())
            sim.settle()
        for model in sim.unserved():
            for node in sim.nodes.values():
                if fits(sizes[model], node.budget) and node.explicit is None:
                    # Every node that could have served it took a cold model at least as large.
                    exercised += 1
                    assert node.serving is not None
                    assert sizes[node.serving] >= sizes[model]
                    assert node.reasons[0] == Reason.UNSERVED_DOWNLOAD
        if joiners > 20:
            assert not sim.unserved()
    assert exercised > 10


def test_sixty_nodes_starting_at_once_converge_without_flapping() -> None:
    for seed in range(5):
        rng = random.Random(200 + seed)
        sizes = random_models(rng, 15)
        names = sorted(sizes)
        sim = Sim(sizes, set(names))
        sim.nodes["b00"] = SimNode("b00", 80 * GB, frozenset(), names[0], tuple(names))
        for i in range(1, 60):
            disk = frozenset(m for m in names if rng.random() < 0.2)
            sim.nodes[f"b{i:02d}"] = SimNode(f"b{i:02d}", random_budget(rng), disk)
        rounds = sim.settle()
        assert rounds <= 3
        for node in sim.nodes.values():
            assert len(node.history) <= 1, (node.node_id, node.history)
            added_capacity = node.explicit is None and node.reasons[0] not in (
                Reason.UNSERVED_ON_DISK,
                Reason.UNSERVED_DOWNLOAD,
            )
            if node.serving is not None and added_capacity:
                assert not (sim.unserved() & sim.obtainable_fitting(node))
        # Cold models were shared out one node each before any doubling up.
        first_takers = Counter(
            n.history[0]
            for n in sim.nodes.values()
            if n.reasons and n.reasons[0] in (Reason.UNSERVED_ON_DISK, Reason.UNSERVED_DOWNLOAD)
        )
        assert all(c == 1 for c in first_takers.values()), first_takers
        assert sim.round() == 0


def test_servers_leaving_make_gaps_that_redundant_servers_fill_once() -> None:
    rng = random.Random(7)
    sizes = {f"m{i}": int(rng.choice([1, 2, 4]) * GB) for i in range(10)}
    names = sorted(sizes)
    sim = Sim(sizes, set(names))
    sim.nodes["c00"] = SimNode("c00", 80 * GB, frozenset(), names[0], tuple(names))
    sim.settle()
    for i in range(1, 55):
        sim.nodes[f"c{i:02d}"] = SimNode(f"c{i:02d}", 24 * GB, frozenset())
        sim.settle()
    assert not sim.unserved()
    # Every model has several servers; all servers of three models leave.
    victims = {"m3", "m5", "m8"}
    for node in list(sim.nodes.values()):
        if node.serving in victims:
            del sim.nodes[node.node_id]
    assert sim.unserved() == victims
    moves_before = {n.node_id: len(n.history) for n in sim.nodes.values()}
    # Nothing moves within the grace.
    sim.settle(step=1.0)
    assert sim.unserved() == victims
    # After it, exactly one node per gap moves, and every model keeps a server.
    sim.now += COLD_GRACE_S
    assert sim.round() == len(victims)
    assert not sim.unserved()
    sim.settle(step=DEFER_TIMEOUT_S)
    assert all(c >= 1 for c in sim.counts().values())
    moved = [n for n in sim.nodes.values() if len(n.history) > moves_before[n.node_id]]
    assert len(moved) == len(victims)
    assert all(len(n.history) - moves_before[n.node_id] == 1 for n in moved)
    for _ in range(10):
        sim.now += COLD_GRACE_S
        assert sim.round() == 0


def test_a_big_mesh_with_a_drop_keeps_every_other_model() -> None:
    sizes = {"small": GB, "mid": 8 * GB, "big": 40 * GB}
    sim = Sim(sizes, set(sizes))
    sim.nodes["d00"] = SimNode("d00", 48 * GB, frozenset(), "big", ("big", "mid", "small"))
    for i in range(1, 51):
        sim.nodes[f"d{i:02d}"] = SimNode(f"d{i:02d}", (8 if i % 2 else 12) * GB, frozenset())
    sim.settle()
    counts = sim.counts()
    assert set(counts) == {"big", "mid", "small"}
    assert counts["big"] == 1  # nobody else fits it
    # The big model's only server drops it: no one else fits, it stays cold, nobody moves.
    del sim.nodes["d00"]
    sim.nodes["e00"] = SimNode("e00", 0, frozenset(), None, ("big", "mid", "small"))
    before = sim.assignment()
    sim.settle()
    sim.now += 2 * COLD_GRACE_S
    assert sim.round() == 0
    assert sim.assignment() == before


def test_a_waiting_peer_started_with_model_is_expected_to_take_it() -> None:
    # p (lower id, not yet serving) was started with `--model C`: C is as good as served.
    anns = [ann("s", None, requested=("C", "D")), ann("p", vram=8, requested=("C",))]
    models = [online("C", 5), online("D", 1)]
    assert choose_model(view("z", 8, models, anns)) == "C"
    assert Elector().update(view("z", 8, models, anns), 0) == Decision(
        "D", Reason.UNSERVED_DOWNLOAD, download=True
    )
