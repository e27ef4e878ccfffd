"""DPO train-step throughput: dice-jax vs the same math in PyTorch transformers.

    python benchmarks/train_step.py [--steps 3] [--pairs 8] [--length 256]

Both sides: SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32), `pairs`
preference pairs of `length` tokens each (a 64-token prompt and a response filling the
rest), chosen and rejected in one forward pass, policy forward + backward, sigmoid DPO loss
on summed response log-probs against CACHED reference log-probs (computed once, outside the
timing), global-norm clipping 1.0, AdamW (weight decay 0). float32 throughout.

- dice-jax: the trainer's jitted step (`dice_jax.training`), one CPU device, with the
  trainer's default shared-prompt layout (each pair's prompt through the model once;
  `--no-shared-prompt` runs it twice, as the PyTorch side does).
- PyTorch: TRL's `concatenated_forward` math on the transformers model loaded with
  `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")`: full
  logits, float32 log-softmax, gather, mask; `torch.set_num_threads(<cores>)`.

Each side runs in its own worker process (as a user would run either framework: its
allocator, thread pools and 6-11 GiB of buffers do not share one address space with the
other's); the parent tells them to step in turn, never both at once, so background load
hits both alike. `--same-process` runs both sides in this process instead (the layout of
earlier measurements). The first step of each is a warm-up (compilation) and not
timed. Prints a table (median step, tokens/s, peak resident memory of the worker, or of the
one process with `--same-process`) and the ratio of medians. PyTorch is a benchmark-only
dependency; dice_jax itself never imports it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dice_jax.checkpoints import embedded_gguf_path, load_model
from dice_jax.models.presets import smollm2_135m
from dice_jax.sharding import DEFAULT_RULES, make_mesh
from dice_jax.training.config import TrainConfig
from dice_jax.training.data import build_pairs
from dice_jax.training.loop import compiled_steps, model_inputs
from dice_jax.training.state import init_train_state

PROMPT_TOKENS = 64


def make_data(pairs: int, length: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    triples = []
    for _ in range(pairs):
        prompt = rng.integers(3, vocab, PROMPT_TOKENS).tolist()
        chosen = rng.integers(3, vocab, length - PROMPT_TOKENS).tolist()
        rejected = rng.integers(3, vocab, length - PROMPT_TOKENS).tolist()
        triples.append((prompt, chosen, rejected))
    data, _ = build_pairs(triples, max_length=length, max_prompt_length=PROMPT_TOKENS,
                          pad_to_multiple=length)
    return data


class JaxSide:
    def __init__(self, loaded, data, cfg: TrainConfig) -> None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        optimizer, shardings, self.step, _, logps = compiled_steps(
            loaded.config, cfg, mesh, tuple(DEFAULT_RULES))
        lengths = data.split_lengths() if cfg.shared_prompt else None
        batch = {k: jnp.asarray(v) for k, v in model_inputs(data, lengths).items()}
        ref, _ = logps(loaded.params, batch)  # cached reference log-probs (policy = ref)
        self.state = init_train_state(loaded.params, optimizer, shardings)
        self.batch = {k: v[None] for k, v in batch.items()}
        self.batch["ref_logps"] = jnp.asarray(ref)[None]

    def run(self) -> float:
        self.state, metrics = self.step(self.state, self.batch)
        return float(metrics["loss"])


class TorchSide:
    """TRL's concatenated-forward DPO step on a transformers model: the embedded SmolLM2 in
    float32 on the CPU by default; `benchmarks/gpu.py` passes its own `model` (already on
    `device`) and `autocast=torch.bfloat16` (bf16 compute, float32 master weights)."""

    def __init__(self, data, cfg: TrainConfig, threads: int, model=None, device: str = "cpu",
                 autocast=None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch, self.beta, self.device, self.autocast = torch, cfg.beta, device, autocast
        if model is None:
            path = embedded_gguf_path("smollm2")
            model = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32")
        self.model = model
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           betas=(cfg.adam_b1, cfg.adam_b2),
                                           eps=cfg.adam_eps, weight_decay=0.0)
        self.max_norm = cfg.max_grad_norm
        n = len(data)
        flat = lambda a: torch.tensor(np.concatenate([a[:, 0], a[:, 1]]), device=device)  # noqa: E731
        self.ids = flat(data.input_ids).long()
        self.mask = flat(data.attention_mask).long()
        self.loss_mask = flat(data.loss_mask)[:, 1:].float()
        self.n = n
        with torch.no_grad():
            self.ref = self.logps()

    def logps(self):
        torch = self.torch
        with torch.autocast(self.device.split(":")[0], dtype=self.autocast,
                            enabled=self.autocast is not None):
            logits = self.model(input_ids=self.ids, attention_mask=self.mask).logits.float()
        logp = torch.gather(logits[:, :-1].log_softmax(-1), 2, self.ids[:, 1:, None])[..., 0]
        return (logp * self.loss_mask).sum(-1)

    def run(self) -> float:
        torch = self.torch
        logps = self.logps()
        ratio = logps - self.ref
        h = ratio[:self.n] - ratio[self.n:]
        loss = -torch.nn.functional.logsigmoid(self.beta * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def build_side(kind: str, args: argparse.Namespace):
    """The side `kind` ("jax" or "torch") on the benchmark's data (`make_data`, seeded, so
    both workers build the same batch) and the token count of that batch."""
    loaded = load_model("embedded:smollm2", with_tokenizer=False) if kind == "jax" else None
    cfg = TrainConfig(learning_rate=5e-7, batch_size=args.pairs, max_length=args.length,
                      max_prompt_length=PROMPT_TOKENS, logits_chunk=args.logits_chunk,
                      shared_prompt=not args.no_shared_prompt)
    data = make_data(args.pairs, args.length, smollm2_135m().vocab_size)  # no weights needed
    side = JaxSide(loaded, data, cfg) if kind == "jax" else TorchSide(data, cfg, args.threads)
    return side, int(data.attention_mask.sum())


class LocalSide:
    """A side in this process (`--same-process`, and inside each worker): `run` answers
    (seconds, loss); `close` the peak resident memory in GiB of the whole process."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        self.side, self.tokens = build_side(kind, args)

    def run(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = self.side.run()
        return time.perf_counter() - t0, loss

    def close(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _worker(kind: str, args: argparse.Namespace, conn) -> None:
    """A side in its own process: steps when the parent says so."""
    side = LocalSide(kind, args)
    conn.send(side.tokens)
    while conn.recv() == "step":
        conn.send(side.run())
    conn.send(side.close())


class WorkerSide:
    """The parent's handle on a side running in a spawned worker process (`LocalSide`'s
    interface)."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(kind, args, child))
        self.process.start()
        self.tokens = self.conn.recv()

    def run(self) -> tuple[float, float]:
        self.conn.send("step")
        return self.conn.recv()

    def close(self) -> float:
        self.conn.send("stop")
        peak = self.conn.recv()
        self.process.join()
        return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--logits-chunk", type=int, default=TrainConfig.logits_chunk)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--no-shared-prompt", action="store_true",
                        help="run each pair's prompt twice, as PyTorch does (dice-jax side)")
    parser.add_argument("--same-process", action="store_true",
                        help="both sides in this process, not one worker process each")
    args = parser.parse_args(argv)

    kinds = {"dice-jax (XLA CPU)": "jax", "PyTorch transformers": "torch"}
    if args.skip_torch:
        kinds.pop("PyTorch transformers")
    make = LocalSide if args.same_process else WorkerSide
    sides = {name: make(kind, args) for name, kind in kinds.items()}
    tokens = {side.tokens for side in sides.values()}
    if len(tokens) != 1:
        raise RuntimeError(f"the sides built different batches: {tokens} tokens")
    tokens = tokens.pop()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.steps + 1):
        for name, side in sides.items():
            seconds, loss = side.run()
            if i:
                times[name].append(seconds)
            print(f"  {name}: step {i} {'(warm-up) ' if not i else ''}{seconds:.2f} s, "
                  f"loss {loss:.6f}", flush=True)
    peaks = {name: side.close() for name, side in sides.items()}
    layout = "one process" if args.same_process else "one worker process per side"
    print(f"\nDPO train step, SmolLM2-135M float32, {args.pairs} pairs x {args.length} tokens "
          f"({tokens} tokens/step), {os.cpu_count()} CPU cores, jax {jax.__version__}, "
          f"{layout}, load average {os.getloadavg()[0]:.2f}")
    print(f"| {'implementation':<22} | median step (s) | tokens/s | peak RSS (GiB) | steps (s) |")
    print(f"|{'-' * 24}|-----------------|----------|----------------|-----------|")
    medians = {}
    for name, ts in times.items():
        medians[name] = statistics.median(ts)
        print(f"| {name:<22} | {medians[name]:15.2f} | {tokens / medians[name]:8.1f} | "
              f"{peaks[name]:14.2f} | {', '.join(f'{t:.1f}' for t in ts)} |")
    if len(medians) == 2:
        jax_t, torch_t = medians.values()
        print(f"\nspeed ratio dice-jax / PyTorch (tokens/s): {torch_t / jax_t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
