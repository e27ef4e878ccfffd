"""The stages of a DICE round, each a function that fills one (temporary) stage folder.

    sample  K responses per prompt from pi_theta(t-1)          samples.jsonl, samples.npz
    score   log pi and log pi_ref of every response             scores.npz
    judge   (llm_judge baseline) the policy rates each sample   judgements.jsonl, scores.npz
    data    rewards, filters, alpha*, D(alpha*), replay -> D_t   pairs/mixed JSONL, stats, plots
    train   DPO on D_t from pi_theta(t-1), reference pi_theta(t-1)   policy/, metrics, TB
    eval    the verifiable judge on held-out prompts            metrics.json, model_outputs.json,
                                                                responses.jsonl

The run loop (`dice_jax.run.loop`) decides which stages a round has and with which weights;
a stage reads only its inputs and writes only its folder. Math lives in the pure functions
these call (`dice_jax.dice`, `dice_jax.training`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections import Counter
from typing import Any

import numpy as np
from jax.sharding import Mesh

from dice_jax.checkpoints.orbax_io import is_checkpoint, save_checkpoint
from dice_jax.config import RunConfig
from dice_jax.data import load_eval_prompts, prompt_text, split_holdout
from dice_jax.dice.artifacts import MIXED_FILE, write_round_files
from dice_jax.dice.builder import DiceDataConfig, ScoredSamples, build_round_data
from dice_jax.dice.llm_judge import judge_prompt, judge_scores
from dice_jax.dice.scoring import score_samples, scored_samples
from dice_jax.distributed import agree, is_writer
from dice_jax.errors import DiceError
from dice_jax.evaluation import MODES, EvalConfig, evaluate_policy
from dice_jax.fileio import atomic_file, read_json, read_jsonl, write_json, write_jsonl
from dice_jax.models.config import ModelConfig
from dice_jax.run.faults import kill_point
from dice_jax.run.metrics import MetricsWriter
from dice_jax.sampling.sampler import Sampler, SamplingConfig
from dice_jax.sampling.store import load_samples, save_samples
from dice_jax.training import DPOTrainer, TrainConfig, tokenize_pairs
from dice_jax.training.data import PairArrays

SCORES_FILE = "scores.npz"


# ---------------------------------------------------------------------- settings
def round_settings(config: RunConfig, seed: int, progress: bool = True
                   ) -> tuple[SamplingConfig, DiceDataConfig, TrainConfig]:
    """The run config's sections with the values the run sets itself: the round's seed
    everywhere, the progress switch, and the paper's one beta (`train.beta`) in Eq. 4."""
    return (dataclasses.replace(config.sampling, seed=seed, progress=progress),
            dataclasses.replace(config.dice, beta=config.train.beta, seed=seed),
            dataclasses.replace(config.train, seed=seed))


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
            "engine": result.engine, "slot_utilisation": round(result.utilisation, 4),
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
    with atomic_file(path, "wb") as f:
        np.savez(f, logp_policy=scored.logp_policy, logp_reference=scored.logp_reference,
                 token_counts=scored.token_counts, **extra)


def read_scored(sample_folder: str, score_folder: str) -> tuple[ScoredSamples, dict]:
    """The ScoredSamples of a round from its sample and score stages (and extra arrays)."""
    samples = load_samples(sample_folder)
    path = os.path.join(score_folder, SCORES_FILE)
    if not os.path.isfile(path):
        raise DiceError(f"{path}: missing; delete {score_folder} and run again")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    scored = scored_samples(samples, arrays.pop("logp_policy"), arrays.pop("logp_reference"),
                            arrays.pop("token_counts"))
    return scored, arrays


def judge_stage(folder: str, stage: str, sample_folder: str, params: Any,
                model_config: ModelConfig, tokenizer: Any, mesh: Mesh,
                sampling: SamplingConfig, max_new_tokens: int) -> dict[str, Any]:
    """The LLM-as-a-judge baseline: the policy rates each of its samples (paper App. A),
    greedily; unparseable ratings become NaN and are dropped (counted) by the data stage."""
    samples = load_samples(sample_folder)
    prompts = [prompt_text(p) for p in samples.prompts]
    queries = [judge_prompt(prompts[i], text) for i, row in enumerate(samples.texts)
               for text in row]
    k = len(samples.texts[0])
    rating = dataclasses.replace(sampling, num_samples=1, max_new_tokens=max_new_tokens,
                                 temperature=0.0, top_p=1.0, top_k=0, max_prompt_tokens=8192,
                                 truncate_prompts=True)
    result = Sampler(params, model_config, tokenizer, mesh).sample(queries, rating)
    texts = [s[0].text for s in result.samples]
    judgements = [[[texts[i * k + j]] for j in range(k)] for i in range(len(prompts))]
    scores, drops = judge_scores(judgements)
    write_jsonl(os.path.join(folder, "judgements.jsonl"),
                [{"prompt_index": i, "sample_index": j, "judgement": judgements[i][j][0],
                  "score": None if np.isnan(scores[i, j]) else float(scores[i, j])}
                 for i in range(len(prompts)) for j in range(k)])
    path = os.path.join(folder, SCORES_FILE)
    with atomic_file(path, "wb") as f:
        np.savez(f, judge_scores=scores)
    write_json(os.path.join(folder, "drops.json"), dict(drops))
    kill_point(f"{stage}:written")
    return {"responses": len(queries), "unparseable": int(np.isnan(scores).sum())}


def eval_stage(folder: str, params: Any, model_config: ModelConfig, tokenizer: Any,
               evaluation: EvalConfig, sampling: SamplingConfig, mesh: Mesh,
               generator_name: str) -> dict[str, Any]:
    """The verifiable judge on held-out prompts (`dice_jax.evaluation`); the manifest keeps
    each mode's metrics."""
    rows = load_eval_prompts(evaluation.prompts, evaluation.num_prompts, evaluation.seed)
    metrics = evaluate_policy(params, model_config, tokenizer, rows, folder,
                              evaluation=evaluation, sampling=sampling, mesh=mesh,
                              generator_name=generator_name, dataset_name=evaluation.prompts)
    return {mode: metrics[mode] for mode in MODES if metrics.get(mode)}


def read_judge_scores(judge_folder: str) -> tuple[np.ndarray, dict[str, int]]:
    with np.load(os.path.join(judge_folder, SCORES_FILE)) as f:
        scores = f["judge_scores"]
    return scores, read_json(os.path.join(judge_folder, "drops.json"))


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
    rows = read_jsonl(os.path.join(data_folder, MIXED_FILE))
    agree(f"{data_folder}/{MIXED_FILE} (D_t)", rows)
    return rows


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
    writer = MetricsWriter(folder, prefix=stage.split("/")[0], jsonl=False) if (
        is_writer()) else None

    def on_step(record: dict[str, float]) -> None:
        if writer is not None:
            writer.write(record)
        kill_point(f"{stage}:step={int(record['step'])}")

    try:
        history = trainer.train(on_step=on_step)
    finally:
        if writer is not None:
            writer.close()
    trained = trainer.params
    save_checkpoint(trained, model_config, policy_dir, tokenizer)
    if is_writer():
        shutil.rmtree(os.path.join(folder, "checkpoints"), ignore_errors=True)
    last = history[-1] if history else {}
    info.update({"steps": cfg.max_steps, "final_loss": last.get("loss"),
                 "final_accuracy": last.get("rewards/accuracies")})
    return trained, info
