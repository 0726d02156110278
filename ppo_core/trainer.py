"""PPOTrainer: one PPO step = score scaling -> rollout log-probs and values -> reference log-probs -> per-token
rewards -> GAE -> epochs x optimiser steps x micro-batches of the clipped loss -> KL controller.

Every formula lives in functional.py; this file is the order in which they run. The exact shortcuts (the prompt
tree, the sampling pass reused as the loss's forward pass, shared LoRA weight casts, the reference cache,
out-of-memory back-off) live behind one interface in shortcuts.py: `self.shortcuts` samples, gives the old and
the reference log-probs, recomputes forward passes and retries what does not fit.
"""

from __future__ import annotations

import time

import torch

from . import functional as F
from .batching import backward_batches
from .config import PPOConfig
from .control import AdaptiveKLController, FixedKLController, RunningMoments, scale_scores
from .generation import Rollout, token_sequences
from .shortcuts import ReferenceCache, Shortcuts

# Stop a run after this many optimiser steps in a row were skipped for non-finite loss or gradients.
MAX_CONSECUTIVE_NONFINITE = 5


class NonFiniteError(RuntimeError):
    """Raised when too many optimiser steps in a row had non-finite loss or gradients."""


class PPOTrainer:
    """Token-level PPO for one adapter of a PolicyModel.

    ``rollout = trainer.generate(queries, max_new_tokens=n)`` samples responses;
    ``stats = trainer.step(queries, rollout.responses, scores)`` makes the update.
    """

    def __init__(self, config: PPOConfig, policy, adapter: str | None = None, *, pad_token_id: int = 0,
                 reference_cache: ReferenceCache | None = None):
        from .model import PolicyModel
        if not isinstance(config, PPOConfig) or not isinstance(policy, PolicyModel):
            raise TypeError(f"PPOTrainer(config, policy): needs a PPOConfig and a PolicyModel, got "
                            f"{type(config).__name__} and {type(policy).__name__}")
        self.config = config
        self.policy = policy
        self.adapter = adapter or policy.adapter_names[0]
        if self.adapter not in policy.adapter_names:
            raise ValueError(f"adapter {self.adapter!r}: must be one of {', '.join(policy.adapter_names)}")
        self.pad_token_id = pad_token_id
        self.params = policy.trainable_parameters(self.adapter)
        # One fused kernel over all tensors (CPU and CUDA); the per-tensor loop agrees to float32 rounding.
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in self.params)
        self.optimizer = torch.optim.Adam(self.params, lr=config.learning_rate, eps=config.adam_eps, fused=fused)
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
                       if config.adap_kl_ctrl else FixedKLController(config.init_kl_coef))
        self.score_moments = RunningMoments()
        self.sample_generator = torch.Generator(device=policy.device).manual_seed(config.seed)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.shortcuts = Shortcuts(policy, self.adapter, config, pad_token_id=pad_token_id,
                                   reference_cache=reference_cache)
        self.scaler: torch.amp.GradScaler | None = None
        self._ensure_scaler()
        self.step_count = 0
        self.counters = {"skipped_steps": 0, "nonfinite_steps": 0}
        self._consecutive_nonfinite = 0
        self.sync_timing = False
        """True: the time/ppo/* statistics synchronise the device at their boundaries, so that they measure device
        work, not just its launch (benchmarks set it; it costs a few host syncs per step)."""

    @property
    def reference_cache(self) -> ReferenceCache:
        """The cache of reference log-distributions; assign one ReferenceCache to several trainers on one base."""
        return self.shortcuts.reference_cache

    @reference_cache.setter
    def reference_cache(self, cache: ReferenceCache) -> None:  # learners on one base share one cache
        cache.bind(self.config.temperature)
        self.shortcuts.reference_cache = cache

    @property
    def fusable(self) -> bool:
        """True when a step makes exactly one optimiser step over the whole batch (see Shortcuts.fusable)."""
        return self.shortcuts.fusable

    @property
    def keep_graphs(self) -> bool:
        """False after an out-of-memory error while sampling graphs were kept: steps recompute from then on."""
        return self.shortcuts.keep_graphs

    @property
    def chunk_tokens(self) -> int | None:
        """The forward token budget (config.micro_batch_tokens, halved on out-of-memory)."""
        return self.shortcuts.chunk_tokens

    # ---------------------------------------------------------------------------------------------- rollout
    def generate(self, queries: list[torch.Tensor], *, max_new_tokens: int, top_k: int = 0, top_p: float = 1.0,
                 stop_at_eos: bool = False, eos_token_id=None, probe_tokens: list[int] | None = None,
                 draft: list[tuple[int, ...]] | None = None) -> Rollout:
        """Sample responses with this trainer's adapter, temperature and random stream (see generation.sample).
        The calls between two steps grow one prompt tree: a token an earlier call computed is not computed again.
        That rollout holds at most config.batch_size samples (the batch a step takes): a call that would take it
        past them starts a new one, so calls without steps (an evaluation loop) hold one batch's tree and graphs.
        draft: likely answer starts, computed with the queries so that a multi-token answer that follows one
        needs a single pass (generation.sample). When the step will be fused (one optimiser step over the batch) the
        call keeps its graph for that step, under torch.no_grad() too (wrapping it there changes nothing); under
        torch.inference_mode() it cannot, and the step recomputes its forward pass instead."""
        queries = token_sequences("query", queries, self.policy.config.get_text_config().vocab_size)
        return self.shortcuts.sample(queries, max_new_tokens=max_new_tokens, temperature=self.config.temperature,
                                     top_k=top_k, top_p=top_p, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                                     generator=self.sample_generator, probe_tokens=probe_tokens, draft=draft)

    def discard_rollouts(self) -> None:
        """Drop kept sampling graphs, the prompt tree and weight casts (e.g. when a batch is not stepped)."""
        self.shortcuts.discard()
        self.shortcuts.take_computed()

    def reference_logprobs(self, queries, responses, R: int, full: bool = False):
        """Reference log-probs [B, R] (and [B, R, V] log-distributions if full), adapters disabled."""
        return self.shortcuts.reference(queries, responses, R, full)

    # ------------------------------------------------------------------------------------------------- step
    def _ensure_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 compute (V100, or a policy cast with .half() after this trainer was made): scale the loss so that
        small LoRA gradients do not underflow."""
        if self.scaler is None and self.policy.compute_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.policy.device.type)
        return self.scaler

    def _now(self) -> float:
        if self.sync_timing and self.policy.device.type == "cuda":
            torch.cuda.synchronize(self.policy.device)
        return time.perf_counter()

    @torch.enable_grad()  # under a caller's torch.no_grad() too
    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor], scores) -> dict[str, float]:
        """One PPO step on a batch of (query [L_i], response [R_i], scalar score) triples."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("PPOTrainer.step() computes gradients: call it outside torch.inference_mode()")
        if not any(p.requires_grad for p in self.params):
            raise RuntimeError(f"PPOTrainer.step(): none of the parameters of adapter {self.adapter!r} requires grad "
                               f"(after policy.requires_grad_(False)?); policy.requires_grad_(True) makes its LoRA "
                               f"weights and value head trainable again")
        self._ensure_scaler()
        cfg, timing, t_start = self.config, {}, self._now()
        sampled = self.shortcuts.take_computed()  # (tokens, passes) of the sampling calls
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
        full = cfg.kl_penalty == "full"
        old = self.shortcuts.rollout_values(queries, responses, R, full)
        old_logprobs, old_values = old.logprobs, old.values
        t_ref = self._now()
        ref_logprobs, ref_full = self.shortcuts.reference(queries, responses, R, full)
        t_end = self._now()
        timing["time/ppo/reference"], timing["time/ppo/forward_pass"] = t_end - t_ref, t_end - t

        # ALGO LOGIC: 4. per-token rewards: -beta * KL on every response token, the score on the last one
        t = self._now()
        kl_coef = self.kl_ctl.value
        if cfg.kl_penalty == "full":
            kl = F.kl_penalty(old.full, ref_full, "full") * mask
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
                                                       old.graph if epoch == 0 else None))
            if cfg.early_stopping and float(step_stats[-1]["policy/policykl"]) > 1.5 * cfg.target_kl:
                early_stopped = True
                break
        self.shortcuts.discard()
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
        stepped = self.shortcuts.take_computed()  # (tokens, passes) of this step's own passes
        stats.update({"ppo/fused_rollout": float(old.graph is not None), "ppo/early_stopped": float(early_stopped),
                      "ppo/optimizer_steps": float(len(step_stats)),
                      "ppo/ref_cache_hits": float(self.reference_cache.hits),
                      "ppo/ref_cache_misses": float(self.reference_cache.misses),
                      "ppo/tokens_computed": float(sampled[0] + stepped[0]),
                      "ppo/backbone_passes": float(sampled[1] + stepped[1]),
                      "ppo/oom_backoffs": float(self.shortcuts.oom_backoffs),
                      **{f"ppo/{k}": float(v) for k, v in self.counters.items()}})
        timing["time/ppo/calc_stats"] = self._now() - t
        timing["time/ppo/total"] = self._now() - t_start
        stats.update(timing)
        return stats

    # ----------------------------------------------------------------------------------------- pieces of step
    def _optimizer_step(self, queries, responses, batch, micro_batches, graph) -> dict[str, torch.Tensor]:
        """Accumulate the loss of k micro-batches (each scaled by 1/k), then one optimiser step unless the step is
        skipped (mean ratio above ratio_threshold, or non-finite loss/gradients)."""
        cfg = self.config
        k = len(micro_batches)

        def accumulate(graph):
            self.optimizer.zero_grad(set_to_none=True)
            if graph is None:
                return [self._micro_batch_backward(queries, responses, batch, mb, k) for mb in micro_batches]
            total, parts = 0.0, []  # the rollout's own forward pass: one backward through it
            for mb in micro_batches:
                loss, st = self._loss(self._select(batch, mb), graph.logprobs[mb], graph.values[mb],
                                      graph.entropy[mb], batch["mask"][mb].sum())
                total, _ = total + loss / k, parts.append(st)
            self._backward(total)
            return parts

        parts = self.shortcuts.until_it_fits(accumulate, graph, queries, responses)
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
        self.shortcuts.weights_changed()
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
            for chunk in self.shortcuts.chunks(idx, queries, responses):
                out = self.shortcuts.forward([queries[i] for i in chunk], [responses[i] for i in chunk],
                                             with_entropy=True)
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

    def _check_inputs(self, queries, responses, scores):
        if not isinstance(queries, (list, tuple)) or not isinstance(responses, (list, tuple)):
            raise ValueError("queries and responses must be lists of 1-D token tensors")
        if isinstance(scores, (str, bytes)) or not (torch.is_tensor(scores) or hasattr(scores, "__len__")):
            raise ValueError(f"scores must be a list or tensor of one number per sample, got {scores!r}")
        if torch.is_tensor(scores) and scores.dim() == 0:
            raise ValueError(f"scores must be one number per sample; got a 0-d tensor ({scores.item()!r})")
        if len(queries) != len(responses) or len(queries) != len(scores):
            raise ValueError(f"queries, responses and scores must have the same length, got "
                             f"{len(queries)}, {len(responses)} and {len(scores)}")
        if len(queries) != self.config.batch_size:
            raise ValueError(f"got a batch of {len(queries)} samples, config.batch_size is {self.config.batch_size}")
        vocab = self.policy.config.get_text_config().vocab_size  # token ids stay on the host (they are keys)
        checked = [token_sequences(name, seqs, vocab) for name, seqs in (("query", queries), ("response", responses))]
        if torch.is_tensor(scores):
            if scores.numel() != len(queries):
                raise ValueError(f"scores must be one number per sample; got a tensor of shape {tuple(scores.shape)} "
                                 f"for {len(queries)} samples")
            scores = scores.detach().to(torch.float64).reshape(-1).cpu()
        else:
            numbers = []
            for i, s in enumerate(scores):
                try:
                    numbers.append(float(torch.as_tensor(s, dtype=torch.float64).reshape(())))
                except (TypeError, ValueError, RuntimeError):
                    raise ValueError(f"scores must be one number per sample; sample {i} has score {s!r}") from None
            scores = torch.tensor(numbers, dtype=torch.float64)
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"scores must be finite; sample {bad[0]} has score {float(scores[bad[0]])}")
        huge = (scores.abs() > torch.finfo(torch.float32).max).nonzero().flatten().tolist()
        if huge:  # the step computes in float32, where it would be inf
            raise ValueError(f"scores must be within float32's range (+-3.4e38); sample {huge[0]} has score "
                             f"{float(scores[huge[0]]):g}")
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
                "shuffle_generator": self.shuffle_generator.get_state(),
                "counters": {**self.counters, "oom_backoffs": self.shortcuts.oom_backoffs},
                "chunk_tokens": self.shortcuts.chunk_tokens, "keep_graphs": self.shortcuts.keep_graphs,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (any rollout kept from before is discarded)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.step_count = int(state["step_count"])
        self.sample_generator.set_state(state["sample_generator"])
        self.shuffle_generator.set_state(state["shuffle_generator"])
        counters = dict(state["counters"])
        self.shortcuts.oom_backoffs = int(counters.pop("oom_backoffs", 0))
        self.counters.update(counters)
        self.shortcuts.chunk_tokens = state["chunk_tokens"]
        self.shortcuts.keep_graphs = bool(state.get("keep_graphs", True))
        if self._ensure_scaler() is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.discard_rollouts()
