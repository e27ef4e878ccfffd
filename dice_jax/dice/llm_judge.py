"""The LLM-as-a-judge baseline (paper Appendix A): the policy scores its own samples 0-5
with the additive 5-point prompt of Yuan et al. (2024, "Self-Rewarding Language Models");
pairs are best vs worst score, with no length shaping.

This module holds the prompt, the score parser and the pairing; sampling the judgements is
the sampler's job.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

JUDGE_PROMPT = """Review the user's question and the corresponding response using the additive 5-point scoring system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.

User: {instruction}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate the response in alignment with this additive scoring model, we'll systematically attribute points based on the outlined criteria."""  # noqa: E501

_SCORE = re.compile(r"score\s*:\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def judge_prompt(instruction: str, response: str) -> str:
    """The judging prompt for one (instruction, response)."""
    return JUDGE_PROMPT.format(instruction=instruction, response=response)


def parse_judge_score(text: str) -> float | None:
    """The last "Score: N" in a judgement, if 0 <= N <= 5; otherwise None (unparseable)."""
    matches = _SCORE.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    return value if 0.0 <= value <= 5.0 else None


def judge_scores(judgements: list[list[list[str]]]) -> tuple[np.ndarray, Counter]:
    """Mean parsed score per response from `[P][K][J]` judgement texts -> `[P, K]`.

    A response none of whose J judgements parses gets NaN and is counted as
    `unparseable_score`; single unparseable judgements are counted too.
    """
    drops: Counter = Counter()
    p, k = len(judgements), len(judgements[0]) if judgements else 0
    scores = np.full((p, k), np.nan, np.float32)
    for i, row in enumerate(judgements):
        for j, texts in enumerate(row):
            parsed = [s for s in (parse_judge_score(t) for t in texts) if s is not None]
            drops["unparseable_judgement"] += len(texts) - len(parsed)
            if parsed:
                scores[i, j] = float(np.mean(parsed))
            else:
                drops["unparseable_score"] += 1
    return scores, drops
