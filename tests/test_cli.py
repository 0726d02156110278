"""The command line in one place: run.py, `python -m moral` and the `moral-ppo` console script are the same program,
and every subcommand works from any directory (the package never imports run.py)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moral import cli, diagnostics
from moral.config import RunConfig, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[sys.executable, "-m", "moral"], ["moral-ppo"], [sys.executable, "run.py"]],
                         ids=["python-m-moral", "moral-ppo", "run.py"])
def test_every_entry_point_prints_the_same_help(command, tmp_path):
    if command[0] == "moral-ppo" and shutil.which("moral-ppo") is None:
        pytest.fail("the moral-ppo console script is not installed: pip install -e .")
    cwd = ROOT if command[-1] == "run.py" else str(tmp_path)  # outside the repository root
    proc = run([*command, "--help"], cwd)
    assert proc.returncode == 0, proc.stderr
    assert "--reward" in proc.stdout and "--report-to" in proc.stdout and "eval --help" in proc.stdout
    proc = run([*command, "eval", "--help"], cwd)
    assert proc.returncode == 0 and "RUN_FOLDER" in proc.stdout, proc.stderr


def test_eval_and_report_run_outside_the_repository(tmp_path, tiny_chat_model_dir):
    folder = tmp_path / "runs" / "deont"
    cli.main(["--reward", "deont", "--model", tiny_chat_model_dir, "--episodes", "1", "--lora-rank", "4",
              "--format-aid", "prefix", "--out", str(folder), "--no-progress"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run([sys.executable, "-m", "moral", "eval", str(folder), "--episodes", "1", "--steps", "1", "--games",
                "IPD", "--orders", "original", "--variants", "structured", "--no-baselines", "--tokens", "action12",
                "--no-progress"], str(elsewhere))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (folder / "eval" / "decisions.csv").is_file()
    proc = run(["moral-ppo", "report", str(folder), "--out", "report"], str(elsewhere))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (elsewhere / "report" / "regret.md").is_file() and (elsewhere / "report" / "training_curves.csv").is_file()


def test_no_module_of_the_package_imports_run_py():
    for folder in ("moral", "ppo_core", "games"):
        for where, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if name.endswith(".py"):
                    text = Path(os.path.join(where, name)).read_text()
                    assert not re.search(r"^\s*(import run\b|from run import)", text, flags=re.M), name


def test_a_successful_run_writes_nothing_to_stderr(tmp_path, tiny_chat_model_dir):
    """Library chatter stays out of the user's terminal: bitsandbytes' request for the `kernels` hub package (logged
    when it is first imported, on CPUs with bf16 instructions), deprecation warnings, progress bars."""
    proc = subprocess.run([sys.executable, "run.py", "--reward", "deont", "--model", tiny_chat_model_dir,
                           "--episodes", "1", "--lora-rank", "4", "--format-aid", "prefix",
                           "--out", str(tmp_path / "run"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("run folder:"), proc.stderr[-2000:]
    assert proc.stderr == ""


def test_bf16_on_a_cpu_without_bf16_instructions_says_so_once(tmp_path, tiny_chat_model_dir, monkeypatch, capsys):
    import ppo_core.model
    args = ["--reward", "deont", "--model", tiny_chat_model_dir, "--episodes", "1", "--lora-rank", "4",
            "--format-aid", "prefix", "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(ppo_core.model, "cpu_has_native_bf16", lambda: False)
    cli.main([*args, "--dtype", "bf16", "--out", str(tmp_path / "bf16")])
    assert capsys.readouterr().out.count("--dtype bf16 on a CPU without bf16 instructions") == 1
    cli.main([*args, "--out", str(tmp_path / "default")])  # fp32 by default there: nothing to say
    assert "bf16 instructions" not in capsys.readouterr().out
    monkeypatch.setattr(ppo_core.model, "cpu_has_native_bf16", lambda: True)
    cli.main([*args, "--dtype", "bf16", "--out", str(tmp_path / "native")])
    assert "bf16 instructions" not in capsys.readouterr().out


def test_more_threads_than_cores_says_so_once(tmp_path, tiny_chat_model_dir, monkeypatch, capsys):
    """A run folder's --threads from a larger machine, resumed on a laptop, oversubscribes its cores: one note (the
    run goes on; the user may have reasons), naming the count that fits."""
    import torch

    import moral.config
    args = ["--reward", "deont", "--model", tiny_chat_model_dir, "--episodes", "1", "--lora-rank", "4",
            "--format-aid", "prefix", "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(moral.config, "usable_cpus", lambda: 1)
    threads = torch.get_num_threads()
    try:
        cli.main([*args, "--threads", "2", "--out", str(tmp_path / "two")])
        out = capsys.readouterr().out
        assert out.count("note: --threads 2 is more than the 1 CPU core this process may use") == 1, out
        assert "; --threads 1 changes it, with --resume too" in out
        cli.main([*args, "--threads", "1", "--out", str(tmp_path / "one")])
        assert "note:" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert moral.config.threads_note(2, "cuda") is None and moral.config.threads_note(None, "cpu") is None


def test_a_batch_of_one_sample_is_one_line_before_the_model_loads(tmp_path, capsys):
    """One step of one game cannot scale its score by a running std or whiten its advantages: exit 2 in one line
    (it was the trainer's ZeroDivisionError traceback at the first update); two games of one step are enough."""
    with pytest.raises(SystemExit) as info:
        cli.main(["--batch-size", "1", "--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--batch-size 1: a PPO batch needs at least 2 samples" in err
    assert RunConfig(steps=1, parallel_games=2).resolve().derived.batch_size == 2


def test_a_lora_rank_no_layer_can_take_is_one_line(tmp_path, tiny_chat_model_dir, capsys):
    """--lora-rank 100000 on the embedded model was killed for memory (24 GB) after 2 minutes (and 10^23 was peft's
    overflow traceback): a rank above every linear layer's min(in, out) adds no expressiveness, so it is refused
    once the model is known."""
    with pytest.raises(SystemExit) as info:
        cli.main(["--model", tiny_chat_model_dir, "--lora-rank", "100000", "--episodes", "1", "--no-progress",
                  "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--lora-rank 100000: at most " in err


@pytest.mark.parametrize("args", [["--resume", ""], ["--out", " "], ["eval", ""], ["report", "", "--out", "x"],
                                  ["report", "RUN", "--out", ""], ["sweep", ""], ["sweep", "g.toml", "--out", ""]])
def test_an_empty_path_is_one_line_not_the_default(args, tmp_path, capsys, monkeypatch):
    """`--resume "$RUN"` with RUN unset started a new 300-episode run, and `--out ""` wrote to the default folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(args + (["--model", str(tmp_path / "never-loaded")] if args[0].startswith("--") else []))
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.endswith(f": {next(a for a in args if not a.strip())!r} is not a path\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["eval", "RUN", "--steps", str(10 ** 23)], f"argument --steps: {10 ** 23} is too large: must be below 2^63"),
    (["--parallel-games", str(2 ** 63)], f"argument --parallel-games: {2 ** 63} is too large: must be below 2^63"),
    (["sweep", "g.toml", "--retries", str(2 ** 64)], f"argument --retries: {2 ** 64} is too large: must be below 2^63"),
    (["eval", "RUN", "--device", ""], "argument --device: '' is not a device: choose cpu, cuda or cuda:N"),
    (["--device", " "], "argument --device: ' ' is not a device: choose cpu, cuda or cuda:N"),
    (["eval", "RUN", "--checkpoint", ""], "argument --checkpoint: '' is not a path")])
def test_a_count_past_2_to_the_63_or_an_empty_device_is_one_line(args, message, tmp_path, capsys):
    """eval --steps 10^23 was tqdm's OverflowError traceback (--parallel-games 10^23 filled 24 GB in a minute before
    the kernel killed it), eval --device '' torch's RuntimeError, and --device '' / --checkpoint '' meant the
    default."""
    training = [] if args[0] == "eval" else ["--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as info:
        cli.main([a.replace("RUN", str(tmp_path)) for a in args] + training)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err == f"error: {message}\n"
    with pytest.raises(UsageError, match=r"--episodes 9223372036854775808: must be a positive integer below 2\^63"):
        RunConfig(episodes=2 ** 63).resolve()
    with pytest.raises(UsageError, match=r"--device '': choose cpu, cuda or cuda:N"):
        RunConfig(device="").resolve()


@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_run_folder_given_twice_is_one_line(command, tmp_path, capsys):
    """`report RUN RUN/` counted the run's seed twice (n=2 and a confidence interval from one run); eval ran it
    twice. Folders are compared as real paths."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    os.symlink(run, tmp_path / "link")
    for twice in ([str(run), str(run)], [str(run), str(tmp_path / "link") + "/"]):
        with pytest.raises(SystemExit) as info:
            cli.main([command, *twice] + (["--out", str(tmp_path / "report")] if command == "report" else []))
        err = capsys.readouterr().err
        assert info.value.code == 2 and err == f"error: {twice[1]}: the same run folder as {run}; give each run once\n"


@pytest.mark.parametrize("args", [["--seed", "-3"], ["eval", "RUN", "--seed", "-1"], ["--seed", str(2 ** 63)]])
def test_a_negative_or_huge_seed_is_one_line(args, tmp_path, capsys):
    """It was numpy's SeedSequence traceback ("expected non-negative integer", exit 1) for training, a line naming
    no value for eval, and 2^63 started a run (seeds are int64 here; the model does not exist, so that a regression
    fails at once)."""
    training = [] if args[0] == "eval" else ["--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as info:
        cli.main([a.replace("RUN", str(tmp_path)) for a in args] + training)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"{args[-1]} is not a seed: must be an integer in [0, 2^63)" in err
    with pytest.raises(UsageError, match=r"--seed -1: must be an integer in \[0, 2\^63\)"):
        RunConfig(seed=-1).resolve()  # grids and the Python API


@pytest.mark.parametrize("command", ["report", "eval"])
def test_a_folder_of_run_folders_is_one_line_that_says_how_to_give_them(command, tmp_path, capsys):
    """`report runs` (the folder that holds the runs) said only that runs is not a run folder."""
    for name in ("deont-tft-seed0", "util-tft-seed0"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.json").write_text("{}")
    (tmp_path / "runs" / "notes").mkdir()
    with pytest.raises(SystemExit) as info:
        cli.main([command, str(tmp_path / "runs"), *(["--out", str(tmp_path / "report")] if command == "report" else [])])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"runs is not a run folder (no config.json); it holds run folders (2): give them, e.g. " \
           f"{tmp_path / 'runs' / '*'}" in err


@pytest.mark.parametrize("command", ["report", "sweep"])
def test_an_out_folder_that_cannot_be_written_is_one_line(command, tmp_path, capsys):
    """As for run.py --out: one line naming the folder (exit 2), not an OSError traceback from makedirs."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    run = tmp_path / "run"  # a run folder (for report) that exists, so that only --out is wrong
    run.mkdir()
    (run / "config.json").write_text("{}")
    args = ["report", str(run)] if command == "report" else ["sweep", os.path.join(ROOT, "grids", "embedded.toml")]
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--out {out}: cannot write there" in err


@pytest.mark.parametrize("option, value, message", [("--tokens", "zz", "unknown token set 'zz'"),
                                                    ("--model", "/no/such/model", "no such folder")])
def test_diagnostics_bad_input_is_one_line(option, value, message, capsys):
    from moral import diagnostics
    with pytest.raises(SystemExit) as info:
        diagnostics.main([option, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {option} ") and message in err


def test_resume_with_other_settings_is_one_line_not_silently_ignored(tmp_path, capsys):
    """`--resume RUN --episodes 500` used to print the finished run's summary and exit 0, as if extended."""
    import json
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(RunConfig(episodes=3).resolve().to_dict()))
    with pytest.raises(SystemExit) as info:
        cli.main(["--resume", str(run), "--episodes", "500", "--reward", "game", "--threads", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--reward --episodes cannot change (only --threads and --report-to can)" in err



def test_resume_of_a_gpu_run_on_a_machine_without_one_is_one_line(tmp_path, capsys, monkeypatch):
    """A run folder copied from a GPU machine (config.json: device cuda) used to end --resume in a RuntimeError
    traceback from the model loader; a finished one still prints its summary."""
    import json

    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**RunConfig(episodes=3).resolve().to_dict(), "device": "cuda"}))
    with pytest.raises(SystemExit) as info:
        cli.main(["--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "the run was trained on cuda, which this machine cannot use (CUDA is not available" in err

def test_eval_checks_its_device_before_anything_else(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(tmp_path), "--device", "foo"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err == "error: --device 'foo': choose cpu, cuda or cuda:N\n"


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys, monkeypatch):
    """It used to load the model, delete and rewrite the final adapter and overwrite summary.json, whose
    wall_s_this_session became the few milliseconds of that empty session."""
    import json

    from moral import finetune
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter.bin").write_bytes(b"weights")
    (run / "config.json").write_text(json.dumps(RunConfig(episodes=3).resolve().to_dict()))
    shares = {"C|C": 0.5, "C|D": 0.0, "D|C": 0.25, "D|D": 0.25, "illegal": 0.0}
    summary = json.dumps({"first_10pct": shares, "last_10pct": shares, "wall_s_this_session": 612.5})
    (run / "summary.json").write_text(summary)

    def no_model(*args, **kwargs):
        raise AssertionError("a finished run was set up again")

    monkeypatch.setattr(finetune, "FineTuning", no_model)
    cli.main(["--resume", str(run), "--no-progress"])
    out = capsys.readouterr().out
    assert out.startswith(f"{run} is finished (3 episodes); nothing to continue")
    assert "last 10%" in out and "25.0%" in out
    assert (run / "summary.json").read_text() == summary and (run / "final" / "adapter.bin").read_bytes() == b"weights"


def test_the_gguf_readers_own_progress_bar_is_off_while_the_embedded_model_converts(capsys):
    from transformers import modeling_gguf_pytorch_utils as reader

    from moral.embedded import quiet_gguf_reader
    with quiet_gguf_reader():
        for _ in reader.tqdm(range(3), desc="Converting GGUF"):
            pass
    assert "Converting GGUF" not in capsys.readouterr().err
    for _ in reader.tqdm(range(3), desc="Converting GGUF"):  # restored afterwards
        pass
    assert "Converting GGUF" in capsys.readouterr().err


@pytest.mark.parametrize("make", [cli.train_parser, cli.eval_parser, cli.report_parser, cli.sweep_parser,
                                  diagnostics.parser], ids=["train", "eval", "report", "sweep", "diagnostics"])
def test_every_option_of_every_command_says_what_it_takes(make):
    """--help lists each option with a line of help (eval's --orders, --variants, --seed, --device and --threads had
    none), and descriptions print as written (report's said "95%%")."""
    parser = make()
    bare = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not bare
    assert "%%" not in parser.format_help()


def test_windows_gets_one_line_instead_of_a_traceback(monkeypatch, capsys):
    """moral.runio imports fcntl (flock), which Windows lacks: the program said so with an ImportError traceback."""
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(SystemExit) as info:
        cli.main(["--reward", "deont"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "WSL2" in err
