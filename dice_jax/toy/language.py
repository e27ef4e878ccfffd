"""The toy prompt/response language and its data: D_offline pairs, evaluation prompts and
the warm-up corpus of the start model.

A prompt is a short name, `toy train 17`, and carries the task's rules as verifiable
instructions (`instruction_ids`, `kwargs`: the `toy:` checkers of `dice_jax.toy.gold`;
`describe_rules()` spells them out). The rules are not written into the prompt text: every
prompt has the same four (`GOLD_RULES`), so the text would add tokens and no information,
and the gold reward of a response y is a function of y alone:

    gold(y) = ( [share_ab(y) >= 1/2] + [share_ab(y) >= 3/4]
              + [6 <= len(y) <= 10] + [y ends with "!"] ) / 4

where share_ab(y) is the fraction of y's characters that are `a` or `b`. It is also the
verifiable judge's instruction-level accuracy, which evaluation and summary.md report.

The base distribution (what the start model is warmed up to write, and what D_offline's
responses are drawn from) ignores the rules: 1 to `MAX_LETTERS` letters, each uniform over
`LETTERS`, then the marker with probability 1/2. Its mean gold reward is 0.379 (exact, by
enumeration: tests/test_toy_task.py).
"""

from __future__ import annotations

import random
from typing import Any

from dice_jax.errors import DiceError
from dice_jax.judge.prompts import build_instruction
from dice_jax.judge.score import label_preferences, score_response

LETTERS = "abcd"
FAVOURED = "ab"
MARKER = "!"
MAX_LETTERS = 12
MARKER_PROBABILITY = 0.5
GOLD_RULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("toy:letter_share", {"letters": FAVOURED, "min_share": 0.5}),
    ("toy:letter_share", {"letters": FAVOURED, "min_share": 0.75}),
    ("toy:length_band", {"min_chars": 6, "max_chars": 10}),
    ("toy:end_marker", {"marker": MARKER}),
)
SPLITS = ("train", "eval", "warmup")
PAIR_CANDIDATES = 4  # responses drawn per D_offline prompt; chosen = best, rejected = worst
LANGUAGE_VERSION = 1  # part of the warm-up cache key: bump when anything above changes


def prompt_row(split: str, index: int) -> dict[str, Any]:
    """Prompt `index` of `split` in the judge's row shape (`id`, `prompt`,
    `instruction_ids`, `kwargs`). The splits' prompt texts never coincide."""
    if split not in SPLITS:
        raise DiceError(f"toy split must be one of {SPLITS}, not {split!r}")
    return {"id": f"toy-{split}-{index:05d}", "prompt": f"toy {split} {index}",
            "instruction_ids": [iid for iid, _ in GOLD_RULES],
            "kwargs": [dict(args) for _, args in GOLD_RULES]}


def describe_rules() -> str:
    """The rules as the checkers describe them, e.g. `50%+ of chars in ab; ...`."""
    return "; ".join(build_instruction(iid, args)[1] for iid, args in GOLD_RULES)


def gold_reward(response: str) -> float:
    """The verifiable judge's score of `response` on a toy prompt (fraction of the rules
    followed)."""
    return score_response(prompt_row("train", 0), response).score


def base_response(rng: random.Random) -> str:
    """One draw from the base distribution (the rules ignored)."""
    n = rng.randint(1, MAX_LETTERS)
    text = "".join(rng.choice(LETTERS) for _ in range(n))
    return text + MARKER if rng.random() < MARKER_PROBABILITY else text


def preference_rows(num: int, seed: int) -> list[dict[str, Any]]:
    """`num` gold-labelled pairs on train prompts 0..num-1 (D_offline, `toy:N`).

    For each prompt `PAIR_CANDIDATES` base responses are drawn; chosen is the one the gold
    reward ranks highest, rejected the lowest (`judge.score.label_preferences`: lowest
    index among ties); when all tie the prompt draws again. Rows carry the prompt's
    instructions, so the judge scores the round's samples on them.
    """
    if num < 1:
        raise DiceError(f"toy:{num}: expected toy:N with N >= 1")
    rows = []
    for i in range(num):
        row = prompt_row("train", i)
        for attempt in range(1000):
            rng = random.Random(f"dice-jax/toy/pairs/{seed}/{i}/{attempt}")
            responses = [base_response(rng) for _ in range(PAIR_CANDIDATES)]
            scores = [score_response(row, r).score for r in responses]
            labels = label_preferences([scores])
            if labels.pairs:
                break
        else:  # pragma: no cover - each attempt ties with probability well below 1/2
            raise DiceError(f"toy prompt {i}: every draw tied")
        pair = labels.pairs[0]
        rows.append({**row, "chosen": responses[pair.chosen_index],
                     "rejected": responses[pair.rejected_index],
                     "chosen_score": pair.chosen_score, "rejected_score": pair.rejected_score,
                     "scores": scores})
    return rows


def eval_rows(split: str, num: int) -> list[dict[str, Any]]:
    """The first `num` prompt rows of `split` (evaluation sets: `toy:eval`)."""
    if num < 1:
        raise DiceError(f"the toy prompt set needs num >= 1, not {num}")
    return [prompt_row(split, i) for i in range(num)]


def warmup_examples(num: int, seed: int) -> list[tuple[str, str]]:
    """`num` (prompt, response) pairs of the warm-up split, responses from the base
    distribution: what the start model learns to write before any preference data."""
    rng = random.Random(f"dice-jax/toy/warmup/{seed}")
    return [(prompt_row("warmup", i)["prompt"], base_response(rng)) for i in range(num)]
