"""The exact shortcuts of PPO on a causal LM, behind one small interface, so that PPOTrainer.step() reads as the
formula sheet and a formula change never touches them:

- the prompt tree: the sampling calls between two optimiser steps grow one packed tree, so a token is computed once
  (ppo_core.tree); the recomputed forward passes and the reference pass pack their sequences the same way;
- kept graphs: when a step makes exactly one optimiser step over its batch (`fusable`), the sampling pass *is* the
  loss's forward pass (dropout is off, so the ratio is exactly 1) and the update backpropagates through it;
- shared casts: the forward calls of such a rollout share one low-precision copy of the LoRA weights;
- the reference cache: reference log-distributions per prefix (the reference weights never change);
- out-of-memory back-off: stop keeping graphs, halve the sampling batch, halve the forward token budget.

Each shortcut has a test that the result does not change (tests/test_trainer.py, tests/test_tree.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .batching import token_budget_chunks
from .generation import Rollout, join_rollouts, sample
from .tree import PromptTree, subtree_chunks


class ReferenceCache:
    """Reference log-distributions (fp32 [V]) keyed by token prefix, least recently used out first, within a
    memory budget. Valid for as long as the reference weights are frozen, i.e. always here."""

    def __init__(self, budget_mb: float):
        self.budget_bytes = int(budget_mb * 2 ** 20)
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self._bytes = 0
        self.temperature: float | None = None  # its rows are log-distributions at this temperature (see bind)

    def bind(self, temperature: float) -> None:
        """Tie the cache to the sampling temperature its rows are computed at: trainers at another temperature
        cannot share it (their reference log-probs would silently be another temperature's)."""
        if self.temperature is None:
            self.temperature = temperature
        elif temperature != self.temperature:
            raise ValueError(f"this ReferenceCache holds log-distributions at temperature {self.temperature}; a "
                             f"trainer at temperature {temperature} needs a cache of its own")

    def get(self, key: tuple[int, ...]) -> torch.Tensor | None:
        """The row cached for this token prefix (marked as recently used), or None."""
        row = self.entries.get(key)
        if row is not None:
            self.entries.move_to_end(key)
        return row

    def put(self, key: tuple[int, ...], row: torch.Tensor) -> None:
        """Cache a row, evicting the least recently used ones beyond the budget (a row larger than the whole
        budget, or a key already held, is not stored)."""
        nbytes = row.numel() * row.element_size()
        if self.budget_bytes < nbytes or key in self.entries:
            return
        self.entries[key] = row
        self._bytes += nbytes
        while self._bytes > self.budget_bytes:
            _, old = self.entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def state_dict(self) -> dict:
        """Keys, rows (on the host, least recently used first) and hit counts, for a checkpoint."""
        keys = list(self.entries)
        return {"keys": [list(k) for k in keys], "hits": self.hits, "misses": self.misses,
                "temperature": self.temperature,
                "rows": torch.stack([self.entries[k] for k in keys]).cpu() if keys else torch.empty(0)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore what state_dict() returned, with the rows on `device`, in the same recency order (no rows if
        they were computed at another temperature than this cache's)."""
        self.entries.clear()
        self._bytes = 0
        saved = state.get("temperature")
        same = saved is None or self.temperature is None or saved == self.temperature
        for key, row in zip(state["keys"], state["rows"]) if same else ():
            self.put(tuple(key), row.to(device))
        self.hits, self.misses = int(state["hits"]), int(state["misses"])


class KeptGraph(NamedTuple):
    """The sampling pass's outputs with their autograd graph, [B, R] each: the loss's forward pass when fused."""
    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor


@dataclass
class RolloutValues:
    """The "old" policy's view of a batch, [B, R] each: log-probs and values (detached), the full
    log-distributions for kl_penalty="full" [B, R, V], and the kept graph (logprobs, values, entropy) when the
    sampling pass serves as the loss's forward pass."""
    logprobs: torch.Tensor
    values: torch.Tensor
    full: torch.Tensor | None = None
    graph: KeptGraph | None = None


class Shortcuts:
    """The shortcuts of one trainer (one adapter of a policy)."""

    def __init__(self, policy, adapter: str, config, *, pad_token_id: int = 0,
                 reference_cache: ReferenceCache | None = None):
        self.policy, self.adapter, self.config, self.pad_token_id = policy, adapter, config, pad_token_id
        self.reference_cache = reference_cache or ReferenceCache(config.reference_cache_mb)
        self.reference_cache.bind(config.temperature)
        self.pad_multiple = 8 if policy.device.type == "cuda" else 1
        self.chunk_tokens = config.micro_batch_tokens  # forward token budget; halved on out-of-memory
        self.keep_graphs = True  # False after an out-of-memory error while graphs were kept: recompute from then on
        self.oom_backoffs = 0
        self._tree: PromptTree | None = None  # the rollout's prompt tree under the current weights
        self._memo: dict = {}    # padded fallback: query -> first-token (logits, value), until the weights change
        self._fused: dict = {}   # (query, response) -> (its sampling Rollout with graph, row, length)
        self._kept_flags: tuple | None = None  # requires_grad of the trainable parameters the kept graphs saw
        self._samples = 0  # samples in the rollout (tree, kept graphs, memo): at most a batch, see sample()
        self._stamp: tuple | None = None  # the adapter's weights the rollout was computed with, see _check_weights
        self._tokens = self._passes = 0  # backbone tokens and forward passes since the last take_computed()

    @property
    def fusable(self) -> bool:
        """True when a step makes exactly one optimiser step over the whole batch, so the sampling pass can be
        its forward pass (ratio = 1 exactly)."""
        c = self.config
        return c.fuse_rollout and c.ppo_epochs == 1 and c.batch_size == c.backward_batch_size \
            and c.kl_penalty != "full"

    # ------------------------------------------------------------------------------------------------ sampling
    def sample(self, queries: list[torch.Tensor], **kwargs) -> Rollout:
        """generation.sample into the rollout's tree, keeping graphs (and one cast of the LoRA weights) when the
        step will be fused; out of memory: stop keeping graphs, then sample each half of the batch. Under
        torch.inference_mode() no graph can be kept: the step recomputes its forward pass.
        A rollout holds at most config.batch_size samples, the batch a step takes: a call that would take it past
        that starts a new one (so generate() in an evaluation loop without steps holds one batch's tree and graphs,
        not all of them); a batch with samples of a dropped rollout recomputes its forward pass, as above."""
        self._check_weights()
        if self._samples and self._samples + len(queries) > self.config.batch_size:
            self.discard()
        self._samples += len(queries)
        keep = self.fusable and self.keep_graphs and not torch.is_inference_mode_enabled()
        if keep:
            self.policy.hold_casts(self)
            flags = self._grad_flags()  # a graph built while they were frozen cannot reach them later
            self._kept_flags = flags if not self._fused else (flags if flags == self._kept_flags else None)
        with self._counting(), self.policy.adapter(self.adapter):
            rollout = self._sample(queries, {**kwargs, "keep_graph": keep, "pad_token_id": self.pad_token_id,
                                             "max_tokens": self.chunk_tokens, "memo": self._memo})
        if rollout.logprobs_graph is not None:  # sliced in rollout_values, under the step's grad mode
            for i, (q, r) in enumerate(zip(queries, rollout.responses)):
                self._fused[(tuple(q.tolist()), tuple(r.tolist()))] = (rollout, i, len(r))
        return rollout

    def _sample(self, queries, kwargs) -> Rollout:
        shared = not torch.is_inference_mode_enabled()  # inference tensors cannot join the rollout's tree
        if shared and self._tree is None and self.policy.tree_supported:
            self._tree = PromptTree(self.policy)
        try:
            return sample(self.policy, queries, tree=self._tree if shared else None, **kwargs)
        except torch.OutOfMemoryError:
            self._tree = None  # a failed pass may have extended its cache part-way
            if kwargs["keep_graph"]:
                self.stop_keeping_graphs()
                return self._sample(queries, {**kwargs, "keep_graph": False})
            if len(queries) == 1:
                raise
            self.oom_backoffs += 1
            half = len(queries) // 2
            return join_rollouts([self._sample(queries[:half], kwargs), self._sample(queries[half:], kwargs)])

    # ----------------------------------------------------------------------------------------- the step's passes
    def rollout_values(self, queries, responses, R: int, full: bool) -> RolloutValues:
        """The old log-probs and values: the kept sampling graph when every sample has one, else a no-grad pass."""
        keys = [(tuple(q.tolist()), tuple(r.tolist())) for q, r in zip(queries, responses)]
        self._check_weights()
        if self.fusable and self._kept_flags == self._grad_flags() and all(k in self._fused for k in keys):
            kept = [self._fused[k] for k in keys]
            graph = KeptGraph(*(_pad_rows([getattr(rollout, field)[i, :n] for rollout, i, n in kept], R)
                                for field in ("logprobs_graph", "values_graph", "entropy")))
            return RolloutValues(graph.logprobs.detach(), graph.values.detach(), graph=graph)
        self.discard()
        with torch.no_grad(), self.policy.adapter(self.adapter):
            out = self.forward(queries, responses, with_values=True, full=full)
        return RolloutValues(out["logprobs"], out["values"], out.get("full"))

    def forward(self, queries, responses, *, with_values=True, full=False, with_entropy=False) -> dict:
        """policy.forward_responses within the token budget (halved on out-of-memory) at the trainer's
        temperature, with the active adapter or reference."""
        while True:
            try:
                with self._counting():
                    return self.policy.forward_responses(
                        queries, responses, temperature=self.config.temperature, with_values=with_values,
                        full_logprobs=full, with_entropy=with_entropy, max_tokens=self.chunk_tokens,
                        pad_multiple=self.pad_multiple, pad_token_id=self.pad_token_id)
            except torch.OutOfMemoryError:
                if not self.halve_budget(queries, responses):
                    raise

    @torch.no_grad()
    def reference(self, queries, responses, R: int, full: bool = False):
        """Reference log-probs [B, R] (and full log-distributions [B, R, V] if full) with adapters disabled, from
        the prefix cache where possible."""
        cache = self.reference_cache
        use_cache = cache.budget_bytes > 0
        rows: dict[tuple[int, int], torch.Tensor] = {}
        missing = []
        for i, (q, r) in enumerate(zip(queries, responses)):
            prefix, found = tuple(q.tolist()), []
            for token in r.tolist():
                row = cache.get(prefix) if use_cache else None
                if row is None:
                    break
                found.append(row)
                prefix += (token,)
            if len(found) == len(r):
                rows.update({(i, j): row for j, row in enumerate(found)})
                cache.hits += 1
            else:
                cache.misses += use_cache
                missing.append(i)
        if missing:
            sub_q, sub_r = [queries[i] for i in missing], [responses[i] for i in missing]
            with self.policy.reference():
                out = self.forward(sub_q, sub_r, with_values=False, full=True)
            for n, i in enumerate(missing):
                prefix = tuple(queries[i].tolist())
                for j, token in enumerate(responses[i].tolist()):
                    rows[i, j] = out["full"][n, j]
                    if use_cache:
                        cache.put(prefix, rows[i, j])
                    prefix += (token,)
        index = sorted(rows)
        table = torch.stack([rows[key] for key in index])                              # [N, V]
        tokens = torch.stack([responses[i][j] for i, j in index]).to(table.device)     # [N]
        ref_logprobs = torch.zeros(len(queries), R, device=table.device, dtype=table.dtype)
        rows_i = torch.tensor([i for i, _ in index], device=table.device)
        rows_j = torch.tensor([j for _, j in index], device=table.device)
        ref_logprobs[rows_i, rows_j] = table.gather(1, tokens[:, None]).squeeze(1)
        ref_full = None
        if full:
            ref_full = torch.zeros(len(queries), R, table.shape[-1], device=table.device, dtype=table.dtype)
            ref_full[rows_i, rows_j] = table
        return ref_logprobs, ref_full

    def chunks(self, idx: list[int], queries, responses) -> list[list[int]]:
        """Samples `idx` grouped so that one chunk's forward pass fits the token budget: subtrees of the packed
        tree, or padded chunks for models without the tree."""
        if self.policy.tree_supported:
            seqs = {i: tuple(queries[i].tolist()) + tuple(responses[i].tolist()) for i in idx}
            order = sorted(idx, key=seqs.__getitem__)
            return [[order[j] for j in chunk]
                    for chunk in subtree_chunks([seqs[i] for i in order], self.chunk_tokens)]
        lengths = [len(queries[i]) + len(responses[i]) for i in idx]
        return [[idx[j] for j in chunk] for chunk in token_budget_chunks(lengths, self.chunk_tokens,
                                                                         self.pad_multiple)]

    def until_it_fits(self, attempt, graph, queries, responses):
        """attempt(graph) until it fits in memory: on out-of-memory drop the kept graph first (this and later steps
        recompute), then halve the forward token budget."""
        while True:
            try:
                return attempt(graph)
            except torch.OutOfMemoryError:
                if graph is not None:
                    graph = None
                    self.stop_keeping_graphs()
                elif not self.halve_budget(queries, responses):
                    raise

    # ------------------------------------------------------------------------------------------- bookkeeping
    def _check_weights(self) -> None:
        """Drop the rollout when the adapter's weights changed since it was computed other than by step() (in place,
        e.g. a caller's own optimiser or a loaded state dict, or replaced, e.g. by .to()): its tree, memo, kept
        graphs and weight casts would serve the old weights. Version counters and storage only: no tensor is read."""
        stamp = tuple((p.data_ptr(), p._version) for p in self.policy.trainable_parameters(self.adapter))
        if self._stamp is not None and stamp != self._stamp:
            self.discard()
            self.policy.weights_changed()
        self._stamp = stamp

    def weights_changed(self) -> None:
        """After an optimiser step: the tree's states, prefills and held weight casts are stale."""
        self._stamp = None
        self._tree = None
        self._memo.clear()
        self.policy.weights_changed()

    def discard(self) -> None:
        """Drop the rollout's tree, kept graphs, memos and weight casts (after a step, or a batch not stepped)."""
        self._tree = None
        self._memo.clear()
        self._fused.clear()
        self._kept_flags = None
        self._samples = 0
        self.policy.release_casts(self)

    def _grad_flags(self) -> tuple:
        return tuple(p.requires_grad for p in self.policy.trainable_parameters(self.adapter))

    def stop_keeping_graphs(self) -> None:
        """After an out-of-memory error with sampling graphs alive: free them; this and every later step
        recomputes its forward pass in token-budget chunks."""
        self.oom_backoffs += 1
        self.discard()
        self.keep_graphs = False

    def halve_budget(self, queries, responses) -> bool:
        """After an out-of-memory error: halve the forward token budget; False if one sample no longer fits."""
        longest = max(len(q) + len(r) for q, r in zip(queries, responses))
        current = self.chunk_tokens or longest * len(queries)
        if current <= longest:
            return False
        self.chunk_tokens = max(longest, current // 2)
        self.oom_backoffs += 1
        return True

    def take_computed(self) -> tuple[int, int]:
        """(tokens, forward passes) that went through the backbone for this trainer since the last call."""
        done, self._tokens, self._passes = (self._tokens, self._passes), 0, 0
        return done

    def _counting(self):
        return _TokenCounter(self)


class _TokenCounter:
    def __init__(self, owner: Shortcuts):
        self.owner = owner

    def __enter__(self):
        self.start = self.owner.policy.backbone_tokens, self.owner.policy.backbone_passes

    def __exit__(self, *exc):
        self.owner._tokens += self.owner.policy.backbone_tokens - self.start[0]
        self.owner._passes += self.owner.policy.backbone_passes - self.start[1]


def _pad_rows(rows: list[torch.Tensor], R: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(r, (0, R - len(r))) for r in rows])
