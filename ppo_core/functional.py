"""Pure tensor functions of token-level PPO for causal LMs. No state, no model, no I/O.

Shapes: B = samples, R = response tokens (right-padded per sample; ``mask`` marks real tokens), V = vocabulary.
Every per-token tensor lives in *response space* [B, R]: position t holds the quantity for the t-th response token
(log pi(y_t | x, y_<t), the value V(x, y_<t) of the state that emits it, its reward, ...). Read top to bottom, this
file follows the formula sheet: log-probs, masked statistics, KL estimators, per-token rewards, GAE, losses.
"""

from __future__ import annotations

import torch

# Rows of logits processed at once when reducing over the vocabulary in fp32.
LOGSUMEXP_CHUNK_ROWS = 64


# --------------------------------------------------------------------------------------------------- log-probs
def logsumexp_fp32(logits: torch.Tensor, chunk_rows: int = LOGSUMEXP_CHUNK_ROWS) -> torch.Tensor:
    """logsumexp over the last dim in fp32, a chunk of rows at a time. [..., V] -> [...].

    Never materialises the whole [..., V] in fp32 (a 256k vocabulary makes that the largest tensor of a step).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if logits.dtype == torch.float32 or flat.shape[0] <= chunk_rows:
        return torch.logsumexp(flat.float(), dim=-1).reshape(logits.shape[:-1])
    parts = [torch.logsumexp(chunk.float(), dim=-1) for chunk in flat.split(chunk_rows)]
    return torch.cat(parts).reshape(logits.shape[:-1])


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] as the chosen logit minus a chunked logsumexp.

    logits [..., V] (any float dtype), tokens [...] (long) -> [...] float32.
    """
    chosen = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1).float()
    return chosen - logsumexp_fp32(logits)


def log_softmax_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Full log-distribution [..., V] in fp32, only for kl_penalty='full' and caches of a few rows."""
    return logits.float() - logsumexp_fp32(logits).unsqueeze(-1)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, without grad. [..., V] -> [...] float32."""
    out = []
    flat = logits.reshape(-1, logits.shape[-1])
    for chunk in flat.split(LOGSUMEXP_CHUNK_ROWS):
        z = chunk.float()
        lse = torch.logsumexp(z, dim=-1)
        out.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
    if not out:
        return torch.zeros(logits.shape[:-1], device=logits.device, dtype=torch.float32)
    return torch.cat(out).reshape(logits.shape[:-1])


# ------------------------------------------------------------------------------------------ masked statistics
def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of values where mask is 1. values, mask [...] -> scalar (dim=None) or reduced over dim."""
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of values where mask is 1 (scalar). unbiased=True divides by n - 1 and needs n >= 2."""
    n = mask.sum()
    if unbiased and n.numel() == 1 and float(n) < 2:
        raise ValueError(f"masked_var(unbiased=True) needs at least 2 unmasked values, got {float(n):g}")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over unmasked entries (unbiased var); shift_mean=False adds the mean back."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# -------------------------------------------------------------------------------------------- KL estimators
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    For 'kl', 'abs', 'mse', 'k3': logprobs, ref_logprobs [B, R] of the sampled tokens -> [B, R].
    For 'full': logprobs, ref_logprobs [B, R, V] are full log-distributions -> exact KL per position [B, R].
    'kl' = k1 = logp - logp_ref (unbiased, can be negative); 'mse' = k2 = (logp - logp_ref)^2 / 2;
    'k3' = exp(logp_ref - logp) - 1 - (logp_ref - logp) (unbiased and >= 0); 'abs' = |logp - logp_ref|.
    """
    if kind == "full":
        return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)
    logratio = logprobs - ref_logprobs
    if kind == "kl":
        return logratio
    if kind == "abs":
        return logratio.abs()
    if kind == "mse":
        return 0.5 * logratio.square()
    if kind == "k3":
        return torch.expm1(-logratio) + logratio
    raise ValueError(f"kl_penalty kind={kind!r}: must be one of kl, abs, mse, full, k3")


# ------------------------------------------------------------------------------------------ rewards and GAE
def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real response token per sample. mask [B, R] -> [B] long."""
    lengths = mask.sum(-1).long()
    if bool((lengths == 0).any()):
        raise ValueError("every sample needs at least one response token (found an empty response)")
    return lengths - 1


def compute_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * kl_t, plus the score on the last response token.

    scores [B], kl [B, R] (already estimated, see kl_penalty), mask [B, R] -> (rewards [B, R], non_score [B, R]),
    both zero on padding.
    """
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, non_score


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    rewards, values, mask [B, R] -> (advantages [B, R], returns [B, R]) with
    delta_t = r_t + gamma V_{t+1} - V_t (V after the last response token = 0), A_t = delta_t + gamma lam A_{t+1},
    returns = A + V. Padding positions get zeros.
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------------- losses
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float,
                n_tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss, a token-level masked mean.

    logprobs (with grad), old_logprobs, advantages, mask [B, R] -> (loss scalar, detached stats).
    n_tokens: denominator of the mean (default mask.sum()); pass a micro-batch's token count when this call
    sees only a chunk of it, so that chunks add up to the micro-batch's mean exactly.
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_sum(torch.max(pg_loss1, pg_loss2), mask) / n_tokens
    with torch.no_grad():
        stats = {
            "clipfrac": masked_sum((pg_loss2 > pg_loss1).float(), mask) / n_tokens,
            "approxkl": 0.5 * masked_sum(logratio.square(), mask) / n_tokens,
            "policykl": masked_sum(-logratio, mask) / n_tokens,
            "approxkl_k3": approx_kl_k3(logprobs, old_logprobs, mask, n_tokens),
            "ratio": masked_sum(ratio, mask) / n_tokens,
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float,
               n_tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), a token-level masked mean.

    values (with grad), old_values, returns, mask [B, R] -> (loss scalar, detached stats).
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    v_loss_unclipped = (values - returns).square()
    v_loss_clipped = (v_clipped - returns).square()
    loss = 0.5 * masked_sum(torch.max(v_loss_unclipped, v_loss_clipped), mask) / n_tokens
    with torch.no_grad():
        stats = {
            "clipfrac": masked_sum((v_loss_clipped > v_loss_unclipped).float(), mask) / n_tokens,
            "error": masked_sum(v_loss_unclipped, mask) / n_tokens,
            "vpred": masked_sum(values, mask) / n_tokens,
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def approx_kl_k3(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                 n_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """CleanRL's approx_kl: masked mean of (ratio - 1) - log ratio, an unbiased, non-negative KL(old || new).

    logprobs, old_logprobs, mask [B, R] -> scalar; n_tokens: denominator (default mask.sum()), as in policy_loss.
    policy_loss reports it as "approxkl_k3" (ppo/policy/approxkl_k3), beside TRL's "approxkl" (0.5 * logratio^2)."""
    logratio = logprobs.detach() - old_logprobs
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    return masked_sum(torch.expm1(logratio) - logratio, mask) / n_tokens


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over unmasked tokens (biased variances); nan if Var[returns] = 0."""
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, torch.full_like(var_returns, float("nan")))
