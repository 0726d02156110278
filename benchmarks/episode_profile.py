"""Where the time of one main-job episode goes at --parallel-games 1, by kind of work: the episode's five sampling
calls and its PPO step are recorded once (after two warm-up episodes) and replayed under torch.profiler.

    python -m benchmarks.episode_profile [--ops N]    (run it on an idle machine)

Prints the replayed episode's seconds and tokens through the backbone, the matrix products split into the frozen
base's, the LoRA factors' (a dimension equal to the rank) and the LM head's with their GFLOP and achieved GFLOP/s, and
the attention kernels' time, and the rest; with --ops N also the N ops with the most self time, by name.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time


def recorded_episode(folder: str, config=None):
    """A fresh main-job run in `folder` (`config`: a moral.config.RunConfig, default the main job's with 10
    episodes) after two warm-up episodes, and a function that replays its third episode's five sampling calls and
    PPO step (same prompts each time; keyword arguments override the sampling calls') and returns the step's
    statistics."""
    from moral.config import RunConfig
    from moral.finetune import FineTuning

    run = FineTuning((config or RunConfig(episodes=10)).resolve(), f"{folder}/run", progress=False)
    trainer = run.trainers["agent"]
    for _ in range(2):
        run.run_episode()
    calls, generate = [], trainer.generate

    def record(queries, **kwargs):
        calls.append((queries, kwargs))
        return generate(queries, **kwargs)

    trainer.generate = record
    run.run_episode()
    trainer.generate = generate

    def replay(**overrides) -> dict:
        """The episode's sampling calls (their arguments updated by `overrides`, e.g. top_k or draft) and step."""
        queries, responses = [], []
        for q, kwargs in calls:
            queries += q
            responses += trainer.generate(q, **{**kwargs, **overrides}).responses
        return trainer.step(queries, responses, [float((-1) ** i * (i % 3)) for i in range(len(queries))])

    return run, replay


def main(argv: list[str]) -> None:
    import argparse

    from torch.profiler import ProfilerActivity, profile

    parser = argparse.ArgumentParser(prog="python -m benchmarks.episode_profile")
    parser.add_argument("--ops", type=int, default=0, metavar="N", help="also list the N ops with most self time")
    args = parser.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="episode-profile-")
    try:
        run, replay = recorded_episode(folder)
        rank, vocab = run.config.lora_rank, run.policy.config.get_text_config().vocab_size
        replay()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            stats = replay()
            seconds = time.perf_counter() - start
        run.logs.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    kinds: dict[str, list[float]] = {}
    total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::mm" and len(e.input_shapes) >= 2 and len(e.input_shapes[0]) == 2:
            (m, k), n = e.input_shapes[0], e.input_shapes[1][1]
            dims = (m, k, n)
            kind = "LM head mm" if vocab in dims else "LoRA mm" if rank in dims else "base mm"
            flop = 2 * m * k * n * e.count
        elif "attention" in e.key or e.key in ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data"):
            kind, flop = "attention", 0
        else:
            continue
        row = kinds.setdefault(kind, [0.0, 0.0])
        row[0] += e.self_cpu_time_total / 1e3
        row[1] += flop / 1e9
    print(f"one replayed episode: {seconds:.2f} s under the profiler ({total_ms / 1e3:.2f} s of ops), "
          f"{stats['ppo/tokens_computed']:.0f} tokens through the backbone")
    print(f"{'kind':<12} {'ms':>7} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8}")
    for kind, (ms, gflop) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        rate = f"{gflop / ms * 1e3:8.0f}" if gflop else f"{'':>8}"
        print(f"{kind:<12} {ms:7.0f} {ms / total_ms:6.0%} {gflop:7.1f} {rate}")
    other = total_ms - sum(ms for ms, _ in kinds.values())
    print(f"{'other ops':<12} {other:7.0f} {other / total_ms:6.0%}   (norms, activations, copies, adds, Adam, ...)")
    if args.ops:
        print(f"{'op (self time)':<48} {'ms':>7} {'calls':>7}")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:args.ops]:
            print(f"{e.key[:48]:<48} {e.self_cpu_time_total / 1e3:7.1f} {e.count:7d}")


if __name__ == "__main__":
    main(sys.argv[1:])
