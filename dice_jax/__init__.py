"""dice-jax: DICE (Bootstrapping Language Models with DPO Implicit Rewards) in pure JAX."""

__version__ = "0.1.0"
