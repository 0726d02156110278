"""Small state that PPO carries between steps: the KL coefficient and the running moments of the scores."""

from __future__ import annotations

import math

import torch


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: batch mean of the sequence KL; n_steps: samples in the batch."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """The coefficient, for a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing changes (the same call as AdaptiveKLController.update)."""

    def state_dict(self) -> dict:
        """The coefficient, for a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.value = float(state["value"])


class RunningMoments:
    """Mean and (unbiased) standard deviation of every score seen so far, merged batch by batch (Chan et al.).

    Starts at mean 0, var 1, count 1e-24 like TRL, so the first batch is in effect normalised by itself.
    Kept in float64.
    """

    def __init__(self):
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 1e-24

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Merge a batch xs [n]; returns the batch's mean and unbiased std (nan for n = 1)."""
        xs = xs.detach().double().cpu()
        n = xs.numel()
        batch_mean = float(xs.mean())
        batch_var = float(xs.var(unbiased=False))
        delta = batch_mean - self.mean
        total = self.count + n
        new_sum_sq = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = new_sum_sq / total
        self.std = math.sqrt(self.var * total / (total - 1))
        self.count = total
        batch_std = math.sqrt(batch_var * n / (n - 1)) if n > 1 else float("nan")
        return batch_mean, batch_std

    def state_dict(self) -> dict:
        """The moments and the count, for a checkpoint."""
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.std, self.count = float(state["std"]), float(state["count"])


def scale_scores(scores: torch.Tensor, moments: RunningMoments, use_score_scaling: bool, use_score_norm: bool,
                 score_clip: float | None) -> torch.Tensor:
    """TRL's score pipeline: update the running moments with this batch, then divide by (std + eps), optionally
    subtract the mean first, then optionally clip. scores [B] -> [B] (same dtype)."""
    if use_score_scaling:
        moments.update(scores)
        eps = torch.finfo(scores.dtype).eps
        if use_score_norm:
            scores = (scores - moments.mean) / (moments.std + eps)
        else:
            scores = scores / (moments.std + eps)
    if score_clip is not None:
        scores = torch.clamp(scores, -score_clip, score_clip)
    return scores
