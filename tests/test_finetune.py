"""End-to-end runs of the training loop on a tiny random model, and the command line's errors."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_same_decisions
from moral import cli
from games import ACTION_TYPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTEFACTS = ("config.json", "games.csv", "ppo.jsonl", "timing.jsonl", "summary.json")


def run_cli(argv, capsys):
    """Call run.py's main in-process; returns (exit code, stdout, stderr)."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_three_episode_run_writes_every_artefact(tmp_path, tiny_chat_model_dir, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["--reward", "deont", "--opponent", "tft", "--model", tiny_chat_model_dir,
                                 "--episodes", "3", "--lora-rank", "4", "--save-every", "2", "--out", str(out),
                                 "--no-progress", "--format-aid", "prefix", "--lr", "0.001"], capsys)
    assert code == 0, err
    for name in ARTEFACTS:
        assert (out / name).is_file(), name
    rows = read_csv(out / "games.csv")
    assert len(rows) == 3 * 5 and {r["learner"] for r in rows} == {"agent"}
    assert list(rows[0]) == ["episode", "step", "slot", "phase", "learner", "game", "opponent", "own_last",
                             "opp_last", "action", "opp_action", "action_type", "reward", "response", "p_c", "p_d"]
    assert all(r["action_type"] in ACTION_TYPES for r in rows)
    for r in rows:  # TFT plays the agent's last legal move, shown in the prompt
        assert r["opp_action"] == r["own_last"]
        assert 0 < float(r["p_c"]) + float(r["p_d"]) <= 1 + 1e-6  # exact action probabilities (one-token actions)
    ppo = [json.loads(line) for line in (out / "ppo.jsonl").read_text().splitlines()]
    assert len(ppo) == 3 and all("ppo/loss/total" in p and "objective/kl" in p for p in ppo)
    assert not any(k.startswith("time/") for k in ppo[0])
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-000002", "ckpt-000003"]
    config = json.loads((out / "config.json").read_text())
    assert config["derived"]["gen_len"] == 1 and config["derived"]["answer_prefix"] == "action"
    assert config["derived"]["ppo"]["batch_size"] == 5 and config["episodes"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decisions"] == 15 and set(summary["last_10pct"]) == {"C|C", "C|D", "D|C", "D|D", "illegal"}
    assert "last 10%" in stdout
    # the final adapter loads with peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), str(out / "final" / "agent"))


def test_llm_vs_llm_runs_two_episodes_with_two_adapters(tmp_path, tiny_chat_model_dir, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["--reward", "util", "--opponent", "llm", "--model", tiny_chat_model_dir,
                            "--episodes", "2", "--lora-rank", "4", "--out", str(out), "--no-progress",
                            "--format-aid", "prefix"], capsys)
    assert code == 0, err
    rows = read_csv(out / "games.csv")
    assert len(rows) == 2 * 3 * 2 and {r["learner"] for r in rows} == {"agent", "opponent"}
    ppo = [json.loads(line) for line in (out / "ppo.jsonl").read_text().splitlines()]
    assert [p["learner"] for p in ppo] == ["agent", "opponent"] * 2
    assert {"agent", "opponent"} <= set(os.listdir(out / "final"))
    # the two players see mirrored states
    for a, o in zip(rows[0::2], rows[1::2]):
        assert (a["own_last"], a["opp_last"]) == (o["opp_last"], o["own_last"])


def test_parallel_games_and_schedule(tmp_path, tiny_chat_model_dir, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["--reward", "game:1,deont:1", "--opponent", "random", "--model", tiny_chat_model_dir,
                            "--parallel-games", "3", "--lora-rank", "4", "--out", str(out), "--no-progress"],
                           capsys)
    assert code == 0, err
    rows = read_csv(out / "games.csv")
    assert len(rows) == 2 * 5 * 3 and {r["slot"] for r in rows} == {"0", "1", "2"}
    assert [r["phase"] for r in rows[:1] + rows[-1:]] == ["game", "deont"]
    config = json.loads((out / "config.json").read_text())
    assert config["derived"]["gen_len"] == 2  # --format-aid defaults to none for a model given by path
    assert {r["p_c"] for r in rows} == {""}  # two-token actions: no exact probabilities from one step
    assert config["derived"]["ppo"]["batch_size"] == 15



@pytest.mark.parametrize("argv", [
    ["--reward", "deont", "--opponent", "tft", "--parallel-games", "2", "--format-aid", "prefix"],
    ["--reward", "game", "--opponent", "random"],  # two-token answers (--format-aid none): drafted in the tree
    ["--reward", "util", "--opponent", "llm", "--format-aid", "prefix"],  # two adapters on one base
], ids=["one-token-2-games", "two-token", "two-learners"])
def test_the_loop_plays_and_learns_the_same_with_and_without_the_prompt_tree(argv, tmp_path, tiny_chat_model_dir,
                                                                               capsys, monkeypatch):
    """The whole training loop, not only ppo_core: the same actions and answers, the same probabilities (p_c, p_d to
    1e-4 relative) and the same PPO statistics (1e-4 relative or 1e-5 absolute) with the tree as with padded
    sequences, while the tree computes fewer tokens. fp32 on every CPU: in bf16 (the default where the CPU has bf16
    instructions) the two differ by bf16 rounding (log-probs of this model ~1e-3 apart). A learning rate of 1e-6:
    this random model answers illegally, so its batches' scores are all equal and the whitened advantages are
    rounding noise, which Adam turns into steps of the learning rate's size, different on the two paths (at 1e-3 the
    second learner's values were 1e-4 apart after one update)."""
    from ppo_core import PolicyModel

    def run(folder):
        code, _, err = run_cli([*argv, "--model", tiny_chat_model_dir, "--episodes", "3", "--lora-rank", "4",
                                "--lr", "1e-6", "--dtype", "fp32", "--out", str(folder), "--no-progress"], capsys)
        assert code == 0, err
        ppo = [json.loads(line) for line in (folder / "ppo.jsonl").read_text().splitlines()]
        return read_csv(folder / "games.csv"), ppo

    tree_rows, tree_ppo = run(tmp_path / "tree")
    monkeypatch.setattr(PolicyModel, "tree_supported", property(lambda self: False))
    padded_rows, padded_ppo = run(tmp_path / "padded")
    assert_same_decisions(tree_rows, padded_rows)
    assert len(tree_ppo) == len(padded_ppo) == (6 if "llm" in argv else 3)
    for a, b in zip(tree_ppo, padded_ppo):
        assert a["ppo/tokens_computed"] < b["ppo/tokens_computed"]
        for key, value in a.items():
            if key == "ppo/val/var_explained" and a["ppo/returns/var"] < 1e-4:
                continue  # it divides by the returns' variance (here as low as 0: null in ppo.jsonl)
            if key in ("ppo/loss/value", "ppo/policy/entropy") or key.startswith(("objective/", "ppo/val/",
                                                                                   "ppo/returns/")):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        # at ratio 1 the policy loss is minus the mean of the whitened advantages: zero but for rounding that the
        # whitening magnifies where the advantages are nearly equal (up to 2e-4 in these batches)
        assert abs(a["ppo/loss/policy"] - b["ppo/loss/policy"]) < 1e-3


BAD_INPUTS = [
    (["--reward", "kant"], "unknown reward 'kant'"),
    (["--reward", "game:0"], "positive integer"),
    (["--opponent", "mother"], "invalid choice: 'mother'"),
    (["--tokens", "action99"], "unknown token set 'action99'"),
    (["--tokens", "yes,yes"], "action strings must differ"),
    (["--tokens", ",no"], "must be non-empty"),
    (["--tokens", "a,b,c"], "unknown token set 'a,b,c'"),
    (["--episodes", "0"], "0 is not a positive integer"),
    (["--episodes", "-3"], "-3 is not a positive integer"),
    (["--episodes", "many"], "invalid int value: 'many'"),
    (["--batch-size", "0"], "0 is not a positive integer"),
    (["--parallel-games", "1.5"], "invalid int value: '1.5'"),
    (["--lr", "abc"], "invalid number: 'abc'"),
    (["--lr", "nan"], "not a finite number"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--lora-rank", "0"], "0 is not a positive integer"),
    (["--quantize", "3bit"], "invalid choice: '3bit'"),
    (["--ppo-epochs", "zero"], "invalid int value: 'zero'"),
    (["--format-aid", "magic"], "invalid choice: 'magic'"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--device", "foo"], "--device 'foo': choose cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device 'mps': choose cpu, cuda or cuda:N"),  # torch takes it; the model would not
    (["--xi", "-1"], "xi=-1.0"),
    (["--reward", "game:2,deont:3", "--episodes", "4"], "has 5 episodes but --episodes is 4"),
    (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such folder"),
    (["--resume", "/nonexistent/run"], "cannot read"),
    (["--unknown-flag"], "unrecognized arguments: --unknown-flag"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_cli_input_gives_one_line_and_exit_code_2(tmp_path, argv, message, capsys):
    code, _, err = run_cli(argv + ["--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert message in err


def test_existing_run_folder_needs_resume(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "games.csv").write_text("x")
    code, _, err = run_cli(["--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1


def test_real_process_reports_bad_input_without_traceback():
    proc = subprocess.run([sys.executable, "run.py", "--reward", "kant"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: unknown reward 'kant'; choose one of game, deont, util, game+deont"


def test_the_codec_drafts_the_legal_answers_of_a_multi_token_protocol(chat_tokenizer_dir):
    """The paper's protocol samples 'action' + digit (SmolLM2's tokens 4667, 33/34): the draft is the two legal
    answers (sampling computes their first token, shared, with the query); with the answer prefix only the digit is
    sampled and nothing is drafted."""
    from transformers import AutoTokenizer
    from games.prompts import get_tokens
    from moral.agent import Codec
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    paper = Codec(tokenizer, get_tokens("action12"), "none")
    assert paper.plan.gen_len == 2 and paper.draft == [(4667, 33), (4667, 34)]
    assert Codec(tokenizer, get_tokens("action12"), "prefix").draft is None
