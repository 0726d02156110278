"""The experiment grid as one job (moral/sweep.py): a 2 x 2 grid of tiny runs on a local Ray instance with 2 CPUs.

A grid runs to the end; launching it again starts no run; a sweep killed mid-run and launched again ends with the
same games.csv files as an uninterrupted one; a locked run folder turns a second writer away (exit 2) and a lock left
by a dead process does not; bad grids fail before anything starts, in one line; --dry-run prints one line per run;
`eval` and `report` take the sweep folder."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moral import cli
from moral.runio import FolderLock, checkpoint_episode, complete_checkpoints
from moral.sweep import GridError, Sweep, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GRID = os.path.join(ROOT, "tests", "grids", "tiny.toml")
NAMES = ["deont-tft-seed0", "deont-tft-seed1", "game-tft-seed0", "game-tft-seed1"]


def write_grid(path, model_dir, text=None):
    text = text if text is not None else Path(TINY_GRID).read_text()
    path.write_text(text.replace("TINY_MODEL", str(model_dir)))
    return str(path)


def spawn(args, extra_env=None, **kwargs):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def sweep(grid, out, *extra, extra_env=None):
    proc = spawn(["sweep", grid, "--out", str(out), "--no-progress", "--cpus-per-run", "1", *extra],
                 extra_env=extra_env)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr


def games_csvs(out):
    return {name: Path(os.path.join(out, "runs", name, "games.csv")).read_bytes() for name in NAMES}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_chat_model_dir):
    root = tmp_path_factory.mktemp("sweep")
    grid = write_grid(root / "tiny.toml", tiny_chat_model_dir)
    code, stdout, stderr = sweep(grid, root / "whole")
    assert code == 0, stderr
    return grid, root / "whole", stdout


def test_a_2x2_grid_runs_to_the_end_and_a_relaunch_starts_no_run(finished_sweep):
    grid, out, stdout = finished_sweep
    assert sorted(os.listdir(out / "runs")) == NAMES
    record = json.loads((out / "sweep.json").read_text())
    assert record["counts"]["finished"] == 4 and record["episodes_done"] == record["episodes_total"] == 24
    for run in record["runs"]:
        assert run["state"] == "finished" and run["episode"] == 6 and run["wall_s"] > 0
        assert set(run["shares"]) >= {"C|C", "C|D", "D|C", "D|D", "illegal"}
        folder = out / "runs" / run["name"]
        assert (folder / "final" / "agent" / "adapter_model.safetensors").is_file()
        config = json.loads((folder / "config.json").read_text())
        assert config["threads"] == 1 and config["episodes"] == 6
        assert (config["reward"], f"seed{config['seed']}") == tuple(run["name"].split("-tft-"))[:1] + \
            (run["name"].rsplit("-", 1)[1],)
    before = {name: os.stat(out / "runs" / name / "games.csv").st_mtime_ns for name in NAMES}
    code, stdout, stderr = sweep(grid, out)
    assert code == 0, stderr
    assert "nothing to do" in stdout
    assert before == {name: os.stat(out / "runs" / name / "games.csv").st_mtime_ns for name in NAMES}
    assert json.loads((out / "sweep.json").read_text())["counts"]["skipped"] == 4


def test_a_sweep_killed_mid_run_and_relaunched_ends_like_an_uninterrupted_one(finished_sweep, tmp_path):
    grid, whole, _ = finished_sweep
    out = tmp_path / "killed"
    proc = spawn(["sweep", grid, "--out", str(out), "--no-progress"], start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once some run has a checkpoint and is not finished
        runs = out / "runs"
        started = [n for n in (os.listdir(runs) if runs.is_dir() else [])
                   if (runs / n / "checkpoints").is_dir() and os.listdir(runs / n / "checkpoints")]
        if any(not (runs / n / "final").exists() for n in started):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray instance, workers included
    proc.wait()  # not communicate(): a Ray daemon outside the group may still hold the pipes open
    proc.stdout.close(), proc.stderr.close()
    unfinished = [n for n in NAMES if not (out / "runs" / n / "summary.json").exists()]
    assert unfinished, "the sweep ended before it could be killed"
    code, stdout, stderr = sweep(grid, out)
    assert code == 0, stderr
    assert games_csvs(out) == games_csvs(whole)


def test_ray_retries_a_run_whose_worker_died_and_the_retry_resumes(finished_sweep, tmp_path, tiny_chat_model_dir):
    grid, whole, _ = finished_sweep
    text = Path(TINY_GRID).read_text().replace('seed = [0, 1]', 'seed = [1]').replace('["game", "deont"]', '["deont"]')
    one = write_grid(tmp_path / "one.toml", tiny_chat_model_dir, text)
    out = tmp_path / "out"
    proc = spawn(["sweep", one, "--out", str(out), "--no-progress"])
    folder = out / "runs" / "deont-tft-seed1"
    deadline = time.time() + 300
    while time.time() < deadline and not (folder / "checkpoints" / "ckpt-000002").is_dir():
        time.sleep(0.02)
    worker = json.loads((folder / "progress.json").read_text())["pid"]
    os.kill(worker, signal.SIGKILL)  # the worker, not the sweep: Ray notices and runs the task again
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert json.loads((folder / "progress.json").read_text())["pid"] != worker
    assert (folder / "games.csv").read_bytes() == games_csvs(whole)["deont-tft-seed1"]


def test_a_locked_run_turns_a_second_writer_away_and_a_dead_holder_does_not(tmp_path, tiny_chat_model_dir):
    folder = tmp_path / "run"
    proc = spawn(["--reward", "game", "--model", tiny_chat_model_dir, "--episodes", "2", "--lora-rank", "4",
                  "--format-aid", "prefix", "--threads", "1", "--no-progress", "--out", str(folder)])
    assert proc.communicate(timeout=300) and proc.returncode == 0
    (folder / "summary.json").unlink()  # unfinished again: --resume of a finished run only reads its summary
    # A live holder: `run.py --resume` exits 2 at once with one line naming it.
    lock = FolderLock(str(folder)).acquire("the test's holder")
    try:
        proc = spawn(["--resume", str(folder), "--no-progress"])
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2
        assert stderr.count("\n") == 1 and "the test's holder" in stderr and f"pid {os.getpid()}" in stderr, stderr
    finally:
        lock.release()
    # A dead holder: a process that took the lock and was killed does not block.
    holder = subprocess.Popen([sys.executable, "-c", "import time; from moral.runio import FolderLock; "
                               f"FolderLock({str(folder)!r}).acquire('doomed'); print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    holder.stdout.close()
    assert "doomed" in (folder / ".lock").read_text()
    proc = spawn(["--resume", str(folder), "--no-progress"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr


def test_a_sweep_names_the_runs_it_could_not_take_and_exits_non_zero(tmp_path, tiny_chat_model_dir):
    text = Path(TINY_GRID).read_text().replace('seed = [0, 1]', 'seed = [0]').replace('"deont"', '"util"')
    grid = write_grid(tmp_path / "g.toml", tiny_chat_model_dir, text)
    lock = FolderLock(str(tmp_path / "out" / "runs" / "util-tft-seed0")).acquire("another sweep")
    try:
        code, stdout, stderr = sweep(grid, tmp_path / "out")
    finally:
        lock.release()
    assert code == 1
    assert "failed: util-tft-seed0:" in stderr and "another sweep" in stderr
    assert (tmp_path / "out" / "runs" / "game-tft-seed0" / "summary.json").is_file()  # the others went on
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert {r["name"]: r["state"] for r in record["runs"]} == {"game-tft-seed0": "finished",
                                                              "util-tft-seed0": "failed"}


BAD_GRIDS = [
    ("[run]\nepisodez = 3\n[grid]\nseed = [0]\n", "episodez: unknown option; allowed:"),
    ("[grid]\nopponent = ['tft', 'tit-for-tat']\n", "tit-for-tat"),
    ("[grid]\nseed = []\n", "seed = []: an axis needs at least one value"),
    ("[run]\nout = 'x'\n[grid]\nseed = [0]\n", "out: set by the sweep"),
    ("[run]\nseed = [0, 1]\n[grid]\nreward = ['game']\n", "belongs under [grid]"),
    ("[run]\nepisodes = 10\n[grid]\nreward = ['game:5,deont:4']\n", "game:5,deont:4"),
    ("[grid]\nlr = ['fast']\n", "lr"),
    ("[grid]\nreward = ['game']\n[grids]\nseed = [0]\n", "unknown table(s) [grids]"),
    ("[grid\nseed = [0]\n", "not valid TOML"),
    ("[run]\nsave-every = 2\nsave_every = 3\n[grid]\nseed = [0]\n", "given twice"),
    ("[run]\nmodel = '/no/such/model'\n[grid]\nseed = [0]\n", "'/no/such/model': no such folder"),
]


@pytest.mark.parametrize("text,expected", BAD_GRIDS)
def test_a_bad_grid_fails_before_anything_starts_in_one_line(tmp_path, capsys, text, expected):
    grid = tmp_path / "bad.toml"
    grid.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", str(grid), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_one_command_per_run_and_starts_nothing(tmp_path, capsys, tiny_chat_model_dir):
    grid = write_grid(tmp_path / "g.toml", tiny_chat_model_dir)
    cli.main(["sweep", grid, "--out", str(tmp_path / "out"), "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("python run.py ") for line in lines)
    assert any("--reward deont" in line and "--seed 1" in line and "--threads 1" in line
               and line.endswith("runs/deont-tft-seed1") for line in lines)
    assert not (tmp_path / "out").exists()



def test_a_runs_command_line_writes_what_the_sweeps_run_wrote(finished_sweep, tmp_path):
    """sweep.json's (and --dry-run's) `python run.py ...` line, for a job system of one's own, repeats the sweep's run
    byte for byte: it carries the run's thread count (--cpus-per-run). Without it a run takes every core, which
    changes the rounding on a real model (README: the embedded model's p_c and p_d with --threads 1 and 2 differ in
    the sixth digit from the first update on); this tiny model happens to write the same bytes either way."""
    import shlex
    _, whole, _ = finished_sweep
    record = json.loads((whole / "sweep.json").read_text())
    run = next(r for r in record["runs"] if r["name"] == "deont-tft-seed1")
    argv = shlex.split(run["command"])
    assert argv[:2] == ["python", "run.py"] and argv[argv.index("--threads") + 1] == "1"
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    proc = spawn(argv[2:] + ["--no-progress"])
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    for name in ("games.csv", "ppo.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (whole / "runs" / run["name"] / name).read_bytes(), name

def test_grid_keys_spelled_as_options_or_with_underscores_and_names_from_settings(tmp_path, tiny_chat_model_dir):
    text = (f"[run]\nmodel = '{tiny_chat_model_dir}'\nbatch-size = 2\nreset_at_switch = true\n"
            "[grid]\nseed = [3]\nreward = ['game:2,deont:2']\nopponent = ['llm']\nlora_rank = [2, 4]\n")
    specs = plan(write_grid(tmp_path / "g.toml", tiny_chat_model_dir, text), str(tmp_path / "out"))
    assert [s.name for s in specs] == ["game2_deont2-llm-lora-rank2-seed3", "game2_deont2-llm-lora-rank4-seed3"]
    assert all(s.config.steps == 2 and s.config.reset_at_switch and s.episodes == 4 for s in specs)
    assert [s.config.lora_rank for s in specs] == [2, 4]


def test_an_unfinished_run_counts_from_its_last_checkpoint_not_its_last_report(tmp_path, tiny_chat_model_dir):
    specs = plan(write_grid(tmp_path / "g.toml", tiny_chat_model_dir), str(tmp_path / "out"))
    for name, checkpoints in (("deont-tft-seed0", ["ckpt-000002", "ckpt-000004", "ckpt-000006.tmp-99"]),
                              ("deont-tft-seed1", [])):
        folder = tmp_path / "out" / "runs" / name
        (folder / "checkpoints").mkdir(parents=True)
        for c in checkpoints:
            (folder / "checkpoints" / c).mkdir()
        (folder / "progress.json").write_text(json.dumps({"episode": 7, "episodes": 8, "wall_s": 1.0}))
    states = Sweep(specs, str(tmp_path / "out"), str(tmp_path / "g.toml")).states
    assert states["deont-tft-seed0"]["episode"] == 4  # the half-written checkpoint of episode 6 does not count
    assert states["deont-tft-seed1"]["episode"] == 0



def test_a_started_run_trained_on_a_gpu_fails_in_one_line_where_there_is_none(tmp_path, monkeypatch):
    """A sweep relaunched on machines without the GPU its started runs trained on: each such run's error line (the
    sweep prints one per failed run) says why, instead of the model loader's "Cannot access accelerator device"."""
    from moral.config import RunConfig, UsageError
    from moral.sweep import error_line, train_run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = tmp_path / "runs" / "deont-tft-seed0"
    (folder / "checkpoints" / "ckpt-000002").mkdir(parents=True)
    (folder / "games.csv").write_text("episode\n")  # started: it wrote its logs
    (folder / "config.json").write_text(json.dumps({**RunConfig(episodes=3).resolve().to_dict(), "device": "cuda"}))
    with pytest.raises(UsageError) as info:
        train_run(str(folder), [], threads=1, holder="test")
    assert error_line(info.value) == f"{folder}: the run was trained on cuda, which this machine cannot use (CUDA is " \
        f"not available on this machine); continue it on a machine that has it (`run.py eval` of its checkpoints and " \
        f"final adapter works here)"

