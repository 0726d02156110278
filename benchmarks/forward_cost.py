"""Cost of one no-grad forward pass of the embedded model by its token count, with the LoRA adapters (r=64) and with
them off: the fixed part of a pass is why the prompt tree saves less time than tokens at --parallel-games 1.

    python -m benchmarks.forward_cost        (medians of 5 after one warm-up; the job's default dtype)
"""

from __future__ import annotations


import torch

from benchmarks.bench import median_s


def main() -> None:
    from moral.agent import load_agent_model
    from moral.config import RunConfig

    policy, _ = load_agent_model(RunConfig(episodes=1).resolve(), init_seed=0)

    print(f"{'tokens':>6} {'LoRA s':>8} {'no LoRA s':>9}   ({policy.compute_dtype})")
    for length in (1, 8, 32, 64, 128, 231):
        ids = torch.randint(100, 1000, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            lora = median_s(lambda: policy.hidden_states(ids))
            with policy.reference():
                base = median_s(lambda: policy.hidden_states(ids))
        print(f"{length:>6} {lora:8.3f} {base:9.3f}")


if __name__ == "__main__":
    main()
