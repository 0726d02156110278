"""The README's ppo_core example (examples/custom_reward.py) on a tiny model: the rewarded behaviour's probability
rises from about chance to above 0.8."""

import os
import re
import sys
from pathlib import Path

import torch

from conftest import random_queries, tiny_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from custom_reward import train  # noqa: E402

GOOD = set(range(3, 64, 8))  # 8 of the 64 token ids: chance = 1/8 per sample under a uniform policy


def probability_of_good(policy, queries):
    """Exact probability that the first response token is in GOOD, averaged over the queries."""
    with torch.no_grad():
        logits = torch.stack([policy.logits(policy.hidden_states(q[None])[0][0, -1]) for q in queries])
    return torch.softmax(logits.float(), -1)[:, sorted(GOOD)].sum(-1).mean().item()


def test_custom_reward_is_learned():
    policy = tiny_policy(0, adapters=("default",), initializer_range=0.2)
    queries = random_queries(16, seed=0)
    before = probability_of_good(policy, queries)
    history = train(policy, queries, lambda response: float(response[0].item() in GOOD), steps=40, lr=3e-2)
    after = probability_of_good(policy, queries)
    assert 0.05 < before < 0.25  # about chance (1/8)
    assert after > 0.8
    assert history[-1] > history[0]


def test_readme_shows_the_example_verbatim():
    readme = Path(os.path.join(ROOT, "README.md")).read_text()
    source = Path(os.path.join(ROOT, "examples", "custom_reward.py")).read_text()
    body = source[source.index("def train("):source.index('\n\nif __name__')]
    assert body in readme
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert any("train(" in b and "PPOTrainer" in b for b in blocks)
