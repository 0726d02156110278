"""The experiment grid as one job: `run.py sweep GRID.toml --out DIR` trains every run of a grid on Ray (a local
instance sized to this machine, or a cluster with --address), each run one Ray task that calls the same training code
as `run.py`, in process.

    [run]                    # options of every run: the command line's, without the leading dashes
    episodes = 150
    [grid]                   # every combination of these values is one run
    reward = ["game", "deont"]
    opponent = ["tft", "llm"]
    seed = [0, 1]

A sweep folder holds grid.toml (the grid as launched), sweep.json (every run's state, episode, latest action-type
shares and wall time, rewritten as the runs progress) and runs/NAME/, one run folder per combination. NAME comes from
the settings (deont-tft-seed0), never from a clock, so launching the same sweep again skips finished runs and resumes
unfinished ones from their last checkpoint (exactly, as `run.py --resume` does). Each run folder is locked while a
process writes it (moral.runio.FolderLock). `run.py eval DIR` and `run.py report DIR` take a sweep folder too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (setup.cfg installs it there)
    import tomli as tomllib

from .config import RunConfig, UsageError, require_trained_device
from .runio import FolderLock, FolderLocked, checkpoint_episode, complete_checkpoints, finished_summary, is_finished, \
    is_started, read_json, write_json_atomic, write_text_atomic

# Options a grid may not set: the sweep decides them for every run.
RESERVED = {"out": "the sweep names each run's folder", "resume": "the sweep resumes unfinished runs itself",
            "no_progress": "runs report to the sweep's progress bar", "threads": "use --cpus-per-run",
            "help": "not a run option"}
NAME_FIRST = ("reward", "opponent")  # always in a run's name, in this order, then the other axes, then the seed
INSTALL_RAY = "pip install -e '.[sweep]'"


class GridError(UsageError):
    """A bad grid file: one line naming the key and the allowed values."""


@dataclass
class RunSpec:
    """One run of a sweep: its folder name, its command-line options and its resolved settings."""
    name: str
    argv: list[str]
    axes: dict
    config: RunConfig = field(repr=False)

    @property
    def episodes(self) -> int:
        return self.config.episodes


# --------------------------------------------------------------------------------------------------- the grid
class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise GridError(message)


def _train_options() -> tuple[argparse.ArgumentParser, dict[str, argparse.Action]]:
    """The training parser (raising instead of exiting) and its options by every accepted spelling: the long option
    without dashes (`save-every`), with underscores (`save_every`) and the setting's name (`steps` for batch-size)."""
    from .cli import train_parser
    parser = train_parser(parser_class=_RaisingParser)
    options = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                options[flag[2:]] = action
                options[flag[2:].replace("-", "_")] = action
        options.setdefault(action.dest, action)
    return parser, options


def _argv_for(key: str, value, action: argparse.Action, where: str) -> list[str]:
    flag = next(f for f in action.option_strings if f.startswith("--"))
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise GridError(f"{where} {key} = {value!r}: must be true or false")
        return [flag] if value else []
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise GridError(f"{where} {key} = {value!r}: must be one {'number' if action.type else 'string'}"
                        + (" (a list of values belongs under [grid])" if isinstance(value, list) else ""))
    return [flag, str(value)]


def _slug(value) -> str:
    text = str(value).replace(":", "").replace(",", "_")
    return re.sub(r"[^A-Za-z0-9.+=_-]", "_", text)


