"""What a sampling call returns: the samples and the call's figures."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sample:
    """One response. `token_ids`/`logprobs` include the stop token when `finish_reason` is
    "stop" (its log-prob is part of the response's likelihood); `text` does not."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: np.ndarray  # int32 [length]
    logprobs: np.ndarray  # float32 [length], log-softmax of the untempered logits
    finish_reason: str  # "stop" | "length"

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


@dataclasses.dataclass
class SamplingResult:
    samples: list[list[Sample]]  # [prompt][sample]
    prompt_token_ids: list[list[int]]  # after templating (and truncation)
    num_truncated: int
    num_generated_tokens: int
    seconds: float
    num_batches: int
    decode_steps: int  # forward passes of the decode loops, all batches together
    shapes: list[tuple[int, int]]  # static: distinct (batch prompts, prompt bucket) run
    engine: str = "static"  # "static" | "continuous"
    slot_steps: int = 0  # continuous: decode slots x steps run

    @property
    def utilisation(self) -> float:
        """Generated tokens per slot-step of the continuous engine (0 for static)."""
        return self.num_generated_tokens / self.slot_steps if self.slot_steps else 0.0


def make_sample(tokenizer: Any, prompt_index: int, sample_index: int, tokens: Sequence[int],
                logprobs: Sequence[float], stopped: bool) -> Sample:
    """A `Sample` from a row's tokens and log-probs (`text` decoded without special
    tokens; empty without a tokenizer)."""
    ids = np.asarray(tokens, np.int32)
    text = "" if tokenizer is None else tokenizer.decode(
        ids.tolist(), skip_special_tokens=True).strip()
    return Sample(prompt_index, sample_index, text, ids, np.asarray(logprobs, np.float32),
                  "stop" if stopped else "length")
