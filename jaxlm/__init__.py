"""jaxlm: Llama-2 / Mistral / sparse-MoE language models in JAX + Flax NNX."""

__version__ = "0.1.0"
