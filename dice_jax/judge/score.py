"""Gold scores: the verifiable judge that stands in for the paper's human / GPT-4 annotator.

A response's gold score is the fraction of its prompt's instructions it follows, checked
strictly (each `if-verifiable` checker on the response as is, as IFEval's "strict" metric),
and its prompt-level flag is whether it follows all of them. Over a set: prompt-level and
instruction-level strict accuracy and mean response length (DICE's length-regularised
rewards aim to raise quality without inflating length, so length is always reported).

Two cases are decided here rather than by the checkers: an empty (whitespace-only) response
follows nothing, since several checkers would pass it (no commas, fewer than N words, a
language that cannot be detected), and an annotator must never prefer silence; a checker
that raises counts as not followed, and is counted, so one odd response cannot stop a run.

`label_preferences` turns K scored responses per prompt into chosen/rejected pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import langdetect

from dice_jax.errors import DiceError
from dice_jax.judge.prompts import build_instruction

# langdetect samples at random unless seeded; a judge must give the same verdict every time.
langdetect.DetectorFactory.seed = 0


@dataclass(frozen=True)
class GoldScore:
    """The verdict on one response: which instructions it followed, in the row's order."""

    instruction_ids: tuple[str, ...]
    followed: tuple[bool, ...]
    errors: tuple[str, ...] = ()  # ids whose checker raised (each also counted not followed)
    response_chars: int = 0
    empty: bool = False

    @property
    def score(self) -> float:
        """Fraction of the instructions followed, in [0, 1]."""
        return sum(self.followed) / len(self.followed)

    @property
    def all_followed(self) -> bool:
        """Prompt-level strict: every instruction followed."""
        return all(self.followed)


def score_response(prompt: Mapping[str, Any], response: str) -> GoldScore:
    """Checks `response` against each instruction of a prompt row (strict).

    `prompt` needs `instruction_ids` and `kwargs` (a row of `dice_jax.judge.prompts`, or a
    google/IFEval row, whose ids are all in the registry). Each instruction is rebuilt fresh
    from its arguments, since some checkers change their own state while checking.
    """
    ids = prompt.get("instruction_ids")
    kwargs = prompt.get("kwargs")
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not ids:
        raise DiceError(f"prompt {prompt.get('id', '?')}: no instruction_ids to check")
    if not isinstance(kwargs, Sequence) or len(kwargs) != len(ids):
        raise DiceError(f"prompt {prompt.get('id', '?')}: kwargs must be a list with one "
                        f"dict per instruction ({len(ids)})")
    if not isinstance(response, str):
        raise DiceError(f"prompt {prompt.get('id', '?')}: response must be a string, "
                        f"not {type(response).__name__}")
    empty = not response.strip()
    followed: list[bool] = []
    errors: list[str] = []
    for iid, args in zip(ids, kwargs, strict=True):
        instruction, _ = build_instruction(iid, args)
        if empty:
            followed.append(False)
            continue
        try:
            followed.append(bool(instruction.check_following(response)))
        except Exception:  # a checker bug or missing data file: not followed, counted
            followed.append(False)
            errors.append(iid)
    return GoldScore(tuple(ids), tuple(followed), tuple(errors), len(response), empty)


def score_responses(prompts: Sequence[Mapping[str, Any]],
                    responses: Sequence[str]) -> list[GoldScore]:
    """`score_response` for each (prompt, response) pair of two equally long sequences."""
    if len(prompts) != len(responses):
        raise DiceError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [score_response(p, r) for p, r in zip(prompts, responses, strict=True)]


def aggregate(scores: Sequence[GoldScore]) -> dict[str, float | int]:
    """Set-level metrics: IFEval's strict accuracies, mean gold score and length, counts.

    `prompt_level_strict_acc`: fraction of responses following all their instructions;
    `instruction_level_strict_acc`: fraction of all instructions followed (pooled);
    `mean_score`: mean per-response fraction; `mean_response_chars`: mean length in
    characters; `checker_errors` / `empty_responses`: how many of each were seen.
    """
    if not scores:
        raise DiceError("no scored responses to aggregate")
    n_instructions = sum(len(s.followed) for s in scores)
    return {
        "prompt_level_strict_acc": sum(s.all_followed for s in scores) / len(scores),
        "instruction_level_strict_acc": sum(sum(s.followed) for s in scores) / n_instructions,
        "mean_score": sum(s.score for s in scores) / len(scores),
        "mean_response_chars": sum(s.response_chars for s in scores) / len(scores),
        "num_prompts": len(scores),
        "num_instructions": n_instructions,
        "checker_errors": sum(len(s.errors) for s in scores),
        "empty_responses": sum(s.empty for s in scores),
    }


@dataclass(frozen=True)
class PreferencePair:
    """One labelled pair: indices into a prompt's K responses, with their gold scores."""

    prompt_index: int
    chosen_index: int
    rejected_index: int
    chosen_score: float
    rejected_score: float


@dataclass(frozen=True)
class PreferenceLabels:
    """The pairs of a set, and how many prompts were dropped because all K scores tied."""

    pairs: tuple[PreferencePair, ...]
    num_prompts: int
    num_ties: int


def label_preferences(scores: Sequence[Sequence[float]]) -> PreferenceLabels:
    """Chosen = highest gold score, rejected = lowest, for each prompt's K >= 2 scores.

    A prompt whose scores are all equal gives no preference: it is dropped and counted in
    `num_ties`. Among equal best (or worst) scores the lowest index wins, so the labels are
    a pure function of the scores. Pure: no responses, no randomness.
    """
    pairs = []
    ties = 0
    for p, row in enumerate(scores):
        values = [float(v) for v in row]
        if len(values) < 2:
            raise DiceError(f"prompt {p}: needs at least 2 scored responses, got {len(values)}")
        if any(math.isnan(v) for v in values):
            raise DiceError(f"prompt {p}: a score is NaN")
        hi, lo = max(values), min(values)
        if hi == lo:
            ties += 1
            continue
        pairs.append(PreferencePair(p, values.index(hi), values.index(lo), hi, lo))
    return PreferenceLabels(tuple(pairs), len(scores), ties)


def preference_rows(prompts: Sequence[Mapping[str, Any]], responses: Sequence[Sequence[str]],
                    labels: PreferenceLabels) -> list[dict[str, Any]]:
    """Labelled pairs as TRL-format rows (`prompt`, `chosen`, `rejected` strings) with the
    prompt row's `id` and both gold scores, the shape `dice_jax.data` loads as D_offline.
    """
    if len(prompts) != len(responses) or labels.num_prompts != len(prompts):
        raise DiceError(f"{len(prompts)} prompts, {len(responses)} response lists and "
                        f"labels for {labels.num_prompts} prompts do not match")
    return [{"id": prompts[pair.prompt_index].get("id", str(pair.prompt_index)),
             "prompt": prompts[pair.prompt_index]["prompt"],
             "chosen": responses[pair.prompt_index][pair.chosen_index],
             "rejected": responses[pair.prompt_index][pair.rejected_index],
             "chosen_score": pair.chosen_score, "rejected_score": pair.rejected_score}
            for pair in labels.pairs]