def read_grid(path: str) -> tuple[dict, dict]:
    """The [run] and [grid] tables of a grid file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise GridError(f"{path}: cannot read the grid file ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"run", "grid"})
    if unknown:
        raise GridError(f"{path}: unknown table(s) {', '.join(f'[{t}]' for t in unknown)}; a grid has [run] and [grid]")
    run, grid = data.get("run", {}), data.get("grid", {})
    if not isinstance(run, dict) or not isinstance(grid, dict):
        raise GridError(f"{path}: [run] and [grid] must be tables")
    return run, grid


def plan(path: str, out: str) -> list[RunSpec]:
    """Every run of the grid file at `path`, validated and resolved, before anything starts. Raises GridError naming
    the bad key and the allowed values; a run folder under `out` that already holds other settings is an error too."""
    run_table, grid_table = read_grid(path)
    parser, options = _train_options()
    allowed = sorted({k for k in options if "_" not in k and k not in RESERVED and k.replace("-", "_") not in RESERVED
                      and options[k].option_strings})

    def check_key(key: str, where: str) -> argparse.Action:
        action = options.get(key)
        if action is None or not action.option_strings:
            raise GridError(f"{where} {key}: unknown option; allowed: {', '.join(allowed)}")
        if action.dest in RESERVED:
            raise GridError(f"{where} {key}: set by the sweep ({RESERVED[action.dest]})")
        return action

    fixed: list[str] = []
    seen: dict[str, str] = {}
    for key, value in run_table.items():
        action = check_key(key, "[run]")
        if action.dest in seen:
            raise GridError(f"[run] {key}: given twice (also as {seen[action.dest]})")
        seen[action.dest] = f"[run] {key}"
        fixed += _argv_for(key, value, action, "[run]")
    axes: list[tuple[str, argparse.Action, list]] = []
    for key, values in grid_table.items():
        action = check_key(key, "[grid]")
        if action.dest in seen:
            raise GridError(f"[grid] {key}: given twice (also as {seen[action.dest]})")
        seen[action.dest] = f"[grid] {key}"
        values = values if isinstance(values, list) else [values]
        if not values:
            raise GridError(f"[grid] {key} = []: an axis needs at least one value")
        if len(set(map(repr, values))) != len(values):
            raise GridError(f"[grid] {key} = {values!r}: a value is repeated")
        for v in values:
            _argv_for(key, v, action, "[grid]")
        axes.append((key, action, values))
    if not axes:
        raise GridError(f"{path}: [grid] is empty; give at least one axis, e.g. seed = [0, 1]")

    order = sorted(range(len(axes)), key=lambda i: (
        NAME_FIRST.index(axes[i][1].dest) if axes[i][1].dest in NAME_FIRST else
        len(NAME_FIRST) + (1 if axes[i][1].dest == "seed" else 0)))
    specs, names = [], {}
    for combo in itertools.product(*(values for _, _, values in axes)):
        argv = list(fixed)
        chosen = {}
        for (key, action, _), value in zip(axes, combo):
            argv += _argv_for(key, value, action, "[grid]")
            chosen[action.dest] = value
        where = ", ".join(f"{key}={value!r}" for (key, _, _), value in zip(axes, combo))
        try:
            args = parser.parse_args(argv)
            config = RunConfig(**settings_from_args(args)).resolve()
        except UsageError as exc:
            raise GridError(f"grid run ({where}): {exc}") from None
        parts = []
        for i in order:
            key, action, _ = axes[i]
            if action.dest not in NAME_FIRST and action.dest != "seed":
                parts.append(f"{action.dest.replace('_', '-')}{_slug(chosen[action.dest])}")
        name = "-".join([_slug(config.reward), config.opponent, *parts, f"seed{config.seed}"])
        if name in names:
            raise GridError(f"grid runs ({names[name]}) and ({where}) would share the folder name {name}")
        names[name] = where
        specs.append(RunSpec(name, argv, chosen, config))
    from .agent import is_folder_path
    for model in sorted({s.config.model for s in specs}):
        if is_folder_path(model) and not os.path.isdir(os.path.expanduser(model)):
            raise GridError(f"model = {model!r}: no such folder (give a Hugging Face id or a model folder)")
    for spec in specs:
        _check_existing(spec, os.path.join(out, "runs", spec.name))
    return specs


def settings_from_args(args) -> dict:
    """RunConfig keyword arguments from parsed training options (what was not given keeps its default)."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "no_progress", "out") and v is not None}


# Settings that may differ between a run folder and a relaunched grid (how, not what, it computes).
_MAY_DIFFER = {"threads", "report_to", "derived", "device", "quantize", "dtype"}  # the last three: machine defaults


def _check_existing(spec: RunSpec, folder: str) -> None:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return
    try:
        old = RunConfig.from_dict(read_json(path))
    except (OSError, ValueError, TypeError) as exc:
        raise GridError(f"{folder}: cannot read its config.json ({type(exc).__name__}); remove the folder") from None
    new = spec.config
    for f in dataclasses.fields(RunConfig):
        if f.name in _MAY_DIFFER:
            continue
        if getattr(old, f.name) != getattr(new, f.name):
            raise GridError(f"{folder} was started with {f.name}={getattr(old, f.name)!r} but the grid now gives "
                            f"{getattr(new, f.name)!r}; choose another --out or remove that run folder")


