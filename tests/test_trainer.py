"""PPOTrainer on tiny random models: exactness of the shortcuts, gradient accumulation, skipping, back-off."""

import contextlib
import copy
import dataclasses
import weakref

import pytest
import torch

from conftest import random_queries, tiny_llama, tiny_policy, with_nonzero_lora
from ppo_core import PPOConfig, PPOTrainer
from ppo_core.generation import sample


def make(config: PPOConfig, seed: int = 0, **policy_kwargs):
    policy = tiny_policy(seed, **policy_kwargs)
    return policy, PPOTrainer(config, policy, "agent")


def lora_params(policy, name="agent"):
    return [p.detach().clone() for p in policy.trainable_parameters(name)]


def fixed_batch(n=8, seed=0, response_len=2):
    queries = random_queries(n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    responses = [torch.randint(3, 64, (response_len,), generator=g) for _ in range(n)]
    scores = torch.randn(n, generator=g).tolist()
    return queries, responses, scores


def test_gradient_accumulation_equals_one_big_batch():
    """k=4 micro-batches of 2 make the same gradient as one micro-batch of 8 (fp32: rtol 1e-5, atol 1e-7; only
    the summation order differs), and each makes one Adam step with its gradient: Adam's first step is
    -lr * g / (|g| + eps) (float64 reference; atol 3e-8, a few float32 steps of parameters near 0.1). The two
    updates are not compared with each other: dividing by |g| + 1e-8 magnifies rounding in gradients of size
    ~1e-8."""
    lr = 1e-3
    base = dict(batch_size=8, ppo_epochs=1, learning_rate=lr, fuse_rollout=False)
    _, big = make(PPOConfig(mini_batch_size=8, **base))
    _, acc = make(PPOConfig(mini_batch_size=2, gradient_accumulation_steps=4, **base))
    queries, responses, scores = fixed_batch()
    before = [[p.detach().double().clone() for p in t.params] for t in (big, acc)]
    st_big = big.step(queries, responses, scores)
    st_acc = acc.step(queries, responses, scores)
    assert st_big["ppo/optimizer_steps"] == st_acc["ppo/optimizer_steps"] == 1
    for pb, pa in zip(big.params, acc.params):
        assert torch.allclose(pb.grad, pa.grad, rtol=1e-5, atol=1e-7)
    for trainer, start in zip((big, acc), before):
        for p, p0 in zip(trainer.params, start):
            g = p.grad.double()
            assert torch.allclose(p.double(), p0 - lr * g / (g.abs() + 1e-8), rtol=0, atol=3e-8)
    assert st_big["ppo/loss/total"] == pytest.approx(st_acc["ppo/loss/total"], rel=1e-5, abs=1e-7)


def test_first_epoch_ratio_is_exactly_one_with_dropout_modules_present():
    """Dropout p=0.5 in LoRA and the value head must not be active: the first update sees ratio == 1 exactly."""
    cfg = PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, learning_rate=1e-3)
    for fuse in (True, False):
        _, trainer = make(dataclasses.replace(cfg, fuse_rollout=fuse), lora_dropout=0.5, value_head_dropout=0.5)
        queries = random_queries(8)
        rollout = trainer.generate(queries, max_new_tokens=2)
        st = trainer.step(queries, rollout.responses, torch.randn(8).tolist())
        assert st["ppo/fused_rollout"] == float(fuse)
        assert st["ppo/policy/ratio"] == 1.0 and st["ppo/policy/clipfrac"] == 0.0
        assert st["ppo/policy/approxkl"] == 0.0 and st["ppo/val/clipfrac"] == 0.0


def test_fused_rollout_gives_the_same_update_as_recomputing():
    """The sampling pass reused as the loss forward equals a separate forward (KV-cached, left-padded vs full,
    right-padded: fp32 rounding only; rtol 1e-4, atol 1e-6 on gradients)."""
    cfg = PPOConfig(batch_size=6, mini_batch_size=6, ppo_epochs=1, learning_rate=1e-3)
    _, fused = make(cfg)
    _, plain = make(dataclasses.replace(cfg, fuse_rollout=False))
    queries = random_queries(6, seed=3)
    rollout = fused.generate(queries, max_new_tokens=3)
    scores = torch.randn(6).tolist()
    st_f = fused.step(queries, rollout.responses, scores)
    st_p = plain.step(queries, rollout.responses, scores)
    assert st_f["ppo/fused_rollout"] == 1.0 and st_p["ppo/fused_rollout"] == 0.0
    for pf, pp in zip(fused.params, plain.params):
        assert torch.allclose(pf.grad, pp.grad, rtol=1e-4, atol=1e-6)
    for key in ("ppo/loss/policy", "ppo/loss/value", "objective/kl"):
        assert st_f[key] == pytest.approx(st_p[key], rel=1e-4, abs=1e-6)


