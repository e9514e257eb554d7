"""priming-jax: Priming (Transformer -> attention/SSM hybrid) in JAX and Flax NNX."""

from priming_jax.checkpoint import load, load_tokenizer, save
from priming_jax.config import ModelConfig

__all__ = ["ModelConfig", "load", "load_tokenizer", "save"]
