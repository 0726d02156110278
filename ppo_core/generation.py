"""Batched, KV-cached sampling for ragged queries that also returns the sampled tokens' log-probs (and, on
request, keeps their autograd graph and the values, so that a one-update PPO step can reuse this forward pass)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .batching import pad_left, position_ids_from_mask, unique_sequences
from .functional import entropy_from_logits, logprobs_from_logits
from .tree import PromptTree, subtree_chunks, tree_size


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


def token_sequences(name: str, seqs, vocab_size: int) -> list[torch.Tensor]:
    """seqs (a list or tuple of 1-D integer tensors or int lists) as int64 CPU tensors; a ValueError naming the
    first bad one: not a list, not 1-D integers, empty, or a token id outside [0, vocab_size)."""
    if not isinstance(seqs, (list, tuple)):
        raise ValueError(f"{name} sequences must come as a list of 1-D token tensors, got {type(seqs).__name__}")
    out = []
    for i, s in enumerate(seqs):
        if isinstance(s, (str, bytes)):
            raise ValueError(f"{name} {i} is text ({s[:40]!r}): give token ids (tokenize it first)")
        try:
            s = torch.as_tensor(s)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} {i} must be a 1-D integer tensor or a list of ints, got {s!r:.60}") from None
        if s.dim() != 1 or s.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{name} {i} must be a 1-D integer tensor, got shape {tuple(s.shape)} and dtype {s.dtype}")
        if len(s) == 0:
            raise ValueError(f"{name} {i} is empty")
        s = s.to(device="cpu", dtype=torch.long)
        lo, hi = int(s.min()), int(s.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} {i} has token id {lo if lo < 0 else hi}: ids must be in [0, {vocab_size}) "
                             f"for this model")
        out.append(s)
    return out


def _index(value) -> int | None:
    """value as a Python int if it is an integer (int, numpy integer, 0-d integer tensor), else None."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def sample(policy, queries: list[torch.Tensor], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, stop_at_eos: bool = False, eos_token_id=None,
           pad_token_id: int = 0, generator: torch.Generator | None = None, keep_graph: bool = False,
           tree: PromptTree | None = None, max_tokens: int | None = None, memo: dict | None = None,
           probe_tokens: list[int] | None = None, draft: list[tuple[int, ...]] | None = None) -> Rollout:
    """Sample responses for ragged queries (each [L_i] long, preferably on the CPU: they are keyed on the host)
    with the policy's active adapter (or inside ``policy.reference()``). Responses come back as CPU tensors.

    Fixed-length mode (default, as in the paper): exactly max_new_tokens per query, EOS does not stop.
    stop_at_eos=True: a response ends with its first EOS token (kept) or at max_new_tokens.
    The queries and their answers grow a prompt tree (ppo_core.tree), so every distinct token is computed once.
    tree: a tree of earlier calls under the *same* weights to extend (the caller drops it when the weights
    change); without one, each chunk of queries whose tree fits in max_tokens nodes gets a fresh tree.
    memo (no-grad one-token answers, or the padded path): query -> its first-step logits (and value) under the
    *same* weights, from earlier calls; only the queries it lacks are computed, in trees of max_tokens nodes.
    Models that cannot take the tree's mask use left-padded batches (identical queries share one prefill).
    probe_tokens: token ids whose first-step log-probs to return (e.g. the two actions' first tokens).
    draft: likely starts of the answers (token sequences, e.g. the legal answers' first tokens), computed below each
    query in its first pass (tree path only; their first max_new_tokens - 1 tokens). Where the sampled tokens follow
    a drafted path, the next steps' states are already in the tree, so a multi-token answer takes one backbone pass
    instead of one per token. The numbers are those of the undrafted computation (the same nodes, in another pass);
    a wrong guess costs its tokens, which nothing attends to.
    """
    if _index(max_new_tokens) is None or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0: no top-k filter)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1] (1: no nucleus filter)")
    vocab = policy.config.get_text_config().vocab_size
    queries = token_sequences("query", queries, vocab)
    if not queries:
        raise ValueError("sample() needs at least one query")
    positions = getattr(policy.config.get_text_config(), "max_position_embeddings", None)
    longest = max(len(q) for q in queries)
    if positions and longest + max_new_tokens > positions:
        raise ValueError(f"max_new_tokens={max_new_tokens}: the longest query ({longest} tokens) and its answer "
                         f"need {longest + max_new_tokens} positions; this model has {positions} "
                         f"(max_position_embeddings)")
    if stop_at_eos and eos_token_id is None:
        raise ValueError("stop_at_eos=True needs eos_token_id")
    eos_list = []  # only stop_at_eos reads eos_token_id
    if stop_at_eos:
        many = isinstance(eos_token_id, (list, tuple, set)) or getattr(eos_token_id, "ndim", 0) == 1
        eos_list = [_index(t) for t in (eos_token_id if many else [eos_token_id])]
        if not eos_list or any(t is None or not 0 <= t < vocab for t in eos_list):
            raise ValueError(f"eos_token_id={eos_token_id!r}: must be a token id in [0, {vocab}) for this model, "
                             f"or a list or 1-D tensor of them")
    eos_ids = torch.tensor(eos_list, device=policy.device, dtype=torch.long)
    if probe_tokens is not None and any(_index(t) is None or not 0 <= t < vocab for t in probe_tokens):
        raise ValueError(f"probe_tokens={probe_tokens!r}: token ids must be in [0, {vocab}) for this model")
    drafts = sorted({tuple(int(t) for t in d[:max_new_tokens - 1]) for d in draft or ()} - {()})
    if any(not 0 <= t < vocab for d in drafts for t in d):
        raise ValueError(f"draft {drafts}: token ids must be in [0, {vocab}) for this model")
    if keep_graph and torch.is_inference_mode_enabled():
        raise RuntimeError("sample(keep_graph=True) cannot keep a graph under torch.inference_mode()")
    run = _Sampling(policy, max_new_tokens, temperature, top_k, top_p, stop_at_eos, eos_ids, generator,
                    keep_graph, probe_tokens, drafts)
    with torch.set_grad_enabled(keep_graph):  # a graph is kept under a caller's torch.no_grad() too
        if not policy.tree_supported:
            return run.padded(queries, pad_token_id, memo)
        if tree is not None:
            return run.tree(queries, tree, max_tokens)
        if memo is not None and max_new_tokens == 1 and not keep_graph:
            return run.memoised(queries, memo, max_tokens)
        keys = [tuple(q.tolist()) for q in queries]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        chunks = subtree_chunks([keys[i] for i in order], max_tokens, extra=sum(tree_size(drafts)))
        if len(chunks) == 1:
            return run.tree(queries, PromptTree(policy), None)
        parts, rows = [], []
        for chunk in chunks:  # each chunk's tree fits the budget; rows go back to the callers' order afterwards
            idx = [order[j] for j in chunk]
            parts.append(run.tree([queries[i] for i in idx], PromptTree(policy), None))
            rows += idx
        back = torch.tensor(sorted(range(len(rows)), key=rows.__getitem__))
        return select_rows(join_rollouts(parts), back)