def test_generate_without_steps_holds_one_batch_of_rollout_and_steps_any_batch_exactly():
    """generate() calls with no step between them (an evaluation loop) used to grow one prompt tree and keep every
    call's graph until a step (`python -m benchmarks.cpu_shortcuts rollout`: on the embedded model about 330 MB more
    per call of 4 prompts, without end). A rollout now holds at most a batch; a batch whose samples
    span two rollouts recomputes its forward pass and makes the update of a trainer that never kept graphs
    (bitwise: the same no-grad and training passes), and a batch within one rollout is still fused."""
    cfg = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-3)
    _, trainer = make(cfg)
    queries = random_queries(12, seed=5)
    responses = []
    with torch.no_grad():
        for call in range(6):
            responses += trainer.generate(queries[2 * call:2 * call + 2], max_new_tokens=2).responses
            held = trainer.shortcuts
            assert len(held._fused) <= 4
            assert len(held._tree) <= sum(len(q) + 2 for q in queries[max(0, 2 * call - 2):2 * call + 2])
    scores = torch.randn(4, generator=torch.Generator().manual_seed(0)).tolist()
    mixed = [2, 3, 10, 11]  # the fourth call's pair (dropped with its rollout) and the sixth's (kept)
    _, plain = make(dataclasses.replace(cfg, fuse_rollout=False))
    stats = [t.step([queries[i] for i in mixed], [responses[i] for i in mixed], scores) for t in (trainer, plain)]
    assert stats[0]["ppo/fused_rollout"] == stats[1]["ppo/fused_rollout"] == 0.0
    for a, b in zip(trainer.params, plain.params):
        assert torch.equal(a, b)
    rollout = [trainer.generate(queries[i:i + 2], max_new_tokens=2).responses for i in (0, 2)]
    st = trainer.step(queries[:4], rollout[0] + rollout[1], scores)
    assert st["ppo/fused_rollout"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_changed_outside_step_drop_the_rollout(dtype):
    """A caller's own change of the adapter's weights between generate() calls, or between generate() and step()
    (its own optimiser, a loaded state dict), used to leave the rollout computed with the old weights: the next call
    reused the tree's states (the same log-probs as before the change) and the step failed in the backward through
    the kept graphs (autograd: "modified by an inplace operation"). Now the next call computes with the new weights
    (its probe equals a fresh sample's: fp32, 1e-6;
    bf16 rounding, 2e-2, against a change of 0.05 to 0.2), and the step makes the update of a trainer that never
    kept graphs (bitwise: the same passes)."""
    cfg = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-3)
    queries = random_queries(4, seed=2)

    def nudged(policy):
        with torch.no_grad():
            g = torch.Generator().manual_seed(9)
            for p in policy.trainable_parameters("agent"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return policy

    policy = with_nonzero_lora(tiny_policy(0)).to(dtype)
    trainer = PPOTrainer(dataclasses.replace(cfg, batch_size=8, mini_batch_size=8), policy, "agent")
    before = trainer.generate(queries, max_new_tokens=1, probe_tokens=[5, 6]).probe_logprobs
    after = trainer.generate(queries[:1], max_new_tokens=1, probe_tokens=[5, 6]).probe_logprobs
    assert torch.equal(after, before[:1])  # same weights: the tree's states serve
    nudged(policy)
    after = trainer.generate(queries[:1], max_new_tokens=1, probe_tokens=[5, 6]).probe_logprobs
    with torch.inference_mode():
        fresh = sample(policy, queries[:1], max_new_tokens=1, probe_tokens=[5, 6]).probe_logprobs
    assert (fresh - before[:1]).abs().max() > 0.05
    assert torch.allclose(after, fresh, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)

    scores = [0.5, -1.0, 2.0, 0.0]
    updated = []
    for fuse in (True, False):
        policy = with_nonzero_lora(tiny_policy(0)).to(dtype)
        trainer = PPOTrainer(dataclasses.replace(cfg, fuse_rollout=fuse), policy, "agent")
        responses = trainer.generate(queries, max_new_tokens=2).responses if fuse else responses
        nudged(policy)
        st = trainer.step(queries, responses, scores)
        assert st["ppo/fused_rollout"] == 0.0
        updated.append(lora_params(policy))
    for a, b in zip(*updated):
        assert torch.equal(a, b)


def test_reference_is_the_base_model_and_policy_moves_away():
    base_copy = tiny_llama(seed=0)
    policy, trainer = make(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-2))
    queries, responses, scores = fixed_batch(4, response_len=2)

    def base_logprobs():  # independent float64 reference from the untouched copy's own forward
        out = []
        for q, r in zip(queries, responses):
            seq = torch.cat([q, r])[None]
            logits = base_copy(input_ids=seq).logits[0].double()
            lp = torch.log_softmax(logits, -1)[len(q) - 1:-1].gather(-1, r[:, None]).squeeze(-1)
            out.append(lp)
        return torch.stack(out)

    expected = base_logprobs()
    ref_before, _ = trainer.reference_logprobs(queries, responses, 2)
    with torch.no_grad():
        pol_before = policy.forward_responses(queries, responses)["logprobs"]
    assert torch.allclose(ref_before.double(), expected, atol=1e-5)
    assert torch.allclose(pol_before.double(), expected, atol=1e-5)  # LoRA B = 0 at init
    trainer.step(queries, responses, scores)
    trainer.reference_cache.entries.clear()  # recompute, do not read the cache
    ref_after, _ = trainer.reference_logprobs(queries, responses, 2)
    with torch.no_grad():
        pol_after = policy.forward_responses(queries, responses)["logprobs"]
    assert torch.allclose(ref_after.double(), expected, atol=1e-5)
    assert (pol_after.double() - expected).abs().max() > 1e-3


def test_a_reference_cache_serves_one_temperature():
    """Its rows are log-distributions at the trainer's temperature: a trainer at another temperature sharing it
    read the first one's reference log-probs, silently. Now sharing is refused at once, naming both temperatures,
    and a checkpoint's rows computed at another temperature are not loaded."""
    from ppo_core import ReferenceCache
    policy = tiny_policy(0)

    def config(temperature):
        return PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1, temperature=temperature)

    hot, cool = PPOTrainer(config(1.0), policy, "agent"), PPOTrainer(config(0.7), policy, "agent")
    message = "temperature 1.0; a trainer at temperature 0.7 needs a cache of its own"
    with pytest.raises(ValueError, match=message):
        PPOTrainer(config(0.7), policy, "agent", reference_cache=hot.reference_cache)
    with pytest.raises(ValueError, match=message):
        cool.reference_cache = hot.reference_cache
    PPOTrainer(config(1.0), policy, "agent", reference_cache=hot.reference_cache)  # the same temperature shares
    queries, responses, _ = fixed_batch(2)
    ref_hot, _ = hot.reference_logprobs(queries, responses, 2)
    ref_cool, _ = cool.reference_logprobs(queries, responses, 2)
    assert (ref_hot - ref_cool).abs().max() > 1e-2  # what sharing served the cooler trainer
    state = hot.reference_cache.state_dict()
    assert len(state["keys"]) == 4
    cool.reference_cache.load_state_dict(state, policy.device)
    assert not cool.reference_cache.entries
    same = ReferenceCache(64)
    same.bind(1.0)
    same.load_state_dict(state, policy.device)
    assert len(same.entries) == 4


def test_left_padding_changes_no_log_probs():
    policy = tiny_policy(0)
    with torch.no_grad():  # make the adapter non-trivial
        for p in policy.trainable_parameters("agent"):
            p.add_(0.05 * torch.randn_like(p))
    queries = random_queries(5, seed=7, min_len=2, max_len=11)
    batched = sample(policy, queries, max_new_tokens=3, top_k=1)  # greedy: deterministic tokens
    for i, q in enumerate(queries):
        single = sample(policy, [q], max_new_tokens=3, top_k=1)
        assert torch.equal(single.responses[0], batched.responses[i])
        assert torch.allclose(single.logprobs[0], batched.logprobs[i], atol=1e-5)
    with torch.no_grad():
        full = policy.forward_responses(queries, batched.responses)
    assert torch.allclose(full["logprobs"], batched.logprobs, atol=1e-5)  # KV-cached decode == full pass


