"""Run settings (moral.config), run files (moral.runio) and run summaries (moral.summary)."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from moral.config import Derived, RunConfig, UsageError, ppo_config
from moral.summary import RunningShares, action_type_shares, category, summarise, tenths


def test_run_config_is_frozen_documented_and_round_trips_through_json(tmp_path):
    config = RunConfig(reward="game:2,deont:3", opponent="llm", device="cpu").resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    d = config.derived
    assert isinstance(d, Derived) and [p.episodes for p in d.phases] == [2, 3] and config.episodes == 5
    assert d.batch_size == 3 and config.steps == 3 and config.learners == ("agent", "opponent")
    assert d.ppo == ppo_config(config).to_dict() and d.ppo["seed"] == d.ppo_seed
    import peft
    import transformers
    assert d.versions == {"python": d.versions["python"], "torch": torch.__version__,
                          "transformers": transformers.__version__, "peft": peft.__version__}  # metadata = modules
    text = json.dumps(config.to_dict(), default=str)
    assert RunConfig.from_dict(json.loads(text)) == config
    # every field has a docstring (the source says what each setting means)
    source = Path(os.path.join(os.path.dirname(__file__), "..", "moral", "config.py")).read_text()
    for f in dataclasses.fields(RunConfig):
        after = source.split(f"\n    {f.name}: ", 1)[1].split("\n", 2)
        assert after[1].strip().startswith('"""'), f.name


def test_round_one_config_json_still_loads_and_unknown_keys_are_named():
    round_one = {"reward": "deont", "opponent": "tft", "out": None, "lr": 1.41e-05, "save_every": 100,
                 "derived": {"phases": [{"reward": "deont", "episodes": 300}], "batch_size": 5, "gen_len": 1,
                             "answer_prefix": "action", "action_token_ids": [[1, 2], [1, 3]], "ppo": {},
                             "ppo_seed": 7, "versions": {}}}
    config = RunConfig.from_dict(round_one)
    assert config.derived.action_token_ids == ((1, 2), (1, 3)) and config.phases[0].episodes == 300
    with pytest.raises(UsageError, match="unknown run setting.*colour"):
        RunConfig.from_dict({**round_one, "colour": "red"})


def test_ppo_config_is_the_papers_single_update_per_episode():
    config = RunConfig(parallel_games=4, device="cpu").resolve()
    ppo = ppo_config(config)
    assert (ppo.batch_size, ppo.mini_batch_size, ppo.ppo_epochs, ppo.learning_rate) == (20, 20, 1, 1.41e-5)
    assert ppo.use_score_scaling and ppo.use_score_norm and ppo.init_kl_coef == 0.2 and ppo.seed == \
        config.derived.ppo_seed
    assert ppo_config(RunConfig(steps=6), seed=3, fuse_rollout=False).batch_size == 6  # unresolved, overridden


def test_summaries_by_hand():
    assert category("illegal|C") == category("illegal|D") == "illegal" and category("D|C") == "D|C"
    shares = action_type_shares(["C|C", "C|C", "D|C", "illegal|C", "illegal|D"])
    assert shares == {"C|C": 0.4, "C|D": 0.0, "D|C": 0.2, "D|D": 0.0, "illegal": 0.4}
    assert tenths(25)[:3] == [(0, 2), (2, 5), (5, 7)] and tenths(25)[-1] == (22, 25)
    rows = [{"episode": e, "action_type": t, "reward": r} for e, t, r in
            [(0, "C|C", 0.0), (0, "illegal|D", -6.0), (1, "D|C", -3.0), (9, "C|D", 3.0), (9, "D|D", 1.0)]]
    s = summarise(rows, episodes=10)
    assert s["first_10pct"] == {"C|C": 0.5, "C|D": 0.0, "D|C": 0.0, "D|D": 0.0, "illegal": 0.5}
    assert s["last_10pct"]["C|D"] == 0.5 and s["mean_reward_last_10pct"] == 2.0 and s["decisions"] == 5
    assert s["by_tenth"][1]["D|C"] == 1.0 and s["by_tenth"][2]["mean_reward"] is None
    running = RunningShares(window=2)
    running.add(["C|C"], [1.0])
    running.add(["D|C"], [-3.0])
    last = running.add(["D|D", "D|D"], [0.0, 2.0])  # the first episode has left the window
    assert last["D|C"] == pytest.approx(1 / 3) and last["D|D"] == pytest.approx(2 / 3) and last["reward"] == 1.0


