"""Checkpoint round trip: save after step n, load in a fresh process, and step n+1 equals the uninterrupted one
bit for bit (weights, optimiser moments, statistics)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_policy, with_nonzero_lora
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


def test_a_checkpoint_is_written_where_folders_cannot_be_opened_as_files(tmp_path, monkeypatch):
    """Windows refuses os.open on a folder (PermissionError), which save_checkpoint used for every checkpoint; there
    it now fsyncs the files only (NTFS journals folder entries). Simulated here: os.name and a refusing os.open."""
    import ppo_core.checkpoint as checkpoint_module
    policy = tiny_policy(0)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), policy, "agent")
    real_open = os.open

    def windows_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.os, "open", windows_open)
    monkeypatch.setattr(checkpoint_module.os, "name", "nt")
    folder = save_checkpoint(str(tmp_path / "ckpt-1"), policy=policy, trainers={"agent": trainer})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1"]
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


@pytest.mark.parametrize("arch, case", [("gemma2", 0), ("llama", 1), ("llama", 3), ("gemma2", 4), ("llama", 6),
                                        ("llama", 10), ("llama", 14), ("llama", 19)])
def test_resume_between_any_two_steps_is_bit_exact_for_random_configurations(arch, case, tmp_path):
    """test_paths_agree's random PPO configurations (multi-epoch, accumulation, score scaling, the reference cache on
    and off, the tree on and off, ...): three steps, or one or two steps, a checkpoint, a trainer whose adapter
    starts from other weights, the checkpoint loaded and the remaining steps, end with the same weights bit for bit
    and the same statistics (24 throwaway configurations agreed the same way)."""
    import random

    from test_paths_agree import random_config, related_queries, trainer_for

    def run(resume_before: int | None):
        rng = random.Random(case)
        config = random_config(rng, seed=case)
        calls = rng.choice([1, config.batch_size])
        sampling = dict(max_new_tokens=rng.choice([1, 2, 3]), top_k=rng.choice([0, 0, 5]),
                        stop_at_eos=rng.random() < 0.3, eos_token_id=rng.choice([2, [2, 7]]))
        tree = rng.random() < 0.7
        trainer = trainer_for(config, case % 5, tree, arch)
        per_call, stats = config.batch_size // calls, []
        for step in range(3):
            queries = related_queries(rng, config.batch_size, seed=10 * case + step)
            scores = [rng.gauss(0, 1) for _ in queries]
            if step == resume_before:
                folder = save_checkpoint(str(tmp_path / f"ckpt-{step}"), policy=trainer.policy,
                                         trainers={"agent": trainer})
                trainer = trainer_for(config, case % 5, tree, arch)
                with_nonzero_lora(trainer.policy, seed=999)
                load_checkpoint(folder, policy=trainer.policy, trainers={"agent": trainer})
            responses = []
            for c in range(calls):
                responses += trainer.generate(queries[c * per_call:(c + 1) * per_call], **sampling).responses
            stats.append({k: v for k, v in trainer.step(queries, responses, scores).items()
                          if not k.startswith("time/")})
        return trainer.params, stats

    params, stats = run(None)
    resumed_params, resumed_stats = run(1 + case % 2)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))
    assert json.dumps(stats, sort_keys=True) == json.dumps(resumed_stats, sort_keys=True)