def test_stop_at_eos_and_fixed_length_modes():
    policy = tiny_policy(0)
    with torch.no_grad():  # make token 2 (EOS) the most likely next token everywhere
        policy._lm_head.weight[2] += 5.0 * policy._backbone.norm.weight.sign()
    queries = random_queries(4, seed=1)
    fixed = sample(policy, queries, max_new_tokens=4, top_k=1, eos_token_id=2)
    assert all(len(r) == 4 for r in fixed.responses)
    stopped = sample(policy, queries, max_new_tokens=4, top_k=1, eos_token_id=2, stop_at_eos=True)
    assert all(len(r) == 1 and r[-1].item() == 2 for r in stopped.responses)
    assert stopped.mask.shape == (4, 1)


def test_top_k_and_temperature_are_consistent():
    policy = tiny_policy(0)
    queries = random_queries(3, seed=2)
    g = torch.Generator().manual_seed(0)
    hot = sample(policy, queries, max_new_tokens=2, temperature=0.7, top_k=5, generator=g)
    with torch.no_grad():
        full = policy.forward_responses(queries, hot.responses, temperature=0.7)
    assert torch.allclose(full["logprobs"], hot.logprobs, atol=1e-5)


def test_ratio_threshold_really_skips_the_step():
    cfg = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2, ratio_threshold=1e-3,
                    fuse_rollout=False)
    policy, trainer = make(cfg)
    before = lora_params(policy)
    st = trainer.step(*fixed_batch(4))
    assert st["ppo/skipped_steps"] == 4 and st["ppo/optimizer_steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(before, lora_params(policy)))
    assert len(trainer.optimizer.state) == 0  # Adam never stepped: no moments were created


def test_nonfinite_gradient_skips_update_and_counts():
    policy, trainer = make(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-2))
    before = lora_params(policy)
    handle = trainer.params[0].register_hook(lambda g: g * float("nan"))
    st = trainer.step(*fixed_batch(4))
    handle.remove()
    assert st["ppo/nonfinite_steps"] == 1 and st["ppo/skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, lora_params(policy)))
    trainer.step(*fixed_batch(4, seed=1))
    assert not all(torch.equal(a, b) for a, b in zip(before, lora_params(policy)))


def test_out_of_memory_halves_the_chunk_and_redoes_the_step():
    cfg = PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, learning_rate=1e-3, fuse_rollout=False)
    _, reference = make(cfg)
    policy, trainer = make(cfg)
    original = policy.forward_responses
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if torch.is_grad_enabled() and calls.get("failed") is None:
            calls["failed"] = True
            raise torch.OutOfMemoryError("simulated")
        return original(*args, **kwargs)

    policy.forward_responses = flaky
    batch = fixed_batch(8)
    st = trainer.step(*batch)
    reference.step(*batch)
    assert st["ppo/oom_backoffs"] == 1 and trainer.chunk_tokens is not None
    for pa, pb in zip(trainer.params, reference.params):  # same data, same gradient (chunking is exact)
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-5, atol=1e-7)


def test_two_adapters_share_one_base_and_learn_separately():
    policy = tiny_policy(0, adapters=("agent", "opponent"))
    cfg = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-2)
    t_agent, t_opp = PPOTrainer(cfg, policy, "agent"), PPOTrainer(dataclasses.replace(cfg, seed=1), policy, "opponent")
    agent0, opp0 = lora_params(policy, "agent"), lora_params(policy, "opponent")
    queries = random_queries(4)
    ro = t_agent.generate(queries, max_new_tokens=2)
    t_agent.step(queries, ro.responses, [1.0, 0.0, 0.5, -1.0])
    assert not all(torch.equal(a, b) for a, b in zip(agent0, lora_params(policy, "agent")))
    assert all(torch.equal(a, b) for a, b in zip(opp0, lora_params(policy, "opponent")))
    ro = t_opp.generate(queries, max_new_tokens=2)
    agent1 = lora_params(policy, "agent")
    t_opp.step(queries, ro.responses, [0.0, 1.0, -0.5, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(agent1, lora_params(policy, "agent")))
    assert not all(torch.equal(a, b) for a, b in zip(opp0, lora_params(policy, "opponent")))
    assert set(policy.value_heads) == {"agent", "opponent"}
    n_base = sum(p.numel() for n, p in policy.lm.named_parameters() if "lora_" not in n)
    assert n_base == sum(p.numel() for p in tiny_llama(0).parameters())  # one copy of the base


def test_early_stopping_on_target_kl():
    """TRL's rule: after an epoch, stop if the last minibatch's policy KL (k1, measured in its forward pass)
    exceeds 1.5 x target_kl. Epoch 1 measures 0 (nothing changed yet); with this batch epoch 2 measures ~0.17."""
    cfg = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=4, learning_rate=5e-2, early_stopping=True,
                    target_kl=1e-3, fuse_rollout=False)
    _, trainer = make(cfg)
    st = trainer.step(*fixed_batch(4, seed=3))
    assert st["ppo/early_stopped"] == 1.0 and st["ppo/optimizer_steps"] == 2
    _, patient = make(dataclasses.replace(cfg, target_kl=100.0))
    st = patient.step(*fixed_batch(4, seed=3))
    assert st["ppo/early_stopped"] == 0.0 and st["ppo/optimizer_steps"] == 4


def test_reference_cache_is_exact_and_hits():
    cfg = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1)
    _, cached = make(cfg)
    _, uncached = make(dataclasses.replace(cfg, reference_cache_mb=0))
    queries, responses, _ = fixed_batch(4)
    a, _ = cached.reference_logprobs(queries, responses, 2)
    b, _ = cached.reference_logprobs(queries, responses, 2)
    c, _ = uncached.reference_logprobs(queries, responses, 2)
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)
    assert cached.reference_cache.hits == 4 and cached.reference_cache.misses == 4


def test_full_kl_penalty_runs_and_is_nonnegative():
    _, trainer = make(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, kl_penalty="full",
                                learning_rate=1e-2))
    for seed in range(3):
        st = trainer.step(*fixed_batch(4, seed=seed))
    assert st["objective/kl"] >= 0 and st["ppo/fused_rollout"] == 0.0


