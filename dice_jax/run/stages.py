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
import hashlib
import json
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
from dice_jax.dice.builder import DiceDataConfig, ScoredSamples, build_round_data, offline_only
from dice_jax.dice.diagnostics import heldout_accuracy
from dice_jax.dice.llm_judge import judge_prompt, judge_scores
from dice_jax.dice.scoring import score_samples, scored_samples
from dice_jax.distributed import agree, is_writer
from dice_jax.errors import DiceError
from dice_jax.evaluation import MODES, EvalConfig, evaluate_policy
from dice_jax.fileio import atomic_file, read_json, read_jsonl, write_json, write_jsonl
from dice_jax.judge.score import score_response
from dice_jax.models.config import ModelConfig
from dice_jax.run.faults import kill_point
from dice_jax.run.metrics import MetricsWriter
from dice_jax.sampling.config import SamplingConfig
from dice_jax.sampling.sampler import Sampler
from dice_jax.sampling.store import load_samples, save_samples
from dice_jax.sharding import DEFAULT_RULES, batch_sharding, put_process_local
from dice_jax.training import DPOTrainer, TrainConfig, tokenize_pairs
from dice_jax.training.data import PairArrays
from dice_jax.training.loop import compiled_steps, compute_reference_logps

SCORES_FILE = "scores.npz"
HELDOUT_FILE = "heldout.npz"  # the held-out pairs' log-probs under both models


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
                reuse_policy_logps: bool, batch_size: int,
                heldout: HeldoutPairs | None = None) -> dict[str, Any]:
    """Algorithm 1, line 4 (first half): log pi and log pi_ref of every sample; with
    `heldout`, also of the held-out preference pairs (`HELDOUT_FILE`), under the same two
    models, for the data stage's reward check."""
    samples = load_samples(sample_folder)
    start = time.perf_counter()
    scored = score_samples(samples, model_config, reference_params, policy_params, mesh=mesh,
                           batch_size=batch_size, reuse_policy_logps=reuse_policy_logps)
    write_scores(folder, scored)
    info: dict[str, Any] = {}
    if heldout is not None and heldout.rows:
        logps = heldout_logps(heldout, model_config, reference_params, mesh)
        with atomic_file(os.path.join(folder, HELDOUT_FILE), "wb") as f:
            np.savez(f, **logps)
        info["heldout_pairs"] = int(logps["logp_policy"].shape[0])
    kill_point(f"{stage}:written")
    return {"seconds": round(time.perf_counter() - start, 2),
            "responses": int(scored.logp_policy.size), **info}


@dataclasses.dataclass
class HeldoutPairs:
    """Preference pairs no round trains on, with what scoring them needs: the policy that
    labels the round, the tokenizer and the DPO settings (truncation, batch size)."""

    rows: list[dict[str, Any]]
    policy_params: Any
    tokenizer: Any
    train: TrainConfig


def heldout_logps(heldout: HeldoutPairs, model_config: ModelConfig, reference_params: Any,
                  mesh: Mesh) -> dict[str, np.ndarray]:
    """Summed response log-probs `[H, 2]` (chosen, rejected) of the held-out pairs under
    the policy and the reference: the DPO trainer's own tokenisation and forward."""
    cfg = heldout.train
    data, stats = tokenize_pairs(
        heldout.rows, heldout.tokenizer, max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode,
        config_eos=model_config.eos_token_ids, pad_to_multiple=cfg.pad_to_multiple)
    if len(data) == 0:
        raise DiceError(f"no usable held-out pair ({stats.summary()})")
    rules = tuple(DEFAULT_RULES)
    logps_step = compiled_steps(model_config, cfg, mesh, rules)[4]
    try:
        layout = data.split_lengths() if cfg.shared_prompt else None
    except DiceError:
        layout = None  # some pair's rows differ in their prompt: every row runs whole

    def put(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: put_process_local(v, batch_sharding(mesh, v.shape, 0, rules), 0)
                for k, v in arrays.items()}

    size = cfg.eval_batch_size or cfg.micro_batch_size
    return {name: compute_reference_logps(logps_step, params, data, size, put, False, layout)
            for name, params in (("logp_policy", heldout.policy_params),
                                 ("logp_reference", reference_params))}


