"""Reference scoring throughput: dice-jax's scorer vs the same math in PyTorch transformers.

    python benchmarks/scoring.py [--prompts 32] [--k 4] [--reps 2] [--batch-size 16]
                                 [--whole] [--padded] [--torch-sorted]

Both sides: SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32), the same
`prompts x k` sequences of 136-264 tokens (about 200 on average; a 32-96-token prompt per
prompt, K responses filling the rest; random ids), the summed float32 log-prob of each
response under the model, `batch_size` sequences per forward. Throughput is scored tokens
per second: prompt + response tokens of every sequence (padding not counted; a prompt counts
once per response, as both sides deliver one score per (prompt, response)).

- dice-jax: `dice_jax.training.scoring.sequence_scores`, the reference forward of
  `score_samples`, with its defaults: each prompt runs once and its K responses attend to
  its KV cache; responses sorted by length, padded to `bucket_length` (multiples of
  32 up to 256, of 64 up to 512) for attention, while the weight matmuls and the
  vocabulary projection run on the packed real tokens only (`models.packing`); float32
  log-softmax chunked. One CPU device. `--whole` adds a row
  with `share_prompts=False` (every row a whole prompt + response, `sequence_logprobs`),
  `--padded` one with `pack_tokens=False` (every matmul on the padded rows).
- PyTorch: TRL's reference log-prob math (`get_batch_logps`) on
  `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")` under
  `torch.no_grad()`: batches in dataset order, right-padded to the batch's longest row,
  full logits, float32 log-softmax, gather, mask, sum; `torch.set_num_threads(<threads>)`.
  `--torch-sorted` adds a row fed dice-jax's length-sorted, bucketed batches.

Each side runs once untimed first (compilation for dice-jax); then repetitions alternate
between the sides so background load hits all alike. Prints a table, the ratios of median
wall time and of median process CPU time (less sensitive to other jobs on a shared
machine), and the largest difference between the sides' scores. PyTorch is a benchmark-only
dependency; dice_jax itself never imports it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

from dice_jax.checkpoints import embedded_gguf_path, load_model
from dice_jax.models.packing import packed_capacity
from dice_jax.training.scoring import plan_batches, plan_prompt_groups, sequence_scores

Rows = tuple[list[list[int]], list[int], list[list[int]]]  # prompts, prompt index, responses


def make_rows(prompts: int, k: int, vocab: int, seed: int = 0) -> Rows:
    """`prompts` prompts of 32-96 tokens and K responses each; prompt + response in
    [136, 264] tokens (mean 200). Response n continues prompt `index[n] = n // k`."""
    rng = np.random.default_rng(seed)
    prompt_ids, index, responses = [], [], []
    for p in range(prompts):
        prompt_ids.append(rng.integers(3, vocab, int(rng.integers(32, 97))).tolist())
        for _ in range(k):
            total = int(rng.integers(136, 265))
            index.append(p)
            responses.append(rng.integers(3, vocab, total - len(prompt_ids[p])).tolist())
    return prompt_ids, index, responses


class JaxSide:
    def __init__(self, loaded, rows: Rows, batch_size: int, share_prompts: bool,
                 pack_tokens: bool = True) -> None:
        self.params, self.config = loaded.params, loaded.config
        self.prompts, self.index, self.responses = rows
        self.batch_size, self.share, self.pack = batch_size, share_prompts, pack_tokens

    def run(self) -> np.ndarray:
        return sequence_scores(self.params, self.config, self.prompts, self.responses,
                               self.index, batch_size=self.batch_size,
                               share_prompts=self.share, pack_tokens=self.pack,
                               progress=False)[0]

    def computed_tokens(self) -> int:
        """Token positions through the decoder's weight matmuls, padding included."""
        if not self.share:
            lengths = [len(self.prompts[i]) + len(r) for i, r in zip(self.index,
                                                                      self.responses)]
            return sum(self.batch_size * w for w, _ in plan_batches(lengths, self.batch_size))
        groups = plan_prompt_groups([len(p) for p in self.prompts], self.index,
                                    self.batch_size)
        total = 0
        for size, width, members, rows in groups:
            real = sum(len(self.prompts[i]) for i in members)
            total += packed_capacity(real) if self.pack else size * width
            lengths = [len(self.responses[n]) for n in rows]
            for w, picked in plan_batches(lengths, self.batch_size):
                real = sum(lengths[j] for j in picked)
                total += packed_capacity(real) if self.pack else self.batch_size * w
        return total