@pytest.mark.parametrize("kl_penalty", ["kl", "full"])
def test_a_step_under_a_float64_default_dtype(kl_penalty):
    """A caller's torch.set_default_dtype(torch.float64) (a float64 model, for a numerical check of its own) used to
    fail in the reference pass: the reference log-probs were written into a tensor of the default dtype from the
    cache's float32 rows ("Index put requires the source and destination dtypes match")."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        policy, trainer = make(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=2, kl_penalty=kl_penalty,
                                         learning_rate=1e-2))
        assert next(policy.parameters()).dtype == torch.float64
        queries = random_queries(4)
        before = lora_params(policy)
        for _ in range(2):  # the second step reads the reference cache (one-token answers to the same queries)
            rollout = trainer.generate(queries, max_new_tokens=1)
            st = trainer.step(queries, rollout.responses, [1.0, -1.0, 0.5, 0.0])
        assert st["ppo/ref_cache_hits"] > 0 and st["objective/kl"] >= 0
        assert any(not torch.equal(a, b) for a, b in zip(before, lora_params(policy)))
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("mutate, message", [
    (lambda q, r, s: (q[:-1], r, s), "same length"),
    (lambda q, r, s: (q, r[:-1] + [torch.tensor([], dtype=torch.long)], s), "response 3 is empty"),
    (lambda q, r, s: (q, r, s[:-1] + [float("nan")]), "finite"),
    (lambda q, r, s: (q, r, s[:-1] + [float("inf")]), "finite"),
    (lambda q, r, s: (q, [x.float() for x in r], s), "integer tensor"),
    (lambda q, r, s: (q[:2], r[:2], s[:2]), "batch_size"),
    (lambda q, r, s: (q, r[:1] + [torch.tensor([5, 64])] + r[2:], s), r"response 1 has token id 64: .*\[0, 64\)"),
    (lambda q, r, s: (q, r, s[:1] + ["high"] + s[2:]), "one number per sample; sample 1 has score 'high'"),
    (lambda q, r, s: (q, r, s[:1] + [torch.tensor([1.0, 2.0])] + s[2:]), "one number per sample; sample 1"),
    (lambda q, r, s: (q, r, torch.tensor(s)[:, None].expand(4, 2)), r"tensor of shape \(4, 2\) for 4 samples"),
])
def test_bad_inputs_raise_value_error(mutate, message):
    _, trainer = make(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1))
    with pytest.raises(ValueError, match=message):
        trainer.step(*mutate(*fixed_batch(4)))


@pytest.mark.parametrize("queries, message", [
    ([], "at least one query"),
    (torch.tensor([[5, 6, 7], [8, 9, 10]]), "list of 1-D token tensors, got Tensor"),
    ([torch.tensor([5, 6]), torch.tensor([], dtype=torch.long)], "query 1 is empty"),
    ([torch.tensor([5, 6, 64])], r"query 0 has token id 64: ids must be in \[0, 64\)"),
    ([torch.tensor([-1, 6])], "query 0 has token id -1"),
    ([torch.tensor([5.0, 6.0])], "query 0 must be a 1-D integer tensor"),
    ([torch.tensor([[5, 6]])], r"query 0 must be a 1-D integer tensor, got shape \(1, 2\)"),
    (["Hello there"], r"query 0 is text \('Hello there'\): give token ids \(tokenize it first\)"),
    ([[5, "6"]], r"query 0 must be a 1-D integer tensor or a list of ints, got \[5, '6'\]"),
    ({"top_k": -1}, r"top_k=-1: must be >= 0"),
    ({"top_p": 0.0}, r"top_p=0.0: must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5: must be in \(0, 1\]"),
    ({"max_new_tokens": 1.5}, r"max_new_tokens=1.5: must be an integer >= 1"),
    ({"max_new_tokens": 2 ** 70}, rf"max_new_tokens={2 ** 70}: the longest query \(2 tokens\) and its answer need "
                                  rf"{2 ** 70 + 2} positions; this model has 512"),  # generated until out of memory
    ({"stop_at_eos": True, "eos_token_id": 64}, r"eos_token_id=64: must be a token id in \[0, 64\)"),
    ({"stop_at_eos": True, "eos_token_id": [3, -1]}, r"eos_token_id=\[3, -1\]: must be a token id"),
    ({"probe_tokens": [3, 64]}, r"probe_tokens=\[3, 64\]: token ids must be in \[0, 64\)"),  # was an IndexError
])
def test_bad_queries_to_generate_raise_one_clear_value_error(queries, message):
    """They used to surface as an AttributeError, an IndexError from the embedding or from torch.topk, a NaN error
    from torch.multinomial, a TypeError from range(), or (float ids, top_p > 1, an EOS id outside the vocabulary, so
    that no response ever stopped) no error. A dict: good queries, these sampling settings."""
    _, trainer = make(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1))
    settings = {"max_new_tokens": 2, **queries} if isinstance(queries, dict) else {"max_new_tokens": 2}
    with pytest.raises(ValueError, match=message):
        trainer.generate([torch.tensor([5, 6])] if isinstance(queries, dict) else queries, **settings)


@pytest.mark.parametrize("batch, message", [
    ({"queries": "ab"}, "queries and responses must be lists of 1-D token tensors"),
    ({"scores": None}, "scores must be a list or tensor of one number per sample, got None"),
    ({"scores": "ab"}, "scores must be a list or tensor of one number per sample, got 'ab'"),
    ({"scores": [1.0]}, "queries, responses and scores must have the same length, got 2, 2 and 1"),
    ({"scores": [1.0, [2.0, 3.0]]}, r"sample 1 has score \[2.0, 3.0\]"),
    ({"scores": torch.ones(2, 2)}, r"got a tensor of shape \(2, 2\) for 2 samples"),
    ({"scores": [1.0, float("inf")]}, "scores must be finite; sample 1 has score inf"),
    ({"scores": torch.tensor(1.0)}, r"got a 0-d tensor \(1.0\)"),  # was a TypeError from len()
    ({"scores": [1.0, -1e300]}, r"within float32's range \(\+-3.4e38\); sample 1 has score -1e\+300"),  # said "inf"
    ({"responses": [torch.tensor([3]), torch.tensor([], dtype=torch.long)]}, "response 1 is empty"),
    ({"responses": [torch.tensor([3.0]), torch.tensor([4])]}, "response 0 must be a 1-D integer tensor"),
    ({"responses": [torch.tensor([3]), torch.tensor([64])]}, r"response 1 has token id 64: ids must be in \[0, 64\)"),
    ({"n": 3}, "got a batch of 3 samples, config.batch_size is 2"),
])
def test_bad_batches_to_step_raise_one_clear_value_error(batch, message):
    """Each names what is wrong (scores=None was a TypeError from len())."""
    _, trainer = make(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1))
    n = batch.pop("n", 2)
    args = {"queries": [torch.tensor([5, 6 + i]) for i in range(n)], "responses": [torch.tensor([3])] * n,
            "scores": [1.0] * n, **batch}
    with pytest.raises(ValueError, match=message):
        trainer.step(args["queries"], args["responses"], args["scores"])


def test_generate_takes_numpy_and_tensor_integers_for_counts_and_eos():
    """Greedy answers stop at their first token once it is an EOS id, however the ids are given (a 1-D tensor, as
    transformers keeps them, used to be refused)."""
    import numpy as np
    _, trainer = make(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1))
    query = [torch.tensor([5, 6])]
    greedy = trainer.generate(query, max_new_tokens=3, top_k=1).responses[0].tolist()
    trainer.discard_rollouts()
    first, other = greedy[0], (greedy[0] + 1) % 64
    assert other not in greedy[:1]
    for eos in (np.int64(first), torch.tensor(first), (other, first), torch.tensor([other, first]),
                np.array([first])):
        rollout = trainer.generate(query, max_new_tokens=np.int64(3), top_k=1, stop_at_eos=True, eos_token_id=eos)
        assert rollout.responses[0].tolist() == [first], eos
        trainer.discard_rollouts()
    rollout = trainer.generate(query, max_new_tokens=np.int64(3), top_k=1, stop_at_eos=True, eos_token_id=other)
    assert rollout.responses[0].tolist() == greedy[:len(rollout.responses[0])]
    trainer.discard_rollouts()


def test_a_trainer_for_an_adapter_the_policy_lacks_says_which_it_has():
    with pytest.raises(ValueError, match="adapter 'opponent': must be one of agent"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), tiny_policy(), "opponent")


def test_generate_takes_queries_as_int_lists_too():
    _, trainer = make(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1))
    as_lists = trainer.generate([[5, 6, 7], [8, 9]], max_new_tokens=2).responses
    trainer.discard_rollouts()
    _, again = make(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1))
    as_tensors = again.generate([torch.tensor([5, 6, 7]), torch.tensor([8, 9])], max_new_tokens=2).responses
    assert all(torch.equal(a, b) for a, b in zip(as_lists, as_tensors))


def test_fp16_compute_uses_loss_scaling_and_updates():
    """fp16 compute (V100) scales the loss; the update stays finite and moves the adapter."""
    from ppo_core import LoraSettings, PolicyModel
    torch.manual_seed(1)
    policy = PolicyModel(tiny_llama(0), adapters=("agent",), lora=LoraSettings(r=8, alpha=16),
                         compute_dtype=torch.float16)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-2), policy,
                         "agent")
    assert trainer.scaler is not None
    before = lora_params(policy)
    for seed in range(3):
        queries = random_queries(4, seed=seed)
        rollout = trainer.generate(queries, max_new_tokens=2)
        trainer.step(queries, rollout.responses, [1.0, -1.0, 0.5, 0.0])
    after = lora_params(policy)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert trainer.state_dict()["scaler"]["scale"] > 0


def test_a_policy_cast_to_fp16_after_its_trainer_was_made_gets_loss_scaling():
    """The scaler used to be decided once, when the trainer was made: policy.half() afterwards left fp16 compute
    without loss scaling (small LoRA gradients underflow)."""
    from ppo_core import LoraSettings, PolicyModel
    policy = PolicyModel(tiny_llama(0), adapters=("agent",), lora=LoraSettings(r=8, alpha=16))
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1), policy, "agent")
    assert trainer.scaler is None and trainer.state_dict()["scaler"] is None
    policy.half()
    queries = random_queries(4, seed=0)
    trainer.step(queries, trainer.generate(queries, max_new_tokens=2).responses, [1.0, -1.0, 0.5, 0.0])
    assert trainer.scaler is not None and trainer.state_dict()["scaler"]["scale"] > 0


# ---------------------------------------------------------------- one low-precision copy of the LoRA weights
def bf16_policy(seed=0, adapters=("agent",)):
    from ppo_core import LoraSettings, PolicyModel
    lm = tiny_llama(seed, initializer_range=0.2)
    torch.manual_seed(seed + 1)
    policy = PolicyModel(lm, adapters=adapters, lora=LoraSettings(r=8, alpha=16), compute_dtype=torch.bfloat16)
    with torch.no_grad():  # non-zero B, so that every LoRA weight gets a gradient through its cast
        g = torch.Generator().manual_seed(seed + 2)
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


def autocast_nesting() -> int:
    level = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return level


def fused_episode(trainer, calls=5, seed=0):
    """`calls` sequential generate calls (prefill + 1 decode each) kept for one fused step."""
    queries, responses = [], []
    for c in range(calls):
        q = random_queries(2, seed=100 * seed + c)
        queries += q
        responses += trainer.generate(q, max_new_tokens=2).responses
    return queries, responses, torch.linspace(-1, 1, len(queries)).tolist()


def test_fused_rollout_keeps_one_bf16_copy_of_each_lora_weight():
    """Ten forward calls (5 generate calls x prefill + decode) keep one bf16 copy of each LoRA matrix in the
    graph instead of ten; the autocast nesting level is back to 0 after the step."""
    def saved_copies(share: bool) -> int:
        policy = bf16_policy()
        if not share:
            policy.hold_casts = lambda owner: None
        trainer = PPOTrainer(PPOConfig(batch_size=10, mini_batch_size=10, ppo_epochs=1), policy, "agent")
        shapes = {tuple(p.shape) for p in trainer.params[:-2]}
        copies = set()

        def pack(t):
            if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
                copies.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            batch = fused_episode(trainer)
        st = trainer.step(*batch)
        assert st["ppo/fused_rollout"] == 1.0 and autocast_nesting() == 0 and not policy._cast_holders
        return len(copies)

    shared, per_call = saved_copies(True), saved_copies(False)
    assert shared > 0 and per_call == 10 * shared


def test_a_callers_autocast_region_around_the_loop_never_serves_casts_of_old_weights(tmp_path):
    """Autocast caches the low-precision copy of each trainable weight until its outermost region exits. A caller
    who wraps the whole loop in torch.autocast(bf16) around an fp32 policy got, after the first update, samples
    computed from the copies of the weights before it (episode 2's log-probs -27.39 instead of -29.54 in a tiny
    run), and after load_adapter_weights the copies of the weights before the load. Now the optimiser step and the
    load clear the cache: the same as one region per call, bit for bit."""
    from ppo_core.model import load_adapter_weights, save_adapter
    save_adapter(with_nonzero_lora(tiny_policy(), seed=7), "agent", str(tmp_path / "other"))

    def episodes(one_region: bool):
        policy = with_nonzero_lora(tiny_policy())
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-2), policy,
                             "agent")
        per_call = contextlib.nullcontext if one_region else (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        logprobs = []
        with torch.autocast("cpu", dtype=torch.bfloat16) if one_region else contextlib.nullcontext():
            for episode in range(3):
                queries = random_queries(4, seed=episode)
                with per_call():
                    rollout = trainer.generate(queries, max_new_tokens=2)
                logprobs.append(rollout.logprobs)
                with per_call():
                    trainer.step(queries, rollout.responses, [1.0, -1.0, 0.5, 0.0])
            for _ in range(2):  # sample (filling the cache), load other weights, sample again
                with per_call():
                    logprobs.append(trainer.generate(random_queries(4, seed=9), max_new_tokens=2).logprobs)
                trainer.discard_rollouts()
                load_adapter_weights(policy, "agent", str(tmp_path / "other"))
                trainer.sample_generator.manual_seed(0)
        return logprobs

    one_region, per_call = episodes(True), episodes(False)
    assert not torch.equal(per_call[3], per_call[4])  # the load changed what is sampled
    assert all(torch.equal(a, b) for a, b in zip(one_region, per_call))


def test_a_trainer_dropped_between_generate_and_step_frees_its_rollout():
    """Under autocast a rollout holds the LoRA weights' casts open (PolicyModel.hold_casts). A trainer dropped
    between generate and step (a notebook cell run again) stayed alive through that hold, with its kept graph and
    prompt tree (gigabytes for Gemma-2-2b), and left autocast's nesting level raised. Now it is freed when dropped,
    the level is back to 0, and the next trainer makes the update a fresh policy makes, bit for bit."""
    def lora_after_step(drop_one_first: bool):
        policy = bf16_policy()
        config = PPOConfig(batch_size=10, mini_batch_size=10, ppo_epochs=1)
        if drop_one_first:
            dropped = PPOTrainer(config, policy, "agent")
            fused_episode(dropped, seed=1)
            assert autocast_nesting() == 1 and len(policy._cast_holders) == 1
            shortcuts = weakref.ref(dropped.shortcuts)
            del dropped
            assert shortcuts() is None and not policy._cast_holders and autocast_nesting() == 0
        trainer = PPOTrainer(config, policy, "agent")
        trainer.step(*fused_episode(trainer))
        assert autocast_nesting() == 0 and not policy._cast_holders
        return {n: p.detach().clone() for n, p in policy.lm.named_parameters() if "lora_" in n}

    fresh, after_a_dropped_trainer = lora_after_step(False), lora_after_step(True)
    assert all(torch.equal(fresh[n], after_a_dropped_trainer[n]) for n in fresh)


def test_a_no_grad_pass_inside_a_kept_rollout_leaves_the_lora_weights_in_the_graph():
    """The prompt tree's one-time probe is a no-grad pass, run inside the first sampling call, while the rollout
    holds autocast's casts. On torch 2.6 a cast cached there (without grad) served the later calls: the first fused
    update then left every LoRA weight unchanged. No-grad calls now keep out of that cache; on a torch with
    PyTorch's own fix (2.13) the LoRA change is asserted all the same."""
    policy = bf16_policy()
    trainer = PPOTrainer(PPOConfig(batch_size=10, mini_batch_size=10, ppo_epochs=1), policy, "agent")
    assert policy._tree_supported is None  # not probed yet: the first generate call probes
    lora = {n: p.detach().clone() for n, p in policy.lm.named_parameters() if "lora_" in n}
    st = trainer.step(*fused_episode(trainer))
    assert st["ppo/fused_rollout"] == 1.0 and policy._tree_supported is True
    after = dict(policy.lm.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in lora.items())
    with torch.no_grad(), policy._compute_context():
        assert not torch.is_autocast_cache_enabled()
    with policy._compute_context():
        assert torch.is_autocast_cache_enabled()


