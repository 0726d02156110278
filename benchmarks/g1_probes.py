"""Ways tried to make the main job's episode (--parallel-games 1) cheaper, none of them in ppo_core; this records what
they gave (docs/speed.md, "Why no exact method gets the G=1 job to 2x"). Run on an idle machine:

    python -m benchmarks.g1_probes lookahead    (~6 min) the job with the next steps' possible prompts computed ahead
    python -m benchmarks.g1_probes patches      (~4 min) the replayed episode with patches of the model's modules
    python -m benchmarks.g1_probes products     (~10 s)  small matrix products in the compute dtype and in fp32

lookahead: the option orders have their own random streams, so they are drawn at the episode's start (the same
values); against TFT the first step's pass also computes step 2's two and step 3's four possible prompts, the fourth
step's pass step 5's two, so that later steps find their prompt in the tree and need no pass. Runs without and with,
alternating, each in a fresh process: 30 episodes after 5, per-episode seconds, passes, tokens, and the seconds of the
sampling calls and of the PPO step (from their difference the update's backward cost per pass and per token).
patches (on the replayed episode of `benchmarks.episode_profile`, alternating, each in a fresh process, medians of 6):
`lora-node`, each peft LoRA layer as one autograd node (the base product, the scaled LoRA branch in one addmm, a
hand-written backward; the LoRA weights cast in each call); `gqa`, transformers' eager Llama attention without
materialising the repeated keys and values (query heads grouped per key/value head); `merged`, each LoRA layer's
forward as one product with W + s B A, cast to the compute dtype once per adapter change (exact in fp32, not in bf16:
the sum is rounded per weight, not per output), its backward as lora-node's; `merged+gqa`, both. `none` is the model
as it is; glibc's malloc settings can be tried on it through MALLOC_* variables.
products: one LoRA factor (rank x hidden) and one base product by token count, in the compute dtype and in fp32, and
the time to read all base weights once at the one-token rate of the base product.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch


# ------------------------------------------------------------------------------------------------ lookahead
def lookahead_run(enabled: bool, warmup: int = 5, episodes: int = 30) -> str:
    from games import structured_prompt
    from games.opponents import C, D
    from moral.config import RunConfig
    from moral.finetune import FineTuning
    from ppo_core.tree import PromptTree

    class Lookahead(FineTuning):
        def run_episode(self):
            pair = (self.tokens.c, self.tokens.d)
            self._orders = [(pair if self.streams["shuffle1"].random() < 0.5 else pair[::-1],
                             pair if self.streams["shuffle2"].random() < 0.5 else pair[::-1])
                            for _ in range(self.config.steps)]
            return super().run_episode()

        def _text(self, game, step, own, other):
            return structured_prompt(game.game, self.tokens, own, other, *self._orders[step])

        def _prompt(self, game, own, other):
            return self._text(game, self._step, own, other)

        def play_step(self, step, phase, games, opponents, batch):
            self._step = step
            g = games[0]
            ahead = []
            if enabled and step == 0:  # vs TFT the opponent's next move is the agent's last one
                ahead = [self._text(g, 1, a0, g.agent_last) for a0 in (C, D)]
                ahead += [self._text(g, 2, a1, a0) for a0 in (C, D) for a1 in (C, D)]
            elif enabled and step == 3 and self.config.steps > 4:
                ahead = [self._text(g, 4, a3, g.agent_last) for a3 in (C, D)]
            if ahead:
                shortcuts = self.trainers["agent"].shortcuts
                if shortcuts._tree is None and self.policy.tree_supported:
                    shortcuts._tree = PromptTree(self.policy)
                for text in ahead:
                    shortcuts._tree.insert(self.codec.query(text).tolist())
            return super().play_step(step, phase, games, opponents, batch)

    with tempfile.TemporaryDirectory() as folder:
        run = Lookahead(RunConfig(episodes=warmup + episodes).resolve(), f"{folder}/run", progress=False)
        for _ in range(warmup):
            run.run_episode()
        trainer, spent = run.trainers["agent"], {"generate": 0.0, "step": 0.0}

        def timed(name, fn):
            def call(*args, **kwargs):
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                spent[name] += time.perf_counter() - start
                return out
            return call

        trainer.generate, trainer.step = timed("generate", trainer.generate), timed("step", trainer.step)
        passes = tokens = 0.0
        start = time.perf_counter()
        for _ in range(episodes):
            stats = run.run_episode().stats["agent"]
            passes += stats["ppo/backbone_passes"]
            tokens += stats["ppo/tokens_computed"]
        seconds = time.perf_counter() - start
        run.logs.close()
    return (f"lookahead {'on ' if enabled else 'off'}: {seconds / episodes:.3f} s per episode, {passes / episodes:.2f} "
            f"passes, {tokens / episodes:.0f} tokens; sampling calls {spent['generate'] / episodes:.3f} s, "
            f"step {spent['step'] / episodes:.3f} s")


# -------------------------------------------------------------------------------------------------- patches
class _LoraLinear(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T as one autograd node; gradients for x, A and B (W is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()
        y = torch.mm(x2, weight.t()).addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, a, b, weight)
        ctx.scaling, ctx.shape = scaling, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, h, a, b, weight = ctx.saved_tensors
        s, g2 = ctx.scaling, grad.reshape(-1, grad.shape[-1])
        g_h = g2 @ b
        dx = torch.mm(g2, weight).addmm_(g_h, a, alpha=s).view(ctx.shape) if ctx.needs_input_grad[0] else None
        da = torch.mm(g_h.t(), x2).mul_(s).float() if ctx.needs_input_grad[2] else None
        db = torch.mm(g2.t(), h).mul_(s).float() if ctx.needs_input_grad[3] else None
        return dx, None, da, db, None


class _MergedLoraLinear(torch.autograd.Function):
    """y = x M^T with M = W + s B A precomputed; gradients for x (through M), A and B, recomputing h = x A^T."""

    @staticmethod
    def forward(ctx, x, merged, lora_a, lora_b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, merged, lora_a, lora_b)
        ctx.scaling, ctx.shape = scaling, x.shape
        return torch.mm(x2, merged.t()).view(*x.shape[:-1], merged.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, merged, lora_a, lora_b = ctx.saved_tensors
        a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
        s, g2 = ctx.scaling, grad.reshape(-1, grad.shape[-1])
        dx = torch.mm(g2, merged).view(ctx.shape) if ctx.needs_input_grad[0] else None
        da = torch.mm((g2 @ b).t(), x2).mul_(s).float() if ctx.needs_input_grad[2] else None
        db = torch.mm(g2.t(), x2 @ a.t()).mul_(s).float() if ctx.needs_input_grad[3] else None
        return dx, None, da, db, None


def _merged_forward(self, x, *args, **kwargs):
    if self.disable_adapters or self.merged:
        return self.base_layer(x)
    name = self.active_adapters[0]
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    key = (name, a._version, b._version, dtype)  # an optimiser step or in-place init bumps the versions
    if getattr(self, "_probe_merged_key", None) != key:
        with torch.no_grad():
            self._probe_merged = (self.base_layer.weight + self.scaling[name] * (b @ a)).to(dtype)
        self._probe_merged_key = key
    with torch.autocast("cpu", enabled=False):
        return _MergedLoraLinear.apply(x.to(dtype), self._probe_merged, a, b, self.scaling[name])


def _lora_node_forward(self, x, *args, **kwargs):
    if self.disable_adapters or self.merged:
        return self.base_layer(x)
    name = self.active_adapters[0]
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    with torch.autocast("cpu", enabled=False):
        return _LoraLinear.apply(x.to(dtype), self.base_layer.weight.to(dtype), self.lora_A[name].weight,
                                 self.lora_B[name].weight, self.scaling[name])


def _grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scores = torch.matmul(query.reshape(b, kv_heads, groups * t, d), key.transpose(2, 3)) * scaling
    scores = scores.view(b, kv_heads, groups, t, -1)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.view(b, kv_heads, groups * t, -1), value)
    return out.view(b, kv_heads, groups, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, heads, d), None


def patched_replay(patch: str, n: int = 6) -> str:
    from benchmarks.bench import wall_times_s
    from benchmarks.episode_profile import recorded_episode

    if "gqa" in patch:
        import transformers.models.llama.modeling_llama as llama
        llama.eager_attention_forward = _grouped_attention
    with tempfile.TemporaryDirectory() as folder:
        run, replay = recorded_episode(folder)
        lora_forward = {"lora-node": _lora_node_forward, "merged": _merged_forward}.get(patch.split("+")[0])
        for layer in run.policy._lora_layers if lora_forward else ():
            layer.forward = types.MethodType(lora_forward, layer)
        times = wall_times_s(replay, n)
        run.logs.close()
    return f"patch {patch:10s}: replayed episode median {statistics.median(times):.3f} s (min {min(times):.3f})"


# ------------------------------------------------------------------------------------------------- products
def products() -> None:
    from benchmarks.bench import median_s
    from moral.agent import load_agent_model
    from moral.config import RunConfig

    config = RunConfig(episodes=1).resolve()
    policy, _ = load_agent_model(config, init_seed=0)
    modules = dict(policy.lm.named_modules())
    base = [m.weight for name, m in modules.items() if name.endswith(".base_layer")]
    up = next(m for name, m in modules.items() if name.endswith("mlp.up_proj"))
    lora_a, up = up.lora_A["agent"].weight, up.base_layer.weight
    dtype = policy.compute_dtype
    print(f"{'product':>22} {'tokens':>6} {dtype!s:>16} {'torch.float32':>14}   (us, medians of 51)")
    one_token = None
    for label, weight in ((f"LoRA A {tuple(lora_a.shape)}", lora_a), (f"base {tuple(up.shape)}", up)):
        for tokens in (1, 21, 231):
            row = []
            for dt in (dtype, torch.float32):
                w, x = weight.detach().to(dt), torch.randn(tokens, weight.shape[1], dtype=dt)
                row.append(median_s(lambda: torch.nn.functional.linear(x, w), n=51))
            if label.startswith("base") and tokens == 1:
                one_token = weight.numel() * weight.element_size() / row[0]
            print(f"{label:>22} {tokens:>6} {row[0] * 1e6:16.1f} {row[1] * 1e6:14.1f}")
    total = sum(w.numel() * w.element_size() for w in base)
    print(f"all {len(base)} base weights: {total / 2**20:.0f} MiB, read once at the base product's one-token rate "
          f"({one_token / 1e9:.1f} GB/s): {total / one_token:.3f} s")


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.g1_probes", description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=("lookahead", "patches", "products"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # one run in this process (the alternation's child)
    args = p.parse_args(argv)
    if args.probe == "products":
        return products()
    if args.one is not None:
        print(lookahead_run(args.one == "on") if args.probe == "lookahead" else patched_replay(args.one), flush=True)
        return
    order = ("off", "on") * 2 if args.probe == "lookahead" else ("none", "lora-node", "gqa", "merged", "merged+gqa") * 2
    for one in order:  # fresh processes: one patch never leaks into the next run
        subprocess.run([sys.executable, "-m", "benchmarks.g1_probes", args.probe, "--one", one], check=True,
                       env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})


if __name__ == "__main__":
    main()
