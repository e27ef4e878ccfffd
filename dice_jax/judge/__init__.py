"""An offline, verifiable judge: built-in instruction prompts and their gold scores.

The paper judges with AlpacaEval 2 (a GPT-4 annotator), which needs network and paid
access. dice-jax instead pairs short base tasks (`tasks.py`) with IFEval's verifiable
instructions (the `if-verifiable` package's checkers) so that any response can be scored
anywhere, deterministically:

- `dice_jax.judge.prompts`: seeded train / eval prompt sets sharing no base task, JSONL
  io, and the CLI `python -m dice_jax.judge.prompts`.
- `dice_jax.judge.score`: the gold score of a response (fraction of its instructions
  followed, strict), set-level metrics, and chosen/rejected labelling of K responses.

Nothing is imported here, so `python -m dice_jax.judge.prompts` runs its module once.
"""
