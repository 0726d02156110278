"""Experiment trackers (--report-to): TensorBoard events carry the PPO statistics and the action-type shares, a
resumed run continues the same event log, and asking for a tracker that is not installed is one line, exit 2."""

import importlib.util
import os
from pathlib import Path

import pytest

from moral import cli


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def args(model_dir, out, *extra):
    return ["--reward", "deont", "--opponent", "tft", "--model", model_dir, "--lora-rank", "4", "--format-aid",
            "prefix", "--lr", "0.001", "--out", str(out), "--no-progress", *extra]


def test_tensorboard_gets_ppo_statistics_and_action_type_shares(tmp_path, tiny_chat_model_dir):
    import json
    out = tmp_path / "run"
    cli.main(args(tiny_chat_model_dir, out, "--episodes", "2", "--report-to", "tensorboard"))
    logged = scalars(out / "tensorboard")
    for tag in ("ppo/loss/total", "objective/kl", "ppo/policy/approxkl_k3", "actions/C|C", "actions/D|C",
                "actions/illegal", "actions/reward"):
        assert [step for step, _ in logged[tag]] == [0, 1], tag
    ppo = [json.loads(line) for line in (out / "ppo.jsonl").read_text().splitlines()]  # the files stay the source of truth
    assert [v for _, v in logged["ppo/loss/total"]] == pytest.approx([p["ppo/loss/total"] for p in ppo], rel=1e-6)
    for i in range(2):  # the five categories' shares add up to 1
        assert sum(logged[f"actions/{t}"][i][1] for t in ("C|C", "C|D", "D|C", "D|D", "illegal")) == \
            pytest.approx(1.0)


def test_a_resumed_run_continues_the_same_tensorboard_log(tmp_path, tiny_chat_model_dir):
    out = tmp_path / "run"
    cli.main(args(tiny_chat_model_dir, out, "--episodes", "2", "--save-every", "1", "--report-to", "tensorboard"))
    os.remove(out / "summary.json")  # pretend the run stopped after its first checkpoint: resume from episode 1
    import shutil
    shutil.rmtree(out / "checkpoints" / "ckpt-000002")
    cli.main(["--resume", str(out), "--no-progress"])
    logged = scalars(out / "tensorboard")
    assert [step for step, _ in logged["ppo/loss/total"]] == [0, 1]  # episode 1 purged, then written once again


def test_a_tracker_that_is_not_installed_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as info:  # an unloadable model: the tracker check must come first
        cli.main(["--model", "/nonexistent/model", "--report-to", "wandb", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--report-to wandb" in err and "pip install -e '.[tracking]'" in err
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_names_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--report-to", "mlflow", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "invalid choice: 'mlflow'" in err and "tensorboard" in err