class _Sampling:
    """One sampling call's settings; `tree` and `padded` are its two ways of computing the steps."""

    def __init__(self, policy, max_new_tokens, temperature, top_k, top_p, stop_at_eos, eos_ids, generator,
                 keep_graph, probe_tokens, drafts):
        self.policy, self.max_new_tokens, self.temperature = policy, max_new_tokens, temperature
        self.top_k, self.top_p, self.stop_at_eos, self.eos_ids = top_k, top_p, stop_at_eos, eos_ids
        self.generator, self.keep_graph, self.probe_tokens = generator, keep_graph, probe_tokens
        self.drafts = drafts

    def heads(self, hidden: torch.Tensor):
        """Logits (temperature applied) and, when keeping the graph, values of the states `hidden` [B, H]."""
        return (self.policy.logits(hidden, self.temperature),
                self.policy.values(hidden) if self.keep_graph else None)

    def tree(self, queries, tree: PromptTree, max_tokens) -> Rollout:
        """The queries' new nodes and drafted answers, then one child per row and sampled token (none to compute
        where it was drafted), computed as the tree grows."""
        lasts = [tree.insert(q.tolist())[-1] for q in queries]
        for last in dict.fromkeys(lasts):
            for draft in self.drafts:
                tree.insert(draft, parent=last)
        tree.compute(max_tokens)

        def advance(token):
            nonlocal lasts
            lasts = [tree.insert((t,), parent=last)[0] for last, t in zip(lasts, token.tolist())]
            tree.compute(max_tokens)
            return self.heads(tree.hidden(lasts))

        return self.steps(*self.heads(tree.hidden(lasts)), advance, len(queries))

    def memoised(self, queries, memo: dict, max_tokens) -> Rollout:
        """One-token answers without graph: the first-step logits of queries that `memo` lacks, in fresh trees of
        at most max_tokens nodes, then one draw per row."""
        keys = [tuple(q.tolist()) for q in queries]
        todo = sorted({k for k in keys if k not in memo})
        for chunk in subtree_chunks(todo, max_tokens):
            tree = PromptTree(self.policy, keep_cache=False)
            lasts = [tree.insert(todo[j])[-1] for j in chunk]
            tree.compute()
            logits, _ = self.heads(tree.hidden(lasts))
            memo.update({todo[j]: row for j, row in zip(chunk, logits)})
        return self.steps(torch.stack([memo[k] for k in keys]), None, None, len(queries))

    def padded(self, queries, pad_token_id, memo) -> Rollout:
        """Left-padded, KV-cached sampling for models that cannot take the prompt tree's mask."""
        policy, device = self.policy, self.policy.device
        keys, inverse_list = unique_sequences([tuple(q.tolist()) for q in queries])  # CPU queries: no device sync
        inverse = torch.tensor(inverse_list, device=device)
        use_memo = memo is not None and self.max_new_tokens == 1
        todo = [k for k in keys if not (use_memo and k in memo)]
        state = {}
        if todo:
            ids, attention_mask = pad_left([torch.tensor(k, device=device) for k in todo], pad_token_id)
            positions = position_ids_from_mask(attention_mask)
            hidden, cache = policy.hidden_states(ids, attention_mask, positions,
                                                 use_cache=self.max_new_tokens > 1)
            new_logits, new_values = self.heads(hidden[:, -1])
            if use_memo:
                for j, k in enumerate(todo):
                    memo[k] = (new_logits[j], None if new_values is None else new_values[j])
        if use_memo:
            step_logits = torch.stack([memo[keys[i]][0] for i in inverse_list])
            step_values = torch.stack([memo[keys[i]][1] for i in inverse_list]) if self.keep_graph else None
        else:  # todo == keys: rows of the prefill are the distinct queries
            step_logits, step_values = new_logits[inverse], (new_values[inverse] if self.keep_graph else None)
            if self.max_new_tokens > 1:
                cache.batch_select_indices(inverse)
                state.update(mask=attention_mask[inverse], positions=positions[inverse], cache=cache)

        def advance(token):
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            state["positions"] = state["positions"][:, -1:] + 1
            hidden, state["cache"] = policy.hidden_states(token[:, None], state["mask"], state["positions"],
                                                          past_key_values=state["cache"], use_cache=True)
            return self.heads(hidden[:, -1])

        return self.steps(step_logits, step_values, advance, len(queries))

    def steps(self, step_logits, step_values, advance, batch: int) -> Rollout:
        """Sample max_new_tokens tokens; advance(token) -> the next step's (logits, values)."""
        probe = None
        if self.probe_tokens:
            with torch.no_grad():
                first = step_logits.detach().float()
                probe = first[:, self.probe_tokens] - torch.logsumexp(first, dim=-1, keepdim=True)
        tokens, logps, values, entropies, alive = [], [], [], [], []
        finished = torch.zeros(batch, dtype=torch.bool, device=self.policy.device)
        for t in range(self.max_new_tokens):
            token = sample_tokens(step_logits, self.top_k, self.top_p, self.generator)
            tokens.append(token)
            logps.append(logprobs_from_logits(step_logits, token))
            entropies.append(entropy_from_logits(step_logits))
            if self.keep_graph:
                values.append(step_values)
            alive.append(~finished)
            if self.stop_at_eos:
                finished = finished | torch.isin(token, self.eos_ids)
            if t + 1 == self.max_new_tokens or (self.stop_at_eos and bool(finished.all())):
                break
            step_logits, step_values = advance(token)
        mask = torch.stack(alive, dim=1).float()
        token_mat = torch.stack(tokens, dim=1).cpu()  # one transfer; responses live on the host, like queries
        lengths = mask.sum(1).long().cpu().tolist()
        logprobs = torch.stack(logps, dim=1) * mask
        return Rollout(
            responses=[token_mat[i, :n] for i, n in enumerate(lengths)],
            logprobs=logprobs.detach(),
            mask=mask,
            logprobs_graph=logprobs if self.keep_graph else None,
            values_graph=torch.stack(values, dim=1) * mask if self.keep_graph else None,
            entropy=torch.stack(entropies, dim=1) * mask,
            probe_logprobs=probe,
        )


def join_rollouts(parts: list[Rollout]) -> Rollout:
    """Concatenate rollouts of consecutive query slices (padding [B, R] tensors to the longest response)."""
    R = max(p.mask.shape[1] for p in parts)

    def cat(name):
        values = [getattr(p, name) for p in parts]
        if values[0] is None:
            return None
        return torch.cat([torch.nn.functional.pad(v, (0, R - v.shape[1])) if v.dim() == 2 and name != "probe_logprobs"
                          else v for v in values])

    return Rollout(responses=[r for p in parts for r in p.responses], logprobs=cat("logprobs"), mask=cat("mask"),
                   logprobs_graph=cat("logprobs_graph"), values_graph=cat("values_graph"), entropy=cat("entropy"),
                   probe_logprobs=cat("probe_logprobs"))


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout's rows in the order `rows` gives."""
    picked = {}
    for name in ("logprobs", "mask", "logprobs_graph", "values_graph", "entropy", "probe_logprobs"):
        value = getattr(rollout, name)
        picked[name] = None if value is None else value[rows.to(value.device)]
    return Rollout(responses=[rollout.responses[i] for i in rows.tolist()], **picked)
