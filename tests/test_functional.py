"""ppo_core.functional against hand-computed values and float64 numpy references (tolerances stated per test)."""

import math

import numpy as np
import pytest
import torch

from ppo_core import functional as F


def test_gae_three_tokens_by_hand():
    # gamma 0.9, lambda 0.8 (gamma*lambda = 0.72); row 0 has 3 tokens, row 1 has 2 (last position is padding)
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 2.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 0.5, 9.0]], dtype=torch.float64)  # 9.0: garbage on padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv, ret = F.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta2 = 1 - 0.3 = 0.7; delta1 = -0.2 + 0.9*0.3 - 0.4 = -0.33; delta0 = 0.1 + 0.9*0.4 - 0.5 = -0.04
    #        A2 = 0.7; A1 = -0.33 + 0.72*0.7 = 0.174; A0 = -0.04 + 0.72*0.174 = 0.08528
    # row 1: delta1 = 2 - 0.5 = 1.5; delta0 = 0.5 + 0.9*0.5 - 1.0 = -0.05; A1 = 1.5; A0 = -0.05 + 0.72*1.5 = 1.03
    expected_adv = [[0.08528, 0.174, 0.7], [1.03, 1.5, 0.0]]
    expected_ret = [[0.58528, 0.574, 1.0], [2.03, 2.0, 0.0]]
    assert torch.allclose(adv, torch.tensor(expected_adv, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ret, torch.tensor(expected_ret, dtype=torch.float64), atol=1e-12)


def test_gae_gamma1_lambda1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.25, 0.125]])
    adv, ret = F.compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[6.0, 5.0, 3.0]]))
    assert torch.allclose(adv, ret - values)


def test_compute_rewards_by_hand():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 7.0]])  # 7.0 sits on padding and must be ignored
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    rewards, non_score = F.compute_rewards(scores, kl, mask, kl_coef=0.5)
    assert torch.allclose(non_score, torch.tensor([[-0.05, -0.1, -0.15], [-0.25, 0.25, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 1.85], [-0.25, -0.75, 0.0]]))


def test_compute_rewards_rejects_empty_response():
    with pytest.raises(ValueError, match="at least one response token"):
        F.compute_rewards(torch.zeros(2), torch.zeros(2, 2), torch.tensor([[1.0, 0], [0, 0]]), 0.1)


def test_masked_statistics_match_numpy_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6))
    m = (rng.random((4, 6)) > 0.3).astype(np.float64)
    sel = x[m == 1]
    xt, mt = torch.tensor(x), torch.tensor(m)
    assert F.masked_mean(xt, mt).item() == pytest.approx(sel.mean(), abs=1e-12)
    assert F.masked_var(xt, mt).item() == pytest.approx(sel.var(ddof=1), abs=1e-12)
    assert F.masked_var(xt, mt, unbiased=False).item() == pytest.approx(sel.var(), abs=1e-12)
    white = F.masked_whiten(xt, mt)
    expected = (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    assert np.allclose(white.numpy()[m == 1], expected[m == 1], atol=1e-12)
    kept = F.masked_whiten(xt, mt, shift_mean=False)
    assert np.allclose(kept.numpy()[m == 1], expected[m == 1] + sel.mean(), atol=1e-12)
    row_means = F.masked_mean(xt, mt, dim=1).numpy()
    assert np.allclose(row_means, [(x[i] * m[i]).sum() / m[i].sum() for i in range(4)], atol=1e-12)


def test_masked_var_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        F.masked_var(torch.ones(3), torch.tensor([0.0, 1.0, 0.0]))


def test_logprobs_from_logits_matches_float64_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 1000) * 4
    tokens = torch.randint(0, 1000, (3, 5))
    ref = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(F.logprobs_from_logits(logits, tokens).double(), ref, atol=1e-5)
    # bf16 logits are reduced in fp32, chunk by chunk (rows > chunk size)
    big = torch.randn(200, 300).bfloat16()
    toks = torch.randint(0, 300, (200,))
    ref16 = torch.log_softmax(big.double(), -1).gather(-1, toks[:, None]).squeeze(-1)
    out = F.logprobs_from_logits(big, toks)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref16, atol=1e-5)


def test_entropy_matches_definition():
    torch.manual_seed(1)
    logits = torch.randn(4, 2, 50)
    p = torch.softmax(logits.double(), -1)
    expected = -(p * p.log()).sum(-1)
    assert torch.allclose(F.entropy_from_logits(logits).double(), expected, atol=1e-5)


def test_kl_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    d = logp - ref  # [log 2, -log 2]
    assert torch.allclose(F.kl_penalty(logp, ref, "kl"), d)
    assert torch.allclose(F.kl_penalty(logp, ref, "abs"), d.abs())
    assert torch.allclose(F.kl_penalty(logp, ref, "mse"), 0.5 * d ** 2)
    # k3 = ref/p - 1 - log(ref/p): for p=0.5, ref=0.25 -> 0.5 - 1 + log 2; for p=0.2, ref=0.4 -> 2 - 1 - log 2
    expected_k3 = torch.tensor([[-0.5 + math.log(2), 1 - math.log(2)]])
    assert torch.allclose(F.kl_penalty(logp, ref, "k3"), expected_k3, atol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        F.kl_penalty(logp, ref, "nope")


def test_full_kl_is_exact_and_k1_k3_are_unbiased():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    full = F.kl_penalty(p.log()[None, None], q.log()[None, None], "full")
    assert full.item() == pytest.approx(exact, abs=1e-12)
    # expectation under p of the sampled estimators equals the exact KL
    lp, lq = p.log(), q.log()
    for kind in ("kl", "k3"):
        assert float((p * F.kl_penalty(lp, lq, kind)).sum()) == pytest.approx(exact, abs=1e-12)


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, st = F.policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): r=1.5,A=1 -> max(-1.5,-1.2) = -1.2 (clipped); r=0.5,A=1 -> max(-0.5,-0.8)=-0.5
    # r=1.1,A=-1 -> max(1.1, 1.1)=1.1; r=0.7,A=-1 -> max(0.7, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    assert st["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.7) / 4, abs=1e-6)


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, st = F.value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped to 0.7 -> (0.7-2)^2 = 1.69 -> 1.69; token 1: 1 and 1 -> 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert values.grad[0, 0].item() == 0.0  # the clipped branch carries no gradient to V


def test_losses_chunk_denominator_adds_up():
    torch.manual_seed(2)
    new, old, adv = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3)
    mask = (torch.rand(6, 3) > 0.3).float()
    mask[:, 0] = 1
    whole, _ = F.policy_loss(new, old, adv, mask, 0.2)
    n = mask.sum()
    parts = sum(F.policy_loss(new[s], old[s], adv[s], mask[s], 0.2, n)[0] for s in (slice(0, 2), slice(2, 6)))
    assert torch.allclose(whole, parts, atol=1e-6)


def test_diagnostics():
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    r = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    m = torch.ones(1, 4)
    expected = 1 - np.var([0, 0, 0, 1.0]) / np.var([1, 2, 3, 5.0])
    assert F.explained_variance(v, r, m).item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(F.explained_variance(v, torch.ones(1, 4), m).item())
    lp, old = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    assert F.approx_kl_k3(lp, old, torch.ones(1, 1)).item() == pytest.approx(1 - math.log(2), abs=1e-6)
