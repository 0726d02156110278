"""The ways ppo_core can compute one PPO step agree, for PPO configurations drawn at random (fixed seeds).

A step's numbers must not depend on which shortcut served it: the prompt tree with the sampling pass kept for the
update (the default), the prompt tree recomputed (`fuse_rollout=False`), padded sequences recomputed (the tree off),
and answers drafted into the tree (`draft=`, which must also draw the same answers). The configurations cover what
the hand-picked tests in test_trainer.py and test_tree.py pin one at a time: batch, micro-batch and accumulation
sizes, epochs, the five KL estimators, score scaling, normalisation and clipping, reward whitening, gradient
clipping, early stopping on the policy KL and skipped steps (ratio threshold; both fire here, the closest value
1.5e-3 from its threshold), temperature, top-k, EOS stopping, token budgets, the reference cache on and off, one call
per batch or one per sample, and queries that are identical, prefixes of one another or share a prefix; on the tiny
Llama and on a tiny Gemma-2 (soft-capping, a 6-token sliding window that its queries of up to 20 tokens reach past).

Tolerance (fp32): every statistic within 1e-4 relative or 1e-5 absolute, whichever is larger (a loss near zero is a
mean of terms near one whose log-probs differ by rounding). In these 20 cases the largest relative difference above
1e-5 absolute is 3.6e-6; over 480 throwaway configurations with queries up to 32 tokens and eager attention too, a
policy loss of 0.0118 differed by 1.2e-6 and one gradient norm by 1.0e-4 relative after 24 optimiser steps. The LoRA and
value-head weights after two steps within 1e-3 of their largest magnitude (largest seen 1.5e-4). The explained
variance is left out where the returns' variance is below 1e-4: it divides by it (one throwaway batch had 1.4e-7,
and -270,759 against -270,652). adam_eps is 1e-4: with PyTorch's 1e-8 Adam's first
steps turn float32 rounding in gradients of ~1e-9 into whole steps of lr."""

import dataclasses
import random

import pytest
import torch

from conftest import random_queries, tiny_policy, with_nonzero_lora
from ppo_core import LoraSettings, PPOConfig, PPOTrainer, PolicyModel
from test_tree import tiny_gemma2_config

PATH_DEPENDENT = {"ppo/fused_rollout", "ppo/tokens_computed", "ppo/backbone_passes", "ppo/ref_cache_hits",
                  "ppo/ref_cache_misses"}


def random_config(rng: random.Random, seed: int) -> PPOConfig:
    batch = rng.choice([2, 3, 4, 6, 8])
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    mini = rng.choice(divisors)
    accumulation = rng.choice([d for d in divisors if batch % (mini * d) == 0])
    scaling = rng.random() < 0.5
    return PPOConfig(batch_size=batch, mini_batch_size=mini, gradient_accumulation_steps=accumulation,
                     ppo_epochs=rng.choice([1, 1, 2, 3]), learning_rate=rng.choice([1e-3, 1e-2]),
                     kl_penalty=rng.choice(["kl", "abs", "mse", "full", "k3"]), use_score_scaling=scaling,
                     use_score_norm=scaling and rng.random() < 0.5, score_clip=rng.choice([None, 0.5]),
                     whiten_rewards=rng.random() < 0.3, max_grad_norm=rng.choice([None, 0.1]),
                     temperature=rng.choice([1.0, 0.7, 1.3]), micro_batch_tokens=rng.choice([None, None, 8, 20]),
                     adap_kl_ctrl=rng.random() < 0.5, gamma=rng.choice([1.0, 0.9]), lam=rng.choice([0.95, 1.0]),
                     reference_cache_mb=rng.choice([64.0, 0.0]), adam_eps=1e-4, seed=seed,
                     early_stopping=rng.random() < 0.5, target_kl=rng.choice([1e-3, 1e-2]),
                     ratio_threshold=rng.choice([10.0, 10.0, 1.02]))


def related_queries(rng: random.Random, n: int, seed: int, max_len: int = 10) -> list[torch.Tensor]:
    """Random queries, some identical to an earlier one, some a prefix of one or sharing a prefix with one."""
    queries = []
    for fresh in random_queries(n, seed, min_len=2, max_len=max_len):
        kind = rng.random()
        if queries and kind < 0.25:
            queries.append(rng.choice(queries).clone())
        elif queries and kind < 0.5:
            earlier = rng.choice(queries)
            head = earlier[:rng.randint(1, len(earlier))]
            queries.append(torch.cat([head, fresh]) if rng.random() < 0.5 else head.clone())
        else:
            queries.append(fresh)
    return queries


