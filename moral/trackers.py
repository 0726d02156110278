"""Experiment trackers, the ecosystem's way: `--report-to none|tensorboard|wandb|trackio` (transformers' and TRL's
`report_to` convention).

A tracker receives the run's settings once, every PPO step's statistics under TRL's key names (the opponent's, when
it is a second learner, under "opponent/"), and per episode the action-type shares of the last 20 episodes and the
episode's mean reward ("actions/C|C", ..., "actions/illegal", "actions/reward"), all at step = episode. It is fed
by moral.runio.RunLogs, so the run folder's files stay the source of truth. A resumed run continues the same
tracker run where the backend allows: TensorBoard purges the events after the checkpoint's episode, wandb resumes
the run id kept in the run folder's tracker.json, trackio resumes the run of the same name.

The backends are optional extras (`pip install -e '.[tracking]'`); wandb logs offline when no credentials exist.
"""

from __future__ import annotations

import importlib.util
import json
import os

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
PROJECT = "moral-ppo"
INSTALL = "pip install -e '.[tracking]'"
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class TrackerUnavailable(ValueError):
    """The tracker asked for is not installed (the command line prints the message and exits with code 2)."""


def check_installed(name: str) -> None:
    """Raise TrackerUnavailable naming the install command when `name`'s package cannot be imported."""
    module = _MODULES.get(name)
    if module is None:
        return
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise TrackerUnavailable(f"--report-to {name}: the {module} package is not installed; install the trackers "
                                 f"with: {INSTALL} (or pip install {module})")


def _flat(stats: dict, learner: str) -> dict[str, float]:
    prefix = "" if learner == "agent" else f"{learner}/"
    return {f"{prefix}{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))}


class Tracker:
    """The interface RunLogs calls; each backend implements _log and close."""

    def log_ppo(self, learner: str, episode: int, stats: dict) -> None:
        self._log(_flat(stats, learner), episode)

    def log_episode(self, episode: int, shares: dict) -> None:
        self._log({f"actions/{k}": float(v) for k, v in shares.items()}, episode)

    def _log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, folder: str, config: dict, resume_episode: int | None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(folder, "tensorboard"), purge_step=resume_episode)
        if resume_episode is None:
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, sort_keys=True, default=str)
                                 + "\n```", 0)

    def _log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, folder: str, config: dict, resume_episode: int | None):
        import wandb
        state = _read_state(folder)
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_credentials() else "offline")
        run_id = state.get("wandb_id") or wandb.util.generate_id()
        _write_state(folder, {**state, "wandb_id": run_id})
        self.run = wandb.init(project=PROJECT, name=os.path.basename(os.path.abspath(folder)), id=run_id,
                              resume="allow", config=config if resume_episode is None else None, dir=folder,
                              mode=mode)

    def _log(self, values, step):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class TrackioTracker(Tracker):
    def __init__(self, folder: str, config: dict, resume_episode: int | None):
        import trackio
        self.trackio = trackio
        name = os.path.basename(os.path.abspath(folder))
        trackio.init(project=PROJECT, name=name, config=config, resume="allow", embed=False)

    def _log(self, values, step):
        self.trackio.log(values, step=step)

    def close(self):
        self.trackio.finish()


_BACKENDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def open_tracker(name: str, folder: str, config: dict, resume_episode: int | None = None) -> Tracker | None:
    """The tracker of a run folder (None for "none"); resume_episode: the episode a resumed run continues from."""
    if name == "none":
        return None
    if name not in _BACKENDS:
        raise ValueError(f"--report-to {name!r}: choose one of {', '.join(TRACKERS)}")
    check_installed(name)
    return _BACKENDS[name](folder, config, resume_episode)


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def _read_state(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "tracker.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_state(folder: str, state: dict) -> None:
    from .runio import write_json_atomic
    write_json_atomic(os.path.join(folder, "tracker.json"), state)
