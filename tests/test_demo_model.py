"""Tests for the tiny random-weight demo model (meshllm.models.demo)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from meshllm.models.demo import (
    CHATML_TEMPLATE,
    DEMO_MODEL_NAME,
    N_VOCAB,
    ensure_demo_model,
    write_demo_model,
)
from meshllm.runtime.procutil import free_port

LLAMA_SERVER = Path.home() / ".cache/meshllm/llama.cpp-0.3.36/bin/llama-server"


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    a = write_demo_model(tmp_path / "a.gguf", seed=3)
    b = write_demo_model(tmp_path / "sub" / "b.gguf", seed=3)
    assert a == tmp_path / "a.gguf"
    assert a.read_bytes() == b.read_bytes()


def test_different_seed_differs(tmp_path: Path) -> None:
    a = write_demo_model(tmp_path / "a.gguf", seed=0)
    b = write_demo_model(tmp_path / "b.gguf", seed=1)
    assert a.read_bytes() != b.read_bytes()
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: np.array(t.data) for t in ra.tensors}
    tb = {t.name: np.array(t.data) for t in rb.tensors}
    assert not np.array_equal(ta["blk.0.attn_q.weight"], tb["blk.0.attn_q.weight"])


def test_metadata_and_tensors(tmp_path: Path) -> None:
    path = write_demo_model(tmp_path / "m.gguf", name="my-demo")
    assert path.stat().st_size < 1_000_000
    assert not [p for p in tmp_path.iterdir() if p.name != "m.gguf"], "temp file left behind"

    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.name") == "my-demo"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE

    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == N_VOCAB
    assert 300 <= N_VOCAB <= 400
    assert tokens[:5] == ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    assert tokens[5] == "<0x00>" and tokens[5 + 255] == "<0xFF>"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[3] == types[4] == gguf.TokenType.CONTROL
    assert types[5 + 10] == gguf.TokenType.BYTE
    assert all(t == gguf.TokenType.NORMAL for t in types[261:])
    assert tokens[_field(reader, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert tokens[_field(reader, "tokenizer.ggml.bos_token_id")] == "<s>"

    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order
    assert shapes["token_embd.weight"] == (64, N_VOCAB)
    assert shapes["output.weight"] == (64, N_VOCAB)
    assert shapes["blk.1.attn_q.weight"] == (64, 64)
    assert shapes["blk.1.attn_k.weight"] == (64, 32)
    assert shapes["blk.1.ffn_down.weight"] == (128, 64)
    assert len(shapes) == 3 + 2 * 9


def test_lm_head_can_never_pick_special_or_byte_tokens(tmp_path: Path) -> None:
    """The structural guarantee behind "every reply runs to max_tokens" (see module docs)."""
    reader = gguf.GGUFReader(write_demo_model(tmp_path / "m.gguf", seed=5))
    t = {x.name: np.array(x.data, dtype=np.float64) for x in reader.tensors}
    n_banned = 5 + 256
    assert np.all(t["token_embd.weight"][:, 0] > 0)  # constant positive bias channel ...
    for i in range(2):  # ... that no layer writes to
        assert not t[f"blk.{i}.attn_output.weight"][0].any()
        assert not t[f"blk.{i}.ffn_down.weight"][0].any()
    assert np.all(t["output_norm.weight"][0] > 0)
    head = t["output.weight"]
    assert head.shape == (N_VOCAB, 64)
    assert np.all(head[:n_banned, 0] < -100) and not head[:n_banned, 1:].any()
    assert not head[n_banned:, 0].any()
    assert np.abs(head[n_banned:, 1:].mean(axis=0)).max() < 1e-6  # max logit >= mean == 0


def test_ensure_demo_model_does_not_rewrite(tmp_path: Path) -> None:
    models = tmp_path / "models"
    path = ensure_demo_model(models)
    assert path == models / f"{DEMO_MODEL_NAME}.gguf"
    path.write_bytes(b"sentinel")  # an existing file is trusted, never regenerated
    assert ensure_demo_model(models, seed=7) == path
    assert path.read_bytes() == b"sentinel"
    other = ensure_demo_model(models, name="other")
    assert other == models / "other.gguf" and other.exists()


# --- real llama-server ------------------------------------------------------------------------


def _post(url: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        result: dict[str, Any] = json.loads(resp.read())
    return result


def _post_stream(url: str, body: dict[str, Any], timeout: float = 30.0) -> list[dict[str, Any]]:
    req = urllib.request.Request(
        url,
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    events: list[dict[str, Any]] = []
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            events.append(json.loads(data))
    return events


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"llama-server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"llama-server not healthy within {deadline_s}s")


@pytest.mark.integration
@pytest.mark.skipif(not LLAMA_SERVER.exists(), reason=f"{LLAMA_SERVER} not built")
def test_llama_server_runs_to_max_tokens(tmp_path: Path) -> None:
    model = write_demo_model(tmp_path / "demo.gguf")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    # Flash attention (on by default) accumulates in F16 with batch-shape-dependent order, so a
    # reused prompt cache can make long greedy replies drift; without it they are stable.
    cmd = [str(LLAMA_SERVER), "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--flash-attn", "off"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(base, proc, deadline_s=60)

        prompts = ["hello", "Write a poem about GPUs!\nÜnïcödé ✓", ""]
        for n in (1, 32, 200):
            for prompt in prompts:
                body = {
                    "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0,
                    "max_tokens": n,
                }
                first = _post(f"{base}/v1/chat/completions", body)
                second = _post(f"{base}/v1/chat/completions", body)
                choice = first["choices"][0]
                assert first["usage"]["completion_tokens"] == n, first
                assert choice["finish_reason"] == "length"
                text = choice["message"]["content"]
                assert text and text.isascii() and text.isprintable(), text
                assert second["choices"][0]["message"]["content"] == text

        # streaming gives the same text, one printable delta per token
        body = {
            "messages": [{"role": "user", "content": "hello"}],
            "temperature": 0,
            "max_tokens": 32,
        }
        expected = _post(f"{base}/v1/chat/completions", body)["choices"][0]["message"]["content"]
        events = _post_stream(f"{base}/v1/chat/completions", body)
        streamed = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
        )
        assert streamed == expected
        finishes = [e["choices"][0].get("finish_reason") for e in events if e["choices"]]
        assert "length" in finishes

        # raw completions endpoint
        comp = _post(
            f"{base}/v1/completions",
            {"prompt": "the model", "temperature": 0, "max_tokens": 50},
        )
        assert comp["usage"]["completion_tokens"] == 50
        assert comp["choices"][0]["finish_reason"] == "length"
        assert comp["choices"][0]["text"].isprintable()
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()
