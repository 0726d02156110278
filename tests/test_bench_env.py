"""What the benchmarks record about the machine: which results file a CPU's figures go to, and whether anything
else used the CPU while they were measured (benchmarks/bench.py); and that a timing helper leaves the policy as it
found it."""

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
