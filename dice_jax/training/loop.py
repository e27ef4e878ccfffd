"""The DPO training loop: reference log-prob cache, checkpoints, evaluation, progress.

Work directory layout:

    checkpoints/<step>/        orbax CheckpointManager: `state` (params, opt state, step)
                               and `meta` (JSON: data fingerprint, seed, data position)
    ref_logps/<split>-<key>.npz  reference log-prob sums [pairs, 2] of one data split,
                               keyed by a hash of the tokenised data + reference identity
    metrics.jsonl              one JSON object per step (and per evaluation)

The reference model is used once, before training, to fill the cache; training then holds
one model (the policy). A restarted trainer (same work directory, same arguments) reloads
the cache, restores the last checkpoint and continues with the same data order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dice_jax import preemption
from dice_jax.distributed import host_array, host_tree, is_writer
from dice_jax.errors import DiceError
from dice_jax.fileio import append_jsonl, atomic_file
from dice_jax.models.config import ModelConfig
from dice_jax.progress import bar_disabled
from dice_jax.sharding import (
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    make_mesh,
    put_process_local,
)
from dice_jax.training.config import TrainConfig
from dice_jax.training.data import PairArrays, PairSampler
from dice_jax.training.memory import memory_plan
from dice_jax.training.state import (
    TrainState,
    abstract_train_state,
    init_train_state,
    make_optimizer,
    train_state_shardings,
)
from dice_jax.training.step import make_eval_step, make_logps_step, make_train_step


def compiled_steps(model_config: ModelConfig, cfg: TrainConfig, mesh: Mesh,
                   rules: Rules) -> tuple[Any, TrainState, Any, Any, Any]:
    """`(optimizer, state shardings, train step, eval step, log-prob step)`, memoised so
    trainers with the same step settings and mesh (restarts, DICE rounds) share
    compilations: the key is the fields the steps read (`TrainConfig.step_key`)."""
    return _compiled_steps(model_config, cfg.step_key(), mesh, rules)


@functools.lru_cache(maxsize=8)
def _compiled_steps(model_config: ModelConfig, step_key: tuple, mesh: Mesh,
                    rules: Rules) -> tuple[Any, TrainState, Any, Any, Any]:
    cfg = TrainConfig(**dict(step_key))
    optimizer = make_optimizer(cfg)
    shardings = train_state_shardings(model_config, optimizer, mesh, rules)
    return (optimizer, shardings,
            make_train_step(model_config, cfg, optimizer, mesh, shardings, rules),
            make_eval_step(model_config, cfg, mesh, rules),
            make_logps_step(model_config, cfg, mesh, rules))


def params_fingerprint(params: Any) -> str:
    """A cheap identity of a parameter tree: shapes, dtypes, sums and sums of squares."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    stats = jax.device_get([(jax.numpy.sum(x.astype(np.float32)),
                             jax.numpy.sum(jax.numpy.square(x.astype(np.float32))))
                            for _, x in leaves])
    h = hashlib.sha256()
    for (path, x), (s, s2) in zip(leaves, stats):
        h.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}{float(s)!r}{float(s2)!r}"
                 .encode())
    return h.hexdigest()


def padded_batches(data: PairArrays, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """Index arrays of `batch_size` covering `data` in order; the last is filled by wrapping
    round, with the count of real rows."""
    out = []
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, start + batch_size) % len(data)
        out.append((idx, min(batch_size, len(data) - start)))
    return out


def model_inputs(data: PairArrays, split_lengths: tuple[int, int] | None
                 ) -> dict[str, np.ndarray]:
    """The arrays a step reads: the shared-prompt layout with the given `(prompt_length,
    response_length)`, or with None the right-padded one."""
    return data.as_dict() if split_lengths is None else data.shared_prompt_dict(*split_lengths)


def compute_reference_logps(logps_fn: Callable, params: Any, data: PairArrays,
                            batch_size: int, put: Callable, progress: bool = True,
                            split_lengths: tuple[int, int] | None = None) -> np.ndarray:
    """Summed reference log-probs float32 `[pairs, 2]` of every pair (one forward each)."""
    out = np.zeros((len(data), 2), np.float32)
    for idx, real in tqdm(padded_batches(data, batch_size), desc="reference log-probs",
                          leave=False, disable=bar_disabled(progress)):
        logps, _ = logps_fn(params, put(model_inputs(data.take(idx), split_lengths)))
        out[idx[:real]] = host_array(logps)[:real]
    return out


