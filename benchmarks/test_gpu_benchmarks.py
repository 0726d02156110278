"""CUDA benchmarks (pytest benchmarks/ --gpu): the Gemma-2 architectures with random weights in 4-bit NF4, LoRA
r=64 on all linear layers, the job's PPOTrainer; the issue's speed and memory targets (H100, Gemma-2-2b) asserted.
The suite runs once per session (benchmarks.gpu_suite.run_suite) and writes <bench-out>/cuda-<gpu>.json."""

import pytest

from benchmarks import gpu_suite

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def suite(request):
    models = tuple(m.strip() for m in request.config.getoption("--gpu-models").split(",") if m.strip())
    command = " ".join(["pytest", *request.config.invocation_params.args])
    path, results = gpu_suite.run_suite("cuda", models, quick=request.config.getoption("--bench-quick"),
                                        out=request.config.getoption("--bench-out"), command=command)
    return results


@pytest.fixture(scope="session")
def target_model(suite):
    block = suite["models"].get(gpu_suite.TARGET_MODEL)
    if block is None:
        pytest.skip(f"the targets are for {gpu_suite.TARGET_MODEL}; add it to --gpu-models")
    assert "error" not in block, block["error"]
    return block


def _target(block, name):
    t = block["targets"][name]
    assert t["measured"] is not None, f"{name}: not measured ({block['cases']})"
    return t


def test_every_case_ran_with_finite_losses(suite):
    for model, block in suite["models"].items():
        assert "error" not in block, f"{model}: {block.get('error')}"
        for name, case in block["cases"].items():
            assert "error" not in case, f"{model} {name}: {case['error']}"
            assert case["losses_finite"], f"{model} {name}: non-finite loss"


def test_paper_configuration_uses_the_fused_rollout(target_model):
    assert target_model["cases"]["paper_G1"]["fused_rollout"] == 1.0


def test_paper_episode_takes_at_most_half_a_second(target_model):
    t = _target(target_model, "s_per_episode_paper")
    assert t["met"], f"{t['measured']:.3f} s per episode in the paper configuration, target {t['limit']}"


def test_peak_memory_of_one_learner_at_most_8_gb(target_model):
    t = _target(target_model, "peak_mem_gb_one_learner")
    assert t["met"], f"peak {t['measured']:.2f} GB with one learner, target {t['limit']}"


def test_peak_memory_of_two_learners_at_most_10_gb(target_model):
    t = _target(target_model, "peak_mem_gb_two_learners")
    assert t["met"], f"peak {t['measured']:.2f} GB with two learners on one base, target {t['limit']}"


def test_game_steps_per_second_grow_20_fold_from_1_to_64_games(target_model):
    t = _target(target_model, "game_steps_per_s_growth_G1_to_G64")
    assert t["met"], f"game steps/s grow {t['measured']:.1f}-fold from G=1 to G=64, target {t['limit']}"
