"""Cost of one no-grad forward pass of the embedded model by its token count, with the LoRA adapters (r=64) and with
them off: the fixed part of a pass is why the prompt tree saves less time than tokens at --parallel-games 1.
Then one frozen base product of the model (the first MLP up projection) by token count, forward and input gradient:
from about a hundred tokens on it runs near this CPU's best rate; at one token it is bound by reading the weight. Last,
what all of a 231-token pass's base products would take at that product's 231-token rate. Then one pass of the prompt
tree as a rollout runs it (with grad, the LoRA weight casts held) and its backward, by token count, each fitted to a
fixed part per pass plus a part per token, and an episode's sampling calls priced by the forward's fit for its passes
and tokens (`--passes`, `--tokens`: the main job's per-episode means from ppo.jsonl, `ppo/backbone_passes` and
`ppo/tokens_computed`).

    python -m benchmarks.forward_cost                (medians of 5 after one warm-up; the job's default dtype)
    python -m benchmarks.forward_cost --passes 4.2 --tokens 545
    python -m benchmarks.forward_cost --dtype bf16   (another compute dtype, e.g. bf16 on a CPU without bf16
                                                      instructions: the forward's layout, x @ W.T, against the input
                                                      gradient's, grad @ W, shows why emulated bf16 is so slow)
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.bench import Dims, median_s


def main(argv=None) -> None:
    import argparse

    from moral.agent import load_agent_model
    from moral.config import DTYPE_NAMES, RunConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="compute dtype (default: the job's on this machine)")
    p.add_argument("--passes", type=float, default=4.2, help="backbone passes per episode (default 4.2)")
    p.add_argument("--tokens", type=float, default=545.0, help="tokens through the backbone per episode (default 545)")
    args = p.parse_args(argv)
    config = RunConfig(episodes=1, dtype=args.dtype).resolve()
    policy, _ = load_agent_model(config, init_seed=0)

    print(f"{'tokens':>6} {'LoRA s':>8} {'no LoRA s':>9}   ({policy.compute_dtype})")
    for length in (1, 8, 32, 64, 128, 231):
        ids = torch.randint(100, 1000, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            lora = median_s(lambda: policy.hidden_states(ids))
            with policy.reference():
                base = median_s(lambda: policy.hidden_states(ids))
        print(f"{length:>6} {lora:8.3f} {base:9.3f}")

    weight = next(m.weight for name, m in policy.lm.named_modules() if name.endswith("mlp.up_proj.base_layer"))
    N, K = weight.shape
    weight_bytes = weight.numel() * weight.element_size()
    print(f"\none frozen base product, {K} -> {N} ({weight.dtype}, {weight_bytes / 2**20:.2f} MiB)")
    print(f"{'tokens':>6} {'forward us':>10} {'GFLOP/s':>8} {'input grad us':>13} {'GFLOP/s':>8} {'weight read GB/s':>16}")
    rate = {}
    for tokens in (1, 8, 32, 64, 128, 231, 512):
        x = torch.randn(tokens, K, dtype=weight.dtype)
        grad_out = torch.randn(tokens, N, dtype=weight.dtype)
        fwd = median_s(lambda: torch.nn.functional.linear(x, weight), n=51)
        dx = median_s(lambda: grad_out @ weight, n=51)
        flop = 2 * tokens * N * K
        rate[tokens] = flop / fwd
        print(f"{tokens:>6} {fwd * 1e6:10.1f} {flop / fwd / 1e9:8.1f} {dx * 1e6:13.1f} {flop / dx / 1e9:8.1f} "
              f"{weight_bytes / fwd / 1e9:16.1f}")

    dims = Dims.from_config(policy.config, config.lora_rank)
    base_flop = 2 * 231 * dims.layers * dims.p_lin
    print(f"\na 231-token pass's base products: {base_flop / 1e9:.1f} GFLOP, {base_flop / rate[231]:.3f} s at the "
          f"231-token rate above")

    print("\none prompt-tree pass as a rollout runs it (grad, LoRA casts held) and its backward")
    print(f"{'tokens':>6} {'forward s':>9} {'backward s':>10}")
    sizes, forward, backward = (1, 21, 110, 231, 443), [], []
    for length in sizes:
        fwd, bwd = tree_pass_with_backward(policy, length)
        forward.append(fwd)
        backward.append(bwd)
        print(f"{length:>6} {fwd:9.3f} {bwd:10.3f}")
    fixed, per_token = line_fit(sizes, forward)
    print(f"forward, least squares: {fixed:.3f} s per pass + {per_token * 1e3:.2f} ms per token; an episode's sampling "
          f"calls ({args.passes:g} passes, {args.tokens:g} tokens) {args.passes * fixed + args.tokens * per_token:.2f} s")
    fixed, per_token = line_fit(sizes, backward)
    print(f"backward of one pass alone: {fixed:.3f} s + {per_token * 1e3:.2f} ms per token (the update's one backward "
          f"through all of an episode's passes costs less per pass and more per token: see docs/speed.md)")


def line_fit(xs, ys) -> tuple[float, float]:
    """Least-squares intercept and slope of ys against xs."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def tree_pass_with_backward(policy, length: int, n: int = 5) -> tuple[float, float]:
    """Median seconds of one packed pass of `length` new tokens with grad (LoRA casts held, as in a rollout), the
    LM and value heads at its last token, and the backward of their sum."""
    from ppo_core.tree import PromptTree

    owner = _Holder()
    generator = torch.Generator().manual_seed(length)
    fwd, bwd = [], []
    for _ in range(n + 1):
        ids = torch.randint(100, 1000, (length,), generator=generator).tolist()
        policy.hold_casts(owner)
        try:
            start = time.perf_counter()
            tree = PromptTree(policy)
            tree.insert(ids)
            tree.compute()
            hidden = tree.hidden([length - 1])
            loss = policy.logits(hidden).float().logsumexp(-1).sum() + policy.values(hidden).sum()
            middle = time.perf_counter()
            loss.backward()
            end = time.perf_counter()
        finally:
            policy.release_casts(owner)
            for p in policy.parameters():
                p.grad = None
        fwd.append(middle - start)
        bwd.append(end - middle)
    return statistics.median(fwd[1:]), statistics.median(bwd[1:])


class _Holder:
    """What holds the casts (hold_casts keeps a weak reference to its owner)."""


if __name__ == "__main__":
    main()
