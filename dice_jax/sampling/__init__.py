"""Sampling K responses per prompt from a policy, with the policy's own token log-probs."""

from dice_jax.sampling.config import SamplingConfig
from dice_jax.sampling.distributions import Distribution
from dice_jax.sampling.results import Sample, SamplingResult
from dice_jax.sampling.sampler import Sampler, sampling_param_shardings

__all__ = ["Distribution", "Sample", "Sampler", "SamplingConfig", "SamplingResult",
           "sampling_param_shardings"]
