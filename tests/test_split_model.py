"""The demo model of realistic shape (meshllm.models.demo.write_shaped_model): the tensor
split benchmark's model. Written here in a small shape, so the tests stay fast."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from meshllm.models.demo import (
    DANUBE3_500M_SHAPE,
    DEMO_SHAPE,
    N_VOCAB,
    ModelShape,
    ensure_shaped_model,
    write_shaped_model,
)
from meshllm.runtime.procutil import free_port

RPC_CACHE_MIN_BYTES = 10 * 1024 * 1024
"""llama.cpp's RPC server caches tensors over this (a compile-time constant)."""

SMALL = ModelShape(
    name="test-small",
    n_layer=3,
    n_embd=96,
    n_head=6,
    n_head_kv=2,
    n_ff=160,
    n_ctx=512,
    rope_freq_base=100000.0,
    f16=True,
)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def test_the_realistic_shape_is_a_real_models_and_fits_the_rpc_cache() -> None:
    shape = DANUBE3_500M_SHAPE
    # h2o-danube3-500m's layers (config.json of the published model).
    assert (shape.n_layer, shape.n_embd, shape.n_ff) == (16, 1536, 4096)
    assert (shape.n_head, shape.n_head_kv, shape.head_dim) == (16, 8, 96)
    matrices = shape.matrix_bytes()
    for name in ("ffn_gate", "ffn_up", "ffn_down"):
        assert matrices[name] > RPC_CACHE_MIN_BYTES, name  # a reload need not resend them
    assert 300e6 < shape.weight_bytes() < 1e9  # a few hundred MB
    assert DEMO_SHAPE.weight_bytes() < 1_000_000


def test_a_shaped_model_has_its_shape_and_types(tmp_path: Path) -> None:
    path = write_shaped_model(tmp_path / "m.gguf", SMALL, name="small")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"], "temp file left behind"
    assert 0 <= path.stat().st_size - SMALL.weight_bytes() < 64 * 1024  # the header

    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.name") == "small"
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert _field(reader, "llama.block_count") == 3
    assert _field(reader, "llama.embedding_length") == 96
    assert _field(reader, "llama.feed_forward_length") == 160
    assert _field(reader, "llama.attention.head_count") == 6
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.context_length") == 512
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(100000.0)
    assert len(_field(reader, "tokenizer.ggml.tokens")) == N_VOCAB

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 3 * 9
    shapes = {name: tuple(int(d) for d in t.shape) for name, t in tensors.items()}
    assert shapes["blk.2.attn_q.weight"] == (96, 96)
    assert shapes["blk.2.attn_k.weight"] == (96, 32)
    assert shapes["blk.2.ffn_up.weight"] == (96, 160)
    assert shapes["blk.2.ffn_down.weight"] == (160, 96)
    for name, t in tensors.items():
        matrix = name.startswith("blk.") and not name.endswith("norm.weight")
        want = gguf.GGMLQuantizationType.F16 if matrix else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, name
        if matrix:
            assert t.n_bytes == SMALL.matrix_bytes()[name.split(".")[2]], name


def test_a_shaped_model_keeps_the_demo_guarantees(tmp_path: Path) -> None:
    """Deterministic per seed; the bias channel survives F16 and every layer."""
    a = write_shaped_model(tmp_path / "a.gguf", SMALL, seed=4)
    b = write_shaped_model(tmp_path / "b.gguf", SMALL, seed=4)
    c = write_shaped_model(tmp_path / "c.gguf", SMALL, seed=5)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()

    t = {x.name: np.array(x.data, dtype=np.float64) for x in gguf.GGUFReader(a).tensors}
    assert np.all(t["token_embd.weight"][:, 0] > 0)
    for i in range(SMALL.n_layer):
        assert not t[f"blk.{i}.attn_output.weight"][0].any()
        assert not t[f"blk.{i}.ffn_down.weight"][0].any()
        assert t[f"blk.{i}.ffn_gate.weight"].any()
    head = t["output.weight"]
    n_banned = 5 + 256
    assert np.all(head[:n_banned, 0] < -100) and not head[n_banned:, 0].any()


def test_ensure_shaped_model_writes_once_per_shape_and_seed(tmp_path: Path) -> None:
    path = ensure_shaped_model(tmp_path, SMALL)
    assert path == tmp_path / "meshllm-demo-test-small.gguf"
    path.write_bytes(b"sentinel")  # an existing file is trusted, never regenerated
    assert ensure_shaped_model(tmp_path, SMALL) == path and path.read_bytes() == b"sentinel"
    other = ensure_shaped_model(tmp_path, SMALL, seed=2)
    assert other == tmp_path / "meshllm-demo-test-small-seed2.gguf" and other.exists()


@pytest.mark.integration
def test_llama_server_runs_a_shaped_model_to_max_tokens(llama_server: str, tmp_path: Path) -> None:
    model = write_shaped_model(tmp_path / "m.gguf", SMALL)
    port = free_port()
    log = tmp_path / "server.log"
    command = [llama_server, "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen([*command, "--threads", "1", "--no-webui"], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"not healthy: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 40}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json.dumps({**body, "temperature": 0}).encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.load(response)
        assert reply["usage"]["completion_tokens"] == 40, reply
        text = reply["choices"][0]["message"]["content"]
        assert text and text.isascii() and text.isprintable(), text
    finally:
        proc.kill()
        proc.wait(10)
