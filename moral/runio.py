"""Run files: the logs of a run folder, one atomic writer for JSON and CSV, and checkpoint discovery.

A run folder holds config.json, games.csv (one row per decision), ppo.jsonl (PPO statistics per step),
timing.jsonl, checkpoints/ckpt-NNNNNN/, final/ and summary.json. The logs are flushed after every episode (so
`tail -f games.csv` and a report on a running run see every finished episode) and fsynced when a checkpoint records
their byte sizes, so that a resume cuts them back to exactly that checkpoint.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence

CSV_COLUMNS = ("episode", "step", "slot", "phase", "learner", "game", "opponent", "own_last", "opp_last", "action",
               "opp_action", "action_type", "reward", "response", "p_c", "p_d")
LOG_FILES = ("games.csv", "ppo.jsonl", "timing.jsonl")


# ----------------------------------------------------------------------------------------------- atomic writers
def write_text_atomic(path: str, text: str) -> str:
    """Write `text` to a temporary sibling, fsync it and rename it over `path`: readers see the old file or the new
    one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def strict_json(data):
    """`data` with every non-finite float (a metric undefined for a run, e.g. a share of no decisions) as None:
    json.dumps writes those as NaN or Infinity, which is not JSON (jq and JavaScript's JSON.parse refuse it)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def write_json_atomic(path: str, data, *, sort_keys: bool = True, default=str, trailing_newline: bool = False) -> str:
    """`data` as indented strict JSON (non-finite numbers as null), atomically."""
    text = json.dumps(strict_json(data), indent=2, sort_keys=sort_keys, allow_nan=False,
                      default=None if default is None else lambda value: strict_json(default(value)))
    return write_text_atomic(path, text + ("\n" if trailing_newline else ""))


def csv_text(columns: Sequence[str], rows: Iterable[Mapping], header: bool = True) -> str:
    """Rows (dicts keyed by `columns`) as CSV text with "\\n" line ends."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv_atomic(path: str, columns: Sequence[str], rows: Iterable[Mapping]) -> str:
    """A header and the rows, atomically."""
    return write_text_atomic(path, csv_text(columns, rows))


def read_csv_rows(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------- the logs
class RunLogs:
    """games.csv, ppo.jsonl and timing.jsonl of a run, appended episode by episode.

    Every record also goes to the run's tracker (moral.trackers), so the files stay the source of truth and a
    dashboard shows the same numbers."""

    def __init__(self, folder: str, offsets: dict | None = None, tracker=None):
        """offsets=None starts the logs afresh; otherwise they are cut back to those byte sizes and appended to."""
        self.folder, self.tracker = folder, tracker
        self.handles = {}
        for name in LOG_FILES:
            path = os.path.join(folder, name)
            if offsets is not None:
                with open(path, "r+b") as f:
                    f.truncate(offsets[name])
            self.handles[name] = open(path, "a" if offsets is not None else "w", newline="", encoding="utf-8")
        if offsets is None:
            self.handles["games.csv"].write(",".join(CSV_COLUMNS) + "\n")

    def write_rows(self, rows: list[dict]) -> None:
        self.handles["games.csv"].write(csv_text(CSV_COLUMNS, rows, header=False))

    def write_ppo(self, record: dict, stats: dict | None = None) -> None:
        """One PPO step of a learner: its statistics to ppo.jsonl, its `time/*` entries to timing.jsonl."""
        stats = stats or {}
        self._write_json("ppo.jsonl", {**record, **{k: v for k, v in stats.items() if not k.startswith("time/")}})
        if stats:
            self._write_json("timing.jsonl", {**record, **{k: v for k, v in stats.items() if k.startswith("time/")}})
        if self.tracker is not None and stats:
            self.tracker.log_ppo(record["learner"], record["episode"], stats)

    def end_episode(self, episode: int, shares: dict) -> None:
        """Flush the logs (readers see every finished episode) and send the running action-type shares."""
        for f in self.handles.values():
            f.flush()
        if self.tracker is not None:
            self.tracker.log_episode(episode, shares)

    def _write_json(self, name: str, record: dict) -> None:
        """One strict-JSON line (strict_json: the explained variance of a batch whose returns are all equal is
        nan, written as null)."""
        self.handles[name].write(json.dumps(strict_json(record), sort_keys=True, allow_nan=False) + "\n")

    def sync(self) -> dict:
        """Flush and fsync every log; returns their byte sizes (a checkpoint records them)."""
        offsets = {}
        for name, f in self.handles.items():
            f.flush()
            os.fsync(f.fileno())
            offsets[name] = f.tell()
        return offsets

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        if self.tracker is not None:
            self.tracker.close()


# ------------------------------------------------------------------------------------------------------ locks
class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


LOCK_FILE = ".lock"


class FolderLock:
    """An exclusive lock on a folder while one process writes it: `FOLDER/.lock`, held with flock(2).

    The kernel drops the lock when its process dies (even by SIGKILL), so a lock left by a dead process never blocks;
    the file itself stays and only says who held it last. flock works across the processes of one machine and, on
    Linux NFS clients, across machines sharing the folder. On a file system that cannot lock (Lustre mounted without
    `flock`, NFS without a lock daemon) the folder is written unlocked, with one warning."""

    def __init__(self, folder: str, what: str = "run"):
        self.folder, self.what, self.fd, self.locked = folder, what, None, False
        self.path = os.path.join(folder, LOCK_FILE)

    def acquire(self, holder: str | None = None) -> "FolderLock":
        """Take the lock or raise FolderLocked naming the holder; writes this process into the lock file."""
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.locked = True
        except BlockingIOError:
            held_by = os.read(fd, 1000).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise FolderLocked(f"{self.folder}: this {self.what} is being written by {held_by}; wait for it to end "
                               f"or stop it first") from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, ...: a cluster file system mounted without locks
            self.locked = False
            warnings.warn(f"{self.folder}: its file system cannot lock files ({exc.strerror or exc}); nothing stops "
                          f"a second process from writing this {self.what} at the same time", stacklevel=2)
        what = holder or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        line = (f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())} ({what})\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode("utf-8"), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            if self.locked:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc):
        self.release()


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_name(episode: int) -> str:
    return f"ckpt-{episode:06d}"


