"""What the benchmarks record about the machine: which results file a CPU's figures go to, and whether anything
else used the CPU while they were measured (benchmarks/bench.py); and that a timing helper leaves the policy as it
found it, and that the probes' patches compute what the modules they replace compute."""

import os
import sys
import time

import pytest

from benchmarks import bench


def test_cpu_load_between_counts_other_processes_and_steal_in_cores():
    start = bench.CpuTimes(wall=100.0, busy=50.0, steal=1.0, own=10.0)
    end = bench.CpuTimes(wall=110.0, busy=70.0, steal=1.5, own=25.0)  # 20 busy core-seconds, 15 of them ours
    assert bench.cpu_load_between(start, end) == {"other_processes_cores": 0.5, "steal_cores": 0.05, "over_s": 10.0}
    assert bench.cpu_load_between(None, end) == {}
    assert bench.cpu_load_between(end, end) == {}


def test_load_note_says_idle_only_below_a_tenth_of_a_core():
    idle = bench.load_note({"other_processes_cores": 0.04, "steal_cores": 0.0, "over_s": 60.0})
    busy = bench.load_note({"other_processes_cores": 0.1, "steal_cores": 0.2, "over_s": 60.0})
    assert idle.startswith("machine idle") and "steal" not in idle
    assert busy.startswith("measured under load") and "0.20 cores (steal)" in busy
    assert "unknown" in bench.load_note({})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_cpu_times_see_this_process_busy():
    start = bench.cpu_times()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    end = bench.cpu_times()
    own, busy, wall = end.own - start.own, end.busy - start.busy, end.wall - start.wall
    assert own >= 0.25  # os.times() counts 10 ms ticks
    assert busy >= own - 0.05  # the machine's busy time includes ours (10 ms ticks)
    assert busy <= wall * os.cpu_count() + 0.05


def test_cpu_results_file_names_the_instruction_set(monkeypatch):
    monkeypatch.setattr(bench, "cpu_name", lambda: "AMD EPYC")
    monkeypatch.setattr(bench, "cpu_isa", lambda: "avx512-bf16")
    assert bench.results_file("cpu") == "cpu-amd-epyc-avx512-bf16.json"
    monkeypatch.setattr(bench, "cpu_isa", lambda: "avx2")
    assert bench.results_file("cpu", "-x") == "cpu-amd-epyc-avx2-x.json"


def test_cpu_isa_agrees_with_the_dtype_choice():
    from ppo_core.model import cpu_has_native_bf16
    assert bench.cpu_isa() in ("amx", "avx512-bf16", "avx512", "avx2", "")
    assert cpu_has_native_bf16() == (bench.cpu_isa() in ("amx", "avx512-bf16"))


def test_forward_cost_times_a_tree_pass_with_backward_and_leaves_no_gradient_or_cast_hold():
    import torch

    from benchmarks.forward_cost import tree_pass_with_backward
    from ppo_core import LoraSettings, PolicyModel
    from ppo_core.testing import tiny_llama

    policy = PolicyModel(tiny_llama(seed=0, vocab_size=1024), adapters=("agent",), lora=LoraSettings(r=4, alpha=8),
                         compute_dtype=torch.bfloat16)
    fwd, bwd = tree_pass_with_backward(policy, 12, n=2)
    assert fwd > 0 and bwd > 0
    assert all(p.grad is None for p in policy.parameters())
    assert not policy._cast_holders
    level = torch.autocast_increment_nesting()  # the hold's nesting level was given back
    torch.autocast_decrement_nesting()
    assert level == 1


def test_g1_probes_patches_compute_what_the_modules_compute():
    """The patches benchmarks.g1_probes times are the same function as the modules they replace (tiny Llama with
    GQA, fp32, forward and LoRA gradients to 1e-5), so their timings compare like with like; the merged one also
    after the adapters change (its merged weight follows them)."""
    import types

    import torch
    import transformers.models.llama.modeling_llama as llama

    from benchmarks.g1_probes import _grouped_attention, _lora_node_forward, _merged_forward
    from ppo_core import LoraSettings, PolicyModel
    from ppo_core.testing import tiny_llama

    ids = torch.tensor([[3, 9, 4, 17, 5, 8, 21]])

    def run(patch, change=False):
        policy = PolicyModel(tiny_llama(seed=0, initializer_range=0.2), adapters=("agent",),
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0))
        policy.lm.config._attn_implementation = "eager"
        torch.manual_seed(1)
        for p in policy.trainable_parameters("agent"):
            torch.nn.init.normal_(p, std=0.1)  # LoRA B starts at 0: make the branch count
        eager = llama.eager_attention_forward
        if patch in ("lora-node", "merged"):
            for layer in policy._lora_layers:
                layer.forward = types.MethodType(_lora_node_forward if patch == "lora-node" else _merged_forward, layer)
        elif patch == "gqa":
            llama.eager_attention_forward = _grouped_attention
        try:
            if change:  # one pass first, then new adapter weights: the merged weight must be rebuilt
                policy.hidden_states(ids)
                with torch.no_grad():
                    for p in policy.trainable_parameters("agent"):
                        p.mul_(1.5)
            hidden, _ = policy.hidden_states(ids)
        finally:
            llama.eager_attention_forward = eager
        hidden.pow(2).sum().backward()
        return hidden.detach(), [p.grad for p in policy.trainable_parameters("agent")[:-2]]

    reference, reference_grads = run("none")
    for patch in ("lora-node", "gqa", "merged"):
        hidden, grads = run(patch)
        assert torch.allclose(hidden, reference, atol=1e-5, rtol=1e-5), patch
        assert all(torch.allclose(g, r, atol=1e-5, rtol=1e-5) for g, r in zip(grads, reference_grads)), patch
    reference, reference_grads = run("none", change=True)
    for patch in ("merged",):
        hidden, grads = run(patch, change=True)
        assert torch.allclose(hidden, reference, atol=1e-5, rtol=1e-5), patch
        assert all(torch.allclose(g, r, atol=1e-5, rtol=1e-5) for g, r in zip(grads, reference_grads)), patch
