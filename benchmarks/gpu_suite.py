"""The GPU half of the benchmarks, end to end without pytest.

    python -m benchmarks.gpu_suite --out benchmarks/results               # Gemma-2-2b architecture
    python -m benchmarks.gpu_suite --models gemma-2-2b,gemma-2-9b         # and Gemma-2-9b's (needs ~25 GB free)

Each model is built from its published configuration with random weights (nothing is downloaded), saved with
save_pretrained to a temporary folder and loaded the way a real run loads it: `ppo_core.load_causal_lm(...,
quantize="4bit")` (bitsandbytes NF4, compute dtype from `compute_dtype_for(device)`), eager attention (Gemma-2's
soft-capping), `PolicyModel` with LoRA r=64 alpha=32 on all linear layers and a value head, `PPOTrainer` with the job's
settings. Prompts are random token ids, drawn from a pool of 16 distinct prompts like the job's 16 training prompts.

Cases (per model): the paper's episode (G=1 game, 5 sequential steps, 2 sampled tokens, one update), the same
without the fused rollout and without the prompt tree, with greedy answers without and with their first tokens
drafted (one pass per step where a legal answer's first token is drafted), the main job's answer-prefix variant (1
token), G=8 and G=64 games side by side (a case
that runs out of memory with the fused rollout is retried with fuse_rollout=False and a token budget), and two
learners on one base (adapters "agent"/"opponent", two trainers, 3 steps as in LLM-vs-LLM). Results go to
<out>/cuda-<device name>.json, rewritten after every case so that a run stopped by a time limit keeps what it did.

`--bench-device cpu --tiny` runs the same code on a tiny Gemma-2 on the CPU (the dry run of the CPU test suite);
`--bench-device cpu` alone runs the full-size architecture on the CPU (bitsandbytes' CPU backend, fp32; minutes per
episode), to <out>/cpu-<cpu>-gpu-suite.json, with no targets: the code at full size, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

from . import bench

# The targets (H100, Gemma-2-2b architecture).
TARGETS = {
    "s_per_episode_paper": ("paper_G1", "s_per_episode", 0.5, "<="),
    "peak_mem_gb_one_learner": ("paper_G1", "peak_mem_gb", 8.0, "<="),
    "peak_mem_gb_two_learners": ("two_learners_G1", "peak_mem_gb", 10.0, "<="),
    "game_steps_per_s_growth_G1_to_G64": (("paper_G64", "paper_G1"), "game_steps_per_s", 20.0, ">="),
}
TARGET_MODEL = "gemma-2-2b"
PROMPT_LEN = 200          # the paper prompt in Gemma-2's chat template (~200 tokens)
TINY_PROMPT_LEN = 40
UNFUSED_TOKEN_BUDGET = 4096


def _cases(tiny: bool, quick: bool) -> list[dict]:
    """(name, workload, learners, ppo overrides, warm-up, measured)."""
    def n(warmup, measured):
        if tiny or quick:
            return (1, 2)
        return (warmup, measured)

    budget = 1024 if tiny else UNFUSED_TOKEN_BUDGET
    return [
        dict(name="paper_G1", work=dict(games=1, steps=5, gen_len=2), learners=1, episodes=n(3, 10)),
        dict(name="paper_G1_unfused", work=dict(games=1, steps=5, gen_len=2), learners=1, episodes=n(2, 5),
             ppo=dict(fuse_rollout=False)),
        dict(name="paper_G1_no_tree", work=dict(games=1, steps=5, gen_len=2), learners=1, episodes=n(2, 5),
             tree=False),
        dict(name="paper_G1_greedy", work=dict(games=1, steps=5, gen_len=2, greedy=True), learners=1,
             episodes=n(2, 5)),
        dict(name="paper_G1_greedy_drafted", work=dict(games=1, steps=5, gen_len=2, greedy=True, draft=True),
             learners=1, episodes=n(2, 5)),
        dict(name="prefix_G1", work=dict(games=1, steps=5, gen_len=1), learners=1, episodes=n(2, 5)),
        dict(name="paper_G8", work=dict(games=8, steps=5, gen_len=2), learners=1, episodes=n(2, 5)),
        dict(name="paper_G8_no_tree", work=dict(games=8, steps=5, gen_len=2), learners=1, episodes=n(2, 5),
             tree=False),
        dict(name="paper_G64", work=dict(games=64, steps=5, gen_len=2), learners=1, episodes=n(1, 3),
             fallback=dict(fuse_rollout=False, micro_batch_tokens=budget)),
        dict(name="two_learners_G1", work=dict(games=1, steps=3, gen_len=2), learners=2, episodes=n(2, 5)),
    ]


def _make_trainers(policy, learners: int, batch: int, overrides: dict, seed: int):
    from ppo_core import PPOTrainer
    names = ("agent", "opponent")[:learners]
    trainers = {name: PPOTrainer(bench.ppo_config(batch, seed + i, **overrides), policy, name, pad_token_id=0)
                for i, name in enumerate(names)}
    if learners > 1:  # one frozen base, one reference cache (as moral.finetune does)
        trainers["opponent"].reference_cache = trainers["agent"].reference_cache
    return trainers


def _simulate_oom(trainers: dict, after_calls: int) -> None:
    """Test hook: raise an out-of-memory error inside generate after some calls (their graphs are alive)."""
    for trainer in trainers.values():
        inner, calls = trainer.generate, [0]

        def generate(*args, _inner=inner, _calls=calls, **kwargs):
            out = _inner(*args, **kwargs)
            _calls[0] += 1
            if _calls[0] > after_calls:
                raise torch.OutOfMemoryError("simulated out-of-memory error (test hook)")
            return out

        trainer.generate = generate


def run_model(name: str, block: dict, device: torch.device, dtype: torch.dtype, *, tiny: bool, quick: bool,
              ceilings: dict, workdir: str, save, log, simulate_oom: frozenset = frozenset(), seed: int = 0,
              only: tuple = (), earlier_cases: dict | None = None) -> None:
    """Build, load and benchmark one architecture, filling `block` (part of the results; `save` writes them)."""
    from ppo_core import LoraSettings
    config = bench.gemma2_config(name)
    lora = LoraSettings(r=64, alpha=32, dropout=0.05)
    dims = bench.Dims.from_config(config, lora.r)
    quantize = "4bit"
    prompt_len = TINY_PROMPT_LEN if tiny else PROMPT_LEN
    block.update({"architecture": name, "config": {k: getattr(config, k) for k in (
                 "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "final_logit_softcapping",
                 "attn_logit_softcapping", "sliding_window", "query_pre_attn_scalar")},
             "weights": "random (built from the configuration)", "quantize": "4bit NF4 (bitsandbytes)",
             "compute_dtype": bench.dtype_name(dtype), "attn_implementation": "eager", "lora_r": lora.r,
             "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "lora_params": dims.layers * dims.p_lora,
             "frozen_matmul_params": dims.layers * dims.p_lin, "prompt_len": prompt_len,
             "cases": dict(earlier_cases or {})})
    save()
    folder = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
    try:
        log(f"[{name}] building random weights and saving them to {folder}")
        block.update(bench.build_random_checkpoint(config, folder, device, dtype=torch.bfloat16, seed=seed))
        t = time.perf_counter()
        policy = bench.load_policy(folder, device, ("agent",), lora, quantize, dtype)
        block["load_s"] = time.perf_counter() - t
        if device.type == "cuda":
            block["resident_gb"] = torch.cuda.memory_allocated(device) / bench.GB
        log(f"[{name}] loaded in {block['load_s']:.1f} s ({block.get('resident_gb') or 0:.2f} GB resident)")
        pool = bench.random_prompt_pool(16, prompt_len, config.vocab_size, device, seed=seed)
        clock = bench.Clock(device)
        dtype_bytes = torch.finfo(dtype).bits // 8
        for case in _cases(tiny, quick):
            if only and case["name"] not in only:
                continue
            if case["learners"] > 1 and len(policy.adapter_names) < case["learners"]:
                policy = _two_adapter_policy(policy, folder, device, lora, quantize, dtype, log)
                bench.free_memory(device)
                block["two_learner_policy"] = policy._bench_origin
            work = bench.Workload(**case["work"], prompt_len=prompt_len, pool=len(pool))
            batch = work.games * work.steps
            attempts = [case.get("ppo", {})] + ([case["fallback"]] if "fallback" in case else [])
            result = None
            for attempt, overrides in enumerate(attempts):
                log(f"[{name}] {case['name']}: G={work.games} N={work.steps} gen={work.gen_len} "
                    f"learners={case['learners']} {overrides or ''}")
                policy.use_prompt_tree = case.get("tree", True)  # the *_no_tree cases: padded sequences
                trainers = _make_trainers(policy, case["learners"], batch, overrides, seed)
                if case["name"] in simulate_oom and attempt == 0:
                    _simulate_oom(trainers, after_calls=2)
                error, fatal = None, False
                try:
                    warmup, measured = case["episodes"]
                    result = bench.run_case(trainers, pool, work, warmup=warmup, measured=measured, clock=clock,
                                            seed=seed, dims=dims, quantize=quantize, dtype_bytes=dtype_bytes,
                                            ceilings=ceilings, log=log)
                except torch.OutOfMemoryError as exc:
                    error = f"out of memory: {str(exc).splitlines()[0][:200]}"
                except Exception as exc:  # noqa: BLE001 - record it, go on with the other cases (unattended run)
                    error, fatal = f"{type(exc).__name__}: {str(exc)[:300]}", True
                    log(traceback.format_exc())
                bench.release(trainers, device)
                if result is not None:
                    result["ppo_overrides"] = overrides
                    if attempt > 0:
                        result["note"] = f"fused rollout ran out of memory; recomputed ({overrides})"
                        result["first_attempt_error"] = block["cases"][case["name"]]["error"]
                    break
                log(f"[{name}] {case['name']}: {error}")
                block["cases"][case["name"]] = {"games": work.games, "error": error, "ppo_overrides": overrides}
                if fatal:
                    break
            if result is not None:
                block["cases"][case["name"]] = result
                peak = (f"peak {result['peak_mem_gb']:.2f} GB" if "peak_mem_gb" in result
                        else f"peak RSS {result.get('peak_rss_gb_process') or 0:.2f} GB")
                log(f"[{name}] {case['name']}: {result['s_per_episode']:.3f} s/episode, "
                    f"{result['game_steps_per_s']:.3g} game steps/s, {peak}, "
                    f"{result['tokens_computed_per_episode']:.0f} tokens computed, "
                    f"{result.get('achieved_tflops', 0):.2f} TFLOP/s, fused={result['fused_rollout']:.0f}")
            save()
        del policy
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        bench.free_memory(device)


def _two_adapter_policy(policy, folder, device, lora, quantize, dtype, log):
    """Two adapters on one base: take the base back from the one-adapter policy (peft unload), else reload it."""
    from ppo_core import PolicyModel
    try:
        base = policy.lm.unload()
        del policy
        bench.free_memory(device)
        two = PolicyModel(base, adapters=("agent", "opponent"), lora=lora, compute_dtype=dtype)
        two._bench_origin = "base reused (peft unload)"
    except Exception as exc:  # noqa: BLE001 - fall back to a fresh load of the same checkpoint
        log(f"    unload failed ({exc!r}); reloading the base")
        policy = None
        bench.free_memory(device)
        two = bench.load_policy(folder, device, ("agent", "opponent"), lora, quantize, dtype)
        two._bench_origin = "base reloaded"
    return two


def evaluate_targets(block: dict) -> dict:
    out = {}
    for target, (case, key, limit, op) in TARGETS.items():
        cases = block.get("cases", {})
        if isinstance(case, tuple):
            a, b = (cases.get(c, {}).get(key) for c in case)
            measured = a / b if a and b else None
        else:
            measured = cases.get(case, {}).get(key)
        met = None if measured is None else (measured <= limit if op == "<=" else measured >= limit)
        out[target] = {"limit": f"{op} {limit}", "measured": measured, "met": met}
    return out


def check_device(device: torch.device) -> None:
    """One clear message when the GPU half cannot run here."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"the GPU benchmarks need a CUDA device, and torch {torch.__version__} sees none "
                         f"(torch.cuda.is_available() is False)")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"the GPU benchmarks need bitsandbytes (4-bit NF4): {exc!r}. On the lent GPU machine run "
                         f"../shared/tools/gpu-carry.sh here first, carry .gpu_site and start the command with "
                         f"export PYTHONPATH=$PWD/.gpu_site:$PWD") from None


