"""The toy task's start model: a random preset taught the toy language, cached on disk.

A `random:PRESET` model writes random bytes and never stops, so no preference data can
make it write the toy language within a few DPO steps (docs/toy_task.md has the
measurement). The model source `toy:PRESET` (or `toy:PRESET:SEED`) is that random model
after a short supervised warm-up on the base distribution (`language.warmup_examples`:
responses that ignore the rules), so the start policy writes the language with the base
distribution's mean gold reward before round 0's DPO begins.

The warm-up is a seeded, jitted cross-entropy step (AdamW, gradient clipping) on
`WarmupSettings.steps` batches; its result is a dice-jax checkpoint under
`cache_root()` (`$DICE_JAX_TOY_CACHE`, default `~/.cache/dice_jax/toy`), in a folder named
by a hash of the settings and `language.LANGUAGE_VERSION`, written under a temporary name
and renamed, so later runs load it in a second. `python -m dice_jax.toy.warmup toy:tiny`
builds it ahead (needed once before a run of several processes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dice_jax.checkpoints.orbax_io import is_checkpoint, save_checkpoint
from dice_jax.errors import DiceError
from dice_jax.fileio import atomic_directory, write_json
from dice_jax.toy.language import LANGUAGE_VERSION, warmup_examples

log = logging.getLogger("dice_jax.toy")
MODEL_DIR = "model"
INFO_FILE = "warmup.json"


@dataclasses.dataclass(frozen=True)
class WarmupSettings:
    """What the warm-up does; every field is part of the cache key."""

    preset: str = "tiny"
    seed: int = 0            # random init and the warm-up corpus
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    examples: int = 4096     # distinct (prompt, response) pairs, cycled in seeded epochs
    pad_to: int = 64         # sequences padded to a multiple of this

    def key(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "language": LANGUAGE_VERSION},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_source(name: str) -> WarmupSettings:
    """`PRESET` or `PRESET:SEED` (the part after `toy:`) -> WarmupSettings."""
    preset, _, seed = name.partition(":")
    if not preset or (seed and not seed.isdigit()):
        raise DiceError(f"toy:{name}: expected toy:PRESET or toy:PRESET:SEED (e.g. toy:tiny, "
                        "toy:tiny:1)")
    return WarmupSettings(preset=preset, seed=int(seed or 0))


def cache_root() -> str:
    return os.environ.get("DICE_JAX_TOY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dice_jax", "toy")


def cache_folder(settings: WarmupSettings) -> str:
    return os.path.join(cache_root(), f"{settings.preset}-seed{settings.seed}-"
                        f"{settings.key()}")


def encode_examples(examples: list[tuple[str, str]], tokenizer: Any, pad_to: int
                    ) -> dict[str, np.ndarray]:
    """(prompt, response) pairs -> right-padded int32 `input_ids`, `attention_mask`,
    `loss_mask` `[N, length]`, tokenised as DPO tokenises a pair's response (chat
    template with the generation prompt, then the response and one end-of-turn id), so
    the warm-up teaches exactly the sequences that are later sampled and scored."""
    from dice_jax.training.data import end_of_turn_id

    eos = end_of_turn_id(tokenizer)
    seqs = []
    for prompt, response in examples:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        p = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        r = [*tokenizer(response, add_special_tokens=False)["input_ids"], eos]
        seqs.append((p, r))
    longest = max(len(p) + len(r) for p, r in seqs)
    length = -(-longest // pad_to) * pad_to
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = {"input_ids": np.full((len(seqs), length), pad, np.int32),
           "attention_mask": np.zeros((len(seqs), length), np.int32),
           "loss_mask": np.zeros((len(seqs), length), np.int32)}
    for i, (p, r) in enumerate(seqs):
        out["input_ids"][i, :len(p) + len(r)] = p + r
        out["attention_mask"][i, :len(p) + len(r)] = 1
        out["loss_mask"][i, len(p):len(p) + len(r)] = 1
    return out


def make_step(model_config: Any, optimizer: optax.GradientTransformation) -> Any:
    """The jitted step: mean response-token cross-entropy, its gradient, one update.

    The full `[batch, length, vocab]` log-softmax is formed at once: with a byte-level
    vocabulary it is small, and on a CPU several times faster than the chunked scorer.
    """
    from dice_jax.models.decoder import Decoder, positions_from_mask

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        ids, attention = batch["input_ids"], batch["attention_mask"]
        logits = Decoder(model_config).apply({"params": params}, ids,
                                             positions_from_mask(attention), attention)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        mask = (batch["loss_mask"][:, 1:] * attention[:, 1:]).astype(jnp.float32)
        return -jnp.sum(target * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    @jax.jit
    def step(params: Any, opt_state: Any, batch: dict[str, jax.Array]
             ) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def warm_up(settings: WarmupSettings) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Trains `random:PRESET` (seed `settings.seed`) on the warm-up corpus.

    Returns params, model config, tokenizer and a summary (first / last losses, seconds).
    Deterministic for given settings on one machine type.
    """
    from dice_jax.checkpoints.random_init import random_model

    start = time.perf_counter()
    try:
        params, config, tokenizer = random_model(settings.preset, settings.seed)
    except KeyError as e:
        raise DiceError(f"toy:{settings.preset}: {e.args[0]}") from None
    data = encode_examples(warmup_examples(settings.examples, settings.seed), tokenizer,
                           settings.pad_to)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(settings.learning_rate, weight_decay=0.0))
    opt_state = optimizer.init(params)
    step = make_step(config, optimizer)
    rng = np.random.default_rng([settings.seed, settings.steps])
    per_epoch = settings.examples // settings.batch_size
    losses = []
    order = np.arange(settings.examples)
    for i in range(settings.steps):
        if i % per_epoch == 0:
            order = rng.permutation(settings.examples)
        idx = np.sort(order[(i % per_epoch) * settings.batch_size:
                            (i % per_epoch + 1) * settings.batch_size])
        params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in data.items()})
        losses.append(float(loss))
    summary = {"settings": dataclasses.asdict(settings), "language_version": LANGUAGE_VERSION,
               "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])),
               "seconds": round(time.perf_counter() - start, 2)}
    return params, config, tokenizer, summary


