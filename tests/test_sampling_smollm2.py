"""The sampler on SmolLM2-135M-Instruct (embedded GGUF): chat-template tokens, greedy parity
with transformers' own GGUF load, end-of-turn stopping and the returned log-probs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import gguf_path

from dice_jax.checkpoints import load_model
from dice_jax.models.decoder import Decoder, positions_from_mask
from dice_jax.sampling import Sampler, SamplingConfig

PROMPTS = [
    "What is the capital of France?",
    [{"role": "system", "content": "You are a terse assistant. Answer in one short sentence."},
     {"role": "user", "content": "Name a primary colour."}],
    "Write a short poem about the sea, the wind and an old lighthouse keeper who has "
    "watched the ships come and go for fifty years.",
    "Hi there, how are you today?",
]


@pytest.fixture(scope="module")
def smollm2():
    model = load_model("embedded:smollm2")
    return model, Sampler(model.params, model.config, model.tokenizer)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32").eval()


def as_messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def test_prompts_use_the_chat_template_once(smollm2):
    model, sampler = smollm2
    tok = model.tokenizer
    for i, prompt in enumerate(PROMPTS):
        ids = sampler.encode(prompt, i)
        text = tok.apply_chat_template(as_messages(prompt), tokenize=False,
                                       add_generation_prompt=True)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert text.endswith("<|im_start|>assistant\n")
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") != ids[1]


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_greedy_matches_transformers(smollm2, reference, engine):
    model, sampler = smollm2
    rows = [sampler.encode(p, i) for i, p in enumerate(PROMPTS)]
    assert len({len(r) for r in rows}) == len(rows)  # all lengths differ
    # min_bucket=64: all prompts in one batch (and one program), as in a real run. The
    # continuous engine: 2 slots, so the queue refills them as rows finish.
    result = sampler.sample(PROMPTS, SamplingConfig(
        max_new_tokens=40, temperature=0.0, min_bucket=64, progress=False,
        max_slots=2 if engine == "continuous" else None), engine=engine)
    assert result.num_batches == 1 if engine == "static" else result.slot_steps > 0
    total = max(map(len, rows))
    ids = np.full((len(rows), total), 2, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, total - len(r):] = r
        mask[i, total - len(r):] = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small batch; one thread is as fast and robust to a busy CPU
    try:
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor(ids),
                                     attention_mask=torch.tensor(mask), do_sample=False,
                                     max_new_tokens=40, eos_token_id=2,
                                     pad_token_id=2)[:, total:].tolist()
    finally:
        torch.set_num_threads(threads)
    for (sample,), ref in zip(result.samples, out):
        expected = ref[:ref.index(2) + 1] if 2 in ref else ref
        assert sample.token_ids.tolist() == expected
        assert sample.text == model.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "Paris" in result.samples[0][0].text
    assert max(s[0].length for s in result.samples) >= 32


def test_samples_stop_at_end_of_turn_with_policy_logprobs(smollm2):
    model, sampler = smollm2
    cfg = SamplingConfig(num_samples=3, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0,
                         min_bucket=64, progress=False)
    result = sampler.sample(PROMPTS[:2], cfg)
    samples = [s for group in result.samples for s in group]
    assert {s.finish_reason for s in samples} >= {"stop"}
    for s in samples:
        ids = s.token_ids.tolist()
        assert (ids[-1] == 2) == (s.finish_reason == "stop") and 2 not in ids[:-1]
        assert "<|im_end|>" not in s.text and s.text == s.text.strip() and s.text
        assert s.length == len(s.logprobs) == (len(ids) if s.finish_reason == "stop" else 32)
    assert len({s.text for s in samples}) > 2
    # The log-probs equal a full forward pass over prompt + response (untempered).
    rows = [sampler.encode(p, i) for i, p in enumerate(PROMPTS[:2])]
    pairs = [(rows[s.prompt_index], s.token_ids.tolist()) for s in samples]
    total = max(len(p) + len(r) for p, r in pairs)
    ids = np.full((len(pairs), total), 2, np.int32)
    mask = np.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = p + r
        mask[i, :len(p) + len(r)] = 1
    # Parameters as an argument, not closed over: XLA would fold 135M constants in.
    logp = np.asarray(jax.jit(lambda prm, i, m: jax.nn.log_softmax(Decoder(model.config).apply(
        {"params": prm}, i, positions_from_mask(m), m).astype(jnp.float32), -1))(
        model.params, jnp.asarray(ids), jnp.asarray(mask)))
    for row, (s, (p, r)) in enumerate(zip(samples, pairs)):
        ref = logp[row, np.arange(len(p) - 1, len(p) + len(r) - 1), r]
        assert np.max(np.abs(s.logprobs - ref)) <= 1e-4
