"""Seeded instruction prompts: a base task plus 1-3 verifiable IFEval instructions.

A prompt row is `{"id", "prompt", "base_task", "instruction_ids", "kwargs"}`: `prompt` is
the full text shown to the model (the base task, then each instruction's own description
as written by its `if-verifiable` class), and `kwargs[j]` are the arguments that rebuild
instruction `j` for checking (`build_instruction`). The train and eval splits draw from
disjoint sets of base tasks, fixed by `split_seed` alone, so sets generated with any
`seed`s never share a task.

Determinism: every random choice comes from a `random.Random` seeded with a string (hashed
with SHA-512 by Python, so independent of PYTHONHASHSEED), and every instruction argument is
drawn here and passed explicitly, so the library's own draws from the global `random`
module are never used. The same (split, num, seed, split_seed, eval_fraction) gives
byte-identical rows in any process with the same Python and if-verifiable versions, and
row `i` does not depend on `num` (a shorter set is a prefix of a longer one).

Usage: `python -m dice_jax.judge.prompts --split train|eval --num N --seed S OUT.jsonl`.
"""

from __future__ import annotations

import os
import random
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from if_verifiable.ifeval import instructions_registry as registry
from if_verifiable.ifeval import instructions_util

from dice_jax.errors import DiceError
from dice_jax.fileio import iter_jsonl, write_jsonl
from dice_jax.judge.tasks import BASE_TASKS

SPLITS = ("train", "eval")
DEFAULT_SPLIT_SEED = 0
DEFAULT_EVAL_FRACTION = 0.25
MAX_INSTRUCTIONS = 3
ROW_KEYS = ("id", "prompt", "base_task", "instruction_ids", "kwargs")

# Registry instructions never used in generated prompts, and why.
EXCLUDED_INSTRUCTIONS: dict[str, str] = {
    "length_constraints:number_sentences":
        "its checker loads nltk's punkt data file, which is not installed offline",
    "change_case:capital_word_frequency":
        "its checker calls nltk.word_tokenize, which needs nltk's punkt data file",
    "combination:repeat_prompt":
        "needs the request to repeat as an argument; its description does not fit appended",
}

# The 22 instructions used, in the registry's order.
SUPPORTED_INSTRUCTIONS: tuple[str, ...] = tuple(
    iid for iid in registry.INSTRUCTION_DICT if iid not in EXCLUDED_INSTRUCTIONS)

# Pairs no response can satisfy together that the registry does not list: the section
# marker ("Section" / "SECTION") is matched case-sensitively, so it cannot appear in an
# all-lowercase response, nor "Section" in an all-capitals one.
EXTRA_CONFLICTS: tuple[tuple[str, str], ...] = (
    ("change_case:english_lowercase", "detectable_format:multiple_sections"),
    ("change_case:english_capital", "detectable_format:multiple_sections"),
)

# Instructions kept to base tasks of some kinds: the fixed yes/no/maybe answer only makes
# sense for a question.
KIND_ONLY: dict[str, frozenset[str]] = {
    "detectable_format:constrained_response": frozenset({"question"}),
}

# IFEval's own argument options and ranges (those its classes draw from when given none).
_RELATIONS = ("less than", "at least")
_POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
_SECTION_SPLITTERS = ("Section", "SECTION")
_ENDING_OPTIONS = ("Any other questions?", "Is there anything else I can help with?")
# IFEval's keyword list less its words of under three letters ("a", "it", ...): keywords are
# matched as regular expressions anywhere in the text, so "a" would always be present.
_KEYWORDS = tuple(w for w in instructions_util.WORD_LIST if len(w) >= 3 and w.isalpha())
_LANGUAGES = tuple(instructions_util.LANGUAGE_CODES)


def conflict_table() -> dict[str, frozenset[str]]:
    """Symmetric conflicts among the supported instructions (each conflicts with itself).

    The registry's INSTRUCTION_CONFLICTS is one-sided (IFEval makes it symmetric with
    `conflict_make`, which mutates it in place); this builds the closure without touching
    the registry, plus EXTRA_CONFLICTS.
    """
    table: dict[str, set[str]] = {iid: {iid} for iid in SUPPORTED_INSTRUCTIONS}
    pairs = [(a, b) for a, bs in registry.INSTRUCTION_CONFLICTS.items() for b in bs]
    for a, b in [*pairs, *EXTRA_CONFLICTS]:
        if a in table and b in table:
            table[a].add(b)
            table[b].add(a)
    return {iid: frozenset(c) for iid, c in table.items()}


