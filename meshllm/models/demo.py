"""A tiny, deterministic llama-architecture GGUF model for demos and tests.

meshllm needs *some* model to exercise the whole stack (node processes, real ``llama-server``,
the OpenAI-compatible API) on machines without GPUs or downloaded weights. This module writes
one from scratch with :mod:`gguf` and numpy: random weights, about 490 KB, loaded by
``llama-server`` in a few milliseconds and decoded at thousands of tokens per second on a
laptop CPU. Its output is gibberish, but it is well-behaved gibberish:

* **Plain llama architecture.** 2 layers, width 64, 4 query heads of dim 16, 2 KV heads (GQA),
  SwiGLU FFN of width 128, RoPE base 10000, RMS-norm eps 1e-5. Nothing exotic, so any
  llama.cpp build runs it. All tensors are F32: F16 matrices barely shrink the file but add
  rounding noise that makes greedy outputs depend on how requests get batched.
* **16k context.** ``llama-server`` sizes its KV pool from the model's context length when no
  ``-c`` is given, and that pool is shared by all (by default 4) slots; a 4k model made four
  concurrent 1500-token requests fail with "Context size has been exceeded". The KV cache of
  this model costs 256 bytes per token, so 16k is cheap.
* **SentencePiece ("llama") vocabulary of 361 tokens**: ``<unk>``, ``<s>``, ``</s>``, the
  ChatML control tokens ``<|im_start|>``/``<|im_end|>``, the 256 byte-fallback tokens
  ``<0x00>``..``<0xFF>`` (so any input text tokenizes) and 100 printable ASCII pieces. The
  GGUF carries a ChatML chat template, so ``/v1/chat/completions`` works out of the box.
* **Every generation runs to ``max_tokens``**, whatever the prompt or seed, and yields only
  printable ASCII. Benchmarks and tests rely on that to get exact token counts. Zeroing the
  LM-head rows of unwanted tokens is not enough (a zero logit can still beat all-negative
  ones), so the model carries a *bias channel* instead: channel 0 of every token embedding is
  a positive constant and no layer writes to it (row 0 of ``attn_output``/``ffn_down`` is
  zero), so after the final RMS norm that channel is strictly positive for any context. The
  LM-head rows of the special and byte tokens are ``-K`` on that channel and zero elsewhere,
  giving them a logit of ``-K * h0 < 0``. The rows of the printable tokens are zero on that
  channel and mean-centred over the others, so their logits average to 0 and at least one
  of them is >= 0. Hence argmax (temperature 0) never picks EOS, a control or a byte token,
  and with ``K = 1000`` (their logit is around -500) sampling at any sane temperature does not
  either.
  Only the context window can cut a reply short (prompt + ``max_tokens`` > context).
* **Deterministic.** The same ``(seed, name)`` always gives a byte-identical file; a different
  seed gives different weights and therefore different text. Greedy replies repeat exactly
  for identical requests, but like any model under llama.cpp they can drift after a few
  hundred tokens when the request is batched differently (concurrent slots, a reused prompt
  cache), mostly through flash attention's F16 accumulation; ``llama-server -fa off`` makes
  that very rare.

``write_shaped_model`` writes the same kind of model in another ``ModelShape``: by default
the layers of a real ~0.5 B model (``DANUBE3_500M_SHAPE``, ~830 MB, layer matrices in F16)
for the tensor split benchmark, where a decode step must cost what a real model's does and
the FFN matrices must be large enough for llama.cpp's RPC tensor cache. It keeps the
vocabulary and every guarantee above; it is written on demand into a cache (seconds), never
committed.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

DEMO_MODEL_NAME = "meshllm-demo"

ARCH = "llama"
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = N_EMBD // N_HEAD
N_FF = 128
N_CTX = 16384  # see module docstring: the KV pool of all slots is sized from it
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5

# Magnitude of the constant bias channel in every embedding, and of the penalty the LM head
# applies through it to tokens that must never be generated.
_BIAS_CHANNEL_VALUE = 1.0
_BANNED_PENALTY = 1000.0

UNK_ID = 0
BOS_ID = 1
EOS_ID = 4  # <|im_end|>: ChatML end of turn
PAD_ID = 0

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SPACE = "\u2581"  # SentencePiece word-boundary marker, decoded as " "
_SPECIAL_TOKENS: list[tuple[str, gguf.TokenType]] = [
    ("<unk>", gguf.TokenType.UNKNOWN),
    ("<s>", gguf.TokenType.CONTROL),
    ("</s>", gguf.TokenType.CONTROL),
    ("<|im_start|>", gguf.TokenType.CONTROL),
    ("<|im_end|>", gguf.TokenType.CONTROL),
]
_BIGRAMS = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le"
)
_WORDS = "the and is it in of to a i we you he on at hello world mesh model demo ok yes no llm"
_NORMAL_PIECES: list[str] = [
    _SPACE,
    *"abcdefghijklmnopqrstuvwxyz",
    *"0123456789",
    *".,!?'-:;()",
    *_BIGRAMS.split(),
    *(_SPACE + w for w in _WORDS.split()),
]


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (pieces, scores, token types) of the demo vocabulary."""
    pieces = [text for text, _ in _SPECIAL_TOKENS]
    types = [int(kind) for _, kind in _SPECIAL_TOKENS]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(gguf.TokenType.BYTE)] * 256
    scores = [0.0] * len(pieces)
    pieces += _NORMAL_PIECES
    types += [int(gguf.TokenType.NORMAL)] * len(_NORMAL_PIECES)
    scores += [-float(i) for i in range(len(_NORMAL_PIECES))]
    assert len(set(pieces)) == len(pieces), "duplicate vocabulary piece"
    return pieces, scores, types