def run_suite(device: str = "cuda", models=("gemma-2-2b",), tiny: bool = False, quick: bool = False,
              out: str = bench.RESULTS_DIR, workdir: str | None = None, log=print, command: str | None = None,
              simulate_oom=(), dtype: torch.dtype | None = None, cases: tuple = ()) -> tuple[str, dict]:
    """Run every case for every model; returns (results file, results). The compute dtype is the device's
    (ppo_core.compute_dtype_for) unless `dtype` is given (the dry run checks bf16 on the CPU with it)."""
    device = torch.device(device)
    check_device(device)
    from ppo_core import compute_dtype_for
    dtype = dtype or compute_dtype_for(device)
    if tiny:
        models = ("tiny-gemma-2",)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    # Off CUDA the file gets a suffix of its own, so a full-size run on the CPU never replaces the CPU half's results.
    suffix = "-dry-run" if tiny else ("" if device.type == "cuda" else "-gpu-suite")
    path = os.path.join(out, bench.results_file(device, suffix))
    command = command or " ".join(["python -m benchmarks.gpu_suite"] + sys.argv[1:])
    results = {"suite": "gpu", "command": command, "environment": bench.environment(device, dtype),
               "dry_run": tiny, "targets_for": f"{TARGET_MODEL} on an H100", "models": {}}
    earlier = {}
    if os.path.isfile(path):  # keep the models of earlier runs on this device (e.g. 2b and 9b run separately)
        with open(path) as f:
            earlier = json.load(f).get("models", {})
        results["models"].update({k: v for k, v in earlier.items() if k not in models})
    log(f"device {results['environment']['device_name']}, compute dtype {bench.dtype_name(dtype)}")
    results["ceilings"] = bench.measure_ceilings(device, dtype, size=512 if tiny else None)
    log(f"ceilings: {results['ceilings']}")

    def save():
        bench.write_json(path, results)

    for name in models:
        block = results["models"][name] = {"command": command, "environment": results["environment"],
                                           "ceilings": results["ceilings"]}
        try:
            run_model(name, block, device, dtype, tiny=tiny, quick=quick, ceilings=results["ceilings"],
                      workdir=workdir or tempfile.gettempdir(), save=save, log=log,
                      simulate_oom=frozenset(simulate_oom), only=tuple(cases),
                      earlier_cases=earlier.get(name, {}).get("cases") if cases else None)
        except torch.OutOfMemoryError as exc:
            block["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
        if (name == TARGET_MODEL and device.type == "cuda") or tiny:  # the targets are for a GPU
            block["targets"] = evaluate_targets(block)
        save()
    log("\n" + bench.render_results(results, os.path.basename(path)))
    return path, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=bench.RESULTS_DIR, help="folder of the results JSON (default: %(default)s)")
    p.add_argument("--models", default="gemma-2-2b",
                   help=f"comma-separated architectures: {', '.join(k for k in bench.GEMMA2_SHAPES if 'tiny' not in k)}")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 measured episodes per case")
    p.add_argument("--cases", default="", help=f"comma-separated subset of: "
                   f"{', '.join(c['name'] for c in _cases(False, False))} (merged into the existing results file)")
    p.add_argument("--workdir", default=None, help="where the random checkpoint is saved (default: the temp dir)")
    p.add_argument("--bench-device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny and args.out == bench.RESULTS_DIR:  # a dry run is not a result
        args.out = tempfile.gettempdir()
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in bench.GEMMA2_SHAPES]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}")
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    known = [c["name"] for c in _cases(False, False)]
    if any(c not in known for c in cases):
        p.error(f"unknown case in --cases {args.cases!r}; known: {', '.join(known)}")
    path, results = run_suite(args.bench_device, models, tiny=args.tiny, quick=args.quick, out=args.out,
                              workdir=args.workdir, cases=cases)
    print(f"\nresults: {path}")
    for name, block in results["models"].items():
        for target, v in block.get("targets", {}).items():
            verdict = "not measured" if v["met"] is None else ("met" if v["met"] else "NOT met")
            print(f"  {name} {target}: {v['measured']} ({v['limit']}) -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
