"""Model files: scanning the models directory, GGUF headers, `--model` resolution, the catalog,
and the `meshllm models` functions. Small demo GGUFs and a low size threshold stand in for real
models; nothing here touches the network."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from meshllm.models import files as models_mod
from meshllm.models.catalog import CATALOG, HF_HOST, find_entry, hf_url
from meshllm.models.demo import N_CTX, N_LAYER, write_demo_model
from meshllm.models.files import (
    DEFAULT_MIN_MODEL_BYTES,
    MIN_BYTES_ENV,
    GgufHeaderError,
    ModelNotFound,
    available_model_names,
    default_min_bytes,
    download_model,
    list_models_table,
    model_rows,
    read_gguf_header,
    resolve_model,
    scan_models,
)

QWEN3B = "Qwen2.5-3B-Instruct-Q4_K_M"


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two demo models written once; tests copy them into their own directories."""
    base = tmp_path_factory.mktemp("demo")
    return {
        "alpha": write_demo_model(base / "alpha.gguf", seed=1, name="Alpha Model"),
        "beta": write_demo_model(base / "beta.gguf", seed=2, name="Beta Model"),
    }


@pytest.fixture
def models_dir(tmp_path: Path, demo_files: dict[str, Path]) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name, path in demo_files.items():
        shutil.copy(path, d / f"{name}.gguf")
    return d


@pytest.fixture(autouse=True)
def _no_env_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIN_BYTES_ENV, raising=False)


# --- scanning --------------------------------------------------------------------------------


def test_scan_lists_models_over_the_threshold_with_header_fields(models_dir: Path) -> None:
    found = scan_models(models_dir, min_bytes=1000)
    assert [m.name for m in found] == ["alpha", "beta"]
    alpha = found[0]
    assert alpha.path == models_dir / "alpha.gguf"
    assert alpha.size == (models_dir / "alpha.gguf").stat().st_size
    assert alpha.architecture == "llama"
    assert alpha.layers == N_LAYER
    assert alpha.context_length == N_CTX
    assert alpha.general_name == "Alpha Model"
    assert alpha.shards == 1


def test_threshold_excludes_small_files(models_dir: Path) -> None:
    size = (models_dir / "alpha.gguf").stat().st_size
    assert [m.name for m in scan_models(models_dir, min_bytes=size)] == ["alpha", "beta"]
    assert scan_models(models_dir, min_bytes=size + 1) == []


def test_default_threshold_is_the_seeds_500_mb(models_dir: Path) -> None:
    assert default_min_bytes() == DEFAULT_MIN_MODEL_BYTES == 500_000_000
    assert scan_models(models_dir) == []  # the demo files are ~0.5 MB


def test_threshold_from_the_environment(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIN_BYTES_ENV, "1000")
    assert default_min_bytes() == 1000
    assert available_model_names(models_dir) == ["alpha", "beta"]
    # An explicit argument wins over the environment.
    assert scan_models(models_dir, min_bytes=10**9) == []


def test_bad_threshold_in_the_environment_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(MIN_BYTES_ENV, "lots")
    with caplog.at_level(logging.WARNING, logger="meshllm.models.files"):
        assert default_min_bytes() == DEFAULT_MIN_MODEL_BYTES
    assert MIN_BYTES_ENV in caplog.text


