"""DICE vs the paper's baselines on SmolLM2-135M-Instruct, judged by the verifiable judge.

    python benchmarks/dice_smollm2.py --size cpu [--out runs/bench_cpu]
    python benchmarks/dice_smollm2.py --size gpu [--out runs/bench_gpu]   # ~2,000 prompts, K=16

Runs, with one shared round 0 (offline DPO on the built-in preference data from
SmolLM2-135M-Instruct, which is the reference), two further rounds of each method:

    dice                  Algorithm 1 (implicit reward, alpha*, replay gamma = 0.5)
    offline_dpo           DPO on D_offline again, fixed reference pi_ref(0)
    offline_dpo_new_ref   DPO on D_offline again, reference pi_theta(t-1)
    llm_judge             the policy rates its own samples (Yuan et al. prompt), no shaping

The first run (DICE) computes `start/` and `round_0/`; the others start from copies of
those stages, so every method continues from the same round-0 model. At the end the
script prints the Table-1-shaped comparison (also in OUT/report.md) and the differences
the paper's claim is about: DICE iter 2 against the round-0 model and against offline DPO
iter 2, in prompt-level accuracy and mean length. Every run folder resumes if the script is
started again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from dice_jax.report import write_report
from dice_jax.run.folder import seed_stages

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
METHODS = ("dice", "offline_dpo", "offline_dpo_new_ref", "llm_judge")
SHARED = ("start/eval", "round_0/train", "round_0/eval")

SIZES = {
    # Reduced so that four methods x two rounds fit a 2-core CPU.
    "cpu": ["--config.data.max_prompts=32", "--config.sampling.num_samples=4",
            "--config.sampling.max_new_tokens=96", "--config.train.max_steps=8",
            "--config.train.batch_size=4", "--config.eval.num_prompts=32",
            "--config.eval.max_new_tokens=160", "--config.dice.judge_max_new_tokens=48"],
    # Sized for one H100-class GPU (not yet measured there).
    "gpu": ["--config.data.max_prompts=2000", "--config.sampling.num_samples=16",
            "--config.sampling.max_new_tokens=256", "--config.sampling.cache_budget_gb=24",
            "--config.dice.filters.min_valid=8", "--config.dice.score_batch_size=128",
            "--config.train.max_steps=60", "--config.train.batch_size=32",
            "--config.train.max_length=512", "--config.train.learning_rate=2e-6",
            "--config.eval.num_prompts=256", "--config.eval.max_new_tokens=256",
            "--config.dice.judge_max_new_tokens=64"],
}


def run_method(method: str, out: str, size: str, seed_from: str | None) -> float:
    run_dir = os.path.join(out, method)
    if seed_from and not os.path.exists(os.path.join(run_dir, "manifest.json")):
        seed_stages(seed_from, run_dir, SHARED)
    cmd = [sys.executable, "-m", "dice_jax.train", f"--config={REPO}/configs/smollm2.py",
           f"--config.run_dir={run_dir}", f"--config.method={method}", "--config.rounds=2",
           *SIZES[size]]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    error = run_forwarding_stderr(cmd)
    if error is not None:
        raise MethodFailed(error)
    return time.perf_counter() - start


class MethodFailed(RuntimeError):
    """A method's run exited non-zero; the message is its `error:` line."""


def run_forwarding_stderr(cmd: list[str]) -> str | None:
    """Runs `cmd`, passing its stderr through (progress bars included); returns None on
    success, else the child's last `error:` line (or its exit status)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE)
    tail = b""
    while chunk := os.read(proc.stderr.fileno(), 65536):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-16384:]
    if proc.wait() == 0:
        return None
    lines = [ln for ln in tail.decode(errors="replace").splitlines()
             if ln.startswith("error:")]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def greedy(run_dir: str, stage: str) -> dict[str, float]:
    with open(os.path.join(run_dir, stage, "eval", "metrics.json")) as f:
        return json.load(f)["greedy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    out = os.path.abspath(args.out or f"runs/bench_{args.size}")
    methods = [m for m in args.methods.split(",") if m]
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    first = None
    for method in methods:
        # A method that cannot run at this scale (e.g. a 135M policy that never writes a
        # parseable "Score: N" as LLM judge) is reported as such; the others still run.
        try:
            seconds[method] = run_method(method, out, args.size, first)
        except MethodFailed as err:
            failed[method] = str(err)
            print(f"{method} FAILED: {err}", flush=True)
        first = first or os.path.join(out, methods[0])
    text = write_report([os.path.join(out, m) for m in seconds], os.path.join(out, "report.md"))
    print(text)
    print("| method | wall time this invocation (s) |\n|---|---|")
    for method, s in seconds.items():
        print(f"| {method} | {s:.0f} |")
    for method, err in failed.items():
        print(f"| {method} | failed: {err} |")
    if "dice" in seconds:
        dice_dir = os.path.join(out, "dice")
        dice2, round0 = greedy(dice_dir, "round_2"), greedy(dice_dir, "round_0")
        print(f"\nDICE iter 2 vs round-0 model: prompt-level strict "
              f"{dice2['prompt_level_strict'] - round0['prompt_level_strict']:+.3f}, "
              f"mean length {dice2['mean_length'] - round0['mean_length']:+.0f} chars")
        if "offline_dpo" in seconds:
            off2 = greedy(os.path.join(out, "offline_dpo"), "round_2")
            print(f"DICE iter 2 vs offline DPO iter 2: prompt-level strict "
                  f"{dice2['prompt_level_strict'] - off2['prompt_level_strict']:+.3f}, "
                  f"mean length {dice2['mean_length'] - off2['mean_length']:+.0f} chars")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
