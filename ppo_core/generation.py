"""Batched, KV-cached sampling for ragged queries that also returns the sampled tokens' log-probs (and, on
request, keeps their autograd graph and the values, so that a one-update PPO step can reuse this forward pass)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batching import pad_left, position_ids_from_mask, unique_sequences
from .functional import entropy_from_logits, logprobs_from_logits


@dataclass
class Rollout:
    """Sampled responses. R = longest response; mask [B, R] marks real tokens."""
    responses: list[torch.Tensor]
    """Each [R_i] long, on the CPU: the sampled tokens (with the EOS token when stopping at EOS)."""
    logprobs: torch.Tensor
    """[B, R] float32, detached: log-probs of the sampled tokens at the sampling temperature, unfiltered by
    top-k/top-p (the distribution the trainer optimises; identical to the sampling one when no filter is on)."""
    mask: torch.Tensor
    """[B, R] float32."""
    logprobs_graph: torch.Tensor | None = None
    """[B, R] with autograd graph (keep_graph=True only)."""
    values_graph: torch.Tensor | None = None
    """[B, R] values of the states that emitted each token, with graph (keep_graph=True only)."""
    entropy: torch.Tensor | None = None
    """[B, R] entropy of each sampling step's distribution (temperature applied, unfiltered), detached."""
    probe_logprobs: torch.Tensor | None = None
    """[B, K] log-probs of `probe_tokens` as the first response token (probe_tokens given only), detached."""


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed logits become -inf. [B, V] -> [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(filtered logits). [B, V] -> [B] long."""
    probs = torch.softmax(filter_logits(logits.detach().float(), top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample(policy, queries: list[torch.Tensor], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, stop_at_eos: bool = False, eos_token_id=None,
           pad_token_id: int = 0, generator: torch.Generator | None = None, keep_graph: bool = False,
           memo: dict | None = None, probe_tokens: list[int] | None = None) -> Rollout:
    """Sample responses for ragged queries (each [L_i] long, preferably on the CPU: they are keyed on the host)
    with the policy's active adapter (or inside ``policy.reference()``). Responses come back as CPU tensors.

    Fixed-length mode (default, as in the paper): exactly max_new_tokens per query, EOS does not stop.
    stop_at_eos=True: a response ends with its first EOS token (kept) or at max_new_tokens.
    Identical queries share one prefill. memo (optional, used when max_new_tokens == 1): query -> (logits, value)
    of earlier calls under the *same* weights; the caller must clear it when the weights change.
    probe_tokens: token ids whose first-step log-probs to return (e.g. the two actions' first tokens).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not queries or any(len(q) == 0 for q in queries):
        raise ValueError("sample() needs at least one query, and every query needs at least one token")
    if stop_at_eos and eos_token_id is None:
        raise ValueError("stop_at_eos=True needs eos_token_id")
    device = policy.device
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           device=device, dtype=torch.long)
    keys, inverse_list = unique_sequences([tuple(q.tolist()) for q in queries])  # CPU queries: no device sync
    inverse = torch.tensor(inverse_list, device=device)
    use_memo = memo is not None and max_new_tokens == 1

    with torch.set_grad_enabled(keep_graph):
        todo = [k for k in keys if not (use_memo and k in memo)]
        cache = attention_mask = positions = None
        if todo:
            ids, attention_mask = pad_left([torch.tensor(k, device=device) for k in todo], pad_token_id)
            positions = position_ids_from_mask(attention_mask)
            hidden, cache = policy.hidden_states(ids, attention_mask, positions, use_cache=max_new_tokens > 1)
            last = hidden[:, -1]
            new_logits = policy.logits(last, temperature)
            new_values = policy.values(last) if keep_graph else None
            if use_memo:
                for j, k in enumerate(todo):
                    memo[k] = (new_logits[j], None if new_values is None else new_values[j])
        if use_memo:
            step_logits = torch.stack([memo[keys[i]][0] for i in inverse_list])
            step_values = torch.stack([memo[keys[i]][1] for i in inverse_list]) if keep_graph else None
        else:  # todo == keys: rows of the prefill are the distinct queries
            step_logits, step_values = new_logits[inverse], (new_values[inverse] if keep_graph else None)
            if max_new_tokens > 1:
                cache.batch_select_indices(inverse)
                attention_mask, positions = attention_mask[inverse], positions[inverse]

        probe = None
        if probe_tokens:
            with torch.no_grad():
                first = step_logits.detach()
                probe = first[:, probe_tokens].float() - torch.logsumexp(first.float(), dim=-1, keepdim=True)
        tokens, logps, values, entropies, alive = [], [], [], [], []
        finished = torch.zeros(len(queries), dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            token = sample_tokens(step_logits, top_k, top_p, generator)
            tokens.append(token)
            logps.append(logprobs_from_logits(step_logits, token))
            entropies.append(entropy_from_logits(step_logits))
            if keep_graph:
                values.append(step_values)
            alive.append(~finished)
            if stop_at_eos:
                finished = finished | torch.isin(token, eos_ids)
            if t + 1 == max_new_tokens or (stop_at_eos and bool(finished.all())):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            hidden, cache = policy.hidden_states(token[:, None], attention_mask, positions, past_key_values=cache,
                                                 use_cache=True)
            step_logits = policy.logits(hidden[:, -1], temperature)
            step_values = policy.values(hidden[:, -1]) if keep_graph else None

    mask = torch.stack(alive, dim=1).float()
    token_mat = torch.stack(tokens, dim=1).cpu()  # one transfer; responses live on the host, like queries
    lengths = mask.sum(1).long().cpu().tolist()
    logprobs = torch.stack(logps, dim=1) * mask
    return Rollout(
        responses=[token_mat[i, :n] for i, n in enumerate(lengths)],
        logprobs=logprobs.detach(),
        mask=mask,
        logprobs_graph=logprobs if keep_graph else None,
        values_graph=torch.stack(values, dim=1) * mask if keep_graph else None,
        entropy=torch.stack(entropies, dim=1) * mask,
        probe_logprobs=probe,
    )