def warm_checkpoint(name: str) -> str:
    """The checkpoint folder of model source `toy:NAME`, built first when not cached."""
    settings = parse_source(name)
    folder = cache_folder(settings)
    model = os.path.join(folder, MODEL_DIR)
    if is_checkpoint(model):
        return model
    if jax.process_count() > 1:
        raise DiceError(f"toy:{name}: the warm-up checkpoint is not built yet; build it once "
                        f"with `python -m dice_jax.toy.warmup toy:{name}` (cache: "
                        f"{cache_root()}, shared by every host) and launch again")
    log.info("toy:%s: warming up random:%s (%d steps); cached in %s", name, settings.preset,
             settings.steps, folder)
    params, config, tokenizer, summary = warm_up(settings)
    try:
        with atomic_directory(folder) as tmp:
            save_checkpoint(params, config, os.path.join(tmp, MODEL_DIR), tokenizer)
            write_json(os.path.join(tmp, INFO_FILE), summary)
    except (OSError, DiceError):
        if not is_checkpoint(model):  # not another process's copy that won the rename
            raise
    log.info("toy:%s: warm-up loss %.3f -> %.3f in %.1f s", name, summary["first_loss"],
             summary["final_loss"], summary["seconds"])
    return model


def main(argv: list[str] | None = None) -> int:
    """`python -m dice_jax.toy.warmup toy:PRESET[:SEED] ...`: builds and prints each."""
    args = sys.argv[1:] if argv is None else argv
    if not args or any(not a.startswith("toy:") for a in args):
        print("usage: python -m dice_jax.toy.warmup toy:PRESET[:SEED] ...", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for source in args:
            print(warm_checkpoint(source.split(":", 1)[1]))
    except DiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
