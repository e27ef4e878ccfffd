"""A random tiny model for smoke tests (about a minute on a 2-core CPU, no network).

Round 0 trains the random `tiny` preset on 48 synthetic preference pairs (so pi_theta(0)
differs from its reference), then two DICE rounds sample K=4 responses to 24 prompts,
score them, build D(alpha*) with replay and train a few steps. Numbers mean nothing; the
run exercises every stage, artifact and the resume logic.
"""

from dice_jax.config import RunConfig


def get_config():
    c = RunConfig()
    c.run_dir = "runs/tiny"
    c.model.policy = "random:tiny"
    c.round0 = True
    c.rounds = 2
    c.data.offline = "synthetic:48"          # 48 toy pairs (dice_jax.data)
    c.data.eval_pairs = 8
    c.sampling.num_samples = 4
    c.sampling.max_new_tokens = 24
    c.sampling.max_prompt_tokens = 128
    c.sampling.cache_budget_gb = 0.25
    c.dice.filters.min_chars = 0
    c.dice.filters.min_valid = 2
    c.dice.filters.drop_truncated = False    # a random model rarely stops by itself
    c.dice.score_batch_size = 16
    c.dice.search.num_trials = 16
    c.train.max_steps = 4
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.max_length = 192
    c.train.max_prompt_length = 128
    c.train.eval_every = 2
    c.train.save_every = 2
    c.eval.num_prompts = 8
    c.eval.max_new_tokens = 16
    return c