def draw_kwargs(instruction_id: str, rng: random.Random) -> dict[str, Any]:
    """Draws explicit, JSON-serialisable arguments for one instruction from `rng`.

    Mirrors the ranges IFEval's classes use, except that a paragraph index never exceeds the
    paragraph count (IFEval may draw one past it, an impossible instruction).
    """
    name = instruction_id.split(":", 1)[1]
    if name == "existence":
        return {"keywords": sorted(rng.sample(_KEYWORDS, 2))}
    if name == "frequency":
        return {"keyword": rng.choice(_KEYWORDS), "frequency": rng.randint(1, 3),
                "relation": rng.choice(_RELATIONS)}
    if name == "forbidden_words":
        return {"forbidden_words": sorted(rng.sample(_KEYWORDS, 2))}
    if name == "letter_frequency":
        return {"letter": rng.choice(string.ascii_lowercase), "let_frequency": rng.randint(1, 10),
                "let_relation": rng.choice(_RELATIONS)}
    if name == "response_language":
        return {"language": rng.choice(_LANGUAGES)}
    if name == "number_paragraphs":
        return {"num_paragraphs": rng.randint(1, 5)}
    if name == "number_words":
        return {"num_words": rng.randint(100, 500), "relation": rng.choice(_RELATIONS)}
    if name == "nth_paragraph_first_word":
        n = rng.randint(1, 5)
        return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n),
                "first_word": rng.choice(_KEYWORDS)}
    if name == "number_placeholders":
        return {"num_placeholders": rng.randint(1, 4)}
    if name == "postscript":
        return {"postscript_marker": rng.choice(_POSTSCRIPT_MARKERS)}
    if name == "number_bullet_lists":
        return {"num_bullets": rng.randint(1, 5)}
    if name == "number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 4)}
    if name == "multiple_sections":
        return {"section_spliter": rng.choice(_SECTION_SPLITTERS),
                "num_sections": rng.randint(1, 5)}
    if name == "end_checker":
        return {"end_phrase": rng.choice(_ENDING_OPTIONS)}
    if instruction_id in SUPPORTED_INSTRUCTIONS:
        return {}  # takes no arguments
    raise DiceError(f"{instruction_id!r} is not one of the supported instructions")


def build_instruction(instruction_id: str, kwargs: Mapping[str, Any] | None) -> tuple[Any, str]:
    """Rebuilds a registry instruction from its id and arguments: (instance, description).

    Any id of the registry is accepted (so real IFEval rows can be scored too); arguments
    that are None are dropped, as IFEval's own evaluation does, since rows read back through
    `datasets` carry every key of the column's struct. Ids with the `toy:` prefix are the
    controlled task's checkers (`dice_jax.toy.gold`), with the same interface.
    """
    from dice_jax.toy.gold import TOY_INSTRUCTIONS, is_toy_instruction

    toy = is_toy_instruction(instruction_id)
    cls = (TOY_INSTRUCTIONS if toy else registry.INSTRUCTION_DICT).get(instruction_id)
    if cls is None:
        known = f"; toy instructions: {sorted(TOY_INSTRUCTIONS)}" if toy else ""
        raise DiceError(f"unknown instruction id {instruction_id!r}{known}")
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    instruction = cls(instruction_id)
    try:
        description = instruction.build_description(**args)
    except (TypeError, ValueError) as e:
        raise DiceError(f"{instruction_id}: cannot build from arguments {args}: {e}") from None
    return instruction, description


