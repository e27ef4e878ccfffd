"""The toy task's gold reward: checkers with the verifiable judge's interface.

Each toy instruction is a class with the methods `dice_jax.judge` uses of an IFEval
instruction: `build_description(**kwargs) -> str`, `get_instruction_args() -> dict` and
`check_following(response) -> bool`. `TOY_INSTRUCTIONS` maps each id with the `toy:`
prefix to one of them, so `dice_jax.judge.prompts.build_instruction` (and with it
`dice_jax.judge.score.score_response`, evaluation, summary.md and the data stage's judge
agreement) checks toy prompts exactly as it checks IFEval ones.

Every checker reads the response's characters as they are (no normalisation):

    toy:letter_share   {letters, min_share}   count(c in letters) / len(response) >= min_share
    toy:length_band    {min_chars, max_chars} min_chars <= len(response) <= max_chars
    toy:end_marker     {marker}               the response ends with marker

A response's gold reward is the fraction of its prompt's instructions it follows
(`GoldScore.score`); an empty response follows nothing (`score_response` decides that).
"""

from __future__ import annotations

from typing import Any

PREFIX = "toy:"


class ToyInstruction:
    """Base class: stores the arguments `build_description` was given."""

    def __init__(self, instruction_id: str) -> None:
        self.id = instruction_id
        self._args: dict[str, Any] = {}

    def build_description(self, **kwargs: Any) -> str:
        raise NotImplementedError

    def get_instruction_args(self) -> dict[str, Any]:
        """The arguments that rebuild this instruction (as IFEval's classes return them)."""
        return dict(self._args)

    def get_instruction_args_keys(self) -> list[str]:
        return list(self._args)

    def check_following(self, value: str) -> bool:
        raise NotImplementedError


class LetterShare(ToyInstruction):
    """At least `min_share` of the response's characters are among `letters`."""

    def build_description(self, *, letters: str, min_share: float) -> str:
        if not isinstance(letters, str) or not letters:
            raise ValueError("letters must be a non-empty string")
        if not 0.0 <= float(min_share) <= 1.0:
            raise ValueError(f"min_share={min_share} must lie in [0, 1]")
        self._args = {"letters": letters, "min_share": min_share}
        return f"{round(100 * float(min_share))}%+ of chars in {letters}"

    def check_following(self, value: str) -> bool:
        if not value:
            return False
        hits = sum(ch in self._args["letters"] for ch in value)
        return hits >= float(self._args["min_share"]) * len(value)


class LengthBand(ToyInstruction):
    """The response has between `min_chars` and `max_chars` characters (inclusive)."""

    def build_description(self, *, min_chars: int, max_chars: int) -> str:
        if not 0 <= int(min_chars) <= int(max_chars):
            raise ValueError(f"need 0 <= min_chars={min_chars} <= max_chars={max_chars}")
        self._args = {"min_chars": min_chars, "max_chars": max_chars}
        return f"{min_chars}-{max_chars} chars"

    def check_following(self, value: str) -> bool:
        return int(self._args["min_chars"]) <= len(value) <= int(self._args["max_chars"])


class EndMarker(ToyInstruction):
    """The response ends with `marker`."""

    def build_description(self, *, marker: str) -> str:
        if not isinstance(marker, str) or not marker:
            raise ValueError("marker must be a non-empty string")
        self._args = {"marker": marker}
        return f"end with {marker}"

    def check_following(self, value: str) -> bool:
        return value.endswith(self._args["marker"])


TOY_INSTRUCTIONS: dict[str, type[ToyInstruction]] = {
    "toy:letter_share": LetterShare,
    "toy:length_band": LengthBand,
    "toy:end_marker": EndMarker,
}


def is_toy_instruction(instruction_id: str) -> bool:
    return isinstance(instruction_id, str) and instruction_id.startswith(PREFIX)