# ------------------------------------------------------------------------------------------------- run states
def run_folder(out: str, name: str) -> str:
    return os.path.join(out, "runs", name)


def command_line(spec: RunSpec, out: str, cpus: float = 1.0) -> str:
    """The run as one `python run.py ...` line (for people who submit job arrays themselves): with the torch threads
    the sweep gives a run of `cpus` CPUs, it writes what the sweep's own run would, byte for byte (a run repeats
    exactly only with its thread count)."""
    return shlex.join(["python", "run.py", *spec.argv, "--threads", str(threads_for(cpus)),
                       "--out", run_folder(out, spec.name)])


# ------------------------------------------------------------------------------------------------- in a worker
def train_run(folder: str, argv: list[str], threads: int, holder: str) -> dict:
    """Train (or resume, or skip) one run in this process: what a sweep's Ray task calls. Returns the summary."""
    from .cli import quiet_libraries, train_parser
    from .finetune import FineTuning

    summary = finished_summary(folder)
    if summary is not None:
        return summary
    quiet_libraries()
    started = time.time()
    if is_started(folder):
        config = dataclasses.replace(RunConfig.from_dict(read_json(os.path.join(folder, "config.json"))),
                                     threads=threads)
        require_trained_device(config, folder)
    else:
        parser = train_parser(parser_class=_RaisingParser)
        config = RunConfig(**settings_from_args(parser.parse_args([*argv, "--threads", str(threads)]))).resolve()
    progress_path = os.path.join(folder, "progress.json")
    os.makedirs(folder, exist_ok=True)
    try:  # wall time of earlier sessions of this run (a resumed run adds to it)
        earlier = float(read_json(progress_path).get("wall_s", 0.0)) if is_started(folder) else 0.0
    except (OSError, ValueError):
        earlier = 0.0

    def report(run) -> None:
        write_json_atomic(progress_path, {"episode": run.episode, "episodes": run.config.episodes,
                                          "shares": run.shares.last, "wall_s": earlier + time.time() - started,
                                          "started": started, "pid": os.getpid()})

    run = FineTuning(config, folder, resume=is_started(folder), progress=False, on_episode=report, holder=holder)
    report(run)
    return run.train()


# ------------------------------------------------------------------------------------------------- the engine
RAY_PROBE_TIMEOUT_S = 5.0


def ray_address(address: str | None) -> tuple[str | None, str]:
    """The cluster to join and where it was named: --address, else RAY_ADDRESS (which ray.init reads by itself too;
    `ray job submit` and many clusters set it), else (None, "") for a local instance."""
    if address:
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS")
    return (env, "RAY_ADDRESS") if env else (None, "")


