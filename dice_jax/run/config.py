"""The run configuration: one ml_collections schema, config files, overrides, validation.

Every config file (`configs/*.py`) defines `get_config()` that starts from `default_config()`
and changes values, so all configs share one set of typed keys. The command line takes
`--config=FILE` and any number of `--config.a.b=VALUE` overrides. Unknown keys, wrong types
and out-of-range values raise `ConfigError` (the CLI prints it and exits with code 2)
before any work starts.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

import ml_collections as mlc

from dice_jax.errors import DiceError

METHODS = ("dice", "offline_dpo", "offline_dpo_new_ref", "llm_judge")
LOSSES = ("sigmoid", "ipo", "hinge", "kto")


class ConfigError(DiceError):
    """An invalid configuration: the message names the key."""


def _optional(kind: type, value: Any = None) -> mlc.FieldReference:
    return mlc.FieldReference(value, field_type=kind)


def default_config() -> mlc.ConfigDict:
    """The full schema with the paper's defaults where it gives them (DICE.md)."""
    c = mlc.ConfigDict()
    c.run_dir = "runs/dice"
    c.method = "dice"            # dice | offline_dpo | offline_dpo_new_ref | llm_judge
    c.rounds = 2                 # DICE rounds after the optional round 0
    c.round0 = False             # offline DPO on D_offline first (start model not DPO-tuned)
    c.seed = 0
    c.export_hf_each_round = False

    c.model = mlc.ConfigDict()
    c.model.policy = "embedded:smollm2"       # pi_theta(0): HF folder, hub id, .gguf, ckpt
    c.model.reference = _optional(str)        # pi_ref(0); None: the policy itself
    c.model.dtype = "float32"                 # compute dtype
    c.model.param_dtype = "float32"           # master weights
    c.model.remat = False
    c.model.chat_template = _optional(str)    # None: the tokenizer's; or a name in
    #                                           dice_jax.chat_templates, or a Jinja string

    c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.data = mlc.ConfigDict()
    c.data.offline = "builtin:smollm2"        # hub id, JSONL/Parquet path, or builtin:NAME
    c.data.offline_split = "train_prefs"
    c.data.max_prompts = _optional(int)       # None: every prompt of D_offline
    c.data.eval_pairs = 576                   # held-out DPO validation pairs (official)

    c.sampling = mlc.ConfigDict()
    c.sampling.num_samples = 16               # K
    c.sampling.temperature = 0.7
    c.sampling.top_p = 0.9
    c.sampling.top_k = 0                      # 0: off
    c.sampling.max_new_tokens = 2048
    c.sampling.max_prompt_tokens = 2048
    c.sampling.truncate_prompts = False       # else: error on a prompt over the limit
    c.sampling.cache_budget_gb = 16.0

    c.dice = mlc.ConfigDict()
    c.dice.beta = 0.1
    c.dice.reward_scale = "beta"              # beta (Eq. 4 as written) | none (official)
    c.dice.length_unit = "chars"
    c.dice.gamma = 0.5
    c.dice.filters = mlc.ConfigDict({"drop_truncated": True, "min_chars": 3,
                                     "max_chars": 6700, "min_valid": 8})
    c.dice.reuse_sampler_logps = True         # log pi from the sampler (tests show equality)
    c.dice.score_batch_size = 32              # sequences per reference forward
    c.dice.judge_max_new_tokens = 256         # llm_judge baseline: tokens per rating
    c.dice.search = mlc.ConfigDict({"method": "random", "objective": "mean_abs",
                                    "alpha_min": 0.0, "alpha_max": _optional(float),
                                    "grid_step": _optional(float), "num_trials": 64})

    c.train = mlc.ConfigDict()
    c.train.loss_type = "sigmoid"
    c.train.beta = 0.1
    c.train.label_smoothing = 0.0
    c.train.learning_rate = 5e-7
    c.train.warmup_steps = 0                  # official constant scheduler ignores warm-up
    c.train.max_steps = 300
    c.train.batch_size = 32
    c.train.grad_accum = 1
    c.train.max_length = 4096
    c.train.max_prompt_length = 2048
    c.train.eval_every = 20
    c.train.save_every = 50
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0
    c.train.shared_prompt = True              # each pair's prompt through the model once

    c.eval = mlc.ConfigDict()
    c.eval.enabled = True                     # evaluate the start model and every round
    c.eval.prompts = "builtin:eval"           # builtin:eval (verifiable judge) or a JSONL file
    c.eval.num_prompts = 256
    c.eval.seed = 0
    c.eval.max_new_tokens = 1024
    c.eval.greedy = True                      # greedy responses
    c.eval.sampled = True                     # one response with the sampling settings
    return c


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def validate(config: mlc.ConfigDict, device_count: int | None = None) -> None:
    """Range checks across the config; raises ConfigError naming the first bad key."""
    c = config
    _check(c.method in METHODS, "method", f"{c.method!r} is not one of {METHODS}")
    _check(c.rounds >= 0, "rounds", f"{c.rounds} must be >= 0")
    _check(c.rounds > 0 or c.round0, "rounds", "0 rounds and no round0: nothing to do")
    _check(c.method != "dice" or c.round0 or c.model.reference is not None,
           "model.reference", "DICE scores round 1 with pi_ref(0): set model.reference (the "
           "model the start policy was DPO-tuned from) or round0=True")
    _check(c.model.dtype in ("float32", "bfloat16"), "model.dtype", f"{c.model.dtype!r}")
    _check(c.model.param_dtype in ("float32", "bfloat16"), "model.param_dtype",
           f"{c.model.param_dtype!r}")
    _check(c.sampling.num_samples >= 2, "sampling.num_samples",
           f"K={c.sampling.num_samples}; a pair needs at least 2 samples")
    _check(c.sampling.temperature >= 0, "sampling.temperature", "must be >= 0")
    _check(0 < c.sampling.top_p <= 1, "sampling.top_p", f"{c.sampling.top_p} not in (0, 1]")
    _check(c.sampling.top_k >= 0, "sampling.top_k", "must be >= 0 (0 disables)")
    _check(c.sampling.max_new_tokens >= 1, "sampling.max_new_tokens", "must be >= 1")
    _check(c.sampling.cache_budget_gb > 0, "sampling.cache_budget_gb", "must be > 0")
    _check(c.dice.beta > 0, "dice.beta", f"{c.dice.beta} must be > 0")
    _check(0 <= c.dice.gamma <= 1, "dice.gamma", f"{c.dice.gamma} must lie in [0, 1]")
    _check(c.dice.reward_scale in ("beta", "none"), "dice.reward_scale",
           f"{c.dice.reward_scale!r} is not 'beta' or 'none'")
    _check(c.dice.length_unit in ("chars", "tokens"), "dice.length_unit",
           f"{c.dice.length_unit!r} is not 'chars' or 'tokens'")
    _check(c.dice.score_batch_size >= 1, "dice.score_batch_size", "must be >= 1")
    _check(c.dice.judge_max_new_tokens >= 1, "dice.judge_max_new_tokens", "must be >= 1")
    f = c.dice.filters
    _check(2 <= f.min_valid <= c.sampling.num_samples, "dice.filters.min_valid",
           f"{f.min_valid} must lie in [2, K={c.sampling.num_samples}]")
    _check(f.max_chars > f.min_chars, "dice.filters.max_chars", "must exceed min_chars")
    s = c.dice.search
    _check(s.method in ("grid", "random", "gp"), "dice.search.method", f"{s.method!r}")
    _check(s.objective in ("mean_abs", "abs_mean"), "dice.search.objective", f"{s.objective!r}")
    _check(s.alpha_min >= 0, "dice.search.alpha_min", "must be >= 0")
    _check(s.alpha_max is None or s.alpha_max > s.alpha_min, "dice.search.alpha_max",
           "must exceed alpha_min")
    _check(s.num_trials >= 1, "dice.search.num_trials", "must be >= 1")
    e = c.eval
    _check(e.num_prompts >= 1, "eval.num_prompts", "must be >= 1")
    _check(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    _check(e.greedy or e.sampled or not e.enabled, "eval.greedy",
           "eval is enabled but neither greedy nor sampled is on")
    t = c.train
    _check(t.loss_type in LOSSES, "train.loss_type", f"{t.loss_type!r} is not one of {LOSSES}")
    _check(t.beta > 0, "train.beta", f"{t.beta} must be > 0")
    _check(0 <= t.label_smoothing < 0.5, "train.label_smoothing", "must lie in [0, 0.5)")
    _check(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    for key in ("max_steps", "batch_size", "grad_accum", "max_length", "eval_every",
                "save_every"):
        _check(t[key] >= 1, f"train.{key}", f"{t[key]} must be >= 1")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(0 < t.max_prompt_length < t.max_length, "train.max_prompt_length",
           "must lie in (0, max_length)")
    _check(t.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"batch_size={t.batch_size} is not divisible by grad_accum={t.grad_accum}")
    sizes = [c.mesh[a] for a in ("data", "fsdp", "tensor")]
    _check(set(c.mesh.keys()) == {"data", "fsdp", "tensor"}, "mesh",
           "needs exactly the axes data, fsdp, tensor")
    _check(sizes.count(-1) <= 1 and all(s == -1 or s >= 1 for s in sizes), "mesh",
           f"{dict(c.mesh)}: sizes must be >= 1, at most one -1")
    if device_count is not None:
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        fits = device_count % known == 0 if -1 in sizes else known == device_count
        _check(fits, "mesh", f"{dict(c.mesh)} does not match the {device_count} available "
               "device(s)")


def load_config_file(spec: str) -> mlc.ConfigDict:
    """Runs `get_config()` of a config file; `FILE:ARG` passes ARG to it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location("dice_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, mlc.ConfigDict):
        raise ConfigError(f"--config: {path}: get_config() must return a ConfigDict")
    return config


def _flat_keys(config: mlc.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys += _flat_keys(value, name + ".") if isinstance(value, mlc.ConfigDict) else [name]
    return keys


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: mlc.ConfigDict, key: str, text: str) -> None:
    """Sets dotted `key` to the parsed `text`, keeping the field's type."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, mlc.ConfigDict) or part not in node:
            known = _flat_keys(config)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--config.{key}: unknown key{hint}")
        if i < len(parts) - 1:
            node = node[part]
    value = _parse_value(text)
    if isinstance(node[parts[-1]], str) and not isinstance(value, str):
        value = text  # a string field takes the text as written ("1e-3", "true", ...)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError, AttributeError) as e:
        expected = type(node[parts[-1]]).__name__ if node[parts[-1]] is not None else "value"
        raise ConfigError(f"--config.{key}={text}: expected type {expected} ({e})") from None


def build_config(config_spec: str, overrides: list[tuple[str, str]],
                 device_count: int | None = None) -> mlc.ConfigDict:
    """Loads, overrides, validates and locks a config."""
    config = load_config_file(config_spec)
    config.lock()
    for key, text in overrides:
        apply_override(config, key, text)
    validate(config, device_count)
    return config


def parse_config_args(argv: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Splits `--config=FILE` and `--config.KEY=VALUE` from the other arguments."""
    spec, overrides, rest = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config") and "=" not in arg and i + 1 < len(argv):
            arg = f"{arg}={argv[i + 1]}"  # "--config.x 3" and "--config FILE" forms
            i += 1
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            key, _, value = arg[len("--config."):].partition("=")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    if spec is None:
        raise ConfigError("--config=FILE is required (e.g. --config=configs/smollm2.py)")
    return spec, overrides, rest