class TorchSide:
    def __init__(self, rows: Rows, batch_size: int, threads: int,
                 sorted_batches: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        path = embedded_gguf_path("smollm2")
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32").eval()
        prompts, index, self.responses = rows
        self.prompts = [prompts[i] for i in index]  # TRL rows: prompt + response each
        n = len(self.prompts)
        if sorted_batches:  # dice-jax's whole-sequence batches: sorted, bucketed
            lengths = [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]
            self.batches = plan_batches(lengths, batch_size)
        else:  # TRL: dataset order, padded to the batch's longest row
            self.batches = [(None, list(range(s, min(s + batch_size, n))))
                            for s in range(0, n, batch_size)]

    def _batch(self, width: int | None, indices: list[int]):
        torch = self.torch
        rows = [self.prompts[i] + self.responses[i] for i in indices]
        width = width or max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, i in enumerate(indices):
            p, y = len(self.prompts[i]), len(self.responses[i])
            ids[r, :p + y] = torch.tensor(rows[r])
            mask[r, :p + y] = 1
            labels[r, p:p + y] = torch.tensor(self.responses[i])
        return ids, mask, labels

    def logps(self, ids, mask, labels):
        """TRL `get_batch_logps`: shift, float32 log-softmax of the full logits, gather,
        mask, sum."""
        torch = self.torch
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        labels = labels[:, 1:].clone()
        logits = logits[:, :-1, :]
        loss_mask = labels != -100
        labels[labels == -100] = 0
        per_token = torch.gather(logits.log_softmax(-1), dim=2,
                                 index=labels.unsqueeze(2)).squeeze(2)
        return (per_token * loss_mask).sum(-1)

    def run(self) -> np.ndarray:
        out = np.zeros(len(self.prompts), np.float32)
        with self.torch.no_grad():
            for width, indices in self.batches:
                out[indices] = self.logps(*self._batch(width, indices)).numpy()
        return out

    def computed_tokens(self) -> int:
        return sum(len(idx) * (w or max(len(self.prompts[i]) + len(self.responses[i])
                                        for i in idx)) for w, idx in self.batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--whole", action="store_true",
                        help="also time dice-jax without prompt sharing")
    parser.add_argument("--padded", action="store_true",
                        help="also time dice-jax with prompt sharing but padded tokens")
    parser.add_argument("--torch-sorted", action="store_true",
                        help="also time PyTorch on dice-jax's length-sorted batches")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args(argv)

    loaded = load_model("embedded:smollm2", with_tokenizer=False)
    rows = make_rows(args.prompts, args.k, loaded.config.vocab_size)
    prompts, index, responses = rows
    tokens = sum(len(prompts[i]) + len(r) for i, r in zip(index, responses))
    sides: dict[str, JaxSide | TorchSide] = {
        "dice-jax": JaxSide(loaded, rows, args.batch_size, share_prompts=True)}
    if args.padded:
        sides["dice-jax, padded tokens"] = JaxSide(loaded, rows, args.batch_size, True, False)
    if args.whole:
        sides["dice-jax, no prompt sharing"] = JaxSide(loaded, rows, args.batch_size, False)
    if not args.skip_torch:
        sides["PyTorch transformers"] = TorchSide(rows, args.batch_size, args.threads)
        if args.torch_sorted:
            sides["PyTorch, sorted batches"] = TorchSide(rows, args.batch_size, args.threads,
                                                         sorted_batches=True)
    first = {}
    for name, side in sides.items():
        t0 = time.perf_counter()
        side.run()
        first[name] = time.perf_counter() - t0
        print(f"  {name}: first run (untimed; compiles) {first[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    scores: dict[str, np.ndarray] = {}
    for i in range(args.reps):
        for name, side in sides.items():
            t0, c0 = time.perf_counter(), time.process_time()
            scores[name] = side.run()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  {name}: repetition {i + 1} {times[name][-1]:.1f} s, CPU "
                  f"{cpu[name][-1]:.1f} s ({tokens / times[name][-1]:.0f} tokens/s)",
                  flush=True)
    print(f"\nReference scoring, SmolLM2-135M float32, {len(responses)} sequences "
          f"({args.prompts} prompts x K={args.k}, 136-264 tokens, {tokens} tokens), batch "
          f"{args.batch_size}, {os.cpu_count()} CPU cores, jax {jax.__version__}, load "
          f"average {os.getloadavg()[0]:.2f}")
    print(f"| {'implementation':<28} | median (s) | tokens/s | median CPU (s) | computed "
          "tokens | first run (s) | repetitions (s) |")
    print(f"|{'-' * 30}|------------|----------|----------------|-----------------|"
          "---------------|-----------------|")
    medians, cpu_medians = {}, {}
    for name, ts in times.items():
        medians[name] = statistics.median(ts)
        cpu_medians[name] = statistics.median(cpu[name])
        print(f"| {name:<28} | {medians[name]:10.1f} | {tokens / medians[name]:8.1f} | "
              f"{cpu_medians[name]:14.1f} | {sides[name].computed_tokens():15d} | "
              f"{first[name]:13.1f} | {', '.join(f'{t:.1f}' for t in ts)} |")
    names = list(medians)
    print()
    for other in names[1:]:
        diff = float(np.max(np.abs(scores[names[0]] - scores[other])))
        print(f"speed ratio dice-jax / {other}: {medians[other] / medians[names[0]]:.2f}x "
              f"(tokens/s, median wall time), {cpu_medians[other] / cpu_medians[names[0]]:.2f}x "
              f"(CPU time); max |score difference| {diff:.2e} (scores around "
              f"{float(np.mean(scores[names[0]])):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
