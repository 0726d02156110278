"""Checkpoint round trip: save after step n, load in a fresh process, and step n+1 equals the uninterrupted one
bit for bit (weights, optimiser moments, statistics)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_policy
from ppo_core import CheckpointError, PPOConfig, PPOTrainer, load_checkpoint, save_checkpoint

SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest import tiny_policy, random_queries
from ppo_core import PPOConfig, PPOTrainer, save_checkpoint, load_checkpoint
mode, folder, out, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
policy = tiny_policy(0)
config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=epochs, learning_rate=1e-2,
                   use_score_scaling=True, use_score_norm=True, seed=7)
trainer = PPOTrainer(config, policy, "agent")
queries = random_queries(4, seed=1)
def one_step():
    rollout = trainer.generate(queries, max_new_tokens=2)
    scores = [float(r[0] % 3) - 1.0 for r in rollout.responses]
    return trainer.step(queries, rollout.responses, scores)
if mode == "full":
    for _ in range(3):
        one_step()
    save_checkpoint(folder, policy=policy, trainers={{"agent": trainer}}, extra={{"step": 3}})
else:
    extra = load_checkpoint(folder, policy=policy, trainers={{"agent": trainer}})
    assert extra == {{"step": 3}}
stats = one_step()
torch.save({{"params": [p.detach() for p in trainer.params],
            "adam": trainer.optimizer.state_dict()["state"],
            "stats": {{k: v for k, v in stats.items() if not k.startswith("time/")}},
            "kl": trainer.kl_ctl.value}}, out)
"""


@pytest.mark.parametrize("epochs", [1, 2])  # 1: fused rollout path; 2: recomputed forward passes
def test_resume_in_a_fresh_process_is_bit_exact(tmp_path, epochs):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    ckpt = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for mode, out in (("full", "a.pt"), ("resume", "b.pt")):
        subprocess.run([sys.executable, str(script), mode, ckpt, str(tmp_path / out), str(epochs)], check=True,
                       env=env, capture_output=True)
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    for i in a["adam"]:
        assert torch.equal(a["adam"][i]["exp_avg"], b["adam"][i]["exp_avg"])
        assert torch.equal(a["adam"][i]["exp_avg_sq"], b["adam"][i]["exp_avg_sq"])
    assert json.dumps(a["stats"], sort_keys=True) == json.dumps(b["stats"], sort_keys=True)
    assert a["kl"] == b["kl"]


def test_checkpoint_is_written_atomically_and_never_overwritten(tmp_path, monkeypatch):
    policy = tiny_policy(0)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), policy, "agent")
    folder = str(tmp_path / "ckpt-1")
    save_checkpoint(folder, policy=policy, trainers={"agent": trainer})
    with pytest.raises(FileExistsError):
        save_checkpoint(folder, policy=policy, trainers={"agent": trainer})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(str(tmp_path / "ckpt-2"), policy=policy, trainers={"agent": trainer})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1"]  # no half-written folder left behind
    load_checkpoint(folder, policy=policy, trainers={"agent": trainer})


def test_corrupt_or_missing_checkpoint_raises_checkpoint_error(tmp_path):
    policy = tiny_policy(0)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), policy, "agent")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(str(tmp_path), policy=policy, trainers={"agent": trainer})
    folder = tmp_path / "ckpt"
    save_checkpoint(str(folder), policy=policy, trainers={"agent": trainer})
    (folder / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(folder), policy=policy, trainers={"agent": trainer})