def test_policy_loss_reports_cleanrls_k3_estimate():
    from ppo_core import functional as F
    old = torch.log(torch.tensor([[0.25, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.5]]))
    _, stats = F.policy_loss(new, old, torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), 0.2)
    ratio = 2.0  # first token only: (r - 1) - log r
    assert stats["approxkl_k3"].item() == pytest.approx((ratio - 1 - math.log(ratio)) / 1, abs=1e-6)


def test_logs_reach_the_disk_after_every_episode_and_checkpoints_say_what_they_are(tmp_path, tiny_chat_model_dir):
    from moral.finetune import FineTuning
    config = RunConfig(model=tiny_chat_model_dir, episodes=3, lora_rank=4, format_aid="prefix", save_every=2,
                       device="cpu").resolve()
    run = FineTuning(config, str(tmp_path / "run"), progress=False)
    try:
        for episode in range(2):
            result = run.run_episode()
            assert len(result.rows) == 5 and "ppo/loss/total" in result.stats["agent"]
            # read by another reader while the run holds the files open: every finished episode is there
            with open(tmp_path / "run" / "games.csv") as f:
                assert len(f.read().splitlines()) == 1 + 5 * (episode + 1)
            with open(tmp_path / "run" / "ppo.jsonl") as f:
                assert len(f.read().splitlines()) == episode + 1
    finally:
        run.train()  # the third episode, the checkpoints and the final files
    saved = json.loads((tmp_path / "run" / "checkpoints" / "ckpt-000003" / "config.json").read_text())
    assert RunConfig.from_dict(saved) == run.config and saved["derived"]["gen_len"] == 1



def test_logs_and_json_files_are_strict_json(tmp_path):
    """A non-finite statistic (ppo/val/var_explained is nan when a batch's returns are all equal, as they were in a
    3-episode run of a tiny model) is written as null: Python's json writes NaN, which jq and JSON.parse refuse."""
    from moral.runio import RunLogs
    logs = RunLogs(str(tmp_path))
    logs.write_ppo({"episode": 1, "learner": "agent"}, {"ppo/val/var_explained": float("nan"), "ppo/loss/total": 0.5,
                                                         "objective/kl": float("inf"), "time/ppo/total": float("-inf")})
    logs.close()
    for name, expected in (("ppo.jsonl", {"ppo/val/var_explained": None, "ppo/loss/total": 0.5, "objective/kl": None}),
                           ("timing.jsonl", {"time/ppo/total": None})):
        text = (tmp_path / name).read_text()
        record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text!r}"))
        assert record == {"episode": 1, "learner": "agent", **expected}
    # the other JSON files (summary.json, eval/metrics.json, sweep.json): a metric undefined for a run is nan
    from moral.runio import write_json_atomic
    path = write_json_atomic(str(tmp_path / "metrics.json"), {"groups": [{"reciprocity": float("nan"), "n": 3}],
                                                             "shares": (0.5, float("-inf")), "wall_s": 1.5,
                                                             "dims": Path("x")}, default=lambda v: [float("nan")])
    text = Path(path).read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text!r}")) == \
        {"groups": [{"reciprocity": None, "n": 3}], "shares": [0.5, None], "wall_s": 1.5, "dims": [None]}

def test_a_folder_lock_tells_held_from_a_file_system_that_cannot_lock(tmp_path, monkeypatch):
    """Every flock error used to read as "being written by <the last holder>": on a file system mounted without
    locks (ENOLCK) every run of a sweep failed so, naming a process that had long ended."""
    import errno
    import fcntl

    from moral import runio
    from moral.runio import FolderLock, FolderLocked

    first = FolderLock(str(tmp_path)).acquire("the first writer")
    try:
        with pytest.raises(FolderLocked, match="being written by pid .*the first writer"):
            FolderLock(str(tmp_path)).acquire("a second writer")
    finally:
        first.release()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runio.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="its file system cannot lock files \\(No locks available\\)"):
        lock = FolderLock(str(tmp_path)).acquire("on a lockless file system")
    assert "on a lockless file system" in (tmp_path / ".lock").read_text()
    lock.release()  # without unlocking what was never locked
    assert lock.fd is None and fcntl.flock is no_locks
