"""The stages of a DICE round, each a function that fills one (temporary) stage folder.

    sample  K responses per prompt from pi_theta(t-1)          samples.jsonl, samples.npz
    score   log pi and log pi_ref of every response             scores.npz
    judge   (llm_judge baseline) the policy rates each sample   judgements.jsonl, scores.npz
    data    rewards, filters, alpha*, D(alpha*), replay -> D_t   pairs/mixed JSONL, stats, plots
    train   DPO on D_t from pi_theta(t-1), reference pi_theta(t-1)   policy/, metrics, TB
    eval    the verifiable judge on held-out prompts            metrics.json, model_outputs.json

The run loop (`dice_jax.run.loop`) decides which stages a round has and with which weights;
a stage reads only its inputs and writes only its folder. Math lives in the pure functions
these call (`dice_jax.dice`, `dice_jax.training`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from typing import Any

import ml_collections as mlc
import numpy as np
from jax.sharding import Mesh

from dice_jax.checkpoints.orbax_io import is_checkpoint, save_checkpoint
from dice_jax.data import split_holdout
from dice_jax.dice.alpha_search import AlphaSearchConfig
from dice_jax.dice.artifacts import MIXED_FILE, read_jsonl, write_jsonl, write_round_files
from dice_jax.dice.builder import DiceDataConfig, ScoredSamples, build_round_data
from dice_jax.dice.filters import FilterConfig
from dice_jax.dice.llm_judge import judge_prompt, judge_scores
from dice_jax.dice.scoring import score_samples
from dice_jax.errors import DiceError
from dice_jax.fileio import write_json
from dice_jax.models.config import ModelConfig
from dice_jax.run.faults import kill_point
from dice_jax.run.metrics import MetricsWriter
from dice_jax.sampling.sampler import Sampler, SamplingConfig
from dice_jax.sampling.store import load_samples, save_samples
from dice_jax.training import DPOTrainer, TrainConfig, tokenize_pairs
from dice_jax.training.data import PairArrays

SCORES_FILE = "scores.npz"
LOSS_NAMES = {"kto": "kto_pair"}  # run config name -> dice_jax.training name


# ---------------------------------------------------------------------- settings
def sampling_config(config: mlc.ConfigDict, seed: int, **changes: Any) -> SamplingConfig:
    """The run config's `sampling` section as a SamplingConfig."""
    s = config.sampling
    settings = dict(num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed,
                    max_prompt_tokens=s.max_prompt_tokens, truncate_prompts=s.truncate_prompts,
                    cache_budget_bytes=int(s.cache_budget_gb * 2**30))
    settings.update(changes)
    return SamplingConfig(**settings)


def train_config(config: mlc.ConfigDict, seed: int) -> TrainConfig:
    """The run config's `train` section (and mesh) as a TrainConfig."""
    t = config.train
    return TrainConfig(
        beta=t.beta, loss_type=LOSS_NAMES.get(t.loss_type, t.loss_type),
        label_smoothing=t.label_smoothing, learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps, max_steps=t.max_steps, batch_size=t.batch_size,
        grad_accum=t.grad_accum, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        max_length=t.max_length, max_prompt_length=t.max_prompt_length,
        eval_every=t.eval_every, save_every=t.save_every, seed=seed,
        shared_prompt=bool(t.get("shared_prompt", True)),
        mesh=tuple((axis, int(config.mesh[axis])) for axis in ("data", "fsdp", "tensor")))


def dice_data_config(config: mlc.ConfigDict, seed: int) -> DiceDataConfig:
    d = config.dice
    f, s = d.filters, d.search
    return DiceDataConfig(
        beta=d.beta, reward_scale=d.reward_scale, length_unit=d.length_unit, gamma=d.gamma,
        seed=seed,
        filters=FilterConfig(drop_truncated=f.drop_truncated, min_chars=f.min_chars,
                             max_chars=f.max_chars, min_valid=f.min_valid),
        search=AlphaSearchConfig(method=s.method, objective=s.objective,
                                 alpha_min=s.alpha_min, alpha_max=s.alpha_max,
                                 grid_step=s.grid_step, num_trials=s.num_trials, seed=seed))


def unique_prompts(rows: list[dict[str, Any]]) -> list[str]:
    """The distinct prompts of D_offline, in first-seen order (the prompts DICE samples)."""
    return list(dict.fromkeys(row["prompt"] for row in rows))