def unreachable(address: str, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> str | None:
    """Why nothing accepts a TCP connection at a HOST:PORT or ray://HOST:PORT address within timeout_s, or None if
    something does (or the address names no port, as "auto" does). ray.init retries an address where nothing
    listens for ever (Ray 2.60: a warning every 40 s, still retrying after 10 min when tried)."""
    import urllib.parse

    from .network import tcp_unreachable

    url = urllib.parse.urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        return None
    return tcp_unreachable(host, port, timeout_s) if host and port is not None else None


def auth_hint() -> str:
    """Ray 2.60's `ray start --head` turns token authentication on where a token exists (~/.ray/auth_token, which
    any local ray.init writes), but ray.init(address=...) sends the token only with RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_MODE"):
        return ""
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.isfile(
        os.path.expanduser(os.path.join("~", ".ray", "auth_token")))
    return "; if it uses token authentication (`ray start` turns it on where ~/.ray/auth_token exists), set " \
           "RAY_AUTH_MODE=token" if token else ""


@contextlib.contextmanager
def stderr_held_back(drop_on: tuple = ()):
    """Hold back what is written to file descriptor 2 until the block ends, then write it out, unless the block
    raised one of `drop_on` (Ray's C++ core writes a retry warning a second there for 30 s against a wrong address,
    before ray.init raises the ConnectionError that one line reports)."""
    sys.stderr.flush()
    saved, raised = os.dup(2), None
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException as exc:
            raised = exc
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not isinstance(raised, drop_on):
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                sys.stderr.flush()


def tasks_fitting(resources: dict, cpus: float, gpus: float) -> int:
    """How many tasks of `cpus` CPUs and `gpus` GPUs one node's resources hold (fractions as Ray counts them:
    1.0 // 0.1 is 9 in floating point, ten tasks of 0.1 GPU fit)."""
    def fit(have: float, need: float) -> int:
        return math.floor(have / need + 1e-6) if need else 2**31
    return min(fit(resources.get("CPU", 0.0), cpus), fit(resources.get("GPU", 0.0), gpus))


class Engine:
    """Ray: a local instance sized to this machine, or the cluster at `address`. Each job is one task with
    `cpus` CPUs and `gpus` GPUs (fractions pack several runs on one GPU); a task whose worker died is retried
    `retries` times."""

    def __init__(self, address: str | None, cpus: float, gpus: float | None, retries: int):
        """`address`: a Ray cluster (HOST:PORT, ray://HOST:PORT, auto); None: RAY_ADDRESS if set, else a local
        instance."""
        try:
            import ray
        except ImportError:
            raise UsageError(f"the sweep runs on Ray, which is not installed: {INSTALL_RAY}") from None
        self.ray, self.cpus, self.gpus, self.retries, self.running = ray, cpus, gpus, retries, {}
        os.environ.setdefault("RAY_ACCEPT_CONNECTIONS_FROM_REMOTE_HOSTS", "0")
        import logging
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        ray_logger = logging.getLogger("ray")
        level = ray_logger.level
        ray_logger.setLevel(logging.ERROR)  # Ray's notes on start-up (token authentication, local instance)
        address, source = ray_address(address)
        try:
            if address:
                self._join(address, source, kwargs)
            else:
                ray.init(object_store_memory=100 * 2**20, **kwargs)
        finally:
            ray_logger.setLevel(level)
        nodes = self.node_resources()
        if gpus is None:
            gpus = 1.0 if any(node.get("GPU", 0) >= 1 for node in nodes) else 0.0
        self.gpus = gpus
        if not any(tasks_fitting(node, cpus, gpus) for node in nodes):
            kinds: dict[str, int] = {}
            for node in nodes:
                kind = f"{node.get('CPU', 0):g} CPU(s) and {node.get('GPU', 0):g} GPU(s)"
                kinds[kind] = kinds.get(kind, 0) + 1
            have = ", ".join(f"{n} with {kind}" for kind, n in kinds.items())
            self.close()
            raise UsageError(f"--cpus-per-run {cpus:g} --gpus-per-run {gpus:g}: no node can run that; the cluster "
                             f"has {len(nodes)} node(s): {have}")

    def _join(self, address: str, source: str, kwargs: dict) -> None:
        """ray.init on an existing cluster, or one line (UsageError) saying why not."""
        why, hint = unreachable(address), ""
        if why is None:
            print(f"joining the Ray cluster at {address} ({source})", flush=True)
            try:
                with stderr_held_back(drop_on=(ConnectionError,)):
                    self.ray.init(address=address, **kwargs)
                return
            except ConnectionError as exc:  # something answered, but not (or not to us) as a Ray cluster
                why, hint = str(exc), auth_hint()
        named, local = (f"--address {address}", "leave --address out") if source == "--address" else \
            (f"RAY_ADDRESS={address}", "unset RAY_ADDRESS")
        raise UsageError(f"{named}: no Ray cluster answers there ({why}); start one with `ray start --head`, or "
                         f"{local} for a local instance{hint}")

    def node_resources(self) -> list[dict]:
        """Each live node's resources ({"CPU": 8.0, "GPU": 1.0, ...})."""
        return [node["Resources"] for node in self.ray.nodes() if node.get("Alive")]

    def slots(self) -> int:
        """How many jobs the cluster can run at once now, node by node (a task runs on one node; read again on
        every call: a cluster may grow)."""
        return max(1, sum(tasks_fitting(node, self.cpus, self.gpus) for node in self.node_resources()))

    def submit(self, fn, *args):
        task = self.ray.remote(fn).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.retries,
                                           retry_exceptions=False)
        return task.remote(*args)

    def run_in_order(self, fn, jobs: list, args_of, poll_s: float):
        """Run `fn(*args_of(job))` for every job, starting them in the order given: no more are submitted than
        the cluster has slots for, since Ray does not promise to start queued tasks in submission order (measured:
        with all 24 runs queued, the longest started last). Yields, every `poll_s` seconds at the latest, the list
        of (job, value, error line or None) finished since the last yield (often empty)."""
        queue, running = list(jobs), self.running
        while queue or running:
            while queue and len(running) < self.slots():
                job = queue.pop(0)
                running[self.submit(fn, *args_of(job))] = job
            ready, _ = self.ray.wait(list(running), num_returns=len(running), timeout=poll_s)
            yield [(running.pop(ref), *self.result(ref)) for ref in ready]

    def stop_running(self, timeout_s: float) -> None:
        """Ask every running job to stop and wait for them to end (at most timeout_s).

        ray.cancel(force=False) runs the task's SIGINT handler, so a training run finishes its episode and saves a
        checkpoint, as on Ctrl-C in run.py; a job that has not started never starts."""
        refs = list(self.running)
        for ref in refs:
            self.ray.cancel(ref, force=False)
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            self.running.pop(ref)

    def result(self, ref):
        """(value, None) or (None, one error line)."""
        try:
            return self.ray.get(ref), None
        except Exception as exc:  # noqa: BLE001 - any failure of one run is that run's, not the sweep's
            return None, error_line(exc)

    def close(self) -> None:
        self.ray.shutdown()


