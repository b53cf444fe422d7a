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
"""

from __future__ import annotations

import os
import uuid
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


def _tensors(seed: int) -> list[tuple[str, npt.NDArray[np.float32]]]:
    """Build all weight tensors, numpy shape (out, in) as gguf expects (llama.cpp reverses it)."""
    rng = np.random.default_rng(seed)
    n_banned = len(_SPECIAL_TOKENS) + 256  # everything before the printable pieces
    kv_dim = N_HEAD_KV * HEAD_DIM

    def f32(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(a, dtype=np.float32)

    out: list[tuple[str, npt.NDArray[np.float32]]] = []

    embd = _uniform(rng, (N_VOCAB, N_EMBD), 1.0)
    embd[:, 0] = _BIAS_CHANNEL_VALUE  # the bias channel (see module docstring)
    out.append(("token_embd.weight", f32(embd)))

    for i in range(N_LAYER):
        scale = 1.0 / np.sqrt(N_EMBD)
        wq = _uniform(rng, (N_HEAD * HEAD_DIM, N_EMBD), 2.0 * scale)
        wk = _uniform(rng, (kv_dim, N_EMBD), 2.0 * scale)
        wv = _uniform(rng, (kv_dim, N_EMBD), scale)
        wo = _uniform(rng, (N_EMBD, N_HEAD * HEAD_DIM), scale)
        w_gate = _uniform(rng, (N_FF, N_EMBD), scale)
        w_up = _uniform(rng, (N_FF, N_EMBD), scale)
        w_down = _uniform(rng, (N_EMBD, N_FF), 1.0 / np.sqrt(N_FF))
        # No layer may write to the bias channel, so it stays constant in the residual stream.
        wo[0, :] = 0.0
        w_down[0, :] = 0.0
        out += [
            (f"blk.{i}.attn_norm.weight", f32(np.ones(N_EMBD))),
            (f"blk.{i}.attn_q.weight", f32(wq)),
            (f"blk.{i}.attn_k.weight", f32(wk)),
            (f"blk.{i}.attn_v.weight", f32(wv)),
            (f"blk.{i}.attn_output.weight", f32(wo)),
            (f"blk.{i}.ffn_norm.weight", f32(np.ones(N_EMBD))),
            (f"blk.{i}.ffn_gate.weight", f32(w_gate)),
            (f"blk.{i}.ffn_up.weight", f32(w_up)),
            (f"blk.{i}.ffn_down.weight", f32(w_down)),
        ]

    out.append(("output_norm.weight", f32(np.ones(N_EMBD))))

    head = _uniform(rng, (N_VOCAB, N_EMBD), 1.0)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pieces, scores, types = _vocab()

    # Unique name in the same directory (so os.replace is atomic); created by the writer with
    # open(), so it gets the usual umask-derived permissions, unlike a mkstemp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_vocab_size(N_VOCAB)
        writer.add_context_length(N_CTX)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(HEAD_DIM)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
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

        for tensor_name, data in _tensors(seed):
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