def split_tasks(split: str, split_seed: int = DEFAULT_SPLIT_SEED,
                eval_fraction: float = DEFAULT_EVAL_FRACTION) -> tuple[tuple[str, str], ...]:
    """The base tasks `(kind, task)` of one split: a seeded partition of BASE_TASKS.

    Depends only on `split_seed` and `eval_fraction`, never on a prompt set's `seed`, so a
    train set and an eval set generated with different seeds still share no task.
    """
    if split not in SPLITS:
        raise DiceError(f"split must be one of {SPLITS}, not {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise DiceError(f"eval_fraction must be in (0, 1), not {eval_fraction}")
    n = len(BASE_TASKS)
    order = list(range(n))
    random.Random(f"dice-jax/judge/split/{split_seed}").shuffle(order)
    n_eval = min(max(round(n * eval_fraction), 1), n - 1)
    chosen = order[:n_eval] if split == "eval" else order[n_eval:]
    return tuple(BASE_TASKS[i] for i in sorted(chosen))


def _draw_instructions(kind: str, rng: random.Random,
                       conflicts: Mapping[str, frozenset[str]]) -> list[str]:
    """1-3 mutually compatible instruction ids, drawn one at a time among those left."""
    blocked: set[str] = set()
    chosen: list[str] = []
    for _ in range(rng.randint(1, MAX_INSTRUCTIONS)):
        candidates = [iid for iid in SUPPORTED_INSTRUCTIONS if iid not in blocked
                      and kind in KIND_ONLY.get(iid, frozenset({kind}))]
        if not candidates:
            break
        iid = rng.choice(candidates)
        chosen.append(iid)
        blocked |= conflicts[iid]
    return chosen


def join_descriptions(task: str, descriptions: Sequence[str]) -> str:
    """The prompt text: the task, then each description after a space, or after a newline
    where the text so far has several lines (a bullet or section template ends unpunctuated).
    """
    text = task
    for description in descriptions:
        text += ("\n" if "\n" in text else " ") + description
    return text


def make_row(row_id: str, task: str, instruction_ids: Sequence[str],
             kwargs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A prompt row from its parts, checking that `kwargs` rebuild each description."""
    descriptions = []
    for iid, args in zip(instruction_ids, kwargs, strict=True):
        instruction, description = build_instruction(iid, args)
        if (instruction.get_instruction_args() or {}) != dict(args):
            # The class rewrote an argument: the stored kwargs would not rebuild this prompt.
            raise DiceError(f"{iid}: arguments {dict(args)} do not round-trip through "
                            f"if-verifiable (got {instruction.get_instruction_args()})")
        descriptions.append(description)
    return {"id": row_id, "prompt": join_descriptions(task, descriptions), "base_task": task,
            "instruction_ids": list(instruction_ids), "kwargs": [dict(a) for a in kwargs]}


def generate_prompts(split: str, num: int, seed: int, *, split_seed: int = DEFAULT_SPLIT_SEED,
                     eval_fraction: float = DEFAULT_EVAL_FRACTION) -> list[dict[str, Any]]:
    """`num` prompt rows of `split`, each a base task with 1-3 verifiable instructions.

    Base tasks are used in turn, a fresh seeded order for each pass over the split, so each
    is used about equally often. A row whose prompt text repeats an earlier one is redrawn.
    """
    if num < 0:
        raise DiceError(f"num must be >= 0, not {num}")
    tasks = split_tasks(split, split_seed, eval_fraction)
    conflicts = conflict_table()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    order: list[int] = []
    for i in range(num):
        if i % len(tasks) == 0:
            order = list(range(len(tasks)))
            random.Random(f"dice-jax/judge/{split}/{seed}/pass/{i // len(tasks)}").shuffle(order)
        kind, task = tasks[order[i % len(tasks)]]
        for attempt in range(100):
            rng = random.Random(f"dice-jax/judge/{split}/{seed}/row/{i}/{attempt}")
            ids = _draw_instructions(kind, rng, conflicts)
            row = make_row(f"{split}-{seed}-{i:05d}", task, ids,
                           [draw_kwargs(iid, rng) for iid in ids])
            if row["prompt"] not in seen:
                break
        seen.add(row["prompt"])
        rows.append(row)
    return rows


def write_prompts(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes rows as JSONL, one per line, via a temporary file renamed into place.

    Refuses an existing `path` (DiceError), so a prompt set is never silently replaced.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl(path, ({k: row[k] for k in ROW_KEYS} for row in rows), ensure_ascii=True,
                overwrite=False)


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Reads a prompt set written by `write_prompts`, checking each row's shape."""
    rows = []
    for line_no, row in iter_jsonl(path):
        missing = [k for k in ROW_KEYS if k not in row] if isinstance(row, dict) else ROW_KEYS
        if missing:
            raise DiceError(f"{path}:{line_no}: prompt row lacks {list(missing)}")
        if (not isinstance(row["instruction_ids"], list) or not isinstance(row["kwargs"], list)
                or len(row["instruction_ids"]) != len(row["kwargs"])):
            raise DiceError(f"{path}:{line_no}: instruction_ids and kwargs must be lists "
                            "of the same length")
        rows.append(row)
    return rows


def _define(fv: Any) -> None:
    from absl import flags

    flags.DEFINE_enum("split", None, list(SPLITS), "which split (required)", flag_values=fv)
    flags.DEFINE_integer("num", None, "number of prompts (required)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "prompt-set seed", flag_values=fv)
    flags.DEFINE_integer("split_seed", DEFAULT_SPLIT_SEED, "seed of the train/eval base-task "
                         "partition (keep the default so train and eval sets never share a "
                         "task)", flag_values=fv)
    flags.DEFINE_float("eval_fraction", DEFAULT_EVAL_FRACTION, "fraction of base tasks kept "
                       "for the eval split", flag_values=fv)


def _run(fv: Any, positional: list[str]) -> int:
    from dice_jax.errors import ConfigError

    if fv.split is None or fv.num is None:
        raise ConfigError("--split and --num are required; see --help")
    if len(positional) != 1:
        raise ConfigError(f"expected one OUT.jsonl, got {len(positional)} argument(s) "
                          f"{positional}; see --help")
    out = positional[0]
    if fv.num < 1:
        raise DiceError(f"--num must be >= 1, not {fv.num}")
    if os.path.lexists(out):
        raise DiceError(f"{out}: already exists; refusing to overwrite")
    rows = generate_prompts(fv.split, fv.num, fv.seed, split_seed=fv.split_seed,
                            eval_fraction=fv.eval_fraction)
    write_prompts(out, rows)
    n_tasks = len({r["base_task"] for r in rows})
    print(f"wrote {len(rows)} {fv.split} prompts ({n_tasks} base tasks, seed {fv.seed}) "
          f"to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: writes a prompt set; exit code 2 with a one-line error on bad input."""
    from dice_jax.cli import run_main

    return run_main(_run, argv, "python -m dice_jax.judge.prompts",
                    "Write a seeded instruction-prompt set (JSONL) of the train or eval "
                    "split.\n\n" + __doc__.rstrip().rsplit("\n\n", 1)[-1], _define)


if __name__ == "__main__":
    sys.exit(main())
