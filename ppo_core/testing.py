"""Tiny random causal LMs for tests and benchmarks (milliseconds per PPO step; nothing downloaded).

    from ppo_core.testing import tiny_llama
    policy = PolicyModel(tiny_llama(seed=0), adapters=("agent",), lora=LoraSettings(r=8, alpha=16))
"""

from __future__ import annotations

import torch


def tiny_llama_config(vocab_size: int = 64, layers: int = 2, initializer_range: float = 0.02):
    """A Llama with hidden size 64, 4 attention heads (2 key/value heads) and `layers` layers."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=initializer_range)


def tiny_llama(seed: int = 0, vocab_size: int = 64, layers: int = 2, initializer_range: float = 0.02):
    """tiny_llama_config's model with random weights from torch.manual_seed(seed), in eval mode.

    initializer_range=0.02 (the Hugging Face default) gives nearly uniform next-token distributions whose logits
    cannot move far (RMSNorm bounds the hidden state); 0.2 gives a head that can."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size, layers, initializer_range)).eval()
