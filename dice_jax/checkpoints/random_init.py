"""`random:PRESET` models: seeded random weights plus a byte-level tokenizer.

For smoke tests (`configs/tiny.py`) and for benchmarks of large shapes without a download
(`random:llama3_8b`). The tokenizer is a real byte-level BPE with no merges (every byte is a
token) and four special tokens, with a ChatML chat template; the model's vocabulary is
resized to it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dice_jax.models.config import ModelConfig
from dice_jax.models.presets import preset
from dice_jax.sharding import param_shardings

SPECIAL_TOKENS = ("<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer: ids 0-3 special, 4-259 the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: i + len(SPECIAL_TOKENS) for i, ch in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", chat_template=CHATML)


def random_config(name: str, tokenizer: Any = None, **config_overrides: Any) -> ModelConfig:
    """The config of `random:NAME`: the preset with the byte tokenizer's vocabulary."""
    tokenizer = tokenizer or byte_tokenizer()
    return preset(name, vocab_size=len(tokenizer), bos_token_id=None,
                  eos_token_ids=(tokenizer.eos_token_id,),
                  pad_token_id=tokenizer.pad_token_id, **config_overrides)


def random_model(name: str, seed: int = 0, shardings: Any | None = None,
                 **config_overrides: Any) -> tuple[dict, ModelConfig, Any]:
    """Params (initialised straight onto `shardings`), config and tokenizer."""
    from dice_jax.models.decoder import Decoder

    tokenizer = byte_tokenizer()
    config = random_config(name, tokenizer, **config_overrides)
    shardings = shardings if shardings is not None else param_shardings(config)
    ids = jnp.zeros((1, 1), jnp.int32)

    def init(key: jax.Array) -> dict:
        import flax.linen as nn

        return nn.unbox(Decoder(config).init(key, ids, ids, ids))["params"]

    params = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return params, config, tokenizer
