"""KL controllers and running score moments against hand-computed values and numpy (float64)."""

import numpy as np
import pytest
import torch

from ppo_core.control import AdaptiveKLController, FixedKLController, RunningMoments, scale_scores


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6, horizon=10000)
    ctl.update(3.0, 5)       # e = clip(3/6 - 1) = -0.2 (at the bound) -> x (1 - 0.2*5/1e4) = x 0.9999
    assert ctl.value == pytest.approx(0.2 * 0.9999, rel=1e-12)
    ctl.update(6.6, 10)      # e = 0.1 -> x 1.0001
    assert ctl.value == pytest.approx(0.2 * 0.9999 * 1.0001, rel=1e-12)
    ctl.update(100.0, 100)   # e clipped to 0.2 -> x 1.002
    assert ctl.value == pytest.approx(0.2 * 0.9999 * 1.0001 * 1.002, rel=1e-12)
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, 6, 10000)
    other.load_state_dict(state)
    assert other.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.3)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.3


def test_running_moments_equal_numpy_over_history():
    rng = np.random.default_rng(0)
    moments, history = RunningMoments(), []
    for size in (5, 1, 7, 3, 12):
        batch = rng.normal(2.0, 3.0, size=size)
        history.extend(batch)
        mean, std = moments.update(torch.tensor(batch))
        assert mean == pytest.approx(batch.mean(), abs=1e-12)
        if size > 1:
            assert std == pytest.approx(batch.std(ddof=1), abs=1e-12)
        assert moments.mean == pytest.approx(np.mean(history), abs=1e-9)
        assert moments.std == pytest.approx(np.std(history, ddof=1), rel=1e-9)


def test_scale_scores_modes():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    std = np.std([1, 2, 3, 6.0], ddof=1)
    eps = torch.finfo(torch.float64).eps
    scaled = scale_scores(scores, RunningMoments(), True, False, None)
    assert np.allclose(scaled.numpy(), scores.numpy() / (std + eps))
    normed = scale_scores(scores, RunningMoments(), True, True, None)
    assert np.allclose(normed.numpy(), (scores.numpy() - 3.0) / (std + eps))
    clipped = scale_scores(scores, RunningMoments(), True, True, 0.5)
    assert clipped.max().item() == 0.5 and clipped.min().item() == -0.5
    untouched = scale_scores(scores, RunningMoments(), False, False, None)
    assert torch.equal(untouched, scores)
