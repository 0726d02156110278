"""CPU benchmark (a): a 2-layer, hidden-64 Llama with LoRA: one generation call and one PPO step, with the fused
rollout (the sampling pass is the loss's forward pass) and without it (no-grad sampling, recomputed forward)."""

import time

import pytest
import torch

from benchmarks import bench
from ppo_core.testing import tiny_llama_config

pytestmark = pytest.mark.cpu_benchmark

WARMUP, MEASURED = 3, 20


def test_tiny_llama_generation_call_and_ppo_step(cpu_record):
    from transformers import LlamaForCausalLM

    from ppo_core import LoraSettings, PolicyModel, PPOTrainer

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(vocab_size=64)).eval()
    policy = PolicyModel(lm, adapters=("agent",), lora=LoraSettings(r=8, alpha=16, dropout=0.05))
    queries = bench.random_prompt_pool(5, 32, 64, "cpu", seed=1)
    timings, flags = {}, {}
    for fused in (True, False):
        trainer = PPOTrainer(bench.ppo_config(5, fuse_rollout=fused), policy, "agent")
        gen, step = [], []
        for i in range(WARMUP + MEASURED):
            t = time.perf_counter()
            rollout = trainer.generate(queries, max_new_tokens=2)
            t_gen = time.perf_counter() - t
            t = time.perf_counter()
            stats = trainer.step(queries, rollout.responses, [0.0, 3.0, -3.0, 0.0, -6.0])
            t_step = time.perf_counter() - t
            assert torch.isfinite(torch.tensor(stats["ppo/loss/total"]))
            if i >= WARMUP:
                gen.append(t_gen)
                step.append(t_step)
        label = "fused" if fused else "unfused"
        flags[label] = stats["ppo/fused_rollout"]
        timings[f"generation_call_{label}"] = bench.spread(gen)
        timings[f"ppo_step_{label}"] = bench.spread(step)
    assert flags == {"fused": 1.0, "unfused": 0.0}
    cpu_record["tiny_llama"] = {
        "model": "Llama 2 layers, hidden 64, vocab 64 (random weights)", "dtype": "fp32", "lora_r": 8,
        "queries": 5, "query_len": 32, "gen_len": 2, "warmup": WARMUP, "timings_s": timings,
        "notes": "one generate call on 5 queries (2 tokens each), then one PPO step on those 5 samples"}