@pytest.mark.parametrize("ppo_epochs", [1, 2])
def test_generate_under_no_grad_or_inference_mode_gives_the_same_update(ppo_epochs):
    """Callers often wrap sampling in torch.no_grad() or torch.inference_mode(). The fused step (1 epoch)
    backpropagates through the sampling pass: no_grad used to leave it without a graph (the step reported its loss
    and changed no LoRA weight), inference_mode made its backward fail. Every mix gives the plain calls' update:
    no_grad bit for bit; a batch with an inference-mode call recomputes its forward pass (fp32 rounding: asserted
    1e-7, against Adam's first step of lr = 1.41e-5 on every weight; `pytest -s -k inference_mode` prints each
    mix's largest difference)."""
    contexts = {"plain": contextlib.nullcontext, "no_grad": torch.no_grad, "inference": torch.inference_mode}

    def lora_after_step(first: str, second: str):
        policy = with_nonzero_lora(tiny_policy())
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=ppo_epochs), policy, "agent")
        queries, responses = [], []
        for c, context in enumerate((first, second)):
            q = random_queries(2, seed=c)
            with contexts[context]():
                responses += trainer.generate(q, max_new_tokens=2).responses
            queries += q
        trainer.step(queries, responses, [1.0, -1.0, 0.5, 0.0])
        return {n: p.detach().clone() for n, p in policy.lm.named_parameters() if "lora_" in n}

    start = {n: p.detach() for n, p in with_nonzero_lora(tiny_policy()).lm.named_parameters() if "lora_" in n}
    plain = lora_after_step("plain", "plain")
    assert all(not torch.equal(plain[n], start[n]) for n in start)
    other = lora_after_step("no_grad", "no_grad")
    assert all(torch.equal(plain[n], other[n]) for n in plain)
    for mix in [("inference", "inference"), ("plain", "inference"), ("inference", "plain"), ("no_grad", "inference")]:
        other = lora_after_step(*mix)
        largest = max(float((plain[n] - other[n]).abs().max()) for n in plain)
        print(f"ppo_epochs={ppo_epochs} {mix}: largest LoRA difference {largest:.2g}")
        assert largest <= 1e-7, mix


