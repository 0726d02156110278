"""CPU benchmarks (b) and (c) on the embedded SmolLM2-135M-Instruct with the real prompt:
(b) one generation call (5 queries, answer prefix "action", 1 sampled token) and one PPO step, fp32 and bf16;
(c) seconds per episode of the main job (`python run.py --reward deont --opponent tft`) through
moral.finetune.FineTuning, split into sampling, reference, backward + optimiser."""

import random
import time
from collections import defaultdict

import pytest
import torch

from benchmarks import bench
from ppo_core.model import cpu_has_native_bf16

pytestmark = pytest.mark.cpu_benchmark

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def smollm2_path():
    from moral.embedded import ensure_embedded_model
    try:
        return ensure_embedded_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def game_prompts(n: int, rng: random.Random) -> list[str]:
    """n training prompts with random states and option orders, as moral.finetune draws them."""
    from games import GAMES, TOKEN_SETS, C, D, structured_prompt
    tokens = TOKEN_SETS["action12"]
    pair = (tokens.c, tokens.d)
    out = []
    for _ in range(n):
        own, other = rng.choice((C, D)), rng.choice((C, D))
        first = pair if rng.random() < 0.5 else pair[::-1]
        second = pair if rng.random() < 0.5 else pair[::-1]
        out.append(structured_prompt(GAMES["IPD"], tokens, own, other, first, second))
    return out


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_smollm2_generation_call_and_ppo_step(dtype_name, smollm2_path, cpu_record, request):
    from transformers import AutoTokenizer

    from games import TOKEN_SETS
    from moral.agent import Codec, decide
    from ppo_core import LoraSettings, PolicyModel, PPOTrainer, load_causal_lm

    emulated = dtype_name == "bf16" and not cpu_has_native_bf16()
    if emulated and not request.config.getoption("--bench-emulated-bf16"):
        pytest.skip("no bf16 instructions on this CPU: bf16 runs emulated (a PPO step 94-105 s against 3-5 s "
                    "in fp32 on an AVX2-only EPYC, benchmarks/RESULTS.md), and the job uses fp32; "
                    "--bench-emulated-bf16 runs it anyway")
    dtype = DTYPES[dtype_name]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    codec = Codec(tokenizer, TOKEN_SETS["action12"], "prefix")
    torch.manual_seed(0)
    lm = load_causal_lm(smollm2_path, device="cpu", dtype=dtype)
    policy = PolicyModel(lm, adapters=("agent",), lora=LoraSettings(r=64, alpha=32, dropout=0.05),
                         compute_dtype=dtype)
    trainer = PPOTrainer(bench.ppo_config(5), policy, "agent", pad_token_id=tokenizer.pad_token_id or 0)
    rng = random.Random(0)
    warmup, measured = 1, 3
    gen, step, host, distinct, lengths = [], [], defaultdict(list), [], set()
    for i in range(warmup + measured):
        prompts = game_prompts(5, rng)
        t = time.perf_counter()
        decisions = decide(codec, trainer.generate, prompts)
        t_gen = time.perf_counter() - t
        t = time.perf_counter()
        stats = trainer.step([d.query for d in decisions], [d.response for d in decisions],
                             [rng.choice(bench.SCORES) for _ in decisions])
        t_step = time.perf_counter() - t
        assert stats["ppo/fused_rollout"] == 1.0 and torch.isfinite(torch.tensor(stats["ppo/loss/total"]))
        if i >= warmup:
            gen.append(t_gen)
            step.append(t_step)
            distinct.append(len(set(prompts)))
            lengths.update(len(d.query) for d in decisions)
            for k, v in stats.items():
                if k.startswith("time/ppo/"):
                    host[k].append(v)
    bounds = MAX_S_EMULATED_BF16 if emulated else MAX_S
    for what, values in (("generation_call", gen), ("ppo_step", step)):
        assert bench.med(values) < bounds[what][dtype_name], (what, values)
    cpu_record[f"smollm2_{dtype_name}"] = {
        "model": "SmolLM2-135M-Instruct (embedded)", "dtype": dtype_name, "lora_r": 64, "queries": 5,
        "query_len": sorted(lengths), "answer_prefix": codec.answer_prefix, "gen_len": codec.plan.gen_len,
        "distinct_prompts_per_call": bench.med(distinct), "warmup": warmup,
        "timings_s": {"generation_call": bench.spread(gen), "ppo_step": bench.spread(step)},
        "host_timing_s": {k: bench.med(v) for k, v in host.items()},
        "notes": "one decide() call on 5 real prompts, then one PPO step (fused rollout)"}


