"""PPOTrainer: one PPO step = score scaling -> rollout log-probs and values -> reference log-probs -> per-token
rewards -> GAE -> epochs x optimiser steps x micro-batches of the clipped loss -> KL controller.

Every formula lives in functional.py; this file is the order in which they run, plus the exact shortcuts:
- the sampling pass is reused as the loss's forward pass when the step makes exactly one optimiser step
  (ppo_epochs=1, one backward batch): dropout is off, so the rollout log-probs *are* the new log-probs;
- the rollout's forward calls share one low-precision copy of the LoRA weights (autocast's cast cache);
- reference log-distributions are cached per prefix (the reference weights never change);
- identical (query, response) pairs share one forward pass; forward chunks respect a token budget.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from . import functional as F
from .batching import backward_batches, token_budget_chunks
from .config import PPOConfig
from .control import AdaptiveKLController, FixedKLController, RunningMoments, scale_scores
from .generation import Rollout, join_rollouts, sample
from .tree import PromptTree

# Stop a run after this many optimiser steps in a row were skipped for non-finite loss or gradients.
MAX_CONSECUTIVE_NONFINITE = 5


class ReferenceCache:
    """Reference log-distributions (fp32 [V]) keyed by token prefix, least recently used out first, within a
    memory budget. Valid for as long as the reference weights are frozen, i.e. always here."""

    def __init__(self, budget_mb: float):
        self.budget_bytes = int(budget_mb * 2 ** 20)
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self._bytes = 0

    def get(self, key: tuple[int, ...]) -> torch.Tensor | None:
        row = self.entries.get(key)
        if row is not None:
            self.entries.move_to_end(key)
        return row

    def put(self, key: tuple[int, ...], row: torch.Tensor) -> None:
        nbytes = row.numel() * row.element_size()
        if self.budget_bytes < nbytes or key in self.entries:
            return
        self.entries[key] = row
        self._bytes += nbytes
        while self._bytes > self.budget_bytes:
            _, old = self.entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def state_dict(self) -> dict:
        keys = list(self.entries)
        return {"keys": [list(k) for k in keys], "hits": self.hits, "misses": self.misses,
                "rows": torch.stack([self.entries[k] for k in keys]).cpu() if keys else torch.empty(0)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.entries.clear()
        self._bytes = 0
        for key, row in zip(state["keys"], state["rows"]):
            self.put(tuple(key), row.to(device))
        self.hits, self.misses = int(state["hits"]), int(state["misses"])


class NonFiniteError(RuntimeError):
    """Raised when too many optimiser steps in a row had non-finite loss or gradients."""


class PPOTrainer:
    """Token-level PPO for one adapter of a PolicyModel.

    ``rollout = trainer.generate(queries, max_new_tokens=n)`` samples responses;
    ``stats = trainer.step(queries, rollout.responses, scores)`` makes the update.
    When the step can reuse the sampling pass (``fusable``), generate() keeps its graph, and one bf16/fp16 copy of
    the LoRA weights shared by all calls (PolicyModel.hold_casts), until step() or discard_rollouts().
    """

    def __init__(self, config: PPOConfig, policy, adapter: str | None = None, *, pad_token_id: int = 0,
                 reference_cache: ReferenceCache | None = None):
        self.config = config
        self.policy = policy
        self.adapter = adapter or policy.adapter_names[0]
        self.pad_token_id = pad_token_id
        self.params = policy.trainable_parameters(self.adapter)
        self.optimizer = torch.optim.Adam(self.params, lr=config.learning_rate, eps=config.adam_eps)
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
                       if config.adap_kl_ctrl else FixedKLController(config.init_kl_coef))
        self.score_moments = RunningMoments()
        device = policy.device
        self.sample_generator = torch.Generator(device=device).manual_seed(config.seed)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.reference_cache = reference_cache or ReferenceCache(config.reference_cache_mb)
        self.pad_multiple = 8 if device.type == "cuda" else 1
        # fp16 compute (V100): scale the loss so that small LoRA gradients do not underflow
        self.scaler = torch.amp.GradScaler(device.type) \
            if getattr(policy, "compute_dtype", None) == torch.float16 else None
        self.chunk_tokens = config.micro_batch_tokens
        self.step_count = 0
        self.counters = {"oom_backoffs": 0, "skipped_steps": 0, "nonfinite_steps": 0}
        self._consecutive_nonfinite = 0
        self._tree: PromptTree | None = None  # the episode's prompt tree under the current weights
        self._memo: dict = {}    # padded fallback: query -> first-token (logits, value), until the weights change
        self._tokens_computed = 0  # backbone tokens since the last step (sampling, old, reference, recomputed)
        self._fused: dict = {}   # (query, response) -> (logprobs [R], values [R], entropy [R]) with graph
        self.keep_graphs = True  # False after an out-of-memory error while graphs were kept: recompute from then on
        self.sync_timing = False
        """True: the time/ppo/* statistics synchronise the device at their boundaries, so that they measure device
        work, not just its launch (benchmarks set it; it costs a few host syncs per step)."""

    # ---------------------------------------------------------------------------------------------- rollout
    @property
    def fusable(self) -> bool:
        """True when a step makes exactly one optimiser step over the whole batch, so the sampling pass can be
        its forward pass (ratio = 1 exactly)."""
        c = self.config
        return c.fuse_rollout and c.ppo_epochs == 1 and c.batch_size == c.backward_batch_size \
            and c.kl_penalty != "full"

    def generate(self, queries: list[torch.Tensor], *, max_new_tokens: int, top_k: int = 0, top_p: float = 1.0,
                 stop_at_eos: bool = False, eos_token_id=None, probe_tokens: list[int] | None = None) -> Rollout:
        """Sample responses with this trainer's adapter, temperature and random stream (see generation.sample).
        The calls between two steps grow one prompt tree: a token an earlier call computed is not computed again."""
        keep = self.fusable and self.keep_graphs
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=self.config.temperature, top_k=top_k, top_p=top_p,
                      stop_at_eos=stop_at_eos, eos_token_id=eos_token_id, pad_token_id=self.pad_token_id,
                      generator=self.sample_generator, keep_graph=keep, max_tokens=self.chunk_tokens,
                      memo=self._memo, probe_tokens=probe_tokens)
        if keep:
            self.policy.hold_casts(self)
        before = self.policy.backbone_tokens
        with self.policy.adapter(self.adapter):
            rollout = self._sample_with_backoff(queries, kwargs)
        self._tokens_computed += self.policy.backbone_tokens - before
        if rollout.logprobs_graph is not None:
            for i, (q, r) in enumerate(zip(queries, rollout.responses)):
                n = len(r)
                self._fused[(tuple(q.tolist()), tuple(r.tolist()))] = (
                    rollout.logprobs_graph[i, :n], rollout.values_graph[i, :n], rollout.entropy[i, :n])
        return rollout

    def _sample_with_backoff(self, queries, kwargs) -> Rollout:
        """sample() into the episode's tree; on out-of-memory, drop the tree (a failed pass may have extended its
        cache part-way), first stop keeping graphs for fused steps (this run's steps then recompute their forward
        pass in token-budget chunks), then sample each half of the batch separately (recursively) and join them."""
        if self._tree is None and self.policy.tree_supported:
            self._tree = PromptTree(self.policy)
        try:
            return sample(self.policy, queries, tree=self._tree, **kwargs)
        except torch.OutOfMemoryError:
            self._tree = None
            if kwargs["keep_graph"]:
                self._stop_keeping_graphs()
                return self._sample_with_backoff(queries, {**kwargs, "keep_graph": False})
            if len(queries) == 1:
                raise
            self.counters["oom_backoffs"] += 1
            half = len(queries) // 2
            return join_rollouts([self._sample_with_backoff(queries[:half], kwargs),
                                  self._sample_with_backoff(queries[half:], kwargs)])

    def _stop_keeping_graphs(self) -> None:
        """After an out-of-memory error with sampling graphs alive: free them; this and every later step
        recomputes its forward pass in token-budget chunks."""
        self.counters["oom_backoffs"] += 1
        self.discard_rollouts()
        self.keep_graphs = False

    def discard_rollouts(self) -> None:
        """Drop kept sampling graphs and prefill memos (e.g. when a batch is not stepped)."""
        self._tree = None
        self._memo.clear()
        self._fused.clear()
        self._tokens_computed = 0
        self.policy.release_casts(self)

    # ------------------------------------------------------------------------------------------------- step
    def _now(self) -> float:
        if self.sync_timing and self.policy.device.type == "cuda":
            torch.cuda.synchronize(self.policy.device)
        return time.perf_counter()

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores) -> dict[str, float]:
        """One PPO step on a batch of (query [L_i], response [R_i], scalar score) triples."""
        cfg, timing, t_start = self.config, {}, self._now()
        tokens_before, sampled_tokens, self._tokens_computed = self.policy.backbone_tokens, self._tokens_computed, 0
        queries, responses, raw_scores = self._check_inputs(queries, responses, scores)
        B, device = len(queries), self.policy.device
        R = max(len(r) for r in responses)
        lengths = torch.tensor([len(r) for r in responses])
        mask = (torch.arange(R)[None, :] < lengths[:, None]).float().to(device)
        if sum(len(r) for r in responses) < 2:
            raise ValueError("advantage whitening needs at least 2 response tokens in a batch")

        # ALGO LOGIC: 1. score scaling / normalisation / clipping with running moments (this batch included)
        scores = scale_scores(raw_scores, self.score_moments, cfg.use_score_scaling, cfg.use_score_norm,
                              cfg.score_clip).to(device=device, dtype=torch.float32)

        # ALGO LOGIC: 2. rollout ("old") log-probs and values; 3. reference log-probs
        t = self._now()
        keys = [(tuple(q.tolist()), tuple(r.tolist())) for q, r in zip(queries, responses)]
        fused = self.fusable and all(k in self._fused for k in keys)
        graph, old_full = None, None
        if fused:
            graph = tuple(self._pad_rows([self._fused[k][n] for k in keys], R) for n in range(3))
            old_logprobs, old_values = graph[0].detach(), graph[1].detach()
        else:
            self.discard_rollouts()
            with torch.no_grad(), self.policy.adapter(self.adapter):
                out = self._with_oom_backoff(queries, responses, lambda: self._forward(
                    queries, responses, with_values=True, full=cfg.kl_penalty == "full"))
            old_logprobs, old_values, old_full = out["logprobs"], out["values"], out.get("full")
        t_ref = self._now()
        ref_logprobs, ref_full = self.reference_logprobs(queries, responses, R, full=cfg.kl_penalty == "full")
        t_end = self._now()
        timing["time/ppo/reference"], timing["time/ppo/forward_pass"] = t_end - t_ref, t_end - t

        # ALGO LOGIC: 4. per-token rewards: -beta * KL on every response token, the score on the last one
        t = self._now()
        kl_coef = self.kl_ctl.value
        if cfg.kl_penalty == "full":
            kl = F.kl_penalty(old_full, ref_full, "full") * mask
        else:
            kl = F.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_penalty) * mask
        rewards, non_score = F.compute_rewards(scores, kl, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = F.masked_whiten(rewards, mask, shift_mean=False) * mask
        timing["time/ppo/compute_rewards"] = self._now() - t

        # ALGO LOGIC: 5. GAE over response tokens, returns = A + V, advantages whitened over the batch
        t = self._now()
        advantages, returns = F.compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = F.masked_whiten(advantages, mask) * mask
        timing["time/ppo/compute_advantages"] = self._now() - t

        # ALGO LOGIC: 6. epochs x optimiser steps x micro-batches of the clipped loss
        t = self._now()
        batch = {"old_logprobs": old_logprobs, "old_values": old_values, "advantages": advantages,
                 "returns": returns, "mask": mask}
        step_stats: list[dict[str, torch.Tensor]] = []
        early_stopped = False
        for epoch in range(cfg.ppo_epochs):
            for micro_batches in backward_batches(B, cfg.mini_batch_size, cfg.gradient_accumulation_steps,
                                                  self.shuffle_generator):
                micro_batches = [mb.to(device) for mb in micro_batches]
                step_stats.append(self._optimizer_step(queries, responses, batch, micro_batches,
                                                       graph if epoch == 0 else None))
            if cfg.early_stopping and float(step_stats[-1]["policy/policykl"]) > 1.5 * cfg.target_kl:
                early_stopped = True
                break
        self.discard_rollouts()
        timing["time/ppo/optimize_step"] = self._now() - t

        # ALGO LOGIC: 7. adapt the KL coefficient to the batch's mean sequence KL
        t = self._now()
        seq_kl = kl.sum(1)
        self.kl_ctl.update(float(seq_kl.mean()), B)
        self.step_count += 1
        stats = {f"ppo/{name}": torch.stack([s[name] for s in step_stats]).mean() for name in step_stats[0]}
        stats.update(self._batch_stats(batch, scores, raw_scores, ref_logprobs, seq_kl, non_score, queries,
                                       responses, kl_coef))
        stats = self._to_floats(stats)
        stats.update({"ppo/fused_rollout": float(fused), "ppo/early_stopped": float(early_stopped),
                      "ppo/optimizer_steps": float(len(step_stats)),
                      "ppo/ref_cache_hits": float(self.reference_cache.hits),
                      "ppo/ref_cache_misses": float(self.reference_cache.misses),
                      "ppo/tokens_computed": float(sampled_tokens + self.policy.backbone_tokens - tokens_before),
                      **{f"ppo/{k}": float(v) for k, v in self.counters.items()}})
        timing["time/ppo/calc_stats"] = self._now() - t
        timing["time/ppo/total"] = self._now() - t_start
        stats.update(timing)
        return stats

    # ----------------------------------------------------------------------------------------- pieces of step
    def _forward(self, queries, responses, *, with_values=True, full=False, with_entropy=False):
        return self.policy.forward_responses(
            queries, responses, temperature=self.config.temperature, with_values=with_values,
            full_logprobs=full, with_entropy=with_entropy, max_tokens=self.chunk_tokens,
            pad_multiple=self.pad_multiple, pad_token_id=self.pad_token_id)

    @torch.no_grad()
    def reference_logprobs(self, queries, responses, R: int, full: bool = False):
        """Reference log-probs [B, R] (and full log-distributions [B, R, V] if full) with adapters disabled,
        from the prefix cache where possible."""
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
                out = self._with_oom_backoff(sub_q, sub_r, lambda: self._forward(sub_q, sub_r, with_values=False,
                                                                                 full=True))
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
        ref_logprobs = torch.zeros(len(queries), R, device=table.device)
        rows_i = torch.tensor([i for i, _ in index], device=table.device)
        rows_j = torch.tensor([j for _, j in index], device=table.device)
        ref_logprobs[rows_i, rows_j] = table.gather(1, tokens[:, None]).squeeze(1)
        ref_full = None
        if full:
            ref_full = torch.zeros(len(queries), R, table.shape[-1], device=table.device)
            ref_full[rows_i, rows_j] = table
        return ref_logprobs, ref_full

    def _optimizer_step(self, queries, responses, batch, micro_batches, graph) -> dict[str, torch.Tensor]:
        """Accumulate the loss of k micro-batches (each scaled by 1/k), then one optimiser step unless the step is
        skipped (mean ratio above ratio_threshold, or non-finite loss/gradients)."""
        cfg = self.config
        k = len(micro_batches)
        while True:
            try:
                self.optimizer.zero_grad(set_to_none=True)
                if graph is not None:  # the rollout's own forward pass: one backward through it
                    total, parts = 0.0, []
                    for mb in micro_batches:
                        loss, st = self._loss(self._select(batch, mb), graph[0][mb], graph[1][mb], graph[2][mb],
                                              batch["mask"][mb].sum())
                        total, _ = total + loss / k, parts.append(st)
                    self._backward(total)
                else:
                    parts = [self._micro_batch_backward(queries, responses, batch, mb, k) for mb in micro_batches]
                break
            except torch.OutOfMemoryError:
                if graph is not None:
                    graph = None
                    self._stop_keeping_graphs()
                elif not self._halve_budget(queries, responses):
                    raise
        st = {name: torch.stack([p[name] for p in parts]).mean() for name in parts[0]}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        st["grad_norm"] = grad_norm
        bad_grad, bad_loss = ~torch.isfinite(grad_norm), ~torch.isfinite(st["loss/total"])
        skip = bad_grad | bad_loss | (st["policy/ratio"] > cfg.ratio_threshold)
        bad_grad, bad_loss, skip = bool(bad_grad), bool(bad_loss), bool(skip)  # the one host sync per step
        # with loss scaling, an overflowing gradient is the scaler's signal to lower the scale, not a fault
        nonfinite = bad_loss or (bad_grad and self.scaler is None)
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["skipped_steps"] += 1
            if self.scaler is not None:
                self.scaler.update()
            if nonfinite:
                self.counters["nonfinite_steps"] += 1
                self._consecutive_nonfinite += 1
                if self._consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                    raise NonFiniteError(f"{self._consecutive_nonfinite} optimiser steps in a row had non-finite "
                                         f"loss or gradients; stopping (try a lower learning rate)")
        else:
            self._consecutive_nonfinite = 0
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self._tree = None  # the weights changed: the tree's states, prefills and held weight casts are stale
        self._memo.clear()
        self.policy.weights_changed()
        return st

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _micro_batch_backward(self, queries, responses, batch, mb: torch.Tensor, k: int):
        """Forward + backward of one micro-batch in token-budget chunks. Chunk losses and stats are masked sums
        over the micro-batch's token count, so they add up to the micro-batch's means; the loss is scaled by 1/k."""
        idx = mb.tolist()
        n_tokens = batch["mask"][mb].sum()
        parts = []
        with self.policy.adapter(self.adapter):
            for chunk in self._chunks_of(idx, queries, responses):
                out = self._forward([queries[i] for i in chunk], [responses[i] for i in chunk], with_entropy=True)
                sel = torch.tensor(chunk, device=mb.device)
                loss, st = self._loss(self._select(batch, sel), out["logprobs"], out["values"], out["entropy"],
                                      n_tokens)
                self._backward(loss / k)
                parts.append(st)
        return {name: torch.stack([p[name] for p in parts]).sum() for name in parts[0]}

    def _loss(self, mb, logprobs, values, entropy, n_tokens):
        """Clipped policy loss + vf_coef * clipped value loss of one micro-batch (or a chunk of it)."""
        cfg = self.config
        R = logprobs.shape[1]
        mask = mb["mask"][:, :R]
        pg_loss, pg_stats = F.policy_loss(logprobs, mb["old_logprobs"][:, :R], mb["advantages"][:, :R], mask,
                                          cfg.cliprange, n_tokens)
        vf_loss, vf_stats = F.value_loss(values, mb["old_values"][:, :R], mb["returns"][:, :R], mask,
                                         cfg.cliprange_value, n_tokens)
        loss = pg_loss + cfg.vf_coef * vf_loss
        return loss, {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), "loss/total": loss.detach(),
                      **{f"policy/{k}": v for k, v in pg_stats.items()},
                      "policy/entropy": F.masked_sum(entropy, mask) / n_tokens,
                      **{f"val/{k}": v for k, v in vf_stats.items()}}

    @staticmethod
    def _select(batch: dict, rows: torch.Tensor) -> dict:
        return {name: value[rows] for name, value in batch.items()}

    def _chunks_of(self, idx, queries, responses):
        lengths = [len(queries[i]) + len(responses[i]) for i in idx]
        return [[idx[j] for j in chunk]
                for chunk in token_budget_chunks(lengths, self.chunk_tokens, self.pad_multiple)]

    def _halve_budget(self, queries, responses) -> bool:
        """After an out-of-memory error: halve the forward token budget; False if one sample no longer fits."""
        longest = max(len(q) + len(r) for q, r in zip(queries, responses))
        current = self.chunk_tokens or longest * len(queries)
        if current <= longest:
            return False
        self.chunk_tokens = max(longest, current // 2)
        self.counters["oom_backoffs"] += 1
        return True

    def _with_oom_backoff(self, queries, responses, fn):
        while True:
            try:
                return fn()
            except torch.OutOfMemoryError:
                if not self._halve_budget(queries, responses):
                    raise

    @staticmethod
    def _pad_rows(rows: list[torch.Tensor], R: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(r, (0, R - len(r))) for r in rows])

    def _check_inputs(self, queries, responses, scores):
        if not isinstance(queries, (list, tuple)) or not isinstance(responses, (list, tuple)):
            raise ValueError("queries and responses must be lists of 1-D token tensors")
        if len(queries) != len(responses) or len(queries) != len(scores):
            raise ValueError(f"queries, responses and scores must have the same length, got "
                             f"{len(queries)}, {len(responses)} and {len(scores)}")
        if len(queries) != self.config.batch_size:
            raise ValueError(f"got a batch of {len(queries)} samples, config.batch_size is {self.config.batch_size}")
        checked = []  # token ids stay on the host (they are keys); forward passes copy them to the device
        for name, seqs in (("query", queries), ("response", responses)):
            out = []
            for i, s in enumerate(seqs):
                s = torch.as_tensor(s)
                if s.dim() != 1 or s.dtype not in (torch.int64, torch.int32):
                    raise ValueError(f"{name} {i} must be a 1-D integer tensor, got shape {tuple(s.shape)} "
                                     f"and dtype {s.dtype}")
                if len(s) == 0:
                    raise ValueError(f"{name} {i} is empty")
                out.append(s.to(device="cpu", dtype=torch.long))
            checked.append(out)
        if torch.is_tensor(scores):
            scores = scores.detach().to(torch.float64).reshape(-1).cpu()
        else:
            scores = torch.tensor([float(torch.as_tensor(s).reshape(())) for s in scores], dtype=torch.float64)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"scores must be finite; sample {bad[0]} has score {float(scores[bad[0]])}")
        return checked[0], checked[1], scores

    def _batch_stats(self, batch, scores, raw_scores, ref_logprobs, seq_kl, non_score, queries, responses,
                     kl_coef) -> dict[str, torch.Tensor]:
        mask, old_logprobs = batch["mask"], batch["old_logprobs"]
        q_len = torch.tensor([len(q) for q in queries], dtype=torch.float32)
        r_len = torch.tensor([len(r) for r in responses], dtype=torch.float32)
        return {
            "objective/kl": seq_kl.mean(),
            "objective/kl_coef": torch.tensor(kl_coef),
            "objective/logprobs": (old_logprobs * mask).sum(1).mean(),
            "objective/ref_logprobs": (ref_logprobs * mask).sum(1).mean(),
            "objective/entropy": (-old_logprobs * mask).sum(1).mean(),
            "ppo/mean_non_score_reward": non_score.sum(1).mean(),
            "ppo/mean_scores": scores.mean(),
            "ppo/std_scores": scores.std() if len(scores) > 1 else torch.tensor(0.0),
            "env/reward_mean": raw_scores.mean(),
            "env/reward_std": raw_scores.std() if len(raw_scores) > 1 else torch.tensor(0.0),
            "ppo/policy/advantages_mean": F.masked_mean(batch["advantages"], mask),
            "ppo/returns/mean": F.masked_mean(batch["returns"], mask),
            "ppo/returns/var": F.masked_var(batch["returns"], mask, unbiased=False),
            "ppo/val/mean": F.masked_mean(batch["old_values"], mask),
            "ppo/val/var": F.masked_var(batch["old_values"], mask, unbiased=False),
            "ppo/val/var_explained": F.explained_variance(batch["old_values"], batch["returns"], mask),
            "tokens/queries_len_mean": q_len.mean(), "tokens/queries_len_std": q_len.std(correction=0),
            "tokens/responses_len_mean": r_len.mean(), "tokens/responses_len_std": r_len.std(correction=0),
            "ppo/learning_rate": torch.tensor(self.optimizer.param_groups[0]["lr"]),
        }

    def _to_floats(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """All stats to Python floats with a single device-to-host transfer."""
        names, device = list(stats), self.policy.device
        values = torch.stack([stats[n].detach().to(device=device, dtype=torch.float32).reshape(()) for n in names])
        return dict(zip(names, values.cpu().tolist()))

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (the adapter weights are saved by the checkpoint module)."""
        return {"optimizer": self.optimizer.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                "score_moments": self.score_moments.state_dict(), "step_count": self.step_count,
                "sample_generator": self.sample_generator.get_state(),
                "shuffle_generator": self.shuffle_generator.get_state(), "counters": dict(self.counters),
                "chunk_tokens": self.chunk_tokens, "keep_graphs": self.keep_graphs,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.step_count = int(state["step_count"])
        self.sample_generator.set_state(state["sample_generator"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        self.counters.update(state["counters"])
        self.chunk_tokens = state["chunk_tokens"]
        self.keep_graphs = bool(state.get("keep_graphs", True))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.discard_rollouts()