def test_sample_keeps_its_graph_under_no_grad_across_chunks_and_refuses_inference_mode():
    """generation.sample(keep_graph=True) sets the grad mode for the whole call: a caller's torch.no_grad() used to
    drop the graph where chunks of queries are joined (a token budget smaller than the batch's tree)."""
    policy = with_nonzero_lora(tiny_policy())
    queries = random_queries(6, seed=3)
    with torch.no_grad():
        rollout = sample(policy, queries, max_new_tokens=2, keep_graph=True, max_tokens=12,
                         generator=torch.Generator().manual_seed(0))
    assert rollout.logprobs_graph.requires_grad and rollout.values_graph.requires_grad
    with torch.inference_mode(), pytest.raises(RuntimeError, match="cannot keep a graph under torch.inference_mode"):
        sample(policy, queries, max_new_tokens=2, keep_graph=True)


@pytest.mark.parametrize("ppo_epochs", [1, 2])
def test_step_under_no_grad_makes_the_same_update_and_inference_mode_is_refused(ppo_epochs):
    """step() under a caller's torch.no_grad() used to fail with "element 0 of tensors does not require grad"."""
    def params_after_step(context):
        policy = with_nonzero_lora(tiny_policy())
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=ppo_epochs), policy, "agent")
        queries, responses = [], []
        for c in range(2):
            q = random_queries(2, seed=c)
            responses += trainer.generate(q, max_new_tokens=2).responses
            queries += q
        with context():
            trainer.step(queries, responses, [1.0, -1.0, 0.5, 0.0])
        return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    plain, wrapped = params_after_step(contextlib.nullcontext), params_after_step(torch.no_grad)
    assert all(torch.equal(plain[n], wrapped[n]) for n in plain)
    with pytest.raises(RuntimeError, match=r"call it outside torch.inference_mode\(\)"):
        params_after_step(torch.inference_mode)