def read_heldout(score_folder: str) -> dict[str, np.ndarray] | None:
    """The held-out pairs' log-probs of a score stage, or None (none were held out, or a
    run folder from before the check)."""
    path = os.path.join(score_folder, HELDOUT_FILE)
    if not os.path.isfile(path):
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


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
               data_config: DiceDataConfig, judge: tuple[np.ndarray, dict] | None = None,
               heldout: dict[str, np.ndarray] | None = None, round_index: int = 0,
               prompt_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Algorithm 1, lines 4-5: rewards, alpha*, D(alpha*), replay mix -> D_t, after the
    reward's health check (`dice.diagnostics`): below `dice.guard.min_heldout_accuracy`
    the round stops (DiceError, exit code 2) or, with `dice.guard.action=offline`, its
    D_t is D_offline. `offline`: the rows replay may draw (none held out); `prompt_rows`
    (default `offline`): rows whose instructions the verifiable judge checks."""
    guard = data_config.guard
    health = (heldout_accuracy(heldout["logp_policy"], heldout["logp_reference"],
                               data_config.scale) if heldout is not None else None)
    tripped = guard.tripped(None if health is None else health["accuracy"])
    if tripped and guard.action == "stop":
        raise DiceError(
            f"round {round_index}: the implicit reward ranks {health['accuracy']:.3f} of "
            f"{health['pairs']} held-out preference pairs correctly (mean margin "
            f"{health['margin']:.4g}), below dice.guard.min_heldout_accuracy="
            f"{guard.min_heldout_accuracy:g}; it would label this round's data no better "
            "than chance. Run the same command with --config.dice.guard.action=offline "
            "(train this round on D_offline) or a lower --config.dice.guard."
            "min_heldout_accuracy to go on")
    data = build_round_data(scored, offline, data_config,
                            judge_scores=None if judge is None else judge[0],
                            judge_drops=None if judge is None else Counter(judge[1]),
                            gold_scores=gold_scores(scored, prompt_rows or offline))
    s = data.stats
    if health is not None:
        s["reward_health"] = {"heldout_implicit_accuracy": health["accuracy"],
                              "heldout_margin": health["margin"],
                              "heldout_pairs": health["pairs"], **s["reward_health"]}
    s["guard"] = {"min_heldout_accuracy": guard.min_heldout_accuracy,
                  "action": guard.action if tripped else "none"}
    if tripped:  # action "offline": D_t is D_offline; D(alpha*) stays for inspection
        data.mixed = offline_only(offline)
        s["replay"] = dict(s["replay"], num_generated=0, num_offline=len(data.mixed),
                           num_rows=len(data.mixed))
    write_round_files(data, folder)
    writer = MetricsWriter(folder, prefix="reward_health", jsonl=False)
    try:
        writer.write({"step": round_index, **flat_figures(s["reward_health"])})
    finally:
        writer.close()
    return {"alpha_star": s["alpha_star"], "num_pairs": s["num_pairs"],
            "num_rows": len(data.mixed),
            "mean_length_gap_before": s["mean_length_gap_before"],
            "mean_length_gap_after": s["mean_length_gap_after"],
            "heldout_implicit_accuracy": None if health is None else health["accuracy"],
            "guard_action": s["guard"]["action"]}


def flat_figures(health: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of `stats["reward_health"]`, nested names joined by '/'."""
    out: dict[str, float] = {}
    for key, value in health.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flat_figures(value).items()})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def gold_scores(scored: ScoredSamples, offline: list[dict[str, Any]]) -> np.ndarray | None:
    """The verifiable judge's score `[P, K]` of every sample whose prompt carries
    instructions in D_offline (NaN elsewhere); None when no prompt does."""
    judged = {}
    for row in offline:
        if row.get("instruction_ids") and isinstance(row.get("prompt"), str):
            judged.setdefault(row["prompt"], row)
    if not judged:
        return None
    gold = np.full(np.shape(scored.logp_policy), np.nan, np.float64)
    for i, prompt in enumerate(scored.prompts):
        row = judged.get(prompt) if isinstance(prompt, str) else None
        if row is not None:
            gold[i] = [score_response(row, text).score for text in scored.responses[i]]
    return gold if np.isfinite(gold).any() else None


def read_mixed(data_folder: str) -> list[dict[str, Any]]:
    rows = read_jsonl(os.path.join(data_folder, MIXED_FILE))
    agree(f"{data_folder}/{MIXED_FILE} (D_t)", rows)
    return rows


def holdout_split(rows: list[dict[str, Any]], eval_pairs: int, seed: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) rows: `eval_pairs` seeded rows held out (at most a fifth)."""
    num_eval = min(eval_pairs, len(rows) // 5)
    return split_holdout(rows, num_eval, seed) if num_eval else (rows, [])


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """A short SHA-256 of a set of preference rows (order-free): which pairs a stage held out."""
    lines = sorted(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def tokenize_round(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]],
                    tokenizer: Any, model_config: ModelConfig, cfg: TrainConfig
                    ) -> tuple[PairArrays, PairArrays | None, dict[str, Any]]:
    """Tokenisation of a round's training rows and of the rows it holds out."""
    kwargs = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  truncation_mode=cfg.truncation_mode, config_eos=model_config.eos_token_ids,
                  pad_to_multiple=cfg.pad_to_multiple)
    train, stats = tokenize_pairs(train_rows, tokenizer, **kwargs)
    held = tokenize_pairs(eval_rows, tokenizer, **kwargs)[0] if eval_rows else None
    if len(train) < cfg.batch_size:
        raise DiceError(f"only {len(train)} training pairs ({stats.summary()}), fewer than "
                        f"one batch of train.batch_size={cfg.batch_size}")
    return train, held, {"train_pairs": len(train), "eval_pairs": 0 if held is None else
                         len(held), "heldout_digest": rows_digest(eval_rows),
                         "data": stats.summary()}


def train_stage(folder: str, stage: str, rows: list[dict[str, Any]],
                held_rows: list[dict[str, Any]], params: Any, model_config: ModelConfig,
                tokenizer: Any, cfg: TrainConfig, mesh: Mesh, reference_params: Any = None,
                reference_id: str | None = None, progress: bool = True
                ) -> tuple[Any, dict[str, Any]]:
    """Algorithm 1, line 6: DPO on the round's rows, resumable from its checkpoints; the
    trainer evaluates on `held_rows` (split off by the caller, never trained on).

    Writes `policy/` (a dice-jax checkpoint of the trained weights), `metrics.jsonl` and
    `tensorboard/`. The trainer's own checkpoints (with optimizer state) are deleted once
    `policy/` exists. Returns the trained params (still on the mesh) and a summary.
    """
    from dice_jax.run.models import POLICY_DIR

    policy_dir = os.path.join(folder, POLICY_DIR)
    if is_checkpoint(policy_dir):  # killed after training, before the stage was recorded
        return None, {"resumed": "policy already written"}
    train, held, info = tokenize_round(rows, held_rows, tokenizer, model_config, cfg)
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
