"""The Elector actor's pure glue: which models a node knows how to get, and what it tells
the election core about them (`known_models`, `model_infos` in actors/elector.py)."""

from __future__ import annotations

from pathlib import Path

from actors.elector import known_models, model_infos
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.models.catalog import CATALOG
from meshllm.placement import election
from meshllm.runtime.config import ModelSpec

MODELS_DIR = "/models"


SHA = "ab" * 32


def ann(
    node_id: str,
    urls: dict[str, str] | None = None,
    sizes: dict[str, int] | None = None,
    requested: tuple[str, ...] = (),
    sha256: dict[str, str] | None = None,
) -> PeerAnnouncement:
    """An announcement; every proposed URL gets the digest SHA unless `sha256` is given."""
    urls = urls or {}
    return PeerAnnouncement(
        node_id=node_id,
        generation=1,
        requested_models=requested,
        model_urls=urls,
        model_sizes=sizes or {},
        model_sha256={name: SHA for name in urls} if sha256 is None else sha256,
    )


def test_nothing_known_but_the_catalog() -> None:
    specs = known_models((), [], MODELS_DIR)
    assert set(specs) == {entry.name for entry in CATALOG}
    for entry in CATALOG:
        spec = specs[entry.name]
        # Not on disk: no path; downloadable into the models directory under its file name.
        assert spec == ModelSpec(
            entry.name, "", entry.url, entry.size or 0, entry.sha256 or "", f"/models/{entry.file}"
        )


def test_a_peer_url_makes_a_model_downloadable_with_the_peers_size_and_digest() -> None:
    peer = ann("p", {"B": "http://127.0.0.1:8000/files/B.gguf"}, {"B": 4242, "X": 7})
    spec = known_models((), [peer], MODELS_DIR)["B"]
    assert spec == ModelSpec(
        "B", "", "http://127.0.0.1:8000/files/B.gguf", 4242, SHA, "/models/B.gguf"
    )
    # Sizes alone (a model on the peer's disk, no URL) give no way to get the model.
    assert "X" not in known_models((), [peer], MODELS_DIR)


def test_the_file_is_named_after_the_model_never_after_the_url() -> None:
    peer = ann(
        "p",
        {"B": "http://h/dl/b-file.gguf?token=1&x=2", "C": "http://h/dl/"},
        {"B": 1, "C": 2},
    )
    specs = known_models((), [peer], MODELS_DIR)
    assert specs["B"].target == "/models/B.gguf"
    assert specs["C"].target == "/models/C.gguf"


def test_own_specs_win_over_peers_and_the_catalog() -> None:
    name = CATALOG[0].name
    own = (
        ModelSpec("B", path="/disk/B.gguf", size=10, target="/disk/B.gguf"),
        ModelSpec(name, path="/disk/cat.gguf", size=11, target="/disk/cat.gguf"),
    )
    peer = ann("p", {"B": "http://h/B.gguf", name: "http://h/cat.gguf"}, {"B": 99, name: 1})
    specs = known_models(own, [peer], MODELS_DIR)
    assert specs["B"] == own[0]
    assert specs[name] == own[1]


def test_a_peer_url_never_replaces_the_catalog_and_later_own_specs_win() -> None:
    entry = CATALOG[0]
    peer = ann("p", {entry.name: "http://mirror/x.gguf"}, {entry.name: 5})
    spec = known_models((), [peer], MODELS_DIR)[entry.name]
    assert (spec.url, spec.size, spec.sha256) == (entry.url, entry.size, entry.sha256)
    # `available` comes before `--model` in the Elector's call: a --model flag wins.
    on_disk = ModelSpec("A", path="/d/A.gguf", size=1, target="/d/A.gguf")
    flagged = ModelSpec("A", url="http://h/A.gguf", target="/models/A.gguf")
    assert known_models((on_disk, flagged), [], MODELS_DIR)["A"] == flagged


def test_the_models_directory_is_joined_as_a_path() -> None:
    peer = ann("p", {"B": "http://h/B.gguf"}, {"B": 1})
    spec = known_models((), [peer], "/some/dir/")["B"]
    assert spec.target == str(Path("/some/dir") / "B.gguf")


def test_model_infos_say_size_disk_and_download() -> None:
    specs = {
        "disk": ModelSpec("disk", path="/d/disk.gguf", size=100, target="/d/disk.gguf"),
        "url": ModelSpec("url", url="http://h/url.gguf", target="/m/url.gguf"),
        "both": ModelSpec("both", path="/d/b.gguf", url="http://h/b.gguf", size=3),
        "neither": ModelSpec("neither"),
    }
    infos = model_infos(specs)
    assert infos == {
        "disk": election.ModelInfo("disk", size_bytes=100, on_disk=True, downloadable=False),
        "url": election.ModelInfo("url", size_bytes=None, on_disk=False, downloadable=True),
        "both": election.ModelInfo("both", size_bytes=3, on_disk=True, downloadable=True),
        "neither": election.ModelInfo("neither", size_bytes=None),
    }
    assert not infos["neither"].obtainable
    assert infos["url"].obtainable and infos["disk"].obtainable


def test_infos_of_known_models_feed_the_priority() -> None:
    """End to end through the glue: a model on this node's disk beats one to download."""
    own = (ModelSpec("A", path="/d/A.gguf", size=1000, target="/d/A.gguf"),)
    seed = ann("s", {"B": "http://h/B.gguf"}, {"B": 1000}, requested=("A", "B"))
    infos = model_infos(known_models(own, [seed], MODELS_DIR))
    view = election.NodeView("n", budget_bytes=10_000, models=infos, announcements=[seed])
    assert election.choose(view) == election.Decision("A", election.Reason.UNSERVED_ON_DISK)
    # Without A on disk the download is chosen; too small a budget chooses nothing.
    infos = model_infos(known_models((), [seed], MODELS_DIR))
    view = election.NodeView("n", budget_bytes=10_000, models=infos, announcements=[seed])
    assert election.choose(view).model == "B"
    small = election.NodeView("n", budget_bytes=1000, models=infos, announcements=[seed])
    assert election.choose(small).model is None


def test_a_peer_cannot_steer_a_download_out_of_the_models_dir() -> None:
    bad = ("", "../x", ".hidden", "a/b", "..", "a\\b", "x\0y")
    peer = ann("p", dict.fromkeys(bad, "http://h/m.gguf"), dict.fromkeys(bad, 1))
    specs = known_models((), [peer], MODELS_DIR)
    assert not set(bad) & set(specs)


def test_the_cold_grace_comes_from_the_node_options() -> None:
    from actors.elector import election_core
    from meshllm.runtime.config import NodeConfig, UpOptions

    options = UpOptions(cold_grace_s=2.5)
    config = NodeConfig(home="/h", run_dir="/h/run", node_id="n", options=options)
    assert election_core(config).cold_grace_s == 2.5
