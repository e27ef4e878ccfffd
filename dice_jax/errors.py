"""Errors that name the file at fault, for one clear message and exit code 2 in the CLIs."""

from __future__ import annotations


class DiceError(Exception):
    """Base class: a user-facing error whose message is shown as is (CLIs exit with 2)."""


class CheckpointError(DiceError):
    """A checkpoint, config or tokenizer file that cannot be used.

    The message starts with the path so a user knows which file to look at.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ConfigError(DiceError, ValueError):
    """An invalid setting: the message names the key (`config.train.beta: ...`)."""
