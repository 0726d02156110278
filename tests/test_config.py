"""PPOConfig: TRL defaults, validation at construction, no mutation after it."""

import dataclasses

import pytest

from ppo_core import PPOConfig


def test_trl_defaults():
    c = PPOConfig()
    assert (c.learning_rate, c.ppo_epochs, c.gamma, c.lam, c.cliprange, c.cliprange_value, c.vf_coef) == \
        (1.41e-5, 4, 1.0, 0.95, 0.2, 0.2, 0.1)
    assert (c.init_kl_coef, c.adap_kl_ctrl, c.target, c.horizon, c.kl_penalty) == (0.2, True, 6.0, 10000.0, "kl")
    assert (c.batch_size, c.mini_batch_size, c.gradient_accumulation_steps) == (128, 128, 1)
    assert (c.ratio_threshold, c.target_kl, c.max_grad_norm, c.score_clip) == (10.0, 1.0, None, None)


@pytest.mark.parametrize("changes, field, rule", [
    ({"batch_size": 0}, "batch_size", "[1, 2^63)"),
    ({"batch_size": 2 ** 70, "mini_batch_size": 2}, "batch_size", "[1, 2^63)"),  # was an OverflowError in generate
    ({"batch_size": 5, "mini_batch_size": 2}, "batch_size", "divisible"),
    ({"batch_size": 8, "mini_batch_size": 2, "gradient_accumulation_steps": 3}, "batch_size", "divisible"),
    ({"learning_rate": -1.0}, "learning_rate", "> 0"),
    ({"learning_rate": float("nan")}, "learning_rate", "finite"),
    ({"gamma": 1.5}, "gamma", "[0, 1]"),
    ({"lam": -0.1}, "lam", "[0, 1]"),
    ({"kl_penalty": "k4"}, "kl_penalty", "one of"),
    ({"use_score_norm": True}, "use_score_norm", "use_score_scaling"),
    ({"batch_size": 1, "mini_batch_size": 1, "use_score_scaling": True}, "batch_size", "two scores"),
    ({"score_clip": 0.0}, "score_clip", "> 0"),
    ({"max_grad_norm": -1}, "max_grad_norm", "> 0"),
    ({"ppo_epochs": 2.0}, "ppo_epochs", "integer"),
    ({"micro_batch_tokens": 0}, "micro_batch_tokens", "[1, 2^63)"),
    ({"temperature": 0}, "temperature", "> 0"),
    ({"early_stopping": "yes"}, "early_stopping", "True or False"),
    ({"seed": 2 ** 64}, "seed", "[-2^63, 2^64)"),  # was torch's "Overflow when unpacking long long" in PPOTrainer
])
def test_invalid_values_name_field_and_rule(changes, field, rule):
    with pytest.raises(ValueError) as err:
        PPOConfig(**changes)
    assert f"PPOConfig.{field}=" in str(err.value) and rule in str(err.value)


def test_frozen_and_replace_revalidates():
    c = PPOConfig(batch_size=8, mini_batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.gradient_accumulation_steps = 4  # the paper's bypass of TRL's check is impossible here
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(c, gradient_accumulation_steps=3)
    d = dataclasses.replace(c, mini_batch_size=2, gradient_accumulation_steps=2)
    assert d.backward_batch_size == 4


@pytest.mark.parametrize("changes, message", [
    ({"reward": 3}, "--reward 3: must be text"),  # each was a TypeError or ValueError from deep inside
    ({"xi": "x"}, "--xi 'x': must be a finite number"),
    ({"temperature": None}, "--temperature None: must be a finite number"),
    ({"device": 1.5}, "--device 1.5: must be text or None"),
    ({"tokens": ["C", "D"]}, r"--tokens \['C', 'D'\]: must be text"),
    ({"parallel_games": None}, "--parallel-games None: must be an integer"),
    ({"lenient": "yes"}, "--lenient 'yes': must be True or False"),
    ({"lora_dropout": 1.0}, r"--lora-dropout 1.0: must be in \[0, 1\)"),
    ({"init_kl_coef": -1}, "PPOConfig.init_kl_coef=-1: must be >= 0"),
])
def test_run_settings_of_the_wrong_kind_are_a_usage_error_naming_them(changes, message):
    """moral's Python API: RunConfig(...).resolve() names a bad setting (the command line and grid files parse
    theirs before; these reached torch.device, `in` on a number or PPOConfig's own ValueError)."""
    from moral.config import RunConfig, UsageError
    with pytest.raises(UsageError, match=message):
        RunConfig(**changes).resolve()
