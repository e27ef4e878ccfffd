"""One table from Hugging Face tensor names to dice-jax parameter paths, used both ways.

Each rule names the HF tensor (with `{i}` for the layer), the parameter path, and how to
turn the HF array (torch layout: `[out_features, in_features]`) into ours and back. Stacked
rules cover one layer slice of a `[layers, ...]` parameter. GGUF tensors are renamed to HF
names first (`GGUF_NAMES`) and their q/k rows un-permuted (`unpermute_llama_cpp`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from dice_jax.models.config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    path: tuple[str, ...]
    hf_name: str
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_ours: Transform
    to_hf: Transform
    stacked: bool


def _same(a: np.ndarray, c: ModelConfig) -> np.ndarray:
    return a


def _t(a: np.ndarray, c: ModelConfig) -> np.ndarray:
    return a.T


def _heads_in(heads: Callable[[ModelConfig], int]) -> tuple[Transform, Transform]:
    """[heads*head_dim, embed] <-> [embed, heads, head_dim] (q, k, v projections)."""
    def to_ours(a: np.ndarray, c: ModelConfig) -> np.ndarray:
        return a.T.reshape(c.hidden_size, heads(c), c.head_dim)

    def to_hf(a: np.ndarray, c: ModelConfig) -> np.ndarray:
        return a.reshape(c.hidden_size, heads(c) * c.head_dim).T
    return to_ours, to_hf


def _o_to_ours(a: np.ndarray, c: ModelConfig) -> np.ndarray:
    return a.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_to_hf(a: np.ndarray, c: ModelConfig) -> np.ndarray:
    return a.reshape(c.num_heads * c.head_dim, c.hidden_size).T


_Q = _heads_in(lambda c: c.num_heads)
_KV = _heads_in(lambda c: c.num_kv_heads)
_L = "model.layers.{i}."

RULES: tuple[TensorRule, ...] = (
    TensorRule(("embed",), "model.embed_tokens.weight",
               lambda c: (c.vocab_size, c.hidden_size), _same, _same, False),
    TensorRule(("final_norm",), "model.norm.weight", lambda c: (c.hidden_size,), _same, _same,
               False),
    TensorRule(("lm_head",), "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), _t, _t,
               False),
    TensorRule(("layers", "attn_norm"), _L + "input_layernorm.weight",
               lambda c: (c.hidden_size,), _same, _same, True),
    TensorRule(("layers", "mlp_norm"), _L + "post_attention_layernorm.weight",
               lambda c: (c.hidden_size,), _same, _same, True),
    TensorRule(("layers", "attn", "q_proj"), _L + "self_attn.q_proj.weight",
               lambda c: (c.num_heads * c.head_dim, c.hidden_size), *_Q, True),
    TensorRule(("layers", "attn", "k_proj"), _L + "self_attn.k_proj.weight",
               lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size), *_KV, True),
    TensorRule(("layers", "attn", "v_proj"), _L + "self_attn.v_proj.weight",
               lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size), *_KV, True),
    TensorRule(("layers", "attn", "o_proj"), _L + "self_attn.o_proj.weight",
               lambda c: (c.hidden_size, c.num_heads * c.head_dim), _o_to_ours, _o_to_hf, True),
    TensorRule(("layers", "mlp", "gate_proj"), _L + "mlp.gate_proj.weight",
               lambda c: (c.intermediate_size, c.hidden_size), _t, _t, True),
    TensorRule(("layers", "mlp", "up_proj"), _L + "mlp.up_proj.weight",
               lambda c: (c.intermediate_size, c.hidden_size), _t, _t, True),
    TensorRule(("layers", "mlp", "down_proj"), _L + "mlp.down_proj.weight",
               lambda c: (c.hidden_size, c.intermediate_size), _t, _t, True),
)

# Tensors some HF checkpoints carry that the model recomputes or does not use.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(config: ModelConfig) -> tuple[TensorRule, ...]:
    """The rules that apply to `config` (no `lm_head` when embeddings are tied)."""
    return tuple(r for r in RULES if not (r.path == ("lm_head",) and config.tie_word_embeddings))


def hf_names(rule: TensorRule, config: ModelConfig) -> list[str]:
    """The HF tensor names of a rule: one per layer for stacked rules."""
    if rule.stacked:
        return [rule.hf_name.format(i=i) for i in range(config.num_layers)]
    return [rule.hf_name]


# ---------------------------------------------------------------- GGUF (llama.cpp) names
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": _L + "input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": _L + "post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": _L + "self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": _L + "self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": _L + "self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": _L + "self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": _L + "mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": _L + "mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": _L + "mlp.down_proj.weight",
}


def hf_to_gguf_name(hf_name: str) -> str:
    """The llama.cpp name of an HF tensor name (inverse of `GGUF_NAMES`)."""
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers."):
        i = parts[2]
        template = "model.layers.{i}." + ".".join(parts[3:])
        for g, h in GGUF_NAMES.items():
            if h == template:
                return g.format(i=i)
    for g, h in GGUF_NAMES.items():
        if h == hf_name:
            return g
    raise KeyError(hf_name)


def unpermute_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a q or k projection `[heads*head_dim, embed]`.

    llama.cpp's converter interleaves the two RoPE halves of each head (pairs (j, j+d/2)
    become adjacent rows); HF's layout keeps the halves apart.
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))
