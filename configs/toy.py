"""The controlled task: DICE where the true reward is known (docs/toy_task.md).

A tiny random model is warmed up on a toy language (`model.policy = "toy:tiny"`, cached
after the first run), round 0 trains it with DPO on pairs labelled by the gold reward
(`data.offline = "toy:128"`), then DICE rounds label the policy's own samples with its
implicit reward. The verifiable judge checks the gold rules, so summary.md's instruction
accuracy is the mean gold reward of each model's responses to held-out prompts.
"""

from dice_jax.config import RunConfig


def get_config():
    c = RunConfig()
    c.run_dir = "runs/toy"
    c.model.policy = "toy:tiny"              # random:tiny taught the toy language (cached)
    c.round0 = True                          # DPO on the gold-labelled pairs first
    c.rounds = 2
    c.data.offline = "toy:128"               # 128 gold-labelled pairs, one per prompt
    c.data.eval_pairs = 16                   # held out: the guard's accuracy check
    c.sampling.num_samples = 8
    c.sampling.temperature = 1.0
    c.sampling.top_p = 0.9                   # at 1.0 rare off-language bytes slip in, and
                                             # the implicit reward favours them (docs)
    c.sampling.max_new_tokens = 24
    c.sampling.max_prompt_tokens = 64
    c.sampling.cache_budget_gb = 0.25
    c.dice.filters.min_chars = 0             # short responses are the task's bad examples
    c.dice.filters.min_valid = 2
    c.dice.search.num_trials = 16
    c.train.beta = 0.1
    c.train.learning_rate = 3e-4
    c.train.max_steps = 20
    c.train.batch_size = 16
    c.train.max_length = 64
    c.train.max_prompt_length = 48
    c.train.pad_to_multiple = 16
    c.train.eval_every = 10
    c.train.save_every = 10
    c.eval.prompts = "toy:eval"
    c.eval.num_prompts = 64
    c.eval.max_new_tokens = 24
    return c
