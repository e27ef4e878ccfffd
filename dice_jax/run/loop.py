"""Algorithm 1: the round loop of a DICE run (and of the paper's baselines).

    start/eval                         the start model, judged before any training
    round_0/{train,eval}               optional offline DPO on D_offline (round0=True)
    round_t/sample                     K samples per prompt from pi_theta(t-1)
    round_t/score | round_t/judge      implicit reward (DICE) or the policy's own ratings
    round_t/data                       alpha*, D(alpha*), replay mix -> D_t
    round_t/train                      DPO from pi_theta(t-1) with reference pi_theta(t-1)
    round_t/{eval,report[,export]}     judge, Markdown report, optional HF folder
    export                             the final policy as an HF folder
    summary.md                         Table-1-shaped summary of every evaluated model

The baselines skip sampling: `offline_dpo` trains every round on D_offline (less the pairs
round 0 holds out) with the original reference pi_ref(0); `offline_dpo_new_ref` does the
same with pi_theta(t-1) as the reference. Every stage is skipped when the manifest says it
is complete, so running the same command again resumes a killed run at its first
incomplete stage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from dice_jax.checkpoints.hf import export_hf_folder
from dice_jax.config import RunConfig
from dice_jax.data import load_preference_data
from dice_jax.distributed import agree, host_tree, is_writer
from dice_jax.run import stages
from dice_jax.run.folder import RunFolder
from dice_jax.run.models import RoundModels
from dice_jax.run.round_report import write_round_report
from dice_jax.sharding import make_mesh

log = logging.getLogger("dice_jax.run")


class DiceRun:
    """One run folder's rounds. `run()` does whatever is not complete yet."""

    def __init__(self, config: RunConfig, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.mesh = make_mesh(config.mesh.as_dict())
        self.folder = RunFolder(config.run_dir, config.to_dict())
        self.models = RoundModels(config, self.folder, self.mesh)
        self._offline: list[dict[str, Any]] | None = None
        self._split: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None

    # ------------------------------------------------------------------ inputs
    @property
    def offline(self) -> list[dict[str, Any]]:
        if self._offline is None:
            d = self.config.data
            self._offline = load_preference_data(d.offline, d.offline_split, d.max_prompts,
                                                 self.config.seed)
            agree(f"D_offline ({d.offline}, its seeded subset)", self._offline)
            log.info("D_offline: %d pairs, %d prompts from %s", len(self._offline),
                     len(stages.unique_prompts(self._offline)), d.offline)
        return self._offline

    @property
    def heldout(self) -> list[dict[str, Any]]:
        """D_offline's held-out pairs: the split round 0's training (and every round of the
        baselines) holds out, which no round trains on (replay and the guard's fallback draw
        from the rest); the data stage checks the implicit reward on them."""
        return self._offline_split()[1]

    @property
    def offline_train(self) -> list[dict[str, Any]]:
        return self._offline_split()[0]

    def _offline_split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        if self._split is None:
            self._split = stages.holdout_split(self.offline, self.config.data.eval_pairs,
                                               self.round_seed(0))
        return self._split

    def round_seed(self, t: int) -> int:
        """Each round's seed for sampling, data order and search: distinct, reproducible."""
        return self.config.seed * 1000 + t

    # ------------------------------------------------------------------ stages
    def _stage(self, name: str, work: Any, resumable: bool = False) -> str:
        if not self.folder.is_complete(name):
            log.info("stage %s", name)
        return self.folder.run_stage(name, work, resumable=resumable)

    def _eval(self, name: str, source: str) -> None:
        if not self.config.eval.enabled:
            return

        sampling = dataclasses.replace(self.config.sampling, progress=self.progress)

        def work(folder: str) -> dict[str, Any]:
            self.models.ensure_loaded()
            return stages.eval_stage(folder, self.models.load(source),
                                     self.models.model_config, self.models.tokenizer,
                                     self.config.eval, sampling, self.mesh,
                                     f"dice-jax:{name}")

        self._stage(f"{name}/eval", work)

    def _train(self, t: int, split_of: Any, reference_source: str | None) -> None:
        """DPO for round t from pi_theta(t-1) on `split_of()` = (train rows, held-out rows);
        `reference_source=None`: pi_theta(t-1)."""
        name = f"round_{t}/train"
        init = self.models.policy_source(t - 1) if t > 0 else self.config.model.policy
        cfg = stages.round_settings(self.config, self.round_seed(t), self.progress)[2]
        trained: dict[str, Any] = {}

        def work(folder: str) -> dict[str, Any]:
            self.models.ensure_loaded()
            params = self.models.load(init)
            reference = None if reference_source in (None, init) else self.models.load(
                reference_source)
            out, info = stages.train_stage(
                folder, name, *split_of(), params, self.models.model_config,
                self.models.tokenizer, cfg, self.mesh, reference_params=reference,
                reference_id=reference_source or init, progress=self.progress)
            trained["params"] = out
            return info

        self._stage(name, work, resumable=True)
        if trained.get("params") is not None:
            self.models.remember(self.models.trained_policy(t), trained["params"])

    def _round_zero(self) -> None:
        self._train(0, self._offline_split, self.models.reference_source(0))
        self._eval("round_0", self.models.policy_source(0))

    def _dice_round(self, t: int) -> None:
        c = self.config
        sample_name, score_name = f"round_{t}/sample", f"round_{t}/score"
        judge_name, data_name = f"round_{t}/judge", f"round_{t}/data"
        policy, reference = self.models.policy_source(t - 1), self.models.reference_source(t - 1)
        sampling, data_config, train_config = stages.round_settings(c, self.round_seed(t),
                                                                    self.progress)

        def sample(folder: str) -> dict[str, Any]:
            self.models.ensure_loaded()
            return stages.sample_stage(folder, sample_name, self.models.load(policy),
                                       self.models.model_config, self.models.tokenizer,
                                       stages.unique_prompts(self.offline),
                                       sampling, self.mesh)

        sample_dir = self._stage(sample_name, sample)
        judge = None
        if c.method == "llm_judge":
            def rate(folder: str) -> dict[str, Any]:
                self.models.ensure_loaded()
                return stages.judge_stage(folder, judge_name, sample_dir,
                                          self.models.load(policy), self.models.model_config,
                                          self.models.tokenizer, self.mesh, sampling,
                                          c.dice.judge_max_new_tokens)

            judge = stages.read_judge_scores(self._stage(judge_name, rate))

        def score(folder: str) -> dict[str, Any]:
            self.models.ensure_loaded()
            policy_params = self.models.load(policy)
            heldout = stages.HeldoutPairs(self.heldout, policy_params, self.models.tokenizer,
                                          train_config)
            return stages.score_stage(folder, score_name, sample_dir,
                                      self.models.model_config,
                                      None if c.dice.reuse_sampler_logps else policy_params,
                                      self.models.load(reference), self.mesh,
                                      c.dice.reuse_sampler_logps, c.dice.score_batch_size,
                                      heldout)

        score_dir = self._stage(score_name, score)

        def build(folder: str) -> dict[str, Any]:
            scored, _ = stages.read_scored(sample_dir, score_dir)
            return stages.data_stage(folder, scored, self.offline_train, data_config, judge,
                                     stages.read_heldout(score_dir), t, self.offline)

        data_dir = self._stage(data_name, build)
        if self.folder.info(data_name).get("guard_action") == "offline":
            log.warning("round %d trains on D_offline: its implicit reward failed the "
                        "held-out check (dice.guard.action=offline)", t)
        self._train(t, lambda: stages.holdout_split(stages.read_mixed(data_dir),
                                                    c.data.eval_pairs, self.round_seed(t)),
                    None)

    def _finish_round(self, t: int) -> None:
        self._eval(f"round_{t}", self.models.policy_source(t))
        name = f"round_{t}/report"

        def report(folder: str) -> dict[str, Any]:
            written = write_round_report(self.folder.root, t, folder, self.config.method)
            # The manifest names the file where it ends up, not in the stage's temp folder.
            return {"report": os.path.join(self.folder.path(name), os.path.basename(written))}

        self._stage(name, report)
        if self.config.export_hf_each_round:
            self._export(f"round_{t}/export", self.models.policy_source(t))

    def _export(self, name: str, source: str) -> None:
        def work(folder: str) -> dict[str, Any]:
            self.models.ensure_loaded()
            params = host_tree(self.models.load(source))  # every process takes part
            info = {"hf_folder": os.path.join(self.folder.path(name), "hf")}
            if is_writer():
                export_hf_folder(params, self.models.model_config, os.path.join(folder, "hf"),
                                 self.models.tokenizer)
            return info

        self._stage(name, work)

    # ------------------------------------------------------------------ the loop
    def run(self) -> str:
        """Runs every incomplete stage; returns the run folder."""
        c = self.config
        _ = self.offline  # read and checked first: a bad row stops the run before any work
        self._eval("start", c.model.policy)
        if c.round0:
            self._round_zero()
        for t in range(1, c.rounds + 1):
            if c.method in ("dice", "llm_judge"):
                self._dice_round(t)
            # The baselines hold out round 0's pairs every round: none ever trains on the
            # pairs their evaluation (and DICE's reward check) uses.
            elif c.method == "offline_dpo":
                self._train(t, self._offline_split, self.models.reference_source(0))
            else:  # offline_dpo_new_ref: the same data, pi_theta(t-1) as the reference
                self._train(t, self._offline_split, None)
            self._finish_round(t)
        last = c.rounds if c.rounds else 0
        self._export("export", self.models.policy_source(last))
        self._summary()
        return self.folder.root

    def _summary(self) -> None:
        """`RUN_DIR/summary.md` (+ PNGs): every evaluated model of the run in Table 1's
        shape; `python -m dice_jax.report RUN_A RUN_B ...` compares several runs."""
        from dice_jax.report import write_report

        if self.config.eval.enabled and is_writer():
            write_report([self.folder.root], os.path.join(self.folder.root, "summary.md"))
