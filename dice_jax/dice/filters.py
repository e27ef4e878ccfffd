"""Which sampled responses may enter a preference pair (official-code defaults).

Responses that hit the token limit without end-of-turn, and responses whose character
length is outside (min_chars, max_chars), are dropped; a prompt needs at least `min_valid`
valid responses. Every drop is counted by reason.
"""

from collections import Counter
from collections.abc import Sequence

import numpy as np

from dice_jax.errors import ConfigError
from dice_jax.settings import check_settings, section, setting


@section
class FilterConfig:
    """Which samples may enter a pair (the run config's `dice.filters`)."""

    drop_truncated: bool = setting(True, "drop responses that hit the token limit without "
                                   "end-of-turn")
    min_chars: int = setting(3, "drop responses of at most this many characters "
                             "(official: <= 3; -1 keeps empty ones)", min=-1)
    max_chars: int = setting(6700, "drop responses of at least this many characters "
                             "(official: >= 6700)", min=1)
    min_valid: int = setting(8, "valid responses a prompt needs (official: 8 of K=16)",
                             min=2)

    def __post_init__(self) -> None:
        check_settings(self, "dice.filters.")

    def check(self) -> None:
        if self.max_chars <= self.min_chars:
            raise ConfigError(f"config.dice.filters.max_chars: {self.max_chars} must exceed "
                              f"min_chars={self.min_chars}")


def valid_responses(finish_reasons: Sequence[Sequence[str]], char_lengths: np.ndarray,
                    config: FilterConfig) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Applies the filters to `[P, K]` responses.

    Returns `(valid [P, K] bool, prompt_kept [P] bool, drops)` where `drops` counts
    responses by first failing reason (`truncated`, `too_short`, `too_long`) and prompts
    dropped for `too_few_valid`. `valid` is False everywhere in a dropped prompt.
    """
    lengths = np.asarray(char_lengths)
    truncated = np.array([[r == "length" for r in row] for row in finish_reasons], bool)
    if truncated.shape != lengths.shape:
        raise ValueError(f"finish_reasons shape {truncated.shape} != lengths {lengths.shape}")
    drops: Counter = Counter()
    valid = np.ones(lengths.shape, bool)
    for reason, bad in (("truncated", truncated if config.drop_truncated else None),
                        ("too_short", lengths <= config.min_chars),
                        ("too_long", lengths >= config.max_chars)):
        if bad is None:
            continue
        drops[reason] += int(np.sum(valid & bad))
        valid &= ~bad
    prompt_kept = valid.sum(-1) >= config.min_valid
    drops["too_few_valid"] += int(np.sum(~prompt_kept))
    valid &= prompt_kept[:, None]
    return valid, prompt_kept, drops