def test_models_dir_defaults_to_the_environment(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHLLM_MODELS_DIR", str(models_dir))
    assert [m.name for m in scan_models(min_bytes=0)] == ["alpha", "beta"]


def test_corrupt_files_are_skipped_with_a_warning(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = (models_dir / "alpha.gguf").read_bytes()
    (models_dir / "truncated.gguf").write_bytes(data[:300])  # cut inside the key/values
    (models_dir / "garbage.gguf").write_bytes(os.urandom(4096))
    (models_dir / "badversion.gguf").write_bytes(b"GGUF" + (99).to_bytes(4, "little") + data[8:])
    (models_dir / "empty.gguf").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="meshllm.models.files"):
        found = scan_models(models_dir, min_bytes=0)
    assert [m.name for m in found] == ["alpha", "beta"]
    for name in ("truncated", "garbage", "badversion", "empty"):
        assert f"{name}.gguf" in caplog.text


def test_huge_lengths_in_a_header_are_refused_not_allocated(tmp_path: Path) -> None:
    # magic, version 3, 0 tensors, 1 key/value, then a key claiming 2**60 bytes
    bad = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
    bad += (1).to_bytes(8, "little") + (1 << 60).to_bytes(8, "little") + b"x" * 64
    path = tmp_path / "huge.gguf"
    path.write_bytes(bad)
    with pytest.raises(GgufHeaderError):
        read_gguf_header(path)


def test_other_files_are_ignored(models_dir: Path, demo_files: dict[str, Path]) -> None:
    shutil.copy(demo_files["alpha"], models_dir / "partial.gguf.part")
    shutil.copy(demo_files["alpha"], models_dir / ".hidden.gguf")
    shutil.copy(demo_files["alpha"], models_dir / "notes.bin")
    (models_dir / "subdir.gguf").mkdir()
    assert [m.name for m in scan_models(models_dir, min_bytes=0)] == ["alpha", "beta"]


def test_symlinked_models_count_and_dangling_links_do_not(
    models_dir: Path, demo_files: dict[str, Path]
) -> None:
    (models_dir / "linked.gguf").symlink_to(demo_files["beta"])
    (models_dir / "dangling.gguf").symlink_to(models_dir / "nowhere.gguf")
    names = [m.name for m in scan_models(models_dir, min_bytes=0)]
    assert names == ["alpha", "beta", "linked"]


def test_missing_directory_is_empty(tmp_path: Path) -> None:
    assert scan_models(tmp_path / "nope", min_bytes=0) == []


def test_split_models_are_one_model(models_dir: Path, demo_files: dict[str, Path]) -> None:
    shutil.copy(demo_files["alpha"], models_dir / "big-00001-of-00002.gguf")
    (models_dir / "big-00002-of-00002.gguf").write_bytes(b"GGUF" + b"\0" * 1000)
    shutil.copy(demo_files["alpha"], models_dir / "lonely-00001-of-00003.gguf")
    found = {m.name: m for m in scan_models(models_dir, min_bytes=0)}
    assert sorted(found) == ["alpha", "beta", "big"]  # "lonely" misses shards 2 and 3
    big = found["big"]
    assert big.shards == 2
    assert big.path == models_dir / "big-00001-of-00002.gguf"
    assert big.size == demo_files["alpha"].stat().st_size + 1004
    assert big.layers == N_LAYER


def test_rescans_reuse_headers_until_a_file_changes(
    models_dir: Path, demo_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []
    real = models_mod.read_gguf_header

    def counting(path: str | os.PathLike[str]) -> models_mod.GgufHeader:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(models_mod, "read_gguf_header", counting)
    models_mod._header_cache.clear()
    scan_models(models_dir, min_bytes=0)
    assert len(reads) == 2
    scan_models(models_dir, min_bytes=0)
    assert len(reads) == 2
    target = models_dir / "alpha.gguf"
    shutil.copy(demo_files["beta"], target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    found = {m.name: m for m in scan_models(models_dir, min_bytes=0)}
    assert len(reads) == 3
    assert found["alpha"].general_name == "Beta Model"


# --- GGUF headers ----------------------------------------------------------------------------


def _assert_same_as_gguf_reader(path: Path) -> None:
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    scalars = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or fld.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        scalars[key] = fld.contents()
    assert dict(header.metadata) == scalars
    assert header.tensor_count == len(reader.tensors)


def test_header_reader_agrees_with_gguf_reader(demo_files: dict[str, Path]) -> None:
    _assert_same_as_gguf_reader(demo_files["alpha"])
    header = read_gguf_header(demo_files["alpha"])
    assert header.architecture == "llama"
    assert header.block_count == N_LAYER
    assert header.context_length == N_CTX
    assert header.name == "Alpha Model"


def _write_gguf(path: Path, *, n_vocab: int, endianess: gguf.GGUFEndian) -> None:
    writer = gguf.GGUFWriter(path, "qwen2", endianess=endianess)
    writer.add_name("Synthetic")
    writer.add_block_count(28)
    writer.add_context_length(32768)
    writer.add_embedding_length(1536)
    writer.add_rope_freq_base(1e6)
    writer.add_token_list([f"tok{i}" for i in range(n_vocab)])
    writer.add_token_types([1] * n_vocab)
    writer.add_token_merges([f"a{i} b{i}" for i in range(n_vocab)])
    writer.add_array("test.nested", [[1, 2], [3]])
    for i in range(3):
        writer.add_tensor(f"t{i}", np.zeros(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_big_endian_and_nested_arrays(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    _write_gguf(path, n_vocab=50, endianess=gguf.GGUFEndian.BIG)
    header = read_gguf_header(path)
    assert (header.architecture, header.block_count, header.context_length) == ("qwen2", 28, 32768)
    assert header.metadata["qwen2.rope.freq_base"] == 1e6
    assert header.tensor_count == 3


def test_a_large_vocabulary_is_skipped_not_read(tmp_path: Path) -> None:
    path = tmp_path / "vocab.gguf"
    _write_gguf(path, n_vocab=100_000, endianess=gguf.GGUFEndian.LITTLE)
    header = read_gguf_header(path)
    assert header.block_count == 28 and header.tensor_count == 3
    # The tokenizer's arrays are skipped by their lengths (what keeps a scan of big
    # models cheap), never decoded into the metadata.
    assert not any(key.startswith("tokenizer.ggml.") for key in header.metadata)
    assert "test.nested" not in header.metadata


# --- resolve_model ---------------------------------------------------------------------------


def test_resolve_a_path(models_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "Model.Q8_0.gguf"
    elsewhere.parent.mkdir()
    shutil.copy(models_dir / "alpha.gguf", elsewhere)
    r = resolve_model(str(elsewhere), models_dir)
    assert (r.name, r.path, r.source) == ("Model.Q8_0", elsewhere, "path")
    assert not r.needs_download
    assert r.url is None


def test_resolve_a_relative_path(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(models_dir)
    r = resolve_model("./beta.gguf", tmp_path / "other")
    assert (r.name, r.path, r.source) == ("beta", models_dir / "beta.gguf", "path")


@pytest.mark.parametrize("ref", ["alpha", "alpha.gguf"])
def test_resolve_a_file_name_in_the_models_dir(models_dir: Path, ref: str) -> None:
    r = resolve_model(ref, models_dir, extra_dirs=[])
    assert (r.name, r.path, r.source) == ("alpha", models_dir / "alpha.gguf", "models_dir")
    assert not r.needs_download


def test_resolve_looks_in_extra_dirs_after_the_models_dir(models_dir: Path, tmp_path: Path) -> None:
    extra = tmp_path / "cache-models"
    extra.mkdir()
    shutil.copy(models_dir / "alpha.gguf", extra / "gamma.gguf")
    shutil.copy(models_dir / "alpha.gguf", extra / "beta.gguf")
    r = resolve_model("gamma", models_dir, extra_dirs=[extra])
    assert r.path == extra / "gamma.gguf"
    assert resolve_model("beta", models_dir, extra_dirs=[extra]).path == models_dir / "beta.gguf"


def test_resolve_a_catalog_name_that_needs_a_download(tmp_path: Path) -> None:
    r = resolve_model(QWEN3B, tmp_path)
    entry = find_entry(QWEN3B)
    assert entry is not None
    assert r.source == "catalog"
    assert r.name == QWEN3B
    assert r.path == tmp_path / f"{QWEN3B}.gguf"
    assert r.needs_download
    assert r.url == (
        "https://huggingface.co/bartowski/Qwen2.5-3B-Instruct-GGUF/resolve/main/"
        "Qwen2.5-3B-Instruct-Q4_K_M.gguf"
    )
    assert (r.size, r.sha256, r.entry) == (entry.size, entry.sha256, entry)
    # Case does not matter for catalog names.
    assert resolve_model(QWEN3B.lower(), tmp_path).entry == entry


def test_a_downloaded_catalog_model_resolves_to_its_file(
    tmp_path: Path, demo_files: dict[str, Path]
) -> None:
    shutil.copy(demo_files["alpha"], tmp_path / f"{QWEN3B}.gguf")
    r = resolve_model(QWEN3B, tmp_path)
    assert (r.source, r.name, r.needs_download) == ("models_dir", QWEN3B, False)
    assert r.entry == find_entry(QWEN3B)


def test_resolve_a_hugging_face_reference(tmp_path: Path) -> None:
    r = resolve_model("someone/Some-Model-GGUF/some-model-Q5_K_M.gguf", tmp_path)
    assert r.source == "huggingface"
    assert r.name == "some-model-Q5_K_M"
    assert r.path == tmp_path / "some-model-Q5_K_M.gguf"
    assert r.url == (
        "https://huggingface.co/someone/Some-Model-GGUF/resolve/main/some-model-Q5_K_M.gguf"
    )
    assert r.needs_download
    assert (r.size, r.sha256, r.entry) == (None, None, None)


def test_a_hugging_face_reference_in_a_repo_folder(tmp_path: Path) -> None:
    r = resolve_model("someone/Big-GGUF/Q4_K_M/big-Q4_K_M.gguf", tmp_path)
    assert r.path == tmp_path / "big-Q4_K_M.gguf"
    assert r.url == "https://huggingface.co/someone/Big-GGUF/resolve/main/Q4_K_M/big-Q4_K_M.gguf"


def test_a_hugging_face_reference_to_a_catalog_file_gets_its_checks(tmp_path: Path) -> None:
    entry = find_entry(QWEN3B)
    assert entry is not None
    r = resolve_model(f"{entry.repo}/{entry.file}", tmp_path)
    assert r.source == "huggingface"
    assert (r.size, r.sha256, r.url) == (entry.size, entry.sha256, entry.url)


def test_resolve_a_hugging_face_page_url(tmp_path: Path) -> None:
    r = resolve_model("https://huggingface.co/someone/Repo-GGUF/blob/abc123/m-Q4_0.gguf", tmp_path)
    assert r.source == "huggingface"
    assert r.url == "https://huggingface.co/someone/Repo-GGUF/resolve/abc123/m-Q4_0.gguf"
    assert r.path == tmp_path / "m-Q4_0.gguf"


def test_resolve_a_plain_url(tmp_path: Path) -> None:
    r = resolve_model("http://127.0.0.1:1/files/x-model.gguf?token=1", tmp_path)
    assert (r.source, r.name, r.path) == ("url", "x-model", tmp_path / "x-model.gguf")
    assert r.url == "http://127.0.0.1:1/files/x-model.gguf?token=1"
    with pytest.raises(ModelNotFound, match=r"does not end in a .gguf"):
        resolve_model("http://127.0.0.1:1/files/", tmp_path)


def test_a_url_may_carry_its_sha256_in_the_fragment(tmp_path: Path) -> None:
    digest = "AB" * 32
    r = resolve_model(f"http://127.0.0.1:1/files/x.gguf?t=1#sha256={digest}", tmp_path)
    assert r.url == "http://127.0.0.1:1/files/x.gguf?t=1"  # the fragment is not sent
    assert r.sha256 == digest.lower()
    for bad in ("#sha256=12", "#md5=" + "0" * 32, "#x"):
        with pytest.raises(ModelNotFound, match="#sha256="):
            resolve_model(f"http://127.0.0.1:1/files/x.gguf{bad}", tmp_path)


@pytest.mark.parametrize(
    "url",
    [
        "http://h/..%2F..%2Fescape.gguf",
        "http://h/a%2Fb.gguf",
        "http://h/.hidden.gguf",
        "http://h/x%00y.gguf",
        "https://huggingface.co/o/r/resolve/main/..%2Fup.gguf",
    ],
)
def test_a_url_cannot_name_a_file_outside_the_models_dir(tmp_path: Path, url: str) -> None:
    with pytest.raises(ModelNotFound, match="safe"):
        resolve_model(url, tmp_path)


def test_unknown_model_says_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model("no-such-model", tmp_path / "models", extra_dirs=[])
    message = str(info.value)
    assert "'no-such-model'" in message
    assert str(tmp_path / "models" / "no-such-model.gguf") in message
    assert "catalog" in message
    assert "Hugging Face" in message


def test_unknown_model_suggests_close_names(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=re.escape(f"Did you mean '{QWEN3B}'")):
        resolve_model("Qwen2.5-3B-Instruct-Q4_K", tmp_path, extra_dirs=[])


@pytest.mark.parametrize(
    "ref",
    [
        "../x/model.gguf",
        "owner/repo/../escape.gguf",
        "owner/repo/model.bin",
        "own er/repo/model.gguf",
        "owner/repo//model.gguf",
        "",
    ],
)
def test_malformed_references_are_not_found(tmp_path: Path, ref: str) -> None:
    with pytest.raises(ModelNotFound):
        resolve_model(ref, tmp_path, extra_dirs=[])


# --- catalog ---------------------------------------------------------------------------------


def test_catalog_entries_are_well_formed() -> None:
    assert len(CATALOG) >= 12
    names = [e.name for e in CATALOG]
    assert len(set(names)) == len(names)
    for entry in CATALOG:
        assert entry.file == f"{entry.name}.gguf"  # a model is named after its file
        assert entry.url == f"{HF_HOST}/{entry.repo}/resolve/main/{entry.file}"
        assert entry.size is None or (isinstance(entry.size, int) and entry.size > 0)
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    for wanted in (QWEN3B, "Qwen2.5-0.5B-Instruct-Q4_K_M", "Llama-3.2-1B-Instruct-Q4_K_M"):
        assert find_entry(wanted) is not None
    assert find_entry(f"{QWEN3B}.gguf") == find_entry(QWEN3B)
    assert find_entry("nope") is None


def test_hf_url_quotes_path_parts() -> None:
    assert hf_url("o/r", "dir/a b.gguf", "main") == f"{HF_HOST}/o/r/resolve/main/dir/a%20b.gguf"


# --- meshllm models list / download ----------------------------------------------------------


def test_model_rows_join_disk_catalog_and_mesh(models_dir: Path) -> None:
    rows = {
        r.name: r
        for r in model_rows(models_dir, {"alpha": 2, QWEN3B: 0, "remote-only": 1}, min_bytes=0)
    }
    assert set(rows) == {"alpha", "beta", "remote-only"} | {e.name for e in CATALOG}
    alpha = rows["alpha"]
    assert (alpha.on_disk, alpha.in_catalog, alpha.mesh) == (True, False, "2 nodes")
    assert (alpha.architecture, alpha.layers) == ("llama", N_LAYER)
    qwen = rows[QWEN3B]
    assert (qwen.on_disk, qwen.in_catalog, qwen.mesh) == (False, True, "cold")
    assert qwen.size == find_entry(QWEN3B).size  # type: ignore[union-attr]
    remote = rows["remote-only"]
    assert (remote.on_disk, remote.in_catalog, remote.mesh, remote.size) == (
        False,
        False,
        "1 node",
        None,
    )
    assert rows["beta"].mesh == ""


def test_list_models_table(models_dir: Path) -> None:
    table = list_models_table(models_dir, ["alpha"], min_bytes=0)
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "ON", "DISK", "CATALOG", "MESH", "ARCH", "LAYERS"]
    alpha = next(line for line in lines if line.startswith("alpha "))
    assert alpha.split()[-5:] == ["yes", "-", "yes", "llama", str(N_LAYER)]
    qwen = next(line for line in lines if line.startswith(QWEN3B))
    assert "1.93 GB" in qwen
    assert qwen.split()[-5:] == ["-", "yes", "-", "-", "-"]
    assert len(lines) == 1 + 2 + len(CATALOG)


def test_download_model_returns_a_model_already_on_disk(
    tmp_path: Path, demo_files: dict[str, Path]
) -> None:
    shutil.copy(demo_files["alpha"], tmp_path / f"{QWEN3B}.gguf")
    # No network: the catalog model is already there.
    assert download_model(QWEN3B, tmp_path) == tmp_path / f"{QWEN3B}.gguf"
    assert download_model(str(demo_files["beta"]), tmp_path) == demo_files["beta"]


def test_download_model_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        download_model("no-such-model", tmp_path)
