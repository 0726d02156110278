"""The measurements behind some CPU-path choices of ppo_core, on the embedded model:

    python -m benchmarks.cpu_shortcuts [PART ...]   (run it on an idle machine)

The first five parts took about 5 minutes together, draft about 1 minute, fused about 1.5 and products a few
seconds (2-core EPYC).

PART is attention, adam, accuracy, reference, switch, draft, fused, products or rollout (default: all, in this
order; rollout needs about 6 GB).

1. Attention of packed passes (`PolicyModel.EAGER_PAIRS_CPU`): one recorded main-job episode replayed with the size
   rule (eager attention up to 2^18 query-key pairs) and with SDPA for every pass, alternating, medians of 5; then
   single tree passes of N tokens (a shared 40-token prefix and 190-token branches), forward + backward and
   forward only, eager vs SDPA, medians of 3.
2. Adam over the job's LoRA factor shapes (SmolLM2-135M, r=64, 420 tensors, 19.5 M parameters): PyTorch's per-tensor
   loop vs its fused kernel, mean of 10 steps.
3. Accuracy of the attention choice in bf16: P(answer) for the 16 training prompts x 2 answers (base model, one
   prompt per pass as in an episode's first sampling call) with eager attention and with SDPA, each against fp32
   SDPA. Eager attention rounds the attention scores to bf16 before the softmax, SDPA does not; the question is
   whether that makes the shortcut less accurate.
4. Switching the adapters off for a reference pass: peft's `disable_adapter()` context vs `PolicyModel.reference()`
   on the job's model (SmolLM2-135M, LoRA r=64 on all seven linear layers, 210 LoRA layers), entered and left 20
   times, median.
5. Switching between two learners' adapters (`--opponent llm`: six switches per episode): peft's `set_adapter` (then
   every adapter made trainable again) vs `PolicyModel.set_adapter` on the same model with two adapters, to the
   other learner and back 20 times, median.
6. Drafted answers in the paper's protocol (`--format-aid none`: 'action' + digit, two sampled tokens per step): one
   recorded episode of the embedded model replayed with greedy sampling (top_k=1, so that the same answers come
   every time) without a draft and with its answers' first tokens drafted (every draw follows the draft, as for a
   model that answers with the actions' own tokens, the codec's draft), alternating, medians of 5; backbone passes
   and tokens.
7. Kept graphs (`fuse_rollout`): one recorded main-job episode replayed with the sampling passes' graphs kept for
   the update, and with `fuse_rollout=False` (no-grad sampling, then a no-grad pass for the old log-probs and a
   training forward pass over the same packed tree), alternating, medians of 5, with the step's own timings.
8. The frozen base's matrix products at the job's shapes (443 tokens, SmolLM2-135M's four weight shapes), fp32 vs
   dynamic int8 (`torch.ao.quantization.quantize_dynamic`, forward only, not exact) vs bf16, means of 20, in
   GFLOP/s: what a quantised CPU base could gain, and that fp32 already runs at this CPU's matrix rate.
9. A rollout's memory in an evaluation loop: a fused trainer's `generate()` called 15 times with 4 new prompts each
   (2 sampled tokens) under torch.no_grad() and no step, with the job's batch of 5 samples (a rollout holds at most
   a batch) and with a batch of 10^6 (as every call's tree and graphs were kept until a step before that bound);
   growth of the process's resident memory from the loop's start, and samples whose graphs are kept. Then what the
   check that the adapter's weights have not changed under a rollout costs each generate() and step() call.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time

import torch

from benchmarks.bench import median_s


def attention() -> None:
    from benchmarks.episode_profile import recorded_episode
    from ppo_core.tree import PromptTree

    folder = tempfile.mkdtemp(prefix="cpu-shortcuts-")
    try:
        run, replay = recorded_episode(folder)
        policy = run.policy
        rule = policy.EAGER_PAIRS_CPU
        times = {"size rule": [], "SDPA only": []}
        for _ in range(5):
            for name, pairs in (("size rule", rule), ("SDPA only", 0)):
                policy.EAGER_PAIRS_CPU = pairs
                start = time.perf_counter()
                stats = replay()
                times[name].append(time.perf_counter() - start)
        print(f"replayed main-job episode ({stats['ppo/tokens_computed']:.0f} tokens), median of 5:")
        for name, t in times.items():
            print(f"  {name:<10} {statistics.median(t):.2f} s")
        run.logs.close()

        g = torch.Generator().manual_seed(0)
        prefix = torch.randint(100, 1000, (40,), generator=g).tolist()
        branches = [prefix + torch.randint(100, 1000, (190,), generator=g).tolist() for _ in range(16)]

        def tree_pass(n: int, grad: bool) -> None:
            with torch.set_grad_enabled(grad):
                tree = PromptTree(policy, keep_cache=False)
                ends = [tree.insert(s)[-1] for s in branches[:n]]
                tree.compute()
                if grad:
                    policy.values(tree.hidden(ends)).sum().backward()

        print("one packed tree pass, median of 3:")
        for n, grad in ((1, True), (2, True), (5, True), (16, False)):
            row = []
            for name, pairs in (("eager", 2 ** 40), ("SDPA", 0)):
                policy.EAGER_PAIRS_CPU = pairs
                row.append(f"{name} {median_s(lambda: tree_pass(n, grad), 3):.2f} s")
            what = "forward + backward" if grad else "forward only"
            print(f"  {40 + 190 * n:>5} tokens, {what:<18}: " + ", ".join(row))
        policy.EAGER_PAIRS_CPU = rule
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def adam() -> None:
    shapes = []
    for _ in range(30):  # SmolLM2-135M: q, k, v, o, gate, up, down
        for fan_in, fan_out in ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)):
            shapes += [(64, fan_in), (fan_out, 64)]
    print(f"Adam over {len(shapes)} LoRA tensors ({sum(a * b for a, b in shapes) / 1e6:.1f} M parameters), mean of 10:")
    for name, kwargs in (("per-tensor loop", {}), ("fused", {"fused": True})):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.Adam(params, lr=1e-5, **kwargs)
        optimizer.step()
        start = time.perf_counter()
        for _ in range(10):
            optimizer.step()
        print(f"  {name:<16} {(time.perf_counter() - start) / 10 * 1e3:.0f} ms")


def attention_accuracy() -> None:
    from transformers import AutoTokenizer

    from games import get_tokens
    from moral.agent import Codec
    from moral.diagnostics import training_queries
    from moral.embedded import ensure_embedded_model
    from ppo_core import LoraSettings, PolicyModel, load_causal_lm

    path = ensure_embedded_model()
    tokens = get_tokens("action12")
    queries, answers = training_queries(Codec(AutoTokenizer.from_pretrained(path), tokens, "prefix"), tokens)

    @torch.no_grad()
    def probabilities(dtype, eager_pairs):  # (16, 2) float64
        policy = PolicyModel(load_causal_lm(path), adapters=("agent",), lora=LoraSettings(r=1), compute_dtype=dtype)
        policy.EAGER_PAIRS_CPU = eager_pairs
        return torch.stack([policy.forward_responses([q] * len(answers), answers, with_values=False)["logprobs"]
                            .sum(1).exp().double() for q in queries])

    reference = probabilities(torch.float32, 0)
    print("P(answer) on 16 prompts x 2 answers, against fp32 with SDPA:")
    for name, dtype, eager_pairs in (("bf16, eager", torch.bfloat16, 2 ** 62), ("bf16, SDPA", torch.bfloat16, 0),
                                     ("fp32, eager", torch.float32, 2 ** 62)):
        error = (probabilities(dtype, eager_pairs) - reference).abs()
        print(f"  {name:<12} max |error| {error.max():.4f}, mean {error.mean():.4f}")


def reference_switch() -> None:
    from moral.agent import load_agent_model
    from moral.config import RunConfig

    policy, _ = load_agent_model(RunConfig().resolve(), init_seed=0)
    print(f"switching {len(policy._lora_layers)} LoRA layers off and on again, median of 20:")
    for name, context in (("peft disable_adapter()", policy.lm.disable_adapter),
                          ("PolicyModel.reference()", policy.reference)):
        def enter_and_leave(context=context):
            with context():
                pass
        print(f"  {name:<24} {median_s(enter_and_leave, 20) * 1e3:.2f} ms")


def learner_switch() -> None:
    from moral.agent import load_agent_model
    from moral.config import RunConfig

    policy, _ = load_agent_model(RunConfig(opponent="llm").resolve(), init_seed=0)
    print(f"switching {len(policy._lora_layers)} LoRA layers to the other learner and back, median of 20:")
    for name, through_peft in (("peft set_adapter", True), ("PolicyModel.set_adapter", False)):
        policy._through_peft = through_peft

        def there_and_back():
            policy.set_adapter("opponent")
            policy.set_adapter("agent")
        print(f"  {name:<24} {median_s(there_and_back, 20) / 2 * 1e3:.2f} ms per switch")


def drafted_answers() -> None:
    from benchmarks.episode_profile import recorded_episode
    from moral.config import RunConfig

    folder = tempfile.mkdtemp(prefix="cpu-shortcuts-")
    try:
        run, replay = recorded_episode(folder, RunConfig(episodes=10, format_aid="none"))
        trainer, answers = run.trainers["agent"], []
        generate = trainer.generate

        def recorded(queries, **kwargs):
            rollout = generate(queries, **kwargs)
            answers.extend(r.tolist() for r in rollout.responses)
            return rollout

        trainer.generate = recorded
        replay(top_k=1, draft=None)
        firsts = sorted({(a[0],) for a in answers})
        times = {"no draft": [], "drafted": []}
        counts = {}
        for _ in range(5):
            for name, draft in (("no draft", None), ("drafted", firsts)):
                answers.clear()
                start = time.perf_counter()
                stats = replay(top_k=1, draft=draft)
                times[name].append(time.perf_counter() - start)
                counts[name] = (stats["ppo/backbone_passes"], stats["ppo/tokens_computed"], list(answers))
        run.logs.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert counts["drafted"][2] == counts["no draft"][2]  # the same greedy answers
    print(f"paper protocol, replayed episode (greedy answers {answers}; drafted first tokens {firsts}), median of 5:")
    for name, t in times.items():
        print(f"  {name:<9} {statistics.median(t):.2f} s   {counts[name][0]:.0f} backbone passes, "
              f"{counts[name][1]:.0f} tokens")


def kept_graphs() -> None:
    from benchmarks.episode_profile import recorded_episode

    folder = tempfile.mkdtemp(prefix="cpu-shortcuts-")
    try:
        run, replay = recorded_episode(folder)
        trainer = run.trainers["agent"]
        configs = {fused: dataclasses.replace(trainer.config, fuse_rollout=fused) for fused in (True, False)}
        rows = {True: [], False: []}
        for _ in range(5):
            for fused in (True, False):
                trainer.config = trainer.shortcuts.config = configs[fused]  # one frozen config, read by both
                start = time.perf_counter()
                stats = replay()
                rows[fused].append((time.perf_counter() - start, stats["time/ppo/forward_pass"],
                                    stats["time/ppo/optimize_step"], stats["ppo/tokens_computed"]))
        run.logs.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("replayed main-job episode, median of 5 (s): episode, no-grad old log-probs pass, update "
          "(forward if recomputed, backward, Adam); tokens through the backbone")
    for fused, label in ((True, "graphs kept (fused)"), (False, "fuse_rollout=False")):
        episode, old, update, tokens = (statistics.median(col) for col in zip(*rows[fused]))
        print(f"  {label:<20} {episode:.2f}   {old:.2f}   {update:.2f}   {tokens:.0f}")


def base_products() -> None:
    import warnings

    import torch

    def rate(fn, flop: float) -> float:
        fn(), fn()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        return flop / ((time.perf_counter() - start) / 20) / 1e9

    print("frozen base products, 443 tokens, GFLOP/s (mean of 20): fp32, dynamic int8, bf16")
    torch.manual_seed(0)
    for k, n in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
        x, linear = torch.randn(443, k), torch.nn.Linear(k, n, bias=False)
        with warnings.catch_warnings():  # the eager quantisation API's deprecation notice
            warnings.simplefilter("ignore")
            int8 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                          dtype=torch.qint8)
        w, xb, wb = linear.weight.detach(), x.bfloat16(), linear.weight.detach().bfloat16()
        flop = 2 * 443 * k * n
        rates = (rate(lambda: torch.nn.functional.linear(x, w), flop), rate(lambda: int8(x), flop),
                 rate(lambda: torch.nn.functional.linear(xb, wb), flop))
        print(f"  [443, {k}] x [{k}, {n}]  " + "  ".join(f"{r:6.1f}" for r in rates))


def rollout_memory() -> None:
    from moral.agent import load_agent_model
    from moral.config import RunConfig
    from ppo_core import PPOConfig, PPOTrainer

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    policy, tokenizer = load_agent_model(RunConfig(episodes=1).resolve(), init_seed=0)
    prompts = [torch.tensor(tokenizer.encode(f"Question {i}: what is {i} plus {7 * i}? Answer with one number, "
                                             f"and explain your reasoning in detail.")) for i in range(120)]
    print("generate() x 15 calls of 4 new prompts (2 tokens), torch.no_grad(), no step: resident memory growth")
    for batch in (5, 10 ** 6):
        trainer = PPOTrainer(PPOConfig(batch_size=batch, mini_batch_size=batch, ppo_epochs=1), policy, "agent")
        start, t = rss_mb(), time.perf_counter()
        with torch.no_grad():
            for call in range(15):
                trainer.generate(prompts[60 * (batch > 5) + 4 * call:][:4], max_new_tokens=2)
        grown, kept = rss_mb() - start, len(trainer.shortcuts._fused)
        print(f"  batch_size {batch:>7}: +{grown:6.0f} MB, graphs kept for {kept} samples, {time.perf_counter() - t:.1f} s")
        trainer.discard_rollouts()
        del trainer
    shortcuts = PPOTrainer(PPOConfig(batch_size=5, mini_batch_size=5), policy, "agent").shortcuts
    tensors = len(policy.trainable_parameters("agent"))
    per_call = median_s(lambda: [shortcuts._check_weights() for _ in range(100)]) / 100
    print(f"weights check (storage and version of {tensors} tensors): {per_call * 1e3:.3f} ms per call, median of 5")


PARTS = {"attention": attention, "adam": adam, "accuracy": attention_accuracy, "reference": reference_switch,
         "switch": learner_switch, "draft": drafted_answers, "fused": kept_graphs,
         "products": base_products, "rollout": rollout_memory}

if __name__ == "__main__":
    import sys

    names = sys.argv[1:] or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"error: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}", file=sys.stderr)
        sys.exit(2)
    for name in names:
        PARTS[name]()