def error_line(exc: BaseException) -> str:
    """One line saying why a task failed: the original exception's message, not Ray's traceback."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    name = type(cause).__name__
    if name in ("UsageError", "RunError", "GridError", "Interrupted"):
        return text[0] if text else name
    return f"{name}: {text[-1] if text else ''}".strip()


def resume_episode(folder: str) -> int:
    """The episode an unfinished run resumes from: its newest complete checkpoint's, else 0."""
    done = complete_checkpoints(folder)
    return checkpoint_episode(done[-1]) if done else 0


def threads_for(cpus: float) -> int:
    return max(1, int(cpus))


# ------------------------------------------------------------------------------------------------- the sweep
class Sweep:
    """The runs of one sweep folder, their states and the sweep's record (sweep.json)."""

    def __init__(self, specs: list[RunSpec], out: str, grid_path: str, cpus: float = 1.0):
        self.specs, self.out, self.grid_path, self.cpus = specs, out, grid_path, cpus
        self.states = {s.name: {"state": "pending", "episode": 0, "episodes": s.episodes, "shares": {},
                                "wall_s": None, "error": None} for s in specs}
        self.launched = time.time()
        for s in specs:
            folder = run_folder(out, s.name)
            self._read_progress(s.name)
            if is_finished(folder):
                self.states[s.name].update(state="skipped", episode=s.episodes)
            else:  # an unfinished run goes on from its last checkpoint, not from the episode it last reported
                self.states[s.name]["episode"] = resume_episode(folder)

    def _read_progress(self, name: str) -> None:
        path = os.path.join(run_folder(self.out, name), "progress.json")
        try:
            p = read_json(path)
        except (OSError, ValueError):
            return
        state = self.states[name]
        state.update(episode=int(p.get("episode", 0)), shares=p.get("shares", {}), wall_s=p.get("wall_s"))
        if state["state"] == "pending" and p.get("started", 0) >= self.launched - 1:  # written by this launch
            state["state"] = "running"

    def poll(self) -> None:
        for name, state in self.states.items():
            if state["state"] in ("pending", "running"):
                self._read_progress(name)

    def done(self, name: str, summary: dict | None, error: str | None) -> None:
        state = self.states[name]
        if error is None:
            self._read_progress(name)
            state.update(state="finished", episode=state["episodes"])
        else:
            self._read_progress(name)
            state.update(state="failed", error=error)

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("finished", "skipped", "running", "pending", "failed")}
        for state in self.states.values():
            out[state["state"]] += 1
        return out

    def episodes_done(self) -> int:
        return sum(min(s["episode"], s["episodes"]) for s in self.states.values())

    def write(self) -> None:
        runs = [{"name": s.name, **self.states[s.name], "folder": os.path.join("runs", s.name), "axes": s.axes,
                 "command": command_line(s, self.out, self.cpus)} for s in self.specs]
        write_json_atomic(os.path.join(self.out, "sweep.json"), {
            "grid": os.path.abspath(self.grid_path), "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_s": time.time() - self.launched, "counts": self.counts(), "episodes_done": self.episodes_done(),
            "episodes_total": sum(s.episodes for s in self.specs), "runs": runs}, sort_keys=False,
            trailing_newline=True)


