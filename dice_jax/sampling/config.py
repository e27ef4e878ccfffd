"""The sampler's settings (`SamplingConfig`: the `sampling.*` keys of a run's config)."""

from dice_jax.sampling.distributions import Distribution
from dice_jax.settings import check_settings, section, setting


@section
class SamplingConfig:
    """Settings of one sampling run (the run config's `sampling` section).

    `temperature=0` is greedy; `top_k=0` and `top_p=1` are off. `stop_token_ids=None` uses
    the model's eos ids plus the tokenizer's eos. Prompts longer than `max_prompt_tokens`
    raise a ValueError naming the prompt, or with `truncate_prompts` keep their last
    `max_prompt_tokens` tokens (counted and logged). `cache_budget_gb` bounds the KV cache
    of one batch (prompt cache + generated cache), and the prompts of one prefill call are
    capped so that its transient activations (`generate.prefill_bytes` each) stay within
    `generate.PREFILL_SHARE` (half) of it on top: about 1.5x the budget in all, besides the
    weights; a prompt too long for that share is prefilled alone (one per data shard).
    `cache_dtype=None` is the model's compute dtype. Prompt lengths are padded to powers of
    two, at least `min_bucket`.
    """

    num_samples: int = setting(1, "K: responses per prompt", min=1)
    max_new_tokens: int = setting(256, "tokens generated per response at most", min=1)
    temperature: float = setting(1.0, "softmax temperature (0: greedy)", min=0)
    top_p: float = setting(1.0, "nucleus sampling mass (1: off)", above=0, max=1)
    top_k: int = setting(0, "keep the k most likely tokens (0: off)", min=0)
    seed: int = setting(0, "sampling seed", managed="config.seed (each round derives its "
                        "own) or eval.seed")
    stop_token_ids: tuple[int, ...] | None = setting(None, "stop tokens (None: the model's "
                                                     "and the tokenizer's eos)")
    max_prompt_tokens: int = setting(1024, "prompt tokens at most (after the chat template)",
                                     min=1)
    truncate_prompts: bool = setting(False, "keep a long prompt's last max_prompt_tokens "
                                     "(else: an error naming the prompt)")
    cache_budget_gb: float = setting(2.0, "KV-cache memory of one batch, GiB (one prefill "
                                     "call's activations: half of it more)", above=0)
    cache_dtype: str | None = setting(None, "KV-cache dtype (None: the compute dtype)",
                                      choices=("float32", "bfloat16"))
    min_bucket: int = setting(16, "smallest padded prompt length", min=1)
    max_batch_prompts: int | None = setting(None, "static engine: prompts per batch at "
                                            "most (None: as many as the cache budget "
                                            "allows)", min=1)
    max_slots: int | None = setting(None, "continuous engine: decode slots at most (None: "
                                    "as many as the cache budget allows)", min=1)
    tiered_slots: bool = setting(True, "continuous engine: when requests queue, tier the "
                                 "slots by length (up to ~2x the rows in the budget; a row "
                                 "outgrowing a short slot pauses until moved up)")
    progress: bool = setting(True, "progress bar", managed="--quiet")

    def __post_init__(self) -> None:
        check_settings(self, "sampling.")

    def check(self) -> None:
        _ = self.distribution  # validates temperature / top-k / top-p together

    @property
    def cache_budget_bytes(self) -> int:
        return int(self.cache_budget_gb * 2**30)

    @property
    def distribution(self) -> Distribution:
        return Distribution(self.temperature, self.top_k, self.top_p)