def load_or_compute_reference(cache_dir: str, split: str, data: PairArrays, identity: str,
                              compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """The cached reference log-probs for `data`, or `compute()` them and write the cache
    atomically (temporary name + rename). Returns `(logps, computed)`."""
    key = hashlib.sha256(f"{data.fingerprint()}|{identity}".encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"{split}-{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            logps = f["logps"]
        if logps.shape == (len(data), 2):
            return logps, False
    logps = compute()
    if is_writer():  # every process computed the same values; one writes them
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_file(path, "wb") as f:
            np.savez(f, logps=logps, identity=np.asarray(identity))
    return logps, True


class DPOTrainer:
    """DPO on one device mesh. `params` is the initial policy; the reference is
    `reference_params` or, when None, the initial policy itself (DICE: pi_ref(t) =
    pi_theta(t-1) = the starting point of round t). `reference_id` names the reference in
    the cache key (default: a fingerprint of its parameters); `reference_cache_dir`
    (default `workdir/ref_logps`) may point beside the data set to share the cache."""

    def __init__(self, cfg: TrainConfig, model_config: ModelConfig, params: Any,
                 train_data: PairArrays, workdir: str, eval_data: PairArrays | None = None, *,
                 reference_params: Any = None, reference_id: str | None = None,
                 reference_cache_dir: str | None = None, mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg, self.model_config, self.rules = cfg, model_config, rules
        self.workdir = os.path.abspath(workdir)
        self.train_data, self.eval_data = train_data, eval_data
        self.progress = progress
        self.reference_cache_dir = reference_cache_dir or os.path.join(self.workdir,
                                                                       "ref_logps")
        self.log = log or (lambda msg: tqdm.write(msg))
        self.mesh = mesh or make_mesh()
        (self.optimizer, self.shardings, self._train_step, self._eval_step,
         self._logps_step) = compiled_steps(model_config, cfg, self.mesh, tuple(rules))
        self.sampler = PairSampler(len(train_data), cfg.batch_size, cfg.seed)
        # One static layout per split, so that every batch of it has the same shapes.
        self.split_lengths = {split: self._layout(split, data)
                              for split, data in (("train", train_data), ("eval", eval_data))
                              if data is not None and len(data)}
        self.log(memory_plan(model_config, dict(self.mesh.shape), cfg).format(
            f"{model_config.model_type} policy"))
        params = jax.device_put(params, self.shardings.params)
        self.reference = self._reference_logps(params if reference_params is None else
                                               jax.device_put(reference_params,
                                                              self.shardings.params),
                                               reference_id)
        del reference_params
        os.makedirs(self.workdir, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints,
                                                 create=True,
                                                 enable_async_checkpointing=False))
        self.state = self._restore_or_init(params)

    # ------------------------------------------------------------------ setup
    @property
    def eval_batch_size(self) -> int:
        return self.cfg.eval_batch_size or self.cfg.micro_batch_size

    def _layout(self, split: str, data: PairArrays) -> tuple[int, int] | None:
        """The shared-prompt layout's `(prompt_length, response_length)` for `data`, or
        None (rows run whole) when it is off or some pair's rows differ in their prompt."""
        if not self.cfg.shared_prompt:
            return None
        try:
            return data.split_lengths()
        except DiceError as e:
            self.log(f"{split} data: {e}; every row runs whole")
            return None

    def _put_pairs(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: put_process_local(v, batch_sharding(self.mesh, v.shape, 0, self.rules), 0)
                for k, v in arrays.items()}

    def _reference_logps(self, ref_params: Any, reference_id: str | None) -> dict[str,
                                                                                 np.ndarray]:
        identity = json.dumps({"reference": reference_id or params_fingerprint(ref_params),
                               "model": json.loads(self.model_config.to_json())},
                              sort_keys=True)
        cache_dir = self.reference_cache_dir
        out = {}
        splits = {"train": self.train_data, "eval": self.eval_data}
        for split, data in splits.items():
            if data is None or len(data) == 0:
                continue
            out[split], computed = load_or_compute_reference(
                cache_dir, split, data, identity,
                lambda data=data, split=split: compute_reference_logps(
                    self._logps_step, ref_params, data, self.eval_batch_size, self._put_pairs,
                    self.progress, self.split_lengths[split]))
            self.log(f"reference log-probs ({split}, {len(data)} pairs): "
                     f"{'computed and cached' if computed else 'loaded from cache'}")
        return out

    def _meta(self, step: int) -> dict[str, Any]:
        epoch, position = self.sampler.position(step)
        return {"step": step, "seed": self.cfg.seed, "epoch": epoch, "position": position,
                "train_fingerprint": self.train_data.fingerprint(),
                "batch_size": self.cfg.batch_size}

    def _restore_or_init(self, params: Any) -> TrainState:
        step = self.manager.latest_step()
        if step is None:
            return init_train_state(params, self.optimizer, self.shardings)
        abstract = abstract_train_state(self.model_config, self.optimizer, params)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              abstract, self.shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        if meta.get("train_fingerprint") != self.train_data.fingerprint() or meta.get(
                "seed") != self.cfg.seed or meta.get("batch_size") != self.cfg.batch_size:
            raise DiceError(f"{self.manager.directory}: checkpoint step {step} was written "
                            "for different training data, seed or batch size; use a new "
                            "work directory")
        self.log(f"resumed from checkpoint step {step} (epoch {meta['epoch']}, "
                 f"batch {meta['position']})")
        return restored["state"]

    # ------------------------------------------------------------------ steps
    def _train_batch(self, step: int) -> tuple[dict[str, jax.Array], int]:
        idx = self.sampler.indices(step)
        accum, micro = self.cfg.grad_accum, self.cfg.micro_batch_size
        pairs = self.train_data.take(idx)
        host = {k: v.reshape(accum, micro, *v.shape[1:])
                for k, v in model_inputs(pairs, self.split_lengths["train"]).items()}
        host["ref_logps"] = self.reference["train"][idx].reshape(accum, micro, 2)
        tokens = int(pairs.attention_mask.sum())
        return {k: put_process_local(v, batch_sharding(self.mesh, v.shape, 1, self.rules), 1)
                for k, v in host.items()}, tokens

    def save(self) -> None:
        step = int(self.state.step)
        if self.manager.latest_step() == step:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), meta=ocp.args.JsonSave(self._meta(step))))
        self.manager.wait_until_finished()

    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the held-out split (prefixed `eval/`)."""
        if self.eval_data is None or len(self.eval_data) == 0:
            return {}
        sums: dict[str, float] = {}
        for idx, real in padded_batches(self.eval_data, self.eval_batch_size):
            host = model_inputs(self.eval_data.take(idx), self.split_lengths["eval"])
            host["ref_logps"] = self.reference["eval"][idx]
            metrics = host_tree(self._eval_step(self.state.params, self._put_pairs(host)))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v)[:real]))
        return {f"eval/{k}": v / len(self.eval_data) for k, v in sums.items()}

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if is_writer():
            append_jsonl(os.path.join(self.workdir, "metrics.jsonl"), record)

    def train(self, until_step: int | None = None,
              on_step: Callable[[dict[str, float]], None] | None = None
              ) -> list[dict[str, float]]:
        """Runs optimizer steps up to `max_steps` (or `until_step`, which stops WITHOUT a
        final checkpoint, as a killed run would). Returns one metrics dict per step run.
        `on_step(record)` is called after each step's record is written (and after the
        step's checkpoint, when one is due)."""
        cfg = self.cfg
        start = int(self.state.step)
        end = min(cfg.max_steps, until_step if until_step is not None else cfg.max_steps)
        history = []
        bar = tqdm(total=cfg.max_steps, initial=start, desc="dpo",
                   disable=bar_disabled(self.progress))
        try:
            with preemption.deferred():
                history = self._steps(start, end, history, bar, on_step)
            if end == cfg.max_steps:
                self.save()
        finally:
            bar.close()
        return history

    def _steps(self, start: int, end: int, history: list[dict[str, float]], bar: Any,
               on_step: Callable[[dict[str, float]], None] | None
               ) -> list[dict[str, float]]:
        """Steps `start` to `end`; after each, a SIGTERM on any process checkpoints that
        step on all of them and stops with `Preempted`."""
        cfg = self.cfg
        for step in range(start, end):
            batch, tokens = self._train_batch(step)
            t0 = time.perf_counter()
            self.state, metrics = self._train_step(self.state, batch)
            record = {k: float(v) for k, v in host_tree(metrics).items()}
            record["tokens_per_second"] = tokens / (time.perf_counter() - t0)
            record["step"] = step + 1
            if not record.pop("finite"):
                raise DiceError(
                    f"non-finite loss or gradient at step {step + 1} (loss="
                    f"{record['loss']}, grad_norm={record['grad_norm']}); training "
                    f"stopped before applying it; the last good checkpoint is step "
                    f"{self.manager.latest_step()} in {self.manager.directory}")
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0:
                record.update(self.evaluate())
            if cfg.save_every and done % cfg.save_every == 0:
                self.save()
            history.append(record)
            self._write_metrics(record)
            if on_step is not None:
                on_step(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}",
                            acc=f"{record['rewards/accuracies']:.2f}",
                            tok_s=f"{record['tokens_per_second']:.0f}")
            if preemption.requested():
                if self.manager.latest_step() != done:
                    self.save()
                raise preemption.Preempted(
                    f"SIGTERM: checkpoint of step {done} saved in "
                    f"{self.manager.directory}; run the same command to resume")
        return history

    @property
    def params(self) -> Any:
        return self.state.params
