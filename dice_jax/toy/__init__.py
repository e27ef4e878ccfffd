"""The controlled task: a toy prompt/response language whose gold reward is known.

`gold` holds the `toy:` checkers the verifiable judge resolves, `language` the prompts,
responses and data sets (`toy:N` pairs, `toy:eval` prompts), `warmup` the start model
(`toy:PRESET` model sources: a random preset taught the base language, cached), and
`probe` the figures of fresh samples (gold reward, implicit-reward accuracy, length).
docs/toy_task.md describes the task.
"""