def run_sweep(specs: list[RunSpec], out: str, grid_path: str, *, address: str | None = None, cpus: float = 1.0,
              gpus: float | None = None, retries: int = 2, progress: bool = True, poll_s: float = 2.0) -> int:
    """Train every run of `specs` into `out`/runs/; returns the exit code (0, or 1 when a run failed)."""
    from tqdm import tqdm

    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    lock = FolderLock(out, what="sweep")
    try:
        lock.acquire()
    except FolderLocked as exc:
        raise UsageError(str(exc)) from None
    try:
        with open(grid_path, encoding="utf-8") as f:
            write_text_atomic(os.path.join(out, "grid.toml"), f.read())
        sweep = Sweep(specs, out, grid_path, cpus)
        todo = [s for s in specs if sweep.states[s.name]["state"] != "skipped"]
        sweep.write()
        if not todo:
            print(f"all {len(specs)} runs of {out} are finished; nothing to do")
            return 0
        engine = Engine(address, cpus, gpus, retries)
        holder = f"sweep {os.path.abspath(out)}"
        try:
            # Longest first, so the last runs are short ones (two learners: 7.0 vs 4.7 s per episode in the
            # embedded grid, README).
            todo.sort(key=lambda s: -s.episodes * (1.5 if s.config.opponent == "llm" else 1))
            bar = tqdm(total=sum(s.episodes for s in specs), initial=sweep.episodes_done(), unit="episode",
                       disable=not progress, dynamic_ncols=True, desc=f"sweep {len(specs)} runs")
            last_write = 0.0
            args_of = lambda s: (os.path.abspath(run_folder(out, s.name)), s.argv, threads_for(cpus), holder)
            with sigterm_as_ctrl_c():
                for finished in engine.run_in_order(train_run, todo, args_of, poll_s):
                    for spec, summary, error in finished:
                        sweep.done(spec.name, summary, error)
                        if not progress:
                            print(f"{spec.name}: {sweep.states[spec.name]['state']}"
                                  + (f" ({error})" if error else ""), flush=True)
                    sweep.poll()
                    bar.n = sweep.episodes_done()
                    c = sweep.counts()
                    bar.set_postfix_str(f"runs: {c['finished'] + c['skipped']} done, {c['running']} running, "
                                        f"{c['pending']} waiting, {c['failed']} failed", refresh=False)
                    bar.refresh()
                    if time.time() - last_write > 5:
                        sweep.write()
                        last_write = time.time()
            bar.close()
        except KeyboardInterrupt:
            stop_runs(engine, sweep)
            sys.stderr.write("stopped; every run continues from its last checkpoint when you launch the same sweep "
                             "again\n")
            return 130
        finally:
            engine.close()
        sweep.write()
    finally:
        lock.release()
    c = sweep.counts()
    print(f"{out}: {c['finished']} run(s) finished now, {c['skipped']} were already finished, {c['failed']} failed; "
          f"wall time {time.time() - sweep.launched:.0f} s")
    failed = [(name, st["error"]) for name, st in sweep.states.items() if st["state"] == "failed"]
    for name, error in failed:
        sys.stderr.write(f"failed: {name}: {error}\n")
    return 1 if failed else 0