# ---------------------------------------------------------------------- stages
def sample_stage(folder: str, stage: str, params: Any, model_config: ModelConfig,
                 tokenizer: Any, prompts: list[str], sampling: SamplingConfig,
                 mesh: Mesh) -> dict[str, Any]:
    """Algorithm 1, line 3: K samples per prompt from the current policy."""
    sampler = Sampler(params, model_config, tokenizer, mesh)
    try:
        result = sampler.sample(prompts, sampling)
    except ValueError as e:  # an empty or over-long prompt: name the config keys
        raise DiceError(f"{stage}: {e} (see config.sampling.max_prompt_tokens and "
                        "config.sampling.truncate_prompts)") from None
    save_samples(folder, prompts, result)
    kill_point(f"{stage}:written")
    return {"num_prompts": len(prompts), "num_samples": sampling.num_samples,
            "generated_tokens": result.num_generated_tokens,
            "seconds": round(result.seconds, 2),
            "tokens_per_second": round(result.num_generated_tokens / max(result.seconds, 1e-9),
                                       1),
            "truncated_prompts": result.num_truncated}


def score_stage(folder: str, stage: str, sample_folder: str, model_config: ModelConfig,
                policy_params: Any, reference_params: Any, mesh: Mesh,
                reuse_policy_logps: bool, batch_size: int) -> dict[str, Any]:
    """Algorithm 1, line 4 (first half): log pi and log pi_ref of every sample."""
    samples = load_samples(sample_folder)
    start = time.perf_counter()
    scored = score_samples(samples, model_config, reference_params, policy_params, mesh=mesh,
                           batch_size=batch_size, reuse_policy_logps=reuse_policy_logps)
    write_scores(folder, scored)
    kill_point(f"{stage}:written")
    return {"seconds": round(time.perf_counter() - start, 2),
            "responses": int(scored.logp_policy.size)}


def write_scores(folder: str, scored: ScoredSamples, **extra: np.ndarray) -> None:
    path = os.path.join(folder, SCORES_FILE)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, logp_policy=scored.logp_policy, logp_reference=scored.logp_reference,
                 token_counts=scored.token_counts, **extra)
    os.replace(path + ".tmp", path)


def read_scored(sample_folder: str, score_folder: str) -> tuple[ScoredSamples, dict]:
    """The ScoredSamples of a round from its sample and score stages (and extra arrays)."""
    samples = load_samples(sample_folder)
    path = os.path.join(score_folder, SCORES_FILE)
    if not os.path.isfile(path):
        raise DiceError(f"{path}: missing; delete {score_folder} and run again")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    scored = ScoredSamples(
        prompts=[_prompt_text(p) for p in samples.prompts], responses=samples.texts,
        token_counts=arrays.pop("token_counts"), finish_reasons=samples.finish_reasons,
        logp_policy=arrays.pop("logp_policy"), logp_reference=arrays.pop("logp_reference"))
    return scored, arrays


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in prompt if m.get("role") == "user")


def judge_stage(folder: str, stage: str, sample_folder: str, params: Any,
                model_config: ModelConfig, tokenizer: Any, mesh: Mesh, seed: int,
                max_new_tokens: int, cache_budget_gb: float) -> dict[str, Any]:
    """The LLM-as-a-judge baseline: the policy rates each of its samples (paper App. A),
    greedily; unparseable ratings become NaN and are dropped (counted) by the data stage."""
    samples = load_samples(sample_folder)
    prompts = [_prompt_text(p) for p in samples.prompts]
    queries = [judge_prompt(prompts[i], text) for i, row in enumerate(samples.texts)
               for text in row]
    k = len(samples.texts[0])
    sampling = SamplingConfig(num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0,
                              seed=seed, max_prompt_tokens=8192, truncate_prompts=True,
                              cache_budget_bytes=int(cache_budget_gb * 2**30))
    result = Sampler(params, model_config, tokenizer, mesh).sample(queries, sampling)
    texts = [s[0].text for s in result.samples]
    judgements = [[[texts[i * k + j]] for j in range(k)] for i in range(len(prompts))]
    scores, drops = judge_scores(judgements)
    write_jsonl(os.path.join(folder, "judgements.jsonl"),
                [{"prompt_index": i, "sample_index": j, "judgement": judgements[i][j][0],
                  "score": None if np.isnan(scores[i, j]) else float(scores[i, j])}
                 for i in range(len(prompts)) for j in range(k)])
    path = os.path.join(folder, SCORES_FILE)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, judge_scores=scores)
    os.replace(path + ".tmp", path)
    write_json(os.path.join(folder, "drops.json"), dict(drops))
    kill_point(f"{stage}:written")
    return {"responses": len(queries), "unparseable": int(np.isnan(scores).sum())}