# Regression bounds, about 4x the figures measured on the 2-core AMD EPYC (benchmarks/RESULTS.md): a change that
# makes the job several times slower fails here, machine noise does not.
MAX_S = {"generation_call": {"fp32": 10.0, "bf16": 3.0}, "ppo_step": {"fp32": 12.0, "bf16": 6.0},
         "episode": {"fp32": 25.0, "bf16": 9.0}}
# bf16 emulated on a CPU without bf16 instructions (--bench-emulated-bf16): about 4x the AVX2-only EPYC's figures
# (generation calls 9.3-11.6 s, PPO steps 94-105 s, three runs, 2026-12-02).
MAX_S_EMULATED_BF16 = {"generation_call": {"bf16": 45.0}, "ppo_step": {"bf16": 400.0}}


@pytest.mark.parametrize("dtype_name", [None, "fp32"], ids=["job-default-dtype", "fp32"])
def test_main_job_seconds_per_episode(dtype_name, smollm2_path, tmp_path, cpu_record):
    """The main job's episode (moral.finetune.FineTuning.run_episode: 5 sequential decide() calls + one PPO step),
    split with the trainer's own synchronised timings into playing (sampling, prompts, rewards), the reference
    pass, and backward + optimiser."""
    from moral.config import RunConfig
    from moral.finetune import FineTuning

    config = RunConfig(reward="deont", opponent="tft", episodes=10, dtype=dtype_name, device="cpu",
                       threads=torch.get_num_threads()).resolve()
    if dtype_name is not None and config.dtype == RunConfig(device="cpu").resolve().dtype:
        pytest.skip(f"the job's default dtype is {config.dtype} already")
    ft = FineTuning(config, str(tmp_path / "run"), progress=False)
    trainer = ft.trainers["agent"]
    trainer.sync_timing = True
    warmup, measured = 1, 3
    records = []
    for i in range(warmup + measured):
        t = time.perf_counter()
        episode = ft.run_episode()
        total = time.perf_counter() - t
        st = episode.stats["agent"]
        assert st["ppo/fused_rollout"] == 1.0 and torch.isfinite(torch.tensor(st["ppo/loss/total"]))
        if i >= warmup:
            records.append({"episode": total, "play": total - st["time/ppo/total"],
                            "reference": st["time/ppo/reference"], "backward_optimizer": st["time/ppo/optimize_step"],
                            "step_other": st["time/ppo/total"] - st["time/ppo/reference"]
                            - st["time/ppo/optimize_step"]})
    # the graph an episode's rollout keeps for its update (5 sequential answers to 5 distinct prompts), with the
    # LoRA weights' low-precision casts shared by the calls (the default), then with one cast per call
    from moral.agent import decide
    prompts = sorted(set(game_prompts(12, random.Random(1))))[:5]

    def rollout():
        for prompt in prompts:
            decide(ft.codec, trainer.generate, [prompt])

    graph_mb = {}
    for label in ("shared_casts", "per_call_casts"):
        if label == "per_call_casts":
            ft.policy.hold_casts = lambda owner: None
        _, graph_mb[label] = bench.saved_graph_mb(rollout, list(ft.policy.parameters()))
        trainer.discard_rollouts()
    ft.logs.close()
    timings = {key: bench.spread(r[key] for r in records) for key in records[0]}
    assert timings["episode"]["median"] < MAX_S["episode"][config.dtype], timings
    assert graph_mb["shared_casts"] <= graph_mb["per_call_casts"], graph_mb
    name = "main_job_episode" + ("" if dtype_name is None else f"_{dtype_name}")
    cpu_record[name] = {
        "model": "SmolLM2-135M-Instruct (embedded)", "dtype": config.dtype, "quantize": config.quantize,
        "steps": config.steps, "parallel_games": config.parallel_games, "format_aid": config.format_aid,
        "gen_len": config.derived.gen_len, "lora_r": config.lora_rank, "warmup": warmup,
        "timings_s": timings, "graph_saved_mb": graph_mb,
        "notes": "moral.finetune.FineTuning.run_episode: 5 sequential decide() calls + one PPO step"
                 + (" (the job's default dtype on this CPU)" if dtype_name is None else "")}
