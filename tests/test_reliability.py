"""Reliability: a run killed at any point and resumed ends exactly like an uninterrupted run; NaNs, a full disk, an
out-of-memory error and SIGTERM never corrupt a run."""

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moral import cli
from ppo_core import load_checkpoint
from ppo_core.checkpoint import read_checkpoint_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPISODES = 8


def train_args(model_dir, out, extra=()):
    return ["--reward", "game", "--opponent", "tft", "--model", model_dir, "--episodes", str(EPISODES),
            "--lora-rank", "4", "--save-every", "2", "--format-aid", "prefix", "--lr", "0.001", "--threads", "1",
            "--out", str(out), "--no-progress", *extra]


def spawn(args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def artefacts(folder):
    """The bytes of the logs and the tensors of the final adapter and value head."""
    out = {name: Path(os.path.join(folder, name)).read_bytes() for name in ("games.csv", "ppo.jsonl")}
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        out[name] = load_file(os.path.join(folder, "final", "agent", name))
    return out


def assert_same(a, b):
    assert a["games.csv"] == b["games.csv"]
    assert a["ppo.jsonl"] == b["ppo.jsonl"]
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_chat_model_dir):
    out = tmp_path_factory.mktemp("runs") / "whole"
    proc = spawn(train_args(tiny_chat_model_dir, out))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return artefacts(out)


@pytest.mark.parametrize("kill_seed", [0, 1, 2, 3])
def test_sigkill_at_a_random_point_then_resume_is_exact(tmp_path, tiny_chat_model_dir, uninterrupted, kill_seed):
    """Kill points: after a random number of checkpoints (0-3) plus a random delay (0-0.4 s), i.e. before the first
    checkpoint, mid-episode, or mid-checkpoint-write."""
    rng = random.Random(kill_seed)
    out = tmp_path / "run"
    proc = spawn(train_args(tiny_chat_model_dir, out))
    wait_for = rng.randint(0, 3)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        ckpts = os.listdir(out / "checkpoints") if (out / "checkpoints").exists() else []
        if len([c for c in ckpts if ".tmp" not in c]) >= wait_for and (out / "games.csv").exists():
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.4))
    killed = proc.poll() is None
    proc.kill()
    proc.communicate()
    if killed:
        resumed = spawn(["--resume", str(out), "--no-progress"])
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err
    assert_same(artefacts(out), uninterrupted)



@pytest.mark.parametrize("argv", [
    ["--reward", "util", "--opponent", "llm", "--format-aid", "prefix"],  # two learners, one shared reference cache
    ["--reward", "game", "--opponent", "random"],  # two-token answers, the Random opponent's stream
    ["--reward", "game:2,deont:3", "--reset-at-switch", "--parallel-games", "3", "--format-aid", "prefix"],
    ["--reward", "deont", "--ppo-epochs", "2", "--tokens", "XY", "--format-aid", "prefix"],  # recomputed updates
], ids=["two-learners", "two-token-random", "schedule-reset-3-games", "two-epochs"])
def test_a_run_stopped_after_any_episode_resumes_exactly_in_every_kind_of_run(argv, tmp_path, tiny_chat_model_dir):
    """The SIGKILL test above covers one kind of run; this stops each other kind after episodes 1 and 3 (as SIGTERM
    does: the episode ends, a checkpoint is written) and resumes it in a new FineTuning: the same games.csv and
    ppo.jsonl bytes and the same final adapters and value heads as the run never stopped (fp32, 1 thread)."""
    from moral.config import RunConfig
    from moral.finetune import FineTuning, Interrupted
    from moral.sweep import settings_from_args

    threads = torch.get_num_threads()
    args = cli.train_parser().parse_args([*argv, "--model", tiny_chat_model_dir, "--episodes", "5", "--lora-rank",
                                          "4", "--lr", "0.001", "--threads", "1", "--dtype", "fp32"])
    config = RunConfig(**settings_from_args(args)).resolve()

    def files(folder):
        out = {name: (folder / name).read_bytes() for name in ("games.csv", "ppo.jsonl")}
        for learner in config.learners:
            for name in ("adapter_model.safetensors", "value_head.safetensors"):
                out[learner, name] = load_file(folder / "final" / learner / name)
        return out

    try:
        FineTuning(config, str(tmp_path / "whole"), progress=False).train()
        whole = files(tmp_path / "whole")
        for stop_after in (1, 3):
            folder = tmp_path / f"stopped-{stop_after}"

            def stop(run, after=stop_after):
                if run.episode == after:
                    run._stop_signal = "SIGTERM"  # what the signal handler sets

            with pytest.raises(Interrupted):
                FineTuning(config, str(folder), progress=False, on_episode=stop).train()
            resumed = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
            FineTuning(resumed, str(folder), resume=True, progress=False).train()
            again = files(folder)
            for key, value in whole.items():
                if isinstance(value, bytes):
                    assert again[key] == value, (stop_after, key)
                else:
                    assert value.keys() == again[key].keys() and all(torch.equal(value[k], again[key][k])
                                                                     for k in value), (stop_after, key)
    finally:
        torch.set_num_threads(threads)