def test_requires_grad_keeps_the_base_frozen_and_a_frozen_learner_steps_again_once_trainable():
    """nn.Module's requires_grad_(True) would unfreeze the base (a gradient the size of the model in every step);
    requires_grad_(False) made step() fail with "element 0 of tensors does not require grad". Now True makes only
    the adapters and value heads trainable; a step while they are frozen is refused with one line; and a batch
    sampled while frozen, stepped once trainable again, makes the update of a policy never frozen: its kept graph
    cannot reach the LoRA weights, so the step recomputes (fp32 rounding, asserted 1e-7; `pytest -s -k
    requires_grad` prints it)."""
    policy = tiny_policy(adapters=("agent", "opponent"))
    assert policy.requires_grad_(True) is policy
    trainable = {id(p) for name in policy.adapter_names for p in policy.trainable_parameters(name)}
    assert all(p.requires_grad == (id(p) in trainable) for p in policy.parameters())
    assert not any(p.requires_grad for p in policy.requires_grad_(False).parameters())

    def lora_after_step(freeze: bool):
        policy = with_nonzero_lora(tiny_policy())
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1), policy, "agent")
        queries, scores = random_queries(4, seed=0), [1.0, -1.0, 0.5, 0.0]
        if freeze:
            policy.requires_grad_(False)
        responses = trainer.generate(queries, max_new_tokens=2).responses
        if freeze:
            with pytest.raises(RuntimeError, match=r"adapter 'agent' requires grad .*requires_grad_\(True\)"):
                trainer.step(queries, responses, scores)
            policy.requires_grad_(True)
        trainer.step(queries, responses, scores)
        return {n: p.detach().clone() for n, p in policy.lm.named_parameters() if "lora_" in n}

    start = {n: p.detach() for n, p in with_nonzero_lora(tiny_policy()).lm.named_parameters() if "lora_" in n}
    plain, refrozen = lora_after_step(False), lora_after_step(True)
    assert all(not torch.equal(plain[n], start[n]) for n in start)
    largest = max(float((plain[n] - refrozen[n]).abs().max()) for n in plain)
    print(f"frozen while sampling, then trainable: largest LoRA difference {largest:.2g}")
    assert largest <= 1e-7


def test_shared_casts_keep_bf16_gradients_as_accurate():
    """The shared copy sums the ten calls' gradients in bf16 before the cast back to fp32. Against a float64
    recomputation of the same batch, the LoRA gradient's relative error stays within 2% of the per-call casts'
    own bf16 error (`pytest tests/test_trainer.py -k accurate -s` prints both per seed; on the 2-core EPYC:
    5.88% vs 5.88%, 2.68% vs 2.65%, 3.99% vs 3.97%)."""
    def relative_error(share: bool, seed: int) -> float:
        policy = bf16_policy(seed)
        reference = copy.deepcopy(policy).double()
        reference.compute_dtype = torch.float64
        if not share:
            policy.hold_casts = lambda owner: None
        cfg = PPOConfig(batch_size=10, mini_batch_size=10, ppo_epochs=1)
        trainer = PPOTrainer(cfg, policy, "agent")
        batch = fused_episode(trainer, seed=seed)
        trainer.step(*batch)
        exact = PPOTrainer(dataclasses.replace(cfg, fuse_rollout=False), reference, "agent")
        exact.step(*batch)
        g = torch.cat([p.grad.flatten().double() for p in trainer.params[:-2]])
        g64 = torch.cat([p.grad.flatten() for p in exact.params[:-2]])
        return float((g - g64).norm() / g64.norm())

    for seed in range(3):
        per_call, shared = relative_error(False, seed), relative_error(True, seed)
        print(f"seed {seed}: LoRA gradient error vs float64, shared cast {shared:.2%}, per-call casts {per_call:.2%}")
        assert 0 < per_call < 0.1 and shared <= 1.02 * per_call


def test_skipping_peft_input_casts_under_autocast_changes_no_value():
    """With bf16 base weights (as the job loads them on a bf16 CPU) peft casts each LoRA input to fp32 and autocast
    casts it straight back; the policy skips both. Hidden states and every LoRA gradient are bitwise those of peft's
    own path, and the casts are back on outside the policy's passes."""
    def pass_(skip: bool):
        policy = bf16_policy()
        policy.lm.get_base_model().to(torch.bfloat16)  # the base only; LoRA factors and the value head stay fp32
        for p in policy.trainable_parameters("agent"):
            p.data = p.data.float()
        ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
        if skip:
            hidden, _ = policy.hidden_states(ids)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = policy._backbone(input_ids=ids).last_hidden_state
        hidden.float().pow(2).sum().backward()
        assert all(m.cast_input_dtype_enabled for m in policy._lora_layers)
        return hidden, [p.grad for p in policy.trainable_parameters("agent")[:-2]]

    (h_skip, g_skip), (h_peft, g_peft) = pass_(True), pass_(False)
    assert h_skip.dtype == torch.bfloat16 and torch.equal(h_skip, h_peft)
    assert len(g_skip) > 0 and all(a is not None and torch.equal(a, b) for a, b in zip(g_skip, g_peft))


