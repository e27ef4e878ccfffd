"""Shared test helpers: tiny random HF models (PyTorch, reference only) and their logits,
running a worker script (`tests/workers/`) on simulated CPU devices, and the tiny run
(`configs/tiny.py`) as a command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(TESTS, "workers")
REPO = os.path.dirname(TESTS)
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.py")

LLAMA_KW = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers model in float32.

    kind: "llama" (GQA + llama3 RoPE scaling + tied embeddings), "llama_untied", or
    "mistral" (GQA + sliding window 5, shorter than the test sequences).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    if kind == "mistral":
        config = MistralConfig(**LLAMA_KW, sliding_window=5, rope_theta=10000.0)
        config.update(overrides)
        model = MistralForCausalLM(config)
    else:
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        config = LlamaConfig(**LLAMA_KW, rope_scaling=scaling if kind == "llama" else None,
                             rope_theta=500000.0 if kind == "llama" else 10000.0,
                             tie_word_embeddings=(kind == "llama"))
        config.update(overrides)
        model = LlamaForCausalLM(config)
    # Random norms so a wrong norm mapping cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval().float()


def save_hf(model, folder: str, **kw) -> str:
    model.save_pretrained(folder, **kw)
    return folder


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    ids = torch.tensor(input_ids, dtype=torch.long)
    mask = torch.tensor(attention_mask, dtype=torch.long)
    positions = torch.clamp(mask.cumsum(-1) - 1, min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


def padded_batch(vocab: int, lengths: list[int], total: int, left: list[bool],
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and a 0/1 mask: row i has lengths[i] real tokens, padded left or right."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for i, (n, is_left) in enumerate(zip(lengths, left)):
        sl = slice(total - n, total) if is_left else slice(0, n)
        ids[i, sl] = rng.integers(3, vocab, n)
        mask[i, sl] = 1
    return ids, mask


def gguf_path() -> str:
    from dice_jax.checkpoints import embedded_gguf_path

    path = embedded_gguf_path("smollm2")
    assert os.path.isfile(path)
    return path


def _start_on_cpu_devices(script: str, args: tuple, devices: int) -> subprocess.Popen:
    """`python tests/workers/SCRIPT ARGS...` with JAX on `devices` simulated CPU devices and
    tests/ importable (for `helpers`, `train_helpers`)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, os.path.join(WORKERS, script),
                             *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, script: str, timeout: float) -> dict:
    """The JSON object on the worker's last stdout line; fails the test with the stderr
    tail if it times out, exits non-zero or prints no JSON."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{script} ran past {timeout}s; stderr tail:\n{err[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{script} exited {proc.returncode}; stderr tail:\n{err[-3000:]}")
    lines = out.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"{script} printed no JSON last line; stdout tail:\n{out[-2000:]}\n"
                    f"stderr tail:\n{err[-2000:]}")


def run_on_cpu_devices(script: str, *args, devices: int = 8, timeout: float = 600) -> dict:
    """Runs `tests/workers/SCRIPT ARGS...` in a fresh Python on `devices` simulated CPU
    devices and returns the JSON object it prints as its last stdout line."""
    return _result(_start_on_cpu_devices(script, args, devices), script, timeout)


def run_processes_on_cpu_devices(script: str, *args, processes: int, devices: int,
                                 timeout: float = 300) -> list[dict]:
    """Runs `processes` copies of `tests/workers/SCRIPT PROCESS_ID ARGS...` at once, each on
    `devices` simulated CPU devices, and returns their JSON results in process order. Every
    copy is killed if one fails, so none is left waiting for its peers."""
    procs = [_start_on_cpu_devices(script, (i, *args), devices) for i in range(processes)]
    try:
        return [_result(p, script, timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def tiny_command(run_dir: str, *overrides: str) -> list[str]:
    """The command line of a quiet `configs/tiny.py` run into `run_dir`."""
    return [sys.executable, "-m", "dice_jax.train", f"--config={TINY_CONFIG}",
            f"--config.run_dir={run_dir}", "--quiet", *overrides]


def train_tiny(run_dir: str, *overrides: str, kill_at: str | None = None,
               term_at: str | None = None, check: bool = True
               ) -> subprocess.CompletedProcess:
    """`python -m dice_jax.train --config=configs/tiny.py` into `run_dir` on one CPU device
    (`kill_at` / `term_at`: fault injection, `DICE_JAX_KILL_AT` / `DICE_JAX_TERM_AT`).
    The runs compile the same programs: conftest's compilation cache (inherited through
    the environment) makes start-up most of a resumed run's time."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    if kill_at:
        env["DICE_JAX_KILL_AT"] = kill_at
    if term_at:
        env["DICE_JAX_TERM_AT"] = term_at
    proc = subprocess.run(tiny_command(run_dir, *overrides), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and kill_at is None and term_at is None:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