def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_chat_model_dir, uninterrupted):
    out = tmp_path / "run"
    proc = spawn(train_args(tiny_chat_model_dir, out))
    while proc.poll() is None and not (out / "games.csv").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 130:  # stopped cleanly (not already finished)
        assert f"python run.py --resume {out}" in err and "Traceback" not in err
        resumed = spawn(["--resume", str(out), "--no-progress"])
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err
    else:  # the run had finished; a signal after train() returned meets the default handler
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert (out / "summary.json").exists()
    assert_same(artefacts(out), uninterrupted)


def _checkpoint_is_finite(folder):
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        tensors = load_file(os.path.join(folder, "adapters", "agent", name))
        assert all(torch.isfinite(t).all() for t in tensors.values())
    state = read_checkpoint_state(folder)
    for moments in state["trainers"]["agent"]["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in moments.values() if torch.is_tensor(v))


def test_nan_reward_is_skipped_and_counted(tmp_path, tiny_chat_model_dir, monkeypatch, capsys):
    import moral.finetune as ft
    real = ft.moral_reward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        return float("nan") if calls["n"] == 7 else real(*args, **kwargs)  # one reward in episode 1

    monkeypatch.setattr(ft, "moral_reward", poisoned)
    out = tmp_path / "run"
    args = train_args(tiny_chat_model_dir, out)
    args[args.index("--episodes") + 1] = "4"
    cli.main(args)
    records = [json.loads(line) for line in (out / "ppo.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in records] == [None, "non-finite reward", None, None]
    assert json.loads((out / "summary.json").read_text())["skipped_nonfinite_rewards"] == 1
    for ckpt in os.listdir(out / "checkpoints"):
        _checkpoint_is_finite(out / "checkpoints" / ckpt)


def test_poisoned_gradient_is_skipped_and_checkpoint_stays_clean(tmp_path, tiny_chat_model_dir, monkeypatch):
    from ppo_core import PPOTrainer
    real_step = PPOTrainer.step
    calls = {"n": 0}

    def step_with_nan_gradient(self, *args, **kwargs):
        calls["n"] += 1
        handle = self.params[0].register_hook(lambda g: g * float("nan")) if calls["n"] == 2 else None
        try:
            return real_step(self, *args, **kwargs)
        finally:
            if handle:
                handle.remove()

    monkeypatch.setattr(PPOTrainer, "step", step_with_nan_gradient)
    out = tmp_path / "run"
    args = train_args(tiny_chat_model_dir, out)
    args[args.index("--episodes") + 1] = "4"
    cli.main(args)
    records = [json.loads(line) for line in (out / "ppo.jsonl").read_text().splitlines()]
    assert [r["ppo/nonfinite_steps"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    for ckpt in os.listdir(out / "checkpoints"):
        _checkpoint_is_finite(out / "checkpoints" / ckpt)


def test_refuses_to_checkpoint_nan_weights(tmp_path):
    from conftest import tiny_policy
    from ppo_core import PPOConfig, PPOTrainer, save_checkpoint
    policy = tiny_policy(0)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), policy, "agent")
    with torch.no_grad():
        trainer.params[0][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(str(tmp_path / "ckpt"), policy=policy, trainers={"agent": trainer})
    assert not os.listdir(tmp_path)


def test_disk_full_keeps_the_last_checkpoint(tmp_path, tiny_chat_model_dir, monkeypatch, capsys):
    import ppo_core.checkpoint as ck
    real_save = ck.torch.save
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(train_args(tiny_chat_model_dir, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "No space left on device" in err and "ckpt-000002" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-000002"]  # no half-written checkpoint
    monkeypatch.undo()
    _checkpoint_is_finite(out / "checkpoints" / "ckpt-000002")
    cli.main(["--resume", str(out), "--no-progress"])  # and the run finishes from there
    assert json.loads((out / "summary.json").read_text())["decisions"] == EPISODES * 5


def test_out_of_memory_in_generation_backs_off(tmp_path, tiny_chat_model_dir, monkeypatch):
    import ppo_core.shortcuts as tr
    real_sample = tr.sample
    calls = {"n": 0}

    def flaky(policy, queries, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 and len(queries) > 1:
            raise torch.OutOfMemoryError("simulated CUDA out of memory")
        return real_sample(policy, queries, **kwargs)

    monkeypatch.setattr(tr, "sample", flaky)
    out = tmp_path / "run"
    args = train_args(tiny_chat_model_dir, out, ["--parallel-games", "4"])
    args[args.index("--episodes") + 1] = "2"
    cli.main(args)
    records = [json.loads(line) for line in (out / "ppo.jsonl").read_text().splitlines()]
    assert records[-1]["ppo/oom_backoffs"] == 1.0
    assert len((out / "games.csv").read_text().splitlines()) == 1 + 2 * 5 * 4


def test_unwritable_out_folder_and_corrupt_checkpoint(tmp_path, tiny_chat_model_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        cli.main(train_args(tiny_chat_model_dir, blocker / "run"))
    assert info.value.code == 2 and "cannot write there" in capsys.readouterr().err
    out = tmp_path / "run"
    args = train_args(tiny_chat_model_dir, out)
    args[args.index("--episodes") + 1] = "2"
    cli.main(args)
    (out / "summary.json").unlink()  # unfinished again: --resume of a finished run only reads its summary
    (out / "checkpoints" / "ckpt-000002" / "state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(SystemExit) as info:
        cli.main(["--resume", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cannot read" in err and "ckpt-000002" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def hub_host() -> str:
    """The Hub's host name (huggingface.co unless HF_ENDPOINT names a mirror)."""
    import urllib.parse

    from huggingface_hub import constants
    return urllib.parse.urlsplit(constants.ENDPOINT).hostname


@pytest.fixture
def no_network(monkeypatch):
    """Every host name lookup fails (as on a node without internet); the list counts the lookups. huggingface_hub
    starts in online mode, and its offline switch is put back after the test."""
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    lookups = []

    def fail(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    return lookups


def test_a_model_id_without_network_or_cache_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys, no_network):
    """No retries against the unreachable Hub (one probe, where huggingface_hub alone looked the host up six times
    per file, about 23 s, with a warning line each), and the --out folder can be used again afterwards."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["--model", "google/gemma-2-2b-it", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--model 'google/gemma-2-2b-it' is not in the local Hugging Face cache" in err
    assert f"{hub_host()} cannot be reached" in err
    assert no_network == [hub_host()]
    # a failed set-up gives the signals back (FineTuning installs its handlers before loading the model)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # the failed set-up left only its lock: the same --out is a new run folder, not "exists, --resume it"
    assert os.listdir(out) == [".lock"]
    with pytest.raises(SystemExit):
        cli.main(["--model", "google/gemma-2-2b-it", "--out", str(out), "--no-progress"])
    assert "the folder exists" not in capsys.readouterr().err


def test_a_cached_model_id_loads_from_the_cache_without_network(tmp_path, monkeypatch, no_network,
                                                                 tiny_chat_model_dir):
    """A Hub id in the local cache trains with the Hub unreachable: one probe, then not one more lookup."""
    import shutil

    from huggingface_hub import constants
    cache = tmp_path / "hub"
    revision = "0" * 40
    snapshot = cache / "models--someone--tiny-chat" / "snapshots" / revision
    shutil.copytree(tiny_chat_model_dir, snapshot)
    (cache / "models--someone--tiny-chat" / "refs").mkdir()
    (cache / "models--someone--tiny-chat" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "run"
    cli.main(["--model", "someone/tiny-chat", "--episodes", "1", "--lora-rank", "4", "--format-aid", "prefix",
              "--threads", "1", "--out", str(out), "--no-progress"])
    assert os.path.isfile(out / "summary.json")
    assert no_network == [hub_host()]


def test_offline_mode_or_a_proxy_means_no_probe(tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    from moral.agent import ModelUnavailable, hub_reachable, model_source
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_reachable() is None  # a direct connection says nothing about the route through a proxy
    monkeypatch.delenv("HTTPS_PROXY")
    assert hub_reachable() is False and no_network == [hub_host()]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match="offline mode is on"):
        model_source("someone/not-cached")
    assert no_network == [hub_host()]  # offline mode set by the user: no probe
    assert model_source(str(tmp_path)) == str(tmp_path)  # a folder is a folder

def test_a_model_path_is_a_folder_or_one_line_and_never_a_hub_lookup(tmp_path, monkeypatch, capsys, no_network):
    from moral.agent import model_source
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert model_source("~/models/mine") == str(tmp_path / "models" / "mine")
    with pytest.raises(SystemExit) as info:
        cli.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--model '{tmp_path / 'missing'}': no such folder" in err
    assert no_network == []
