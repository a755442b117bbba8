"""Models built from a config with random weights: tiny ones for tests, full-size shapes for speed runs."""

from __future__ import annotations

import torch

# Shapes of Llama-family models. "smollm2-135m" is SmolLM2-135M's architecture (134.5M parameters).
LLAMA_SHAPES = {
    "tiny": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192),
}


def random_llama(shape: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0, tie_embeddings=True):
    """A LlamaForCausalLM of a named shape with random weights (needs the ``hf`` extra: transformers)."""
    if shape not in LLAMA_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}: choose one of {', '.join(LLAMA_SHAPES)}")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_SHAPES[shape], tie_word_embeddings=tie_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)