def test_held_casts_never_serve_weights_from_before_a_step():
    """Two learners on one base: the agent steps while the opponent's rollout still holds casts; the agent's
    next rollout must use its new weights (a stale bf16 copy would give the old log-probs)."""
    policy = bf16_policy(adapters=("agent", "opponent"))
    cfg = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=0.2)
    agent, opponent = PPOTrainer(cfg, policy, "agent"), PPOTrainer(dataclasses.replace(cfg, seed=1), policy, "opponent")
    queries = random_queries(4, seed=7)
    ro_agent = agent.generate(queries, max_new_tokens=1)
    opponent.generate(queries, max_new_tokens=1)
    agent.step(queries, ro_agent.responses, [1.0, -1.0, 1.0, -1.0])
    assert autocast_nesting() == 1  # the opponent still holds
    after = agent.generate(queries, max_new_tokens=1)
    agent.discard_rollouts()
    opponent.discard_rollouts()
    assert autocast_nesting() == 0
    with torch.no_grad(), policy.adapter("agent"):
        fresh = policy.forward_responses(queries, after.responses, with_values=False)["logprobs"]
    with torch.no_grad(), policy.adapter("agent"):
        old = agent.policy.forward_responses(queries, ro_agent.responses, with_values=False)["logprobs"]
    # bf16 logits carry ~3 significant digits: one rounding step of a logit near -6.7 is 0.03, and sampling (a tree
    # of the queries) and forward_responses (a tree of query + response) may round it differently; the step moves
    # these log-probs by ~1.8
    assert torch.allclose(after.logprobs, fresh, rtol=2 ** -7, atol=2e-2)
    assert not torch.allclose(ro_agent.logprobs, old, rtol=2 ** -7, atol=2e-2)  # the step moved these log-probs


def test_out_of_memory_while_keeping_graphs_drops_them_and_recomputes(monkeypatch):
    """An out-of-memory error in a graph-keeping generate call frees the graphs kept so far, later calls keep
    none (for the rest of the run, and after a resume), and the step recomputes its forward pass: same responses
    and the same update as a trainer that never fused (rtol 1e-4, atol 1e-6, as the fused-vs-recomputed test)."""
    import ppo_core.shortcuts as trainer_module
    cfg = PPOConfig(batch_size=6, mini_batch_size=6, ppo_epochs=1, learning_rate=1e-3)
    _, flaky = make(cfg)
    _, plain = make(dataclasses.replace(cfg, fuse_rollout=False))
    real_sample, kept = trainer_module.sample, []

    def sample(policy, queries, **kwargs):
        kept.append(kwargs["keep_graph"])
        if len(kept) == 2 and kwargs["keep_graph"]:
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        return real_sample(policy, queries, **kwargs)

    monkeypatch.setattr(trainer_module, "sample", sample)
    queries = [random_queries(2, seed=s) for s in range(3)]
    responses = [flaky.generate(q, max_new_tokens=2).responses for q in queries]
    assert kept == [True, True, False, False] and not flaky.shortcuts._fused
    monkeypatch.setattr(trainer_module, "sample", real_sample)
    plain_responses = [plain.generate(q, max_new_tokens=2).responses for q in queries]
    flat = lambda xs: [x for part in xs for x in part]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(responses), flat(plain_responses)))
    scores = torch.randn(6).tolist()
    st = flaky.step(flat(queries), flat(responses), scores)
    plain.step(flat(queries), flat(responses), scores)
    assert st["ppo/fused_rollout"] == 0.0 and st["ppo/oom_backoffs"] == 1
    for pf, pp in zip(flaky.params, plain.params):
        assert torch.allclose(pf.grad, pp.grad, rtol=1e-4, atol=1e-6)
    flaky.generate(random_queries(2, seed=9), max_new_tokens=2)
    assert not flaky.keep_graphs and not flaky.shortcuts._fused
    _, resumed = make(cfg)
    resumed.load_state_dict(flaky.state_dict())
    assert not resumed.keep_graphs


def test_out_of_memory_in_generation_samples_each_half(monkeypatch):
    import ppo_core.shortcuts as trainer_module
    _, trainer = make(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, fuse_rollout=False))
    real_sample, sizes = trainer_module.sample, []

    def sample(policy, queries, **kwargs):
        sizes.append(len(queries))
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        return real_sample(policy, queries, **kwargs)

    monkeypatch.setattr(trainer_module, "sample", sample)
    queries = random_queries(4, seed=5)
    rollout = trainer.generate(queries, max_new_tokens=2)
    assert sizes == [4, 2, 2] and trainer.shortcuts.oom_backoffs == 1
    assert len(rollout.responses) == 4 and rollout.logprobs.shape == (4, 2)
    assert trainer.step(queries, rollout.responses, [1.0, 0.0, -1.0, 0.5])["ppo/oom_backoffs"] == 1


def test_trainer_arguments_in_the_wrong_order_get_one_line():
    """TRL's PPOTrainer took (config, model, ...); passing (policy, config) used to fail inside with
    "'PPOConfig' object has no attribute 'adapter_names'"."""
    policy = tiny_policy()
    with pytest.raises(TypeError, match=r"needs a PPOConfig and a PolicyModel, got PolicyModel and PPOConfig"):
        PPOTrainer(policy, PPOConfig(batch_size=2, mini_batch_size=2))
    PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), policy)


def test_policy_to_bf16_computes_in_bf16_and_keeps_fp32_master_weights_that_learn():
    """policy.to(torch.bfloat16) (a habit) cast the LoRA weights and value head to bf16 too: Adam's first step at the
    paper's lr 1.41e-5 then left part of them unchanged (rounded away), silently."""
    from ppo_core import LoraSettings, PolicyModel
    policy = PolicyModel(tiny_llama(0), lora=LoraSettings(r=4)).to(torch.bfloat16)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, learning_rate=1.41e-5), policy)
    assert policy.compute_dtype == torch.bfloat16
    assert {p.dtype for p in trainer.params} == {torch.float32}
    assert policy.lm.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16
    before = [p.detach().clone() for p in trainer.params]
    queries = [torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5])]
    trainer.step(queries, trainer.generate(queries, max_new_tokens=2).responses, [1.0, -1.0])
    unchanged = sum(int((p == b).sum()) for p, b in zip(trainer.params, before))
    assert unchanged == 0, f"{unchanged} of {sum(b.numel() for b in before)} trainable weights did not move"
    assert {p.dtype for p in policy.to(torch.float64).trainable_parameters("default")} == {torch.float64}