N_VOCAB = len(_SPECIAL_TOKENS) + 256 + len(_NORMAL_PIECES)


def _uniform(
    rng: np.random.Generator, shape: tuple[int, ...], std: float
) -> npt.NDArray[np.float64]:
    """Zero-mean uniform noise with standard deviation ``std``."""
    return (rng.random(shape) * 2.0 - 1.0) * (std * np.sqrt(3.0))


@dataclass(frozen=True)
class ModelShape:
    """The widths of a llama-architecture model written with the demo vocabulary."""

    name: str
    """Part of the file name `ensure_shaped_model` writes."""
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    rope_freq_base: float
    f16: bool
    """Layer matrices in F16 (norms, embeddings and the LM head stay F32)."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def matrix_bytes(self) -> dict[str, int]:
        """Bytes of each weight matrix of one layer, as written."""
        item = 2 if self.f16 else 4
        kv_dim = self.n_head_kv * self.head_dim
        return {
            "attn_q": self.n_embd * self.n_head * self.head_dim * item,
            "attn_k": self.n_embd * kv_dim * item,
            "attn_v": self.n_embd * kv_dim * item,
            "attn_output": self.n_head * self.head_dim * self.n_embd * item,
            "ffn_gate": self.n_embd * self.n_ff * item,
            "ffn_up": self.n_embd * self.n_ff * item,
            "ffn_down": self.n_ff * self.n_embd * item,
        }

    def weight_bytes(self) -> int:
        """Bytes of all tensors (about the file's size: the header is a few kB)."""
        layer = sum(self.matrix_bytes().values()) + 2 * self.n_embd * 4
        return self.n_layer * layer + (2 * N_VOCAB + 1) * self.n_embd * 4


DEMO_SHAPE = ModelShape(
    name="tiny",
    n_layer=N_LAYER,
    n_embd=N_EMBD,
    n_head=N_HEAD,
    n_head_kv=N_HEAD_KV,
    n_ff=N_FF,
    n_ctx=N_CTX,
    rope_freq_base=ROPE_FREQ_BASE,
    f16=False,
)
"""The tiny demo model's shape (`write_demo_model`)."""

DANUBE3_500M_SHAPE = ModelShape(
    name="danube3-500m-shape",
    n_layer=16,
    n_embd=1536,
    n_head=16,
    n_head_kv=8,
    n_ff=4096,
    n_ctx=4096,
    rope_freq_base=100000.0,
    f16=True,
)
"""The layers of H2O's h2o-danube3-500m (a real llama-architecture model) with the demo
vocabulary instead of its 32k one: ~0.42 B parameters, ~830 MB in F16, whose FFN matrices
(12 MiB each) are over the 10 MiB above which llama.cpp's RPC server caches a tensor, so
a worker with `--cache` need not receive them again. A decode step reads every weight
once: compute, not the network, dominates it, as with a real model (the benchmark's
`split` section). The context is cut to 4k so the KV cache stays small."""


def _tensors(
    seed: int, shape: ModelShape = DEMO_SHAPE
) -> list[tuple[str, npt.NDArray[np.float32] | npt.NDArray[np.float16]]]:
    """Build all weight tensors, numpy shape (out, in) as gguf expects (llama.cpp reverses it)."""
    rng = np.random.default_rng(seed)
    n_banned = len(_SPECIAL_TOKENS) + 256  # everything before the printable pieces
    n_embd, n_head, head_dim, n_ff = shape.n_embd, shape.n_head, shape.head_dim, shape.n_ff
    kv_dim = shape.n_head_kv * head_dim

    def f32(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(a, dtype=np.float32)

    def matrix(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float32] | npt.NDArray[np.float16]:
        return np.ascontiguousarray(a, dtype=np.float16) if shape.f16 else f32(a)

    out: list[tuple[str, npt.NDArray[np.float32] | npt.NDArray[np.float16]]] = []

    embd = _uniform(rng, (N_VOCAB, n_embd), 1.0)
    embd[:, 0] = _BIAS_CHANNEL_VALUE  # the bias channel (see module docstring)
    out.append(("token_embd.weight", f32(embd)))

    for i in range(shape.n_layer):
        scale = 1.0 / np.sqrt(n_embd)
        wq = _uniform(rng, (n_head * head_dim, n_embd), 2.0 * scale)
        wk = _uniform(rng, (kv_dim, n_embd), 2.0 * scale)
        wv = _uniform(rng, (kv_dim, n_embd), scale)
        wo = _uniform(rng, (n_embd, n_head * head_dim), scale)
        w_gate = _uniform(rng, (n_ff, n_embd), scale)
        w_up = _uniform(rng, (n_ff, n_embd), scale)
        w_down = _uniform(rng, (n_embd, n_ff), 1.0 / np.sqrt(n_ff))
        # No layer may write to the bias channel, so it stays constant in the residual stream.
        wo[0, :] = 0.0
        w_down[0, :] = 0.0
        out += [
            (f"blk.{i}.attn_norm.weight", f32(np.ones(n_embd))),
            (f"blk.{i}.attn_q.weight", matrix(wq)),
            (f"blk.{i}.attn_k.weight", matrix(wk)),
            (f"blk.{i}.attn_v.weight", matrix(wv)),
            (f"blk.{i}.attn_output.weight", matrix(wo)),
            (f"blk.{i}.ffn_norm.weight", f32(np.ones(n_embd))),
            (f"blk.{i}.ffn_gate.weight", matrix(w_gate)),
            (f"blk.{i}.ffn_up.weight", matrix(w_up)),
            (f"blk.{i}.ffn_down.weight", matrix(w_down)),
        ]

    out.append(("output_norm.weight", f32(np.ones(n_embd))))

    head = _uniform(rng, (N_VOCAB, n_embd), 1.0)
    head[:, 0] = 0.0
    # Printable tokens: mean-centred, so their logits average to ~0 -> max >= ~0.
    head[n_banned:, 1:] -= head[n_banned:, 1:].mean(axis=0, keepdims=True)
    # Special and byte tokens: logit = -K * h0 < 0, since h0 (the bias channel) is > 0.
    head[:n_banned, :] = 0.0
    head[:n_banned, 0] = -_BANNED_PENALTY
    out.append(("output.weight", f32(head)))
    return out


def write_demo_model(path: Path, *, seed: int = 0, name: str = DEMO_MODEL_NAME) -> Path:
    """Write the demo model to ``path`` atomically (temp file + rename) and return ``path``."""
    return _write_model(path, DEMO_SHAPE, seed, name)


def write_shaped_model(
    path: Path, shape: ModelShape = DANUBE3_500M_SHAPE, *, seed: int = 0, name: str | None = None
) -> Path:
    """Write a demo model of another shape (by default a real ~0.5 B model's layers, a few
    hundred MB) to ``path`` atomically and return ``path``: the demo's vocabulary, random
    weights and guarantees (every reply runs to ``max_tokens``, printable, deterministic
    for a seed), only larger. Takes seconds: numpy, seeded."""
    return _write_model(path, shape, seed, name or f"{DEMO_MODEL_NAME}-{shape.name}")


def ensure_shaped_model(
    models_dir: Path, shape: ModelShape = DANUBE3_500M_SHAPE, *, seed: int = 0
) -> Path:
    """Return the shaped model's path in ``models_dir`` (a cache, never committed), writing
    it there if it is missing."""
    name = f"{DEMO_MODEL_NAME}-{shape.name}"
    path = Path(models_dir) / (f"{name}.gguf" if seed == 0 else f"{name}-seed{seed}.gguf")
    if not path.exists():
        write_shaped_model(path, shape, seed=seed, name=name)
    return path


def _write_model(path: Path, shape: ModelShape, seed: int, name: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pieces, scores, types = _vocab()

    # Unique name in the same directory (so os.replace is atomic); created by the writer with
    # open(), so it gets the usual umask-derived permissions, unlike a mkstemp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        writer.add_name(name)
        file_type = gguf.LlamaFileType.MOSTLY_F16 if shape.f16 else gguf.LlamaFileType.ALL_F32
        writer.add_file_type(int(file_type))
        writer.add_vocab_size(N_VOCAB)
        writer.add_context_length(shape.n_ctx)
        writer.add_embedding_length(shape.n_embd)
        writer.add_block_count(shape.n_layer)
        writer.add_feed_forward_length(shape.n_ff)
        writer.add_head_count(shape.n_head)
        writer.add_head_count_kv(shape.n_head_kv)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_rope_freq_base(shape.rope_freq_base)
        writer.add_layer_norm_rms_eps(RMS_EPS)

        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_unk_token_id(UNK_ID)
        writer.add_pad_token_id(PAD_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        # No "▁" is inserted at the start of the text or after control tokens: the prompt is
        # tokenized exactly as the chat template renders it.
        writer.add_add_space_prefix(False)
        writer.add_chat_template(CHATML_TEMPLATE)

        for tensor_name, data in _tensors(seed, shape):
            writer.add_tensor(tensor_name, data)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def ensure_demo_model(models_dir: Path, *, seed: int = 0, name: str = DEMO_MODEL_NAME) -> Path:
    """Return ``models_dir / f"{name}.gguf"``, writing the demo model there if it is missing."""
    path = Path(models_dir) / f"{name}.gguf"
    if not path.exists():
        write_demo_model(path, seed=seed, name=name)
    return path
