"""Shared fixtures: tiny random causal LMs built from a config (milliseconds per PPO step)."""

import os

import pytest
import torch

from ppo_core.testing import tiny_llama, tiny_llama_config  # noqa: F401 - shared with the benchmarks

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_policy(seed: int = 0, adapters=("agent",), r: int = 8, lora_dropout: float = 0.0,
                value_head_dropout: float = 0.1, vocab_size: int = 64, initializer_range: float = 0.02):
    """A tiny Llama (ppo_core.testing) with LoRA adapters."""
    from ppo_core import LoraSettings, PolicyModel
    lm = tiny_llama(seed, vocab_size, initializer_range=initializer_range)
    torch.manual_seed(seed + 1)
    return PolicyModel(lm, adapters=adapters, lora=LoraSettings(r=r, alpha=2 * r, dropout=lora_dropout),
                       value_head_dropout=value_head_dropout)


def with_nonzero_lora(policy, seed: int = 0):
    """LoRA B starts at zero: random LoRA and value-head weights (every adapter, in order) make the adapters matter."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name in policy.adapter_names:
            for p in policy.trainable_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama saved to disk (for loading paths and 4-bit quantisation)."""
    path = tmp_path / "tiny-llama"
    tiny_llama(seed=0).save_pretrained(path)
    return str(path)


def assert_same_decisions(rows: list[dict], other: list[dict]) -> None:
    """Decision rows (games.csv, eval/decisions.csv) alike: every column equal but the probabilities p_c and p_d,
    equal to 1e-4 relative (two computations of one fp32 model)."""
    assert len(rows) == len(other) > 0
    for a, b in zip(rows, other):
        for key in a:
            if key in ("p_c", "p_d") and a[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), key
            else:
                assert a[key] == b[key], key


def random_queries(n: int, seed: int = 0, vocab_size: int = 64, min_len: int = 3, max_len: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (L,), generator=g) for L in lengths]


@pytest.fixture(autouse=True)
def _quiet_progress_bars(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _no_held_autocast_casts():
    """A test that fails between generate() and step() leaves its trainer holding autocast's weight casts
    (PolicyModel.hold_casts); do not let that leak into the next test."""
    yield
    for _ in range(torch.autocast_increment_nesting()):  # back to level 0
        torch.autocast_decrement_nesting()
    torch.clear_autocast_cache()


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer and chat template (read from the embedded GGUF file; no model weights)."""
    from transformers import AutoTokenizer
    from moral.embedded import cache_dir, gguf_path
    folder = tmp_path_factory.mktemp("tokenizer")
    converted = cache_dir()
    if os.path.isfile(os.path.join(converted, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(converted)
    else:
        path = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, chat_tokenizer_dir):
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer: a complete --model folder for run.py."""
    import shutil
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny-chat-model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in os.listdir(chat_tokenizer_dir):
        shutil.copy(os.path.join(chat_tokenizer_dir, name), folder)
    return str(folder)
