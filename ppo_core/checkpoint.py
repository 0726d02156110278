"""Save and load the whole training state, atomically.

A checkpoint is a folder:
    adapters/<adapter>/adapter_config.json, adapter_model.safetensors, value_head.safetensors   (peft layout)
    state.pt   one dict: each trainer's optimiser, KL controller, score moments, random streams and counters;
               the reference cache; the global RNG states (python, numpy, torch, CUDA); the caller's `extra`.
    config.json  (optional) the caller's settings that made this state, so that the folder alone says what it is.
It is written into a temporary sibling folder and renamed into place, so a reader sees a complete checkpoint or
none. Checkpoint folders are never overwritten.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from .model import load_adapter_weights, save_adapter

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or unreadable."""


def capture_rng() -> dict:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, key.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: str) -> None:
    """fsync every file under `folder`, then every folder (their entries), deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_folder(root)


def _fsync_folder(folder: str) -> None:
    """Make a folder's entries durable (POSIX). Windows cannot open a folder as a file (PermissionError), nor does it
    need to: NTFS journals its folder entries, so there the files' own fsyncs are all there is to do."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nonfinite_tensors(trainers: dict) -> list[str]:
    """Names of trainable weights or optimiser moments that hold NaN or Inf (a checkpoint must never contain any)."""
    bad = []
    for trainer in trainers.values():
        named = {id(p): f"{trainer.adapter}[{i}]" for i, p in enumerate(trainer.params)}
        for p in trainer.params:
            if not bool(torch.isfinite(p).all()):
                bad.append(f"weight {named[id(p)]}")
        for p, state in trainer.optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    bad.append(f"optimizer {key} of {named.get(id(p), '?')}")
    return bad


def save_checkpoint(folder: str, *, policy, trainers: dict, extra: dict | None = None,
                    config: dict | None = None) -> str:
    """Write adapters, value heads and all trainer state to `folder` (which must not exist yet); returns it.

    trainers: {name: PPOTrainer}; trainers sharing one reference cache store it once. config: JSON-serialisable
    settings written as config.json beside the state. Refuses (ValueError) to write a state with NaN or Inf in it.
    """
    folder = os.path.abspath(folder)
    if os.path.exists(folder):
        raise FileExistsError(f"checkpoint {folder} exists already")
    bad = nonfinite_tensors(trainers)
    if bad:
        raise ValueError(f"refusing to write checkpoint {folder}: non-finite values in {', '.join(bad[:3])}")
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        for trainer in trainers.values():
            save_adapter(policy, trainer.adapter, os.path.join(tmp, "adapters", trainer.adapter))
        caches = {id(t.reference_cache): t.reference_cache for t in trainers.values()}
        state = {"trainers": {name: t.state_dict() for name, t in trainers.items()},
                 "reference_caches": [c.state_dict() for c in caches.values()],
                 "cache_of": {name: list(caches).index(id(t.reference_cache)) for name, t in trainers.items()},
                 "rng": capture_rng(), "extra": extra or {}}
        torch.save(state, os.path.join(tmp, STATE_FILE))
        if config is not None:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True, default=str)
        _fsync_tree(tmp)
        os.rename(tmp, folder)
        _fsync_folder(os.path.dirname(folder))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_checkpoint_state(folder: str) -> dict:
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} is not a checkpoint: {STATE_FILE} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def load_checkpoint(folder: str, *, policy, trainers: dict, restore_global_rng: bool = True) -> dict:
    """Load a checkpoint written by save_checkpoint into an existing policy and trainers; returns `extra`."""
    state = read_checkpoint_state(folder)
    missing = set(trainers) - set(state["trainers"])
    if missing:
        raise CheckpointError(f"{folder} has no state for {sorted(missing)}; it has {sorted(state['trainers'])}")
    for name, trainer in trainers.items():
        adapter_dir = os.path.join(folder, "adapters", trainer.adapter)
        try:
            load_adapter_weights(policy, trainer.adapter, adapter_dir)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load adapter {trainer.adapter!r} from {adapter_dir}: {exc}") from exc
        trainer.load_state_dict(state["trainers"][name])
        cache_state = state["reference_caches"][state["cache_of"][name]]
        trainer.reference_cache.load_state_dict(cache_state, policy.device)
    if restore_global_rng:
        restore_rng(state["rng"])
    return state["extra"]