STOP_WAIT_S = 300.0


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (a batch system's stop) raises KeyboardInterrupt in the driver, as Ctrl-C does, inside the block."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler installed outside Python, which stays replaced
            signal.signal(signal.SIGTERM, previous)


def stop_runs(engine: Engine, sweep: Sweep) -> None:
    """Ctrl-C or SIGTERM: the running runs finish their episode and save a checkpoint (a second Ctrl-C: at once)."""
    names = [spec.name for spec in engine.running.values()]
    if names:
        sys.stderr.write(f"stopping: {len(names)} running run(s) finish their episode and save a checkpoint "
                         f"(Ctrl-C again to stop at once)\n")
        sys.stderr.flush()
        try:
            with sigterm_as_ctrl_c():  # a second SIGTERM, like a second Ctrl-C, stops at once
                engine.stop_running(STOP_WAIT_S)
        except KeyboardInterrupt:
            pass
    for name in names:  # pending again, from the checkpoint just saved (or finished, if it ended meanwhile)
        folder = run_folder(sweep.out, name)
        if is_finished(folder):
            sweep.states[name].update(state="finished", episode=sweep.states[name]["episodes"])
        else:
            sweep.states[name].update(state="pending", episode=resume_episode(folder))
    sweep.write()


# ------------------------------------------------------------------------------------------- sweep folders
def is_sweep_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "sweep.json")) or os.path.isfile(os.path.join(path, "grid.toml"))


def sweep_runs(path: str, finished_only: bool = False) -> list[str]:
    """The run folders of a sweep folder, in name order."""
    root = os.path.join(path, "runs")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    folders = [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, "config.json"))]
    return [f for f in folders if is_finished(f)] if finished_only else folders


def sweep_axes(path: str) -> list[str]:
    """The settings (RunConfig names) that the [grid] of a sweep folder's grid.toml varies."""
    try:
        _, grid = read_grid(os.path.join(path, "grid.toml"))
    except GridError:
        return []
    _, options = _train_options()
    return [options[k].dest if k in options else k for k in grid]


def eval_run(folder: str, cfg_dict: dict, threads: int) -> dict:
    """Evaluate one finished run in this process (a sweep eval's Ray task); returns a short record."""
    from .cli import quiet_libraries
    from .evaluate import EvalConfig, evaluate
    quiet_libraries()
    cfg = EvalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    metrics = evaluate(folder, cfg, threads=threads, progress=False)
    return {"decisions": metrics["decisions"], "wall_s": metrics["wall_s"]}


def already_evaluated(folder: str, cfg_dict: dict) -> bool:
    """eval/metrics.json exists and was made with the same evaluation settings."""
    path = os.path.join(folder, "eval", "metrics.json")
    try:
        done = read_json(path).get("eval", {})
    except (OSError, ValueError):
        return False
    return {k: list(v) if isinstance(v, tuple) else v for k, v in done.items()} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in cfg_dict.items()}


def eval_sweep(path: str, cfg, *, address: str | None = None, cpus: float = 1.0, gpus: float | None = None,
               retries: int = 2, progress: bool = True) -> int:
    """Evaluate every finished run of a sweep folder that has not been evaluated with these settings."""
    from tqdm import tqdm
    cfg_dict = dataclasses.asdict(cfg)
    finished = sweep_runs(path, finished_only=True)
    todo = [f for f in finished if not already_evaluated(f, cfg_dict)]
    print(f"{path}: {len(finished)} finished run(s), {len(finished) - len(todo)} already evaluated, "
          f"{len(todo)} to evaluate", flush=True)
    if not todo:
        return 0
    engine = Engine(address, cpus, gpus, retries)
    failed, done = [], 0
    t0 = time.time()
    try:
        bar = tqdm(total=len(todo), unit="run", disable=not progress, desc="eval")
        args_of = lambda f: (os.path.abspath(f), cfg_dict, threads_for(cpus))
        with sigterm_as_ctrl_c():
            for finished in engine.run_in_order(eval_run, todo, args_of, 2.0):
                for folder, record, error in finished:
                    bar.update(1)
                    if error:
                        failed.append((folder, error))
                    else:
                        done += 1
        bar.close()
    except KeyboardInterrupt:
        sys.stderr.write(f"stopped; {done} of {len(todo)} run(s) evaluated (an unfinished run's eval/ is as it was); "
                         f"the same command evaluates the rest\n")
        return 130
    finally:
        engine.close()
    print(f"evaluated {len(todo) - len(failed)} run(s) in {time.time() - t0:.0f} s")
    for folder, error in failed:
        sys.stderr.write(f"failed: {os.path.basename(folder)}: {error}\n")
    return 1 if failed else 0