def test_a_run_folder_started_with_other_settings_is_refused(finished_sweep, tmp_path):
    grid, whole, _ = finished_sweep
    changed = tmp_path / "changed.toml"
    changed.write_text(Path(grid).read_text().replace("lr = 0.001", "lr = 0.002"))
    with pytest.raises(GridError, match="was started with lr=0.001 but the grid now gives 0.002"):
        plan(str(changed), str(whole))


def test_sweep_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch, tiny_chat_model_dir):
    monkeypatch.setitem(sys.modules, "ray", None)
    grid = write_grid(tmp_path / "g.toml", tiny_chat_model_dir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", grid, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "pip install -e '.[sweep]'" in capsys.readouterr().err


def test_eval_and_report_take_the_sweep_folder(finished_sweep, tmp_path):
    grid, whole, _ = finished_sweep
    eval_args = ["eval", str(whole), "--episodes", "2", "--steps", "2", "--variants", "structured", "--orders",
                 "original", "--no-baselines", "--no-progress"]
    proc = spawn(eval_args)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "4 to evaluate" in stdout
    assert all((whole / "runs" / n / "eval" / "metrics.json").is_file() for n in NAMES)
    proc = spawn(eval_args + ["--threads", "1"])  # a run folder's option, said to be unused here
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "4 already evaluated, 0 to evaluate" in stdout
    assert "note: --threads applies only to run folders (a sweep's runs take --cpus-per-run" in stderr
    out = tmp_path / "report"
    proc = spawn(["report", str(whole), "--out", str(out)])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    for name in ("learning.png", "regret_by_game.png", "reciprocity_ipd.png", "test_action_types.png",
                 "training_action_types.png", "sweep_results.md", "sweep_results.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = (out / "sweep_results.csv").read_text()
    assert "Deontological" in table and "Game payoffs" in table


def test_the_engine_starts_jobs_in_the_order_given_never_more_than_it_has_slots_for():
    from moral.sweep import Engine

    def job(i):
        start = time.time()
        time.sleep(0.2)
        return i, start, time.time()

    engine = Engine(None, cpus=1.0, gpus=0.0, retries=0)
    try:
        slots = engine.slots()
        jobs = list(range(3 * slots + 1))
        done = [item for finished in engine.run_in_order(job, jobs, lambda i: (i,), 0.05) for item in finished]
    finally:
        engine.close()
    assert sorted(j for j, _, _ in done) == jobs and all(error is None for _, _, error in done)
    spans = sorted(value for _, value, _ in done)  # (job, start, end)
    ends = sorted(end for _, _, end in spans)
    for job, start, _ in spans:
        assert sum(s <= start < e for _, s, e in spans) <= slots
        if job >= slots:  # it waited for job - slots + 1 jobs to end: no later job jumped the queue
            assert start >= ends[job - slots]


def test_an_address_without_a_ray_cluster_is_one_line(tmp_path, monkeypatch, capsys):
    """ray.init's ConnectionError (after about 30 s against an address that answers nothing) was a traceback."""
    import ray

    from moral import sweep

    def no_cluster(address=None, **kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr(sweep, "unreachable", lambda address: None)  # something answers TCP, but not Ray
    grid = os.path.join(ROOT, "grids", "embedded.toml")
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", grid, "--out", str(tmp_path / "sweep"), "--address", "10.0.0.9:6379", "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --address 10.0.0.9:6379: no Ray cluster answers there")


def test_eval_of_a_sweep_stopped_by_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    """It was a KeyboardInterrupt traceback out of Ray's wait; now one line saying how many runs were evaluated."""
    from moral import sweep

    out = tmp_path / "sweep"
    for name in ("a", "b", "c"):
        run = out / "runs" / name
        (run / "final").mkdir(parents=True)
        (run / "config.json").write_text("{}")
        (run / "summary.json").write_text("{}")
    (out / "sweep.json").write_text("{}")

    class StoppedEngine:
        closed = False

        def __init__(self, *args):
            pass

        def run_in_order(self, job, items, args_of, poll_s):
            yield [(items[0], {}, None)]
            raise KeyboardInterrupt

        def close(self):
            StoppedEngine.closed = True

    monkeypatch.setattr(sweep, "Engine", StoppedEngine)
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 130 and len(err.strip().splitlines()) == 1 and StoppedEngine.closed
    assert err.startswith("stopped; 1 of 3 run(s) evaluated")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_address_nothing_listens_at_is_one_line_at_once(tmp_path, monkeypatch, capsys):
    """ray.init retried such an address for ever (Ray 2.60: a warning every 40 s, still waiting after 10 min)."""
    import ray

    def must_not_run(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", must_not_run)
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    grid = os.path.join(ROOT, "grids", "embedded.toml")
    with pytest.raises(SystemExit) as info:
        cli.main(["sweep", grid, "--out", str(tmp_path / "sweep"), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: RAY_ADDRESS={address}: no Ray cluster answers there ({address}: connection "
                          f"refused)") and "unset RAY_ADDRESS" in err


def test_unreachable_names_what_a_probe_finds():
    from moral.sweep import unreachable
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert unreachable(f"127.0.0.1:{port}") is None and unreachable(f"ray://127.0.0.1:{port}") is None
    assert unreachable(f"127.0.0.1:{port}") == f"127.0.0.1:{port}: connection refused"
    assert unreachable("auto") is None and unreachable("127.0.0.1") is None  # no port: left to Ray


def test_a_sweep_joins_the_ray_cluster_that_ray_address_names(finished_sweep, tmp_path):
    """`ray job submit` and many clusters set RAY_ADDRESS, which ray.init reads by itself: the sweep used to ask
    for a local instance's object store there, a ValueError traceback before any run. Here a second Ray instance
    started with `ray start --head` is the cluster; its runs write the same games.csv as the local instance's."""
    grid, whole, _ = finished_sweep
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    # with a token in ~/.ray/auth_token (any local instance writes one) `ray start` turns token authentication on;
    # the driver sends the token only with RAY_AUTH_MODE=token (auth_hint's advice, taken here)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    if not os.path.isfile(os.path.expanduser("~/.ray/auth_token")):
        subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=120)
    started = subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                              "--include-dashboard=false", "--disable-usage-stats"], env=env, capture_output=True,
                             text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        code, stdout, stderr = sweep(grid, tmp_path / "on-cluster",
                                     extra_env={"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"})
        assert code == 0, stderr
        assert games_csvs(tmp_path / "on-cluster") == games_csvs(whole)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)


def test_auth_hint_names_ray_auth_mode_only_where_a_token_exists(monkeypatch, tmp_path):
    from moral.sweep import auth_hint
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert auth_hint() == ""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 64)
    assert auth_hint().endswith("set RAY_AUTH_MODE=token")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already set: the hint has nothing to add
    assert auth_hint() == ""


@pytest.mark.parametrize("raised, shown", [(None, True), (ValueError, True), (ConnectionError, False)])
def test_stderr_held_back_writes_out_unless_the_block_raised_what_it_drops(raised, shown, capfd):
    from moral.sweep import stderr_held_back
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        with stderr_held_back(drop_on=(ConnectionError,)):
            os.write(2, b"a C++ warning\n")
            assert capfd.readouterr().err == ""  # held back so far
            if raised:
                raise raised("stop")
    assert capfd.readouterr().err == ("a C++ warning\n" if shown else "")


def test_the_engine_counts_slots_node_by_node():
    """A task runs on one node: two 8-CPU nodes hold four 3-CPU runs, not 16 // 3 = 5; a run no node can hold is
    one line (it would wait in Ray's queue for ever); ten 0.1-GPU runs fit one GPU (1.0 // 0.1 is 9.0)."""
    from moral.config import UsageError
    from moral.sweep import Engine, tasks_fitting

    assert tasks_fitting({"CPU": 8.0, "GPU": 1.0}, 1.0, 0.1) == 8 and tasks_fitting({"CPU": 16.0, "GPU": 1.0}, 1, 0.1) == 10
    assert tasks_fitting({"CPU": 8.0}, 3.0, 0.0) == 2 and tasks_fitting({"CPU": 8.0}, 1.0, 0.5) == 0

    class FakeRay:
        nodes_ = [{"Alive": True, "Resources": {"CPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 8.0}},
                  {"Alive": False, "Resources": {"CPU": 64.0}}]

        @classmethod
        def nodes(cls):
            return cls.nodes_

        @staticmethod
        def shutdown():
            pass

    engine = Engine.__new__(Engine)
    engine.ray, engine.cpus, engine.gpus = FakeRay, 3.0, 0.0
    assert engine.slots() == 4
    FakeRay.nodes_ = FakeRay.nodes_ + [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}]  # the cluster grew
    assert engine.slots() == 5

    def init(*args, **kwargs):
        pass

    import ray
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "init", init)
        mp.setattr(ray, "nodes", FakeRay.nodes)
        mp.setattr(ray, "shutdown", FakeRay.shutdown)
        with pytest.raises(UsageError, match=r"--cpus-per-run 12 --gpus-per-run 1: no node can run that; the cluster "
                                             r"has 3 node\(s\): 2 with 8 CPU\(s\) and 0 GPU\(s\), 1 with 4 CPU"):
            Engine(None, cpus=12.0, gpus=None, retries=0)
        assert Engine(None, cpus=4.0, gpus=None, retries=0).gpus == 1.0  # a node with a GPU: one per run


def test_a_stopped_sweep_lets_its_runs_save_a_checkpoint_first(tmp_path, tiny_chat_model_dir):
    """Ctrl-C, or the SIGTERM of a batch system's time limit, used to end the sweep at once (Ray killed the
    runs), losing each run's episodes since its last checkpoint (up to --save-every, 100 by default). Now each
    running run finishes its episode and saves a checkpoint, as run.py does. SIGTERM here: the driver turns it
    into Ctrl-C's KeyboardInterrupt (both were measured to pass; one is enough for the suite's time)."""
    stop = signal.SIGTERM
    text = Path(TINY_GRID).read_text().replace('seed = [0, 1]', 'seed = [0]').replace('["game", "deont"]', '["deont"]')
    text = text.replace("episodes = 6", "episodes = 400").replace("save_every = 2", "save_every = 400")
    grid = write_grid(tmp_path / "long.toml", tiny_chat_model_dir, text)
    out = tmp_path / "out"
    proc = spawn(["sweep", grid, "--out", str(out), "--no-progress"])
    folder = out / "runs" / "deont-tft-seed0"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads((folder / "progress.json").read_text())["episode"] >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.send_signal(stop)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "stopping: 1 running run(s) finish their episode and save a checkpoint" in stderr
    saved = [os.path.basename(c) for c in complete_checkpoints(str(folder))]
    assert len(saved) == 1 and 3 <= checkpoint_episode(saved[0]) < 400, saved
    run = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert run["state"] == "pending" and run["episode"] == checkpoint_episode(saved[0])


def test_sigterm_is_ctrl_c_inside_the_block_only():
    """Train and eval sweeps: a batch system's SIGTERM takes Ctrl-C's path (runs save a checkpoint; one line)."""
    from moral.sweep import sigterm_as_ctrl_c
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert signal.getsignal(signal.SIGTERM) is before