def read_judge_scores(judge_folder: str) -> tuple[np.ndarray, dict[str, int]]:
    with np.load(os.path.join(judge_folder, SCORES_FILE)) as f:
        scores = f["judge_scores"]
    with open(os.path.join(judge_folder, "drops.json")) as f:
        return scores, json.load(f)


def data_stage(folder: str, scored: ScoredSamples, offline: list[dict[str, Any]],
               data_config: DiceDataConfig, judge: tuple[np.ndarray, dict] | None = None
               ) -> dict[str, Any]:
    """Algorithm 1, lines 4-5: rewards, alpha*, D(alpha*), replay mix -> D_t."""
    data = build_round_data(scored, offline, data_config,
                            judge_scores=None if judge is None else judge[0],
                            judge_drops=None if judge is None else Counter(judge[1]))
    write_round_files(data, folder)
    s = data.stats
    return {"alpha_star": s["alpha_star"], "num_pairs": s["num_pairs"],
            "num_rows": s["replay"]["num_rows"],
            "mean_length_gap_before": s["mean_length_gap_before"],
            "mean_length_gap_after": s["mean_length_gap_after"]}


def read_mixed(data_folder: str) -> list[dict[str, Any]]:
    return read_jsonl(os.path.join(data_folder, MIXED_FILE))


def tokenized_split(rows: list[dict[str, Any]], tokenizer: Any, model_config: ModelConfig,
                    cfg: TrainConfig, eval_pairs: int, seed: int
                    ) -> tuple[PairArrays, PairArrays | None, dict[str, Any]]:
    """Held-out split (seeded) and tokenisation of a round's training rows."""
    num_eval = min(eval_pairs, len(rows) // 5)
    train_rows, eval_rows = split_holdout(rows, num_eval, seed) if num_eval else (rows, [])
    kwargs = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  truncation_mode=cfg.truncation_mode, config_eos=model_config.eos_token_ids,
                  pad_to_multiple=cfg.pad_to_multiple)
    train, stats = tokenize_pairs(train_rows, tokenizer, **kwargs)
    held = tokenize_pairs(eval_rows, tokenizer, **kwargs)[0] if eval_rows else None
    if len(train) < cfg.batch_size:
        raise DiceError(f"only {len(train)} training pairs ({stats.summary()}), fewer than "
                        f"one batch of train.batch_size={cfg.batch_size}")
    return train, held, {"train_pairs": len(train), "eval_pairs": 0 if held is None else
                         len(held), "data": stats.summary()}


def train_stage(folder: str, stage: str, rows: list[dict[str, Any]], params: Any,
                model_config: ModelConfig, tokenizer: Any, cfg: TrainConfig, mesh: Mesh,
                eval_pairs: int, reference_params: Any = None,
                reference_id: str | None = None, progress: bool = True
                ) -> tuple[Any, dict[str, Any]]:
    """Algorithm 1, line 6: DPO on the round's rows, resumable from its checkpoints.

    Writes `policy/` (a dice-jax checkpoint of the trained weights), `metrics.jsonl` and
    `tensorboard/`. The trainer's own checkpoints (with optimizer state) are deleted once
    `policy/` exists. Returns the trained params (still on the mesh) and a summary.
    """
    from dice_jax.run.models import POLICY_DIR

    policy_dir = os.path.join(folder, POLICY_DIR)
    if is_checkpoint(policy_dir):  # killed after training, before the stage was recorded
        return None, {"resumed": "policy already written"}
    train, held, info = tokenized_split(rows, tokenizer, model_config, cfg, eval_pairs,
                                        cfg.seed)
    trainer = DPOTrainer(cfg, model_config, params, train, folder, held,
                         reference_params=reference_params, reference_id=reference_id,
                         mesh=mesh, progress=progress)
    writer = MetricsWriter(folder, prefix=stage.split("/")[0], jsonl=False)

    def on_step(record: dict[str, float]) -> None:
        writer.write(record)
        kill_point(f"{stage}:step={int(record['step'])}")

    try:
        history = trainer.train(on_step=on_step)
    finally:
        writer.close()
    trained = trainer.params
    save_checkpoint(trained, model_config, policy_dir, tokenizer)
    shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)
    last = history[-1] if history else {}
    info.update({"steps": cfg.max_steps, "final_loss": last.get("loss"),
                 "final_accuracy": last.get("rewards/accuracies")})
    return trained, info