def trainer_for(config: PPOConfig, seed: int, prompt_tree: bool, arch: str) -> PPOTrainer:
    if arch == "llama":
        policy = tiny_policy(seed, initializer_range=0.2)
    else:  # Gemma-2 with a 6-token window: sequences reach past it on its sliding layers
        from transformers import Gemma2ForCausalLM
        torch.manual_seed(seed)
        lm = Gemma2ForCausalLM(tiny_gemma2_config(window=6)).eval()
        policy = PolicyModel(lm, adapters=("agent",), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    policy = with_nonzero_lora(policy, seed)
    policy.use_prompt_tree = prompt_tree
    return PPOTrainer(config, policy, "agent")


@pytest.mark.parametrize("arch, case", [("llama", case) for case in range(16)] +
                         [("gemma2", case) for case in range(16, 20)])
def test_tree_fused_recomputed_padded_and_drafted_steps_agree(arch, case):
    rng = random.Random(case)
    config = random_config(rng, seed=case)
    calls = rng.choice([1, config.batch_size])
    sampling = dict(max_new_tokens=rng.choice([1, 2, 3]), top_k=rng.choice([0, 0, 5]),
                    stop_at_eos=rng.random() < 0.3, eos_token_id=rng.choice([2, [2, 7]]))
    unfused = dataclasses.replace(config, fuse_rollout=False)
    default = trainer_for(config, case % 5, True, arch)
    others = {"tree recomputed": trainer_for(unfused, case % 5, True, arch),
              "padded": trainer_for(unfused, case % 5, False, arch)}
    drafted = trainer_for(config, case % 5, True, arch)
    assert default.policy.tree_supported and not others["padded"].policy.tree_supported
    per_call = config.batch_size // calls
    for step in range(2):
        queries = related_queries(rng, config.batch_size, seed=10 * case + step,
                                  max_len=10 if arch == "llama" else 20)
        drafts = [tuple(rng.randrange(3, 64) for _ in range(sampling["max_new_tokens"])) for _ in range(2)]
        responses, drafted_responses = [], []
        for c in range(calls):
            part = queries[c * per_call:(c + 1) * per_call]
            responses += default.generate(part, **sampling).responses
            # one draft the draw follows (the default trainer's own answer) and two it rarely does
            drafted_responses += drafted.generate(part, **sampling,
                                                  draft=drafts + [tuple(responses[-1].tolist())]).responses
        assert all(torch.equal(a, b) for a, b in zip(responses, drafted_responses)), "a draft changed a draw"
        scores = [rng.gauss(0, 1) for _ in range(config.batch_size)]
        stats = default.step(queries, responses, scores)
        others_stats = {name: t.step(queries, responses, scores) for name, t in others.items()}
        others_stats["drafted"] = drafted.step(queries, drafted_responses, scores)
        for name, other in others_stats.items():
            for key, value in stats.items():
                if key.startswith("time/") or key in PATH_DEPENDENT:
                    continue
                if key == "ppo/val/var_explained" and stats["ppo/returns/var"] < 1e-4:
                    continue  # 1 - Var(returns - values) / Var(returns): rounding over a variance near zero
                assert other[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, step, key)
    assert stats["ppo/optimizer_steps"] >= 1
    for name, trainer in {**others, "drafted": drafted}.items():
        for a, b in zip(default.params, trainer.params):
            assert float((a - b).detach().abs().max()) <= 1e-3 * float(a.detach().abs().max()), name


@pytest.mark.parametrize("case", range(6))
def test_two_learners_on_one_base_are_two_separate_policies_bit_for_bit(case):
    """Two adapters on one frozen base, their calls interleaved one sample at a time as two players' are (each
    trainer switching adapters, the prompt tree and kept graphs per trainer, a shared reference cache in half the
    cases), make the same draws and updates, bit for bit, as two policies with a base of their own (30 throwaway
    configurations agreed the same way)."""
    rng = random.Random(100 + case)
    config = random_config(rng, seed=case)
    configs = {"agent": config, "opponent": dataclasses.replace(config, seed=case + 1)}
    sampling = dict(max_new_tokens=rng.choice([1, 2, 3]), top_k=rng.choice([0, 0, 5]))
    shared = with_nonzero_lora(tiny_policy(case % 3, adapters=("agent", "opponent"), initializer_range=0.2), case)
    on_one_base = {name: PPOTrainer(configs[name], shared, name) for name in configs}
    if case % 2:
        on_one_base["opponent"].reference_cache = on_one_base["agent"].reference_cache
    separate = {}
    for name in configs:
        own = tiny_policy(case % 3, adapters=(name,), initializer_range=0.2)
        with torch.no_grad():
            for mine, theirs in zip(own.trainable_parameters(name), shared.trainable_parameters(name)):
                mine.copy_(theirs)
        separate[name] = PPOTrainer(configs[name], own, name)
    for step in range(3):
        queries = {name: related_queries(rng, config.batch_size, seed=100 * case + 10 * step + i)
                   for i, name in enumerate(configs)}
        scores = {name: [rng.gauss(0, 1) for _ in range(config.batch_size)] for name in configs}
        responses = {(way, name): [] for way in ("one base", "separate") for name in configs}
        for i in range(config.batch_size):
            for name in configs:
                for way, trainers in (("one base", on_one_base), ("separate", separate)):
                    responses[way, name] += trainers[name].generate(queries[name][i:i + 1], **sampling).responses
        for name in configs:
            assert all(torch.equal(a, b) for a, b in zip(responses["one base", name], responses["separate", name]))
            stats = [trainers[name].step(queries[name], responses[way, name], scores[name])
                     for way, trainers in (("one base", on_one_base), ("separate", separate))]
            same = [{k: v for k, v in st.items() if not k.startswith("time/") and k not in PATH_DEPENDENT}
                    for st in stats]  # a shared cache counts both learners' hits
            assert same[0] == pytest.approx(same[1], rel=0, abs=0, nan_ok=True)
    for name in configs:
        assert all(torch.equal(a, b) for a, b in zip(on_one_base[name].params, separate[name].params))
