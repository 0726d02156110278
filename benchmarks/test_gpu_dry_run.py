"""The GPU half's code, run on the CPU with a tiny Gemma-2 (4-bit NF4 through bitsandbytes' CPU backend), the FLOP
model checked against PyTorch's own FLOP counter, and the --gpu option's failure without CUDA."""

import json
import os
import random
import subprocess
import sys
import tempfile
from collections import defaultdict

import pytest
import torch

from benchmarks import bench, gpu_suite
from ppo_core.testing import tiny_llama_config

pytestmark = pytest.mark.cpu_benchmark
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["paper_G1", "paper_G1_unfused", "paper_G1_no_tree", "paper_G1_greedy", "paper_G1_greedy_drafted", "prefix_G1",
         "paper_G8", "paper_G8_no_tree", "paper_G64", "two_learners_G1"]


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a dry run, not a measurement: fastest and steadiest on a shared machine
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["device-dtype", "bf16"])
def test_gpu_suite_runs_end_to_end_on_cpu_with_tiny_gemma2(dtype, tmp_path, one_thread):
    path, results = gpu_suite.run_suite("cpu", tiny=True, out=str(tmp_path), log=lambda *a: None,
                                        simulate_oom={"paper_G64"}, command="dry run", dtype=dtype)
    with open(path) as f:
        saved = json.load(f)
    assert list(saved["models"]["tiny-gemma-2"]["cases"]) == CASES
    env = results["environment"]
    for key in ("device_name", "compute_dtype", "torch", "transformers", "peft", "bitsandbytes"):
        assert env[key], key
    assert results["ceilings"]["matmul_tflops"] > 0 and results["ceilings"]["copy_tb_per_s"] > 0
    block = results["models"]["tiny-gemma-2"]
    assert block["compute_dtype"] == ("bf16" if dtype == torch.bfloat16 else "fp32")
    assert block["config"]["final_logit_softcapping"] == 30.0 and block["attn_implementation"] == "eager"
    assert list(block["cases"]) == CASES
    for name, case in block["cases"].items():
        assert "error" not in case, name
        assert case["s_per_episode"] > 0 and case["losses_finite"] and case["tokens_computed_per_episode"] > 0, name
        assert case["generation_s"] + case["step_s"] <= case["s_per_episode"] * 1.001, name
        assert case["prompt_tree"] == (not name.endswith("_no_tree")), name
        if not case["prompt_tree"]:  # the FLOP model counts the padded computation
            assert case["flops_per_episode"] > 0 and 0 < case["floor_over_measured"] < 1, name
    for size in ("G1", "G8"):  # the tree computes fewer tokens than padded sequences of the same episode shape
        cases = block["cases"]
        assert cases[f"paper_{size}"]["tokens_computed_per_episode"] < \
            cases[f"paper_{size}_no_tree"]["tokens_computed_per_episode"], size
    cases = block["cases"]
    greedy, drafted = cases["paper_G1_greedy"], cases["paper_G1_greedy_drafted"]
    assert drafted["backbone_passes_per_episode"] < greedy["backbone_passes_per_episode"]  # one pass per step
    assert cases["paper_G1"]["fused_rollout"] == 1.0 and cases["paper_G1_unfused"]["fused_rollout"] == 0.0
    assert cases["prefix_G1"]["gen_len"] == 1 and cases["prefix_G1"]["ref_cache_hit_rate"] > 0
    # the simulated out-of-memory error in the fused G=64 case falls back to the recomputed forward
    assert cases["paper_G64"]["fused_rollout"] == 0.0 and "out of memory" in cases["paper_G64"]["first_attempt_error"]
    assert cases["two_learners_G1"]["learners"] == 2 and block["two_learner_policy"]
    assert set(block["targets"]) == set(gpu_suite.TARGETS)
    assert "| paper_G1 |" in bench.render_results(results)


def test_gpu_suite_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--models", "gemma-2-1b", "--bench-device", "cpu"])
    assert "unknown model 'gemma-2-1b'" in capsys.readouterr().err


@pytest.mark.parametrize("gen_len", [1, 2])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("arch", ["tiny-gemma-2", "tiny-llama"])
def test_flop_model_matches_torch_flop_counter(arch, fuse, gen_len, one_thread):
    """The analytic FLOPs of an episode (bench.Dims / bench.Work) equal torch.utils.flop_counter's count of the
    same episode exactly (unquantised fp32 model, so that every matmul is an aten op the counter sees)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ppo_core import LoraSettings, PPOTrainer
    config = bench.gemma2_config(arch) if arch.startswith("tiny-gemma") else tiny_llama_config()
    with tempfile.TemporaryDirectory() as folder:
        bench.build_random_checkpoint(config, folder, torch.device("cpu"), dtype=torch.float32)
        lora = LoraSettings(r=8, alpha=16, dropout=0.0)
        policy = bench.load_policy(folder, torch.device("cpu"), lora=lora, quantize="none", dtype=torch.float32)
    policy.use_prompt_tree = False  # the FLOP model counts the padded computation
    dims = bench.Dims.from_config(config, lora.r)
    pool = bench.random_prompt_pool(4, 24, config.vocab_size, "cpu")
    trainers = {"agent": PPOTrainer(bench.ppo_config(6, fuse_rollout=fuse), policy, "agent")}
    work = bench.Workload(games=2, steps=3, gen_len=gen_len, prompt_len=24, pool=4)
    with FlopCounterMode(display=False) as counter:
        record = bench.run_episode(trainers, pool, work, random.Random(0), bench.Clock("cpu"), defaultdict(float),
                                   dims, quantize="none", dtype_bytes=4)
    assert record["fused_rollout"] == float(fuse)
    # transformers 5.17 (the GPU machine's) computes the rotary angles as a matrix product (inv_freq @ positions),
    # which the counter sees; it is not the model's work (head_dim FLOPs a token), and 5.24 multiplies instead
    rotary = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("rotary_emb"))
    assert record["flops"] == counter.get_total_flops() - rotary


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_option_without_cuda_fails_with_one_clear_message():
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_gpu_benchmarks.py", "--gpu", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count("no CUDA device is visible") == 1, output[-2000:]
