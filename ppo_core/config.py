"""PPOConfig: every PPO hyper-parameter in one frozen, validated dataclass.

Field names and defaults follow TRL's classic ``PPOConfig`` (0.9.5.dev0) so that settings and dashboards carry
over. The dataclass is frozen: change a field with ``dataclasses.replace(config, field=value)``, which validates
again. (The paper's code set ``gradient_accumulation_steps`` after construction and so bypassed TRL's checks.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

KL_PENALTIES = ("kl", "abs", "mse", "full", "k3")


@dataclass(frozen=True)
class PPOConfig:
    # --- TRL classic fields (same names, same defaults) ---
    learning_rate: float = 1.41e-5
    """Adam learning rate (TRL default)."""
    batch_size: int = 128
    """Samples per ``PPOTrainer.step`` call."""
    mini_batch_size: int = 128
    """Samples per micro-batch; ``gradient_accumulation_steps`` micro-batches make one optimiser step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimiser step; each micro-batch loss is scaled by 1/k."""
    ppo_epochs: int = 4
    """Passes over the batch per ``step``."""
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip epsilon (around the rollout values)."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    adap_kl_ctrl: bool = True
    """Adaptive KL coefficient (Ziegler et al. 2019) instead of a fixed one."""
    init_kl_coef: float = 0.2
    """Initial KL coefficient beta."""
    kl_penalty: str = "kl"
    """Per-token KL estimator in the reward: 'kl' (k1), 'abs', 'mse' (k2), 'full' (exact), 'k3'."""
    target: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    horizon: float = 10000.0
    """Horizon of the adaptive controller."""
    use_score_scaling: bool = False
    """Divide scores by the running standard deviation of all scores seen so far."""
    use_score_norm: bool = False
    """Also subtract the running mean (requires use_score_scaling)."""
    score_clip: float | None = None
    """Clip (scaled) scores to [-score_clip, score_clip]."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch before GAE (keeps their mean)."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm of the trainable parameters."""
    early_stopping: bool = False
    """Stop the epochs when the last minibatch's policy KL exceeds 1.5 x target_kl."""
    target_kl: float = 1.0
    """Policy KL threshold for early stopping."""
    ratio_threshold: float = 10.0
    """Skip an optimiser step (really skip it) when the mean ratio of its batch exceeds this."""
    seed: int = 0
    """Seed of the trainer's own random streams (minibatch shuffling, sampling)."""

    # --- ours ---
    temperature: float = 1.0
    """Sampling temperature; log-probs for the loss and the KL use the same temperature."""
    micro_batch_tokens: int | None = None
    """Token budget of one forward pass (samples x padded length); None = one pass per micro-batch."""
    adam_eps: float = 1e-8
    """Adam epsilon (TRL uses PyTorch's default 1e-8)."""
    reference_cache_mb: float = 64.0
    """Memory budget (MiB) of the cache of reference log-distributions per prefix; 0 disables it."""
    fuse_rollout: bool = True
    """Reuse the sampling forward pass as the loss's forward pass when this is exact (1 epoch, 1 optimiser step)."""

    def __post_init__(self):
        def fail(field: str, rule: str):
            raise ValueError(f"PPOConfig.{field}={getattr(self, field)!r}: {rule}")

        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                fail(name, "must be an integer")
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if not 1 <= getattr(self, name) < 2 ** 63:
                fail(name, "must be in [1, 2^63)")
        if not -2 ** 63 <= self.seed < 2 ** 64:
            fail("seed", "must be in [-2^63, 2^64), as torch.Generator.manual_seed takes it")
        for name in ("adap_kl_ctrl", "use_score_scaling", "use_score_norm", "whiten_rewards", "early_stopping",
                     "fuse_rollout"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be True or False")
        floats = ("learning_rate", "gamma", "lam", "cliprange", "cliprange_value", "vf_coef", "init_kl_coef",
                  "target", "horizon", "target_kl", "ratio_threshold", "temperature", "adam_eps",
                  "reference_cache_mb")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "must be a finite number")
        positive = ("learning_rate", "cliprange", "cliprange_value", "target", "horizon", "target_kl",
                    "ratio_threshold", "temperature", "adam_eps")
        for name in positive:
            if getattr(self, name) <= 0:
                fail(name, "must be > 0")
        for name in ("vf_coef", "init_kl_coef", "reference_cache_mb"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                fail(name, "must be in [0, 1]")
        for name in ("score_clip", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                fail(name, "must be None or a finite number > 0")
        if self.micro_batch_tokens is not None and (not isinstance(self.micro_batch_tokens, int)
                                                    or isinstance(self.micro_batch_tokens, bool)
                                                    or not 1 <= self.micro_batch_tokens < 2 ** 63):
            fail("micro_batch_tokens", "must be None or an integer in [1, 2^63)")
        if self.kl_penalty not in KL_PENALTIES:
            fail("kl_penalty", f"must be one of {', '.join(KL_PENALTIES)}")
        if self.use_score_norm and not self.use_score_scaling:
            fail("use_score_norm", "has no effect without use_score_scaling=True")
        if self.use_score_scaling and self.batch_size < 2:
            fail("batch_size", "must be >= 2 with use_score_scaling=True (the running std of the scores needs two "
                               "scores in the first batch)")
        if self.batch_size % self.backward_batch_size:
            fail("batch_size", f"must be divisible by mini_batch_size x gradient_accumulation_steps "
                               f"= {self.mini_batch_size} x {self.gradient_accumulation_steps} "
                               f"= {self.backward_batch_size}")

    @property
    def backward_batch_size(self) -> int:
        """Samples per optimiser step."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict:
        """Every field by name (JSON-ready: for logs, checkpoints and trackers)."""
        return dataclasses.asdict(self)
