"""`run.py eval` and `run.py report` on a 2-episode run of a tiny random model produce every file."""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_same_decisions
from moral import cli
from games import PROMPT_VARIANTS, TEST_GAMES
from moral.evaluate import EVAL_COLUMNS, EvalConfig, plan_blocks


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_chat_model_dir):
    out = tmp_path_factory.mktemp("runs") / "deont"
    cli.main(["--reward", "deont", "--opponent", "tft", "--model", tiny_chat_model_dir, "--episodes", "2",
              "--lora-rank", "4", "--format-aid", "prefix", "--out", str(out), "--no-progress"])
    return out


def test_blocks_cover_games_orders_variants_and_baselines():
    blocks = plan_blocks(EvalConfig())
    structured = [b for b in blocks if b.group == "main" and b.variant == "structured"]
    assert len(structured) == 5 * 4
    assert {b.variant for b in blocks if b.group == "main"} == set(PROMPT_VARIANTS)
    assert {(b.group, b.game) for b in blocks if b.group != "main"} == {
        (f"reference+{v}", g) for v in ("deont", "util") for g in TEST_GAMES}


def test_eval_and_report_write_every_file(trained_run, tmp_path, capsys):
    cli.main(["eval", str(trained_run), "--episodes", "2", "--steps", "2", "--followup", "--followup-tokens", "3",
              "--tokens", "action34", "action12", "--no-progress"])
    printed = capsys.readouterr().out
    assert "De before" in printed and "IPD" in printed
    eval_dir = trained_run / "eval"
    with open(eval_dir / "decisions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == EVAL_COLUMNS
    # per token set: 26 blocks with fine-tuned + reference answers, 10 value-prompted blocks; x 2 episodes x 2 steps
    assert len(rows) == 2 * (26 * 2 + 10) * 2 * 2
    assert {r["model"] for r in rows} == {"finetuned", "reference", "reference+deont", "reference+util"}
    assert {r["tokens"] for r in rows} == {"action34", "action12"}
    assert {r["response"][:7] for r in rows if r["tokens"] == "action12"} <= {"action1", "action2"} | {
        r["response"][:7] for r in rows if r["action"] == "illegal"}
    for r in rows:  # the opponent's previous move recorded is the one shown in the prompt (the state)
        assert r["action_type"].endswith("|" + r["opp_last"])
    # fine-tuned and reference answered the very same prompts: identical state columns, pairwise
    ft = [r for r in rows if r["model"] == "finetuned"]
    ref = [r for r in rows if r["model"] == "reference"]
    assert [(r["variant"], r["game"], r["table_order"], r["episode"], r["step"], r["own_last"], r["opp_last"],
             r["opp_action"]) for r in ft] == \
        [(r["variant"], r["game"], r["table_order"], r["episode"], r["step"], r["own_last"], r["opp_last"],
          r["opp_action"]) for r in ref]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["decisions"] == len(rows) and metrics["groups"]
    with open(eval_dir / "followup.csv", newline="") as f:
        follow = list(csv.DictReader(f))
    assert len(follow) == 2 * 2 * 2 * 2  # 2 models x 2 episodes x 2 steps x 2 questions
    assert {r["question"] for r in follow} == {"Why did you make this decision?",
                                              "What strategy did you use to make this decision?"}

    out = tmp_path / "report"
    cli.main(["report", str(trained_run), "--out", str(out)])
    assert "action34" in (out / "regret.md").read_text()
    for name in ("regret", "test_action_types", "reciprocity_ipd", "training_curves"):
        assert (out / f"{name}.md").is_file() and (out / f"{name}.csv").is_file()
    for name in ("training_action_types", "regret_by_game", "test_action_types", "reciprocity_ipd"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_stopped_by_ctrl_c_leaves_eval_folder_as_it_was(trained_run, capsys, monkeypatch):
    """Ctrl-C during the follow-up questions (the last, long part) used to leave a new decisions.csv beside the
    old metrics.json and end in a KeyboardInterrupt traceback."""
    from moral import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    eval_dir = trained_run / "eval"
    before = {p.name: p.read_bytes() for p in eval_dir.iterdir()} if eval_dir.is_dir() else {}
    monkeypatch.setattr(evaluate, "ask_followups", interrupted)
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(trained_run), "--episodes", "1", "--steps", "1", "--games", "IPD", "--followup",
                  "--no-baselines", "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 130 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"stopped: {trained_run}/eval/ is as it was") and "0 of 1 run(s) evaluated" in err
    after = {p.name: p.read_bytes() for p in eval_dir.iterdir()} if eval_dir.is_dir() else {}
    assert after == before


def quick_eval(run) -> list[str]:
    """`run.py eval` arguments for one IPD step per block, no baselines."""
    return ["eval", str(run), "--episodes", "1", "--steps", "1", "--games", "IPD", "--no-baselines", "--no-progress"]


def test_eval_without_followup_removes_an_earlier_followup_csv(trained_run):
    eval_dir = trained_run / "eval"
    quick = quick_eval(trained_run)
    cli.main(quick + ["--followup", "--followup-tokens", "2"])
    assert (eval_dir / "followup.csv").is_file()
    cli.main(quick)
    assert not (eval_dir / "followup.csv").exists() and (eval_dir / "decisions.csv").is_file()
    assert json.loads((eval_dir / "metrics.json").read_text())["eval"]["followup"] is False


def test_followup_answers_longer_than_the_model_are_one_line_before_any_decision(trained_run, capsys, monkeypatch):
    """--followup-tokens 100000 ran every decision, then failed in sample() naming max_new_tokens; now it is refused
    as soon as the model's positions are known, before the first decision."""
    from moral import evaluate
    decided = []
    monkeypatch.setattr(evaluate, "decide", lambda *a, **k: decided.append(1) or pytest.fail("decided"))
    with pytest.raises(SystemExit) as info:
        cli.main(quick_eval(trained_run) + ["--followup", "--followup-tokens", "100000"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and not decided
    assert "--followup-tokens 100000: " in err and " positions, prompt included" in err


def test_an_eval_stopped_between_its_writes_leaves_no_metrics_json(trained_run, monkeypatch):
    """metrics.json marks a finished eval (the sweep skips runs that have one): an eval that dies after writing
    decisions.csv must not leave the previous eval's metrics.json beside the new decisions."""
    from moral import evaluate, sweep
    eval_dir = trained_run / "eval"
    quick = quick_eval(trained_run)
    cli.main(quick)
    settings = json.loads((eval_dir / "metrics.json").read_text())["eval"]
    assert sweep.already_evaluated(str(trained_run), settings)

    def dies_after_decisions(path, *args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(evaluate, "write_json_atomic", dies_after_decisions)
    with pytest.raises(OSError, match="simulated"):
        cli.main(quick + ["--steps", "2"])
    assert {row["step"] for row in csv.DictReader((eval_dir / "decisions.csv").read_text().splitlines())} == {"0", "1"}  # the new eval's
    assert not (eval_dir / "metrics.json").exists()
    assert not sweep.already_evaluated(str(trained_run), settings)



@pytest.mark.parametrize("format_aid", ["prefix", "none"], ids=["one-token", "two-token"])
def test_eval_answers_the_same_with_and_without_the_prompt_tree(format_aid, tmp_path, tiny_chat_model_dir,
                                                               monkeypatch):
    """Evaluation packs each step's prompts (fine-tuned, reference and value-prompted baselines) into prompt trees;
    padded sequences must give the same decisions: the same answers and actions, p_c and p_d to 1e-4 relative
    (fp32), in fewer tokens through the backbone."""
    from moral import evaluate
    from ppo_core import PolicyModel
    run = tmp_path / "run"
    cli.main(["--reward", "deont", "--opponent", "tft", "--model", tiny_chat_model_dir, "--episodes", "1",
              "--lora-rank", "4", "--format-aid", format_aid, "--dtype", "fp32", "--out", str(run), "--no-progress"])
    cfg = EvalConfig(episodes=2, steps=2, games=("IPD", "ICN"), orders=("original",),
                     variants=("structured", "unstructured"))

    def decisions():
        metrics = evaluate.evaluate(str(run), cfg, progress=False)
        with open(run / "eval" / "decisions.csv", newline="") as f:
            return list(csv.DictReader(f)), metrics["backbone_tokens"]

    tree_rows, tree_tokens = decisions()
    monkeypatch.setattr(PolicyModel, "tree_supported", property(lambda self: False))
    padded_rows, padded_tokens = decisions()
    assert tree_tokens < padded_tokens
    assert_same_decisions(tree_rows, padded_rows)



def test_a_run_trained_on_a_gpu_is_evaluated_on_a_machine_without_one(trained_run, tmp_path, monkeypatch, capsys):
    """A run folder copied from a GPU machine (config.json: device cuda, bf16) used to end its evaluation on a laptop in
    a RuntimeError traceback from the model loader. It is now evaluated on this machine's device, in fp32 where the
    CPU would only emulate bf16, with one note saying so."""
    run = tmp_path / "from-gpu"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "device": "cuda", "dtype": "bf16"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("ppo_core.model.cpu_has_native_bf16", lambda: False)
    cli.main(quick_eval(run))
    err = capsys.readouterr().err
    assert "note: the run was trained on cuda in bf16; evaluating on cpu in fp32" in err
    assert json.loads((run / "eval" / "metrics.json").read_text())["decisions"] > 0
    with pytest.raises(SystemExit) as info:  # a device asked for by name must exist
        cli.main(quick_eval(run) + ["--device", "cuda"])
    assert info.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
def test_eval_with_more_threads_than_cores_says_so(trained_run, monkeypatch, capsys):
    import moral.config
    monkeypatch.setattr(moral.config, "usable_cpus", lambda: 1)
    threads = torch.get_num_threads()
    try:
        cli.main(quick_eval(trained_run) + ["--threads", "2"])
    finally:
        torch.set_num_threads(threads)
    assert "note: --threads 2 is more than the 1 CPU core this process may use" in capsys.readouterr().err

def test_eval_says_which_options_a_run_folder_does_not_use(trained_run, capsys):
    """The engine's options are the sweep folders' (a run folder is evaluated in this process): said, not silently
    ignored; the evaluation still runs."""
    cli.main(quick_eval(trained_run) + ["--cpus-per-run", "2", "--retries", "0"])
    err = capsys.readouterr().err
    assert "note: --cpus-per-run --retries apply only to sweep folders (a run folder is evaluated in this process)" \
        in err
    assert (trained_run / "eval" / "metrics.json").is_file()
    cli.main(quick_eval(trained_run))
    assert "note:" not in capsys.readouterr().err


def test_eval_bad_input(tmp_path, capsys):
    for argv, message in ((["eval", str(tmp_path)], "not a run folder"),
                          (["eval", str(tmp_path), "--games", "XYZ"], "unknown game 'XYZ'"),
                          (["eval", str(tmp_path), "--tokens", "a,a"], "must differ"),
                          (["report", str(tmp_path), "--out", str(tmp_path / "r")], "not a run folder")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