def checkpoint_episode(path: str) -> int:
    """The episode a checkpoint folder (named by checkpoint_name) was saved after."""
    return int(os.path.basename(path).removeprefix("ckpt-"))


def complete_checkpoints(folder: str) -> list[str]:
    """Checkpoint folders of a run, oldest first (half-written ones, still named *.tmp-PID, excluded)."""
    ckpt_dir = os.path.join(folder, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return [os.path.join(ckpt_dir, d) for d in sorted(os.listdir(ckpt_dir))
            if d.startswith("ckpt-") and ".tmp" not in d]


def latest_checkpoint(folder: str) -> str | None:
    """The newest checkpoint that can be read."""
    from ppo_core.checkpoint import CheckpointError, read_checkpoint_state
    for path in reversed(complete_checkpoints(folder)):
        try:
            read_checkpoint_state(path)
            return path
        except CheckpointError:
            continue
    return None


def is_finished(folder: str) -> bool:
    """Final adapter and summary written: nothing left to do."""
    return os.path.isdir(os.path.join(folder, "final")) and os.path.isfile(os.path.join(folder, "summary.json"))


def finished_summary(folder: str) -> dict | None:
    """A finished run's summary.json, or None if the run is unfinished or its summary cannot be read (resuming the
    run writes it again)."""
    if not is_finished(folder):
        return None
    try:
        summary = read_json(os.path.join(folder, "summary.json"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and {"first_10pct", "last_10pct"} <= set(summary) else None


def is_started(folder: str) -> bool:
    """The run wrote its logs: it continues from its last checkpoint (or from episode 0 if it has none)."""
    return os.path.isfile(os.path.join(folder, "games.csv")) and os.path.isfile(os.path.join(folder, "config.json"))


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_partial_writes(folder: str) -> None:
    """Drop what a killed process left half-written: temporary checkpoint folders and a final adapter (written
    again at the end)."""
    for name in os.listdir(folder):
        if name == "final" or name.startswith("final.tmp-"):
            remove_tree(os.path.join(folder, name))
    ckpt_dir = os.path.join(folder, "checkpoints")
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if ".tmp-" in name:
            remove_tree(os.path.join(ckpt_dir, name))
