"""`python -m dice_jax.evaluate --config=configs/X.py [--checkpoint=SRC] [--out=DIR]
[--prompts=SPEC] [--name=NAME] [--config.KEY=VALUE ...]`: judge any checkpoint.

Answers the config's evaluation prompts (`eval.*`: greedy and/or one sampled response with
the `sampling` distribution) with any model source, scores them with the verifiable judge
and writes `metrics.json`, `responses.jsonl` and AlpacaEval-format `model_outputs.json`
(see `dice_jax.evaluation`). Prompt sets (`eval.prompts` or `--prompts`): `builtin:eval` /
`builtin:train`, a JSONL / JSON file with `prompt` or `instruction` per row (optional
`instruction_ids` / `instruction_id_list` and `kwargs`, `id` / `key`, `dataset`), or a hub
data set such as `google/IFEval` (network needed). Errors print one line and exit with
code 2.
"""

import os
import re
import sys
from typing import Any

from absl import flags

from dice_jax.cli import config_of, run_main
from dice_jax.errors import ConfigError, DiceError

PROG = "python -m dice_jax.evaluate"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "any model source (default: the config's "
                        "model.policy)", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder, must not exist (default "
                        "RUN_DIR/evaluate/NAME)", flag_values=fv)
    flags.DEFINE_string("prompts", None, "prompt set (default: eval.prompts)", flag_values=fv)
    flags.DEFINE_string("name", None, "generator name in model_outputs.json and the default "
                        "folder", flag_values=fv)


def default_name(checkpoint: str) -> str:
    """A folder name for a checkpoint source: `embedded:smollm2` -> `embedded_smollm2`."""
    base = os.path.basename(os.path.normpath(checkpoint)) if os.path.exists(checkpoint) else (
        checkpoint)
    return re.sub(r"[^\w.-]+", "_", base).strip("._") or "model"


def _evaluate(fv: flags.FlagValues, positional: list[str]) -> tuple[str, dict[str, Any]]:
    """Loads the model, evaluates; returns (out_dir, metrics)."""
    import jax

    from dice_jax.chat_templates import apply_chat_template
    from dice_jax.checkpoints import load_model
    from dice_jax.config import validate
    from dice_jax.data import load_eval_prompts
    from dice_jax.evaluation import evaluate_policy
    from dice_jax.fileio import atomic_directory
    from dice_jax.sharding import make_mesh

    if positional:
        raise ConfigError(f"unknown argument(s) {positional}; see --help")
    config = validate(config_of(fv), jax.device_count())
    checkpoint = fv.checkpoint or config.model.policy
    name = fv.name or default_name(checkpoint)
    out = fv.out or os.path.join(config.run_dir, "evaluate", name)
    if os.path.lexists(out):
        raise DiceError(f"{out}: already exists; refusing to overwrite (use --out)")
    prompts = fv.prompts or config.eval.prompts
    rows = load_eval_prompts(prompts, config.eval.num_prompts, config.eval.seed)
    try:
        mesh = make_mesh(config.mesh.as_dict())
    except ValueError as e:
        raise DiceError(f"config.mesh: {e}") from None
    model = load_model(checkpoint, dtype=config.model.dtype,
                       param_dtype=config.model.param_dtype)
    if model.tokenizer is None:
        raise DiceError(f"{checkpoint}: has no tokenizer; evaluation needs one")
    try:
        apply_chat_template(model.tokenizer, config.model.chat_template)
    except ValueError as e:
        raise DiceError(f"config.model.chat_template: {e}") from None
    with atomic_directory(out) as tmp:
        metrics = evaluate_policy(model.params, model.config, model.tokenizer, rows, tmp,
                                  evaluation=config.eval, sampling=config.sampling, mesh=mesh,
                                  generator_name=name, dataset_name=prompts)
    return out, metrics


def _run(fv: flags.FlagValues, positional: list[str]) -> int:
    from dice_jax.evaluation import MODES

    out, metrics = _evaluate(fv, positional)
    for mode in MODES:
        if mode in metrics:
            m = metrics[mode]
            acc = (f"prompt-level {100 * m['prompt_level_strict']:.1f}%, instruction-level "
                   f"{100 * m['instruction_level_strict']:.1f}%, "
                   if "prompt_level_strict" in m else "")
            print(f"{mode}: {acc}mean length {m['mean_length']:.0f} chars "
                  f"({m['num_prompts']} prompts)")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit code 0, or 2 with one line on a DiceError / ConfigError."""
    return run_main(_run, argv, PROG, __doc__, _define, run_config=True)


if __name__ == "__main__":
    sys.exit(main())
