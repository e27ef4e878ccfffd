"""Model configuration for the Llama-3 / Mistral decoder family.

One dataclass describes every supported model. It is built from a Hugging Face
`config.json` (both the transformers-4 `rope_theta`/`rope_scaling` fields and the
transformers-5 `rope_parameters` field are read), from a GGUF header, or from a named
preset, and written back as an HF `config.json` on export.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from dice_jax.errors import CheckpointError
from dice_jax.fileio import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """The "llama3" RoPE frequency scaling of Llama 3.1 / 3.2 (HF `rope_type="llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one decoder-only model.

    `dtype` is the compute dtype of activations and matmuls; `param_dtype` the storage
    dtype of parameters. Softmax and log-softmax always run in float32.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        e, m, h, kv, d = (self.hidden_size, self.intermediate_size, self.num_heads,
                          self.num_kv_heads, self.head_dim)
        per_layer = e * d * (2 * h + 2 * kv) + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + head + self.num_layers * per_layer + e

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json",
                     **overrides: Any) -> ModelConfig:
        """Builds a config from the dict of an HF `config.json`; `source` names it in errors."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = hf.get("architectures") or model_type
            raise CheckpointError(source, f"unsupported architecture {arch!r} (model_type="
                                  f"{model_type!r}); dice-jax supports {SUPPORTED_MODEL_TYPES}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise CheckpointError(source, f"{flag}=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(source, f"hidden_act={hf['hidden_act']!r}; only 'silu'")
        try:
            rope = dict(hf.get("rope_parameters") or {})
            legacy = hf.get("rope_scaling") or {}
            rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type",
                                 legacy.get("rope_type", legacy.get("type", "default")))
            scaling_src = rope if "factor" in rope else legacy
            scaling = None
            if rope_type == "llama3":
                scaling = RopeScaling(
                    factor=float(scaling_src["factor"]),
                    low_freq_factor=float(scaling_src["low_freq_factor"]),
                    high_freq_factor=float(scaling_src["high_freq_factor"]),
                    original_max_position_embeddings=int(
                        scaling_src["original_max_position_embeddings"]))
            elif rope_type not in ("default", None):
                raise CheckpointError(source, f"unsupported RoPE type {rope_type!r}; "
                                      "supported: default, llama3")
            heads = int(hf["num_attention_heads"])
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            window = hf.get("sliding_window") if model_type == "mistral" else None
            if model_type == "mistral" and hf.get("use_sliding_window") is False:
                window = None
            kwargs = dict(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                sliding_window=int(window) if window else None,
                max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(i) for i in eos_ids),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as e:
            raise CheckpointError(source, f"missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(source, f"bad value: {e}") from None
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise CheckpointError(source, str(e)) from None

    @classmethod
    def from_hf_file(cls, path: str, **overrides: Any) -> ModelConfig:
        """Reads an HF `config.json`."""
        hf = read_json(path)
        if not isinstance(hf, dict):
            raise CheckpointError(path, "expected a JSON object")
        return cls.from_hf_dict(hf, source=path, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers-5 field names, readable by 4.x too)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    **dataclasses.asdict(self.rope_scaling)}
        eos: Any = list(self.eos_token_ids)
        eos = eos[0] if len(eos) == 1 else (eos or None)
        hf: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if self.rope_scaling is None else {
                k: v for k, v in rope.items() if k != "rope_theta"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,
        }
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        else:
            hf["sliding_window"] = self.sliding_window
        return hf

    # ------------------------------------------------------------------ own JSON
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model_config.json") -> ModelConfig:
        try:
            d = json.loads(text)
            if d.get("rope_scaling") is not None:
                d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
            d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
            return cls(**d)
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(source, f"not a dice-jax model config ({e})") from None
