"""Ways to cut the per-op overhead of an episode on the CPU, tried on the stack the main job runs (SmolLM2-135M,
LoRA r=64 on every linear layer, bf16 autocast on a CPU with native bf16):

    python -m benchmarks.fusion_probe                (about 1 minute; run it on an idle machine)
    python -m benchmarks.fusion_probe --compile      (adds 2. and 3.: about 3 minutes with a warm compile cache,
                                                      several more the first time on a machine)
    python -m benchmarks.fusion_probe --dtype fp32   (the fused layer's agreement with the modules in fp32)

1. A hand-fused Llama decoder layer: the q/k/v and the gate/up base weights concatenated into one product each, one
   LoRA-A product per shared input, each LoRA-B product, its scaling and the sum in one addmm; same precision choices
   as the Hugging Face modules (RMSNorm and softmax in fp32). One packed pass of T tokens (causal mask), forward and
   backward to the LoRA weights, against the Hugging Face + peft modules the job runs; alternating, medians of 5;
   T = 443 (the tokens of the profiled episode, `benchmarks.episode_profile`) and 110 (a later sampling call).
2. The best case for fusion: the hand-fused stack of 1. compiled whole by torch.compile for one fixed shape (T = 443;
   no cache objects, no peft, no graph breaks), one pass forward + backward, eager vs compiled, medians of 5.
3. torch.compile of each decoder layer (regional compilation, dynamic shapes, recompile limit raised so that all 30
   layers compile) on the replayed main-job episode of `benchmarks.episode_profile`, medians of 5.

None is in ppo_core: this records what they gave (docs/speed.md).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.bench import median_s


class FusedLlama:
    """The decoder stack of a peft-wrapped Llama-family PolicyModel as plain tensor operations on its own weights
    (the active adapter's LoRA factors stay the trainable leaves). hidden(ids, positions, visible) -> [T, H]."""

    def __init__(self, policy):
        backbone, adapter = policy._backbone, policy._active
        self.dtype = policy.compute_dtype
        text = policy.config.get_text_config()
        self.heads, self.kv_heads = text.num_attention_heads, text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.heads
        self.eps, self.embed, self.norm, self.rotary = text.rms_norm_eps, backbone.embed_tokens, backbone.norm, \
            backbone.rotary_emb

        def lora(module):
            return (module.base_layer.weight, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                    module.scaling[adapter])

        self.layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [lora(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
            gate_up = [lora(m) for m in (mlp.gate_proj, mlp.up_proj)]
            self.layers.append({
                "norm1": layer.input_layernorm.weight, "norm2": layer.post_attention_layernorm.weight,
                "qkv": (torch.cat([w for w, *_ in qkv]), [(a, b, s) for _, a, b, s in qkv]),
                "gate_up": (torch.cat([w for w, *_ in gate_up]), [(a, b, s) for _, a, b, s in gate_up]),
                "o": (lora(attn.o_proj)[0], [lora(attn.o_proj)[1:]]),
                "down": (lora(mlp.down_proj)[0], [lora(mlp.down_proj)[1:]])})

    def _rms(self, x, weight):
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _linear(self, x, base, loras):
        """x [T, in] -> the outputs of the LoRA linears that share input x, each [T, out_i]."""
        dt = self.dtype
        base_out = x @ base.to(dt).T
        a_out = x @ torch.cat([a for a, _, _ in loras]).to(dt).T
        outs, lo, col = [], 0, 0
        for a, b, scale in loras:
            out = base_out[:, lo:lo + b.shape[0]]
            outs.append(torch.addmm(out, a_out[:, col:col + a.shape[0]], b.to(dt).T, alpha=scale))
            lo, col = lo + b.shape[0], col + a.shape[0]
        return outs

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """ids, positions [T]; visible [T, T] bool (True = may attend) -> final normed hidden states [T, H]."""
        T, d = ids.shape[0], self.head_dim
        h = self.embed(ids).to(self.dtype)
        cos, sin = (c[0, :, None].to(self.dtype).transpose(0, 1) for c in self.rotary(h[None], positions[None]))
        bias = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        group = self.heads // self.kv_heads
        for layer in self.layers:
            q, k, v = self._linear(self._rms(h, layer["norm1"]), *layer["qkv"])
            q = self._rotate(q.view(T, self.heads, d).transpose(0, 1), cos, sin)
            k = self._rotate(k.view(T, self.kv_heads, d).transpose(0, 1), cos, sin)
            v = v.view(T, self.kv_heads, d).transpose(0, 1)
            k = k[:, None].expand(-1, group, -1, -1).reshape(self.heads, T, d)
            v = v[:, None].expand(-1, group, -1, -1).reshape(self.heads, T, d)
            scores = (q @ k.transpose(1, 2)) * d ** -0.5 + bias
            y = (torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v).transpose(0, 1).reshape(T, -1)
            h = h + self._linear(y, *layer["o"])[0]
            gate, up = self._linear(self._rms(h, layer["norm2"]), *layer["gate_up"])
            h = h + self._linear(F.silu(gate) * up, *layer["down"])[0]
        return self._rms(h, self.norm.weight)


def causal_pass(policy, T: int):
    """Random ids, positions and a causal mask for one packed pass of T tokens: ([T], [T], [T, T] bool)."""
    ids = torch.randint(100, policy.config.get_text_config().vocab_size, (T,),
                        generator=torch.Generator().manual_seed(T))
    return ids, torch.arange(T), torch.ones(T, T, dtype=torch.bool).tril()


def alternating_medians(params, passes: dict, n: int = 5) -> dict[str, float]:
    """{name: fn() -> hidden states}: median seconds of forward + backward to `params`, the passes alternating."""
    times = {name: [] for name in passes}
    for _ in range(n):
        for name, fn in passes.items():
            for p in params:
                p.grad = None
            start = time.perf_counter()
            fn().float().square().mean().backward()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fused_layer(policy, fused: FusedLlama, tokens: tuple[int, ...]) -> None:
    params = policy.trainable_parameters(policy._active)
    for T in tokens:
        ids, positions, visible = causal_pass(policy, T)
        passes = {"modules (HF + peft)": lambda: policy.packed_hidden_states(
                      ids[None], {"full_attention": visible}, positions[None])[0],
                  "hand-fused layer": lambda: fused.hidden(ids, positions, visible)}
        with torch.no_grad():
            a, b = (fn().float() for fn in passes.values())
        print(f"T={T}: fused vs modules, final hidden states: max |difference| {(a - b).abs().max():.3g}, mean "
              f"{(a - b).abs().mean():.3g} (max |hidden| {a.abs().max():.3g}, mean {a.abs().mean():.3g})")
        for name, seconds in alternating_medians(params, passes).items():
            print(f"  {name:<20} forward + backward {seconds:.3f} s")


def compiled_fused_stack(policy, fused: FusedLlama, T: int) -> None:
    """The best case for fusion: the hand-fused stack compiled whole for one fixed shape (no cache objects, no
    peft, no graph breaks), one packed pass of T tokens forward + backward."""
    ids, positions, visible = causal_pass(policy, T)
    compiled = torch.compile(fused.hidden, dynamic=False)
    params = policy.trainable_parameters(policy._active)
    start = time.perf_counter()
    compiled(ids, positions, visible).float().square().mean().backward()  # compiles forward and backward
    first = time.perf_counter() - start
    seconds = alternating_medians(params, {"eager": lambda: fused.hidden(ids, positions, visible),
                                           "compiled": lambda: compiled(ids, positions, visible)})
    print(f"hand-fused stack, T={T}, forward + backward: eager {seconds['eager']:.3f} s, compiled whole "
          f"{seconds['compiled']:.3f} s (median of 5; compiling took {first:.0f} s)")


def compiled_layers(run, replay) -> None:
    import torch._dynamo
    torch._dynamo.config.recompile_limit = 64  # each layer index guards on the cache's length: one graph per layer
    torch._dynamo.config.accumulated_recompile_limit = 4096

    eager = median_s(replay)
    for layer in run.policy._backbone.layers:
        layer.compile(dynamic=True)
    start = time.perf_counter()
    replay()
    first = time.perf_counter() - start
    print(f"replayed main-job episode: eager {eager:.2f} s, compiled layers {median_s(replay):.2f} s "
          f"(median of 5; the first compiled replay took {first:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fusion_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true", help="also the compiled cases (about 10 minutes)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[443, 110])
    args = parser.parse_args()
    from benchmarks.episode_profile import recorded_episode
    from moral.config import RunConfig

    folder = tempfile.mkdtemp(prefix="fusion-probe-")
    try:
        run, replay = recorded_episode(folder, RunConfig(episodes=10, dtype=args.dtype))
        policy = run.policy
        with torch.no_grad():  # LoRA B starts at zero: make the adapters matter for the agreement check
            g = torch.Generator().manual_seed(0)
            for name, p in policy.lm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        fused = FusedLlama(policy)
        fused_layer(policy, fused, tuple(args.tokens))
        if args.compile:
            compiled_fused_stack(policy, fused, args.tokens[0])
            compiled_layers(run, replay)
        run.logs.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
