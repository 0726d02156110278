"""The command line: every subcommand and its helpers. `python run.py`, `python -m moral` and the console script
`moral-ppo` all call `main`.

    run.py [train] --reward deont --opponent tft      fine-tune (the default subcommand; `train` may be omitted)
    run.py --resume RUN_FOLDER                        continue a stopped run with its own settings
    run.py eval RUN_FOLDER [RUN_FOLDER ...]           generalisation tests -> RUN_FOLDER/eval/
    run.py report RUN_FOLDER [...] --out DIR          tables and figures across runs
    run.py sweep GRID.toml --out DIR                  every run of an experiment grid, on Ray (moral.sweep)
    run.py eval SWEEP_DIR / report SWEEP_DIR --out R  evaluate / report every finished run of a sweep

Bad input gets one line naming the bad value and the allowed ones, and exit code 2; the work lives in moral/.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time

SUBCOMMANDS = ("train", "eval", "report", "sweep")
PROG = "run.py"

# bitsandbytes asks for the `kernels` hub package when it is first imported (on CPUs with bf16 instructions), and
# resolving a run's config imports it: silenced here, before any command can import it, at the cost of no import.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class OneLineParser(argparse.ArgumentParser):
    """Bad input: one line naming the problem, exit code 2 (argparse prints the whole usage otherwise)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def usage_error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _nonempty(text: str, says: str) -> str:
    """An empty or blank value (an unset shell variable, "$RUN") is refused, not read as the option's default
    (`--resume ""` started a new run)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} {says}")
    return text


def path_arg(text: str) -> str:
    return _nonempty(text, "is not a path")


def positive_int(text: str) -> int:
    return _count(text, 1, "is not a positive integer")


def _count(text: str, minimum: int, says: str) -> int:
    """An integer in [minimum, 2^63): larger ones overflow the integers that torch, numpy, Ray and len() take (eval
    --steps 10^23 was OverflowError's traceback)."""
    value = _int_at_least(text, minimum, says)
    if value >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"{value} is too large: must be below 2^63")
    return value


def device_arg(text: str) -> str:
    """--device: not empty here; the rest is checked by moral.config.parse_device."""
    return _nonempty(text, "is not a device: choose cpu, cuda or cuda:N")


def seed_int(text: str) -> int:
    from .config import SEED_LIMIT, SEED_RULE

    says = f"is not a seed: {SEED_RULE}"
    value = _int_at_least(text, 0, says)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} {says}")
    return value


def _int_at_least(text: str, minimum: int, says: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} {says}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def quiet_libraries() -> None:
    import warnings
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*should not be contained in the prefix.*")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def require_writable(folder: str, option: str | None = "--out") -> None:
    """Create `folder` and check that a file can be written there, or one line naming it (and the option that gave
    it, if any; exit 2)."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        usage_error(f"{option + ' ' if option else ''}{folder}: cannot write there ({exc.strerror or exc})")


def require_run_folders(folders: list[str]) -> None:
    seen = {}
    for run in folders:
        real = os.path.realpath(run)
        if real in seen:  # a report would count its seed twice
            usage_error(f"{run}: the same run folder as {seen[real]}; give each run once")
        seen[real] = run
        if not os.path.isfile(os.path.join(run, "config.json")):
            inside = sorted(os.listdir(run)) if os.path.isdir(run) else []
            runs = [f for f in inside if os.path.isfile(os.path.join(run, f, "config.json"))]
            hint = f"; it holds run folders ({len(runs)}): give them, e.g. {os.path.join(run, '*')}" if runs else ""
            usage_error(f"{run} is not a run folder (no config.json){hint}")


# --------------------------------------------------------------------------------------------------------- train
def train_parser(prog: str = PROG, parser_class=OneLineParser) -> argparse.ArgumentParser:
    from games import OPPONENT_NAMES, TOKEN_SETS
    from ppo_core.model import QUANTIZE_CHOICES

    from .agent import FORMAT_AIDS
    from .config import DTYPE_NAMES
    from .embedded import EMBEDDED_MODEL
    from .rewards import REWARDS
    from .trackers import TRACKERS

    p = parser_class(prog=prog, description="Fine-tune an LLM agent with a moral reward on the IPD (PPO). Other "
                                            f"subcommands: {prog} sweep --help, {prog} eval --help, "
                                            f"{prog} report --help.")
    p.add_argument("--reward", help=f"{', '.join(REWARDS)}, or a schedule such as game:500,deont:500 (default deont)")
    p.add_argument("--opponent", choices=OPPONENT_NAMES, metavar="NAME",
                   help=f"{', '.join(OPPONENT_NAMES)} (default tft)")
    p.add_argument("--model", help=f"Hugging Face id or folder (default: the embedded {EMBEDDED_MODEL})")
    p.add_argument("--episodes", type=positive_int, help="episodes (default: 300 embedded model, 1000 otherwise)")
    p.add_argument("--batch-size", dest="steps", type=positive_int,
                   help="steps per episode = PPO batch per game (default 5; 3 vs llm)")
    p.add_argument("--parallel-games", type=positive_int, help="independent games per episode (default 1)")
    p.add_argument("--seed", type=seed_int, help="seed of every random stream (default 0)")
    p.add_argument("--lr", type=finite_float, help="learning rate (default 1.41e-5)")
    p.add_argument("--lora-rank", type=positive_int, help="LoRA rank (default 64)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, metavar="Q",
                   help=f"{', '.join(QUANTIZE_CHOICES)} (default: 4bit on GPU, none on CPU)")
    p.add_argument("--ppo-epochs", type=positive_int,
                   help="PPO epochs per batch (default 1 = the paper's effective update)")
    p.add_argument("--tokens", metavar="SET",
                   help=f"action strings: {', '.join(TOKEN_SETS)}, or two strings C,D (default action12)")
    p.add_argument("--format-aid", choices=FORMAT_AIDS, metavar="AID",
                   help="prefix: start the answer with the actions' shared first token(s); none: the paper's "
                        "protocol (default: prefix for the embedded model, none otherwise)")
    p.add_argument("--lenient", action="store_true", default=None,
                   help="accept an action string anywhere in the answer")
    p.add_argument("--illegal-reward", dest="illegal", type=finite_float, help="reward of an illegal answer (-6)")
    p.add_argument("--xi", type=finite_float, help="Deontological punishment (default 3)")
    p.add_argument("--reset-at-switch", action="store_true", default=None,
                   help="reset optimiser, KL coefficient and score moments when a reward schedule switches")
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N episodes (default 100)")
    p.add_argument("--keep-checkpoints", type=positive_int, help="checkpoints kept (default 2)")
    p.add_argument("--report-to", choices=TRACKERS, metavar="TRACKER",
                   help=f"experiment tracker: {', '.join(TRACKERS)} (default none; pip install -e '.[tracking]')")
    p.add_argument("--out", type=path_arg, help="run folder (default runs/REWARD-OPPONENT-seedS-TIME)")
    p.add_argument("--resume", type=path_arg, metavar="RUN_FOLDER", help="continue a stopped run with its own settings")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--device", type=device_arg, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, metavar="DTYPE",
                   help="compute dtype: fp32, bf16, fp16 (default: bf16 on GPUs that support it and on CPUs with "
                        "native bf16 instructions, fp16 on V100, fp32 otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary lines still print)")
    return p


def _resumed_config(args):
    """The settings of the run folder being resumed (only --threads and --report-to may change)."""
    from .config import RunConfig, option_name
    from .runio import read_json
    from .trackers import TrackerUnavailable, check_installed

    path = os.path.join(args.resume, "config.json")
    try:
        config = RunConfig.from_dict(read_json(path))
    except (OSError, ValueError, TypeError) as exc:
        usage_error(f"--resume {args.resume}: cannot read {path} ({type(exc).__name__})")
    fixed = [option_name(k) for k, v in vars(args).items()
             if v is not None and k not in ("resume", "threads", "report_to", "no_progress")]
    if fixed:
        usage_error(f"--resume {args.resume} continues the run with the settings in its config.json: "
                    f"{' '.join(fixed)} cannot change (only --threads and --report-to can)")
    changes = {k: getattr(args, k) for k in ("threads", "report_to") if getattr(args, k) is not None}
    config = dataclasses.replace(config, **changes)
    try:
        check_installed(config.report_to)
    except TrackerUnavailable as exc:
        usage_error(str(exc))
    return config


def _new_run_folder(args, config) -> str:
    folder = args.out or os.path.join(
        "runs", f"{config.reward.replace(':', '').replace(',', '_')}-{config.opponent}-seed{config.seed}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}")
    from .runio import LOCK_FILE
    if os.path.exists(folder) and set(os.listdir(folder)) - {LOCK_FILE}:  # a lock alone: a set-up that failed
        usage_error(f"--out {folder}: the folder exists; continue it with --resume {folder} or choose another --out")
    require_writable(folder)
    return folder


def train(argv: list[str], prog: str = PROG) -> None:
    from .agent import ModelUnavailable
    from .config import RunConfig, UsageError, require_trained_device
    from .finetune import FineTuning, Interrupted, RunError
    from .runio import finished_summary
    from .summary import format_summary
    from .sweep import settings_from_args

    args = train_parser(prog).parse_args(argv)
    try:
        if args.resume:
            config, folder, resume = _resumed_config(args), args.resume, True
            summary = finished_summary(folder)
            if summary is not None:  # nothing to continue; its files (final adapter, summary.json) stay as they are
                print(f"{folder} is finished ({config.episodes} episodes); nothing to continue. Its summary:")
                print(format_summary(summary))
                return
            require_trained_device(config, f"--resume {folder}")
        else:
            config = RunConfig(**settings_from_args(args)).resolve()
            folder, resume = _new_run_folder(args, config), False
        quiet_libraries()
        try:
            run = FineTuning(config, folder, resume=resume, progress=not args.no_progress)
        except ModelUnavailable as exc:
            usage_error(f"--model {exc}")
        except (OSError, ValueError) as exc:
            if isinstance(exc, UsageError):
                raise
            usage_error(f"--model {config.model!r} cannot be loaded: {str(exc).splitlines()[0][:300]}")
        print(f"run folder: {folder}", flush=True)
        note = config.speed_note()
        if note:
            print(note, flush=True)
        summary = run.train()
    except UsageError as exc:
        usage_error(str(exc))
    except RunError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)
    except Interrupted as exc:
        sys.stderr.write(f"stopped by {exc}; a checkpoint is saved. Continue with: python run.py --resume "
                         f"{folder}\n")
        sys.exit(130)
    print(format_summary(summary))


# ---------------------------------------------------------------------------------------------------------- eval
def eval_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from games import GAMES, TABLE_ORDERS, TEST_GAMES, TOKEN_SETS

    from .evaluate import VARIANTS

    p = OneLineParser(prog=f"{prog} eval", description="Generalisation tests of trained runs -> RUN_FOLDER/eval/.")
    p.add_argument("runs", nargs="+", type=path_arg, metavar="RUN_FOLDER")
    p.add_argument("--episodes", type=positive_int, default=10, help="test episodes per game (default 10)")
    p.add_argument("--steps", type=positive_int, default=5, help="steps per test episode (default 5)")
    p.add_argument("--games", nargs="+", default=list(TEST_GAMES), metavar="GAME",
                   help=f"any of {', '.join(GAMES)} (default {' '.join(TEST_GAMES)}, the paper's five)")
    p.add_argument("--tokens", nargs="+", default=["action34"], metavar="SET",
                   help=f"one or more of {', '.join(TOKEN_SETS)}, or two strings C,D (default action34)")
    p.add_argument("--orders", nargs="+", default=list(TABLE_ORDERS), choices=TABLE_ORDERS, metavar="ORDER",
                   help=f"payoff-table orders: {', '.join(TABLE_ORDERS)} (default all)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                   help=f"prompt variants: {', '.join(VARIANTS)} (default all)")
    p.add_argument("--no-baselines", action="store_true", help="skip the value-prompted reference baselines")
    p.add_argument("--followup", action="store_true", help="ask the follow-up questions after each IPD decision")
    p.add_argument("--followup-tokens", type=positive_int, default=100, help="answer length (default 100)")
    p.add_argument("--seed", type=seed_int, default=100, help="seed of the test games and answers (default 100)")
    p.add_argument("--checkpoint", type=path_arg,
                   help="evaluate this checkpoint folder instead of the run's final adapter")
    p.add_argument("--token-budget", type=positive_int, default=2048,
                   help="tokens of one packed forward pass (prompt-tree nodes; default 2048)")
    p.add_argument("--device", type=device_arg, help="cpu, cuda or cuda:N (default: the run's)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_options(p, "evaluation")
    return p


def evaluate(argv: list[str], prog: str = PROG) -> None:
    from .agent import ModelUnavailable
    from .config import option_name, parse_device
    from .evaluate import EvalConfig, evaluate as run_eval

    args = eval_parser(prog).parse_args(argv)
    cfg = EvalConfig(episodes=args.episodes, steps=args.steps, games=tuple(args.games), tokens=tuple(args.tokens),
                     orders=tuple(args.orders), variants=tuple(args.variants), baselines=not args.no_baselines,
                     followup=args.followup, followup_tokens=args.followup_tokens, seed=args.seed,
                     checkpoint=args.checkpoint, token_budget=args.token_budget)
    try:
        cfg.validate()
        parse_device(args.device)
    except ValueError as exc:
        usage_error(str(exc))
    from .sweep import eval_sweep, is_sweep_folder
    sweeps = [r for r in args.runs if is_sweep_folder(r)]
    runs = [r for r in args.runs if r not in sweeps]
    require_run_folders(runs)
    for folder in args.runs:  # each run's eval/ goes inside it (a sweep's: inside each of its runs)
        require_writable(folder if folder not in sweeps else os.path.join(folder, "runs"), option=None)
    if not sweeps:  # options that none of the folders uses are said, not silently ignored; the eval still runs
        names, which = ENGINE_OPTIONS, "sweep folders (a run folder is evaluated in this process)"
    else:
        names = ("device", "threads") if not runs else ()
        which = "run folders (a sweep's runs take --cpus-per-run and --gpus-per-run)"
    unused = [option_name(k) for k in names if getattr(args, k) is not None]
    if unused:
        print(f"note: {' '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} only to {which}: ignored here",
              file=sys.stderr, flush=True)
    quiet_libraries()
    failed = False
    for folder in sweeps:
        code = _with_usage_errors(eval_sweep, folder, cfg, **_engine_settings(args), progress=not args.no_progress)
        if code == 130:  # stopped: eval_sweep said what was done
            sys.exit(130)
        failed |= code != 0
    for done, run in enumerate(runs):
        try:
            metrics = run_eval(run, cfg, device=args.device, threads=args.threads, progress=not args.no_progress)
        except KeyboardInterrupt:
            sys.stderr.write(f"stopped: {run}/eval/ is as it was (a run's evaluation is written when it completes); "
                             f"{done} of {len(runs)} run(s) evaluated\n")
            sys.exit(130)
        except ModelUnavailable as exc:
            usage_error(f"{run}: the run's model {exc}")
        except ValueError as exc:
            usage_error(str(exc))
        print(f"{run}: {metrics['decisions']} decisions in {metrics['wall_s']:.0f} s -> {run}/eval/")
        print_regret(metrics["groups"])
    if failed:
        sys.exit(1)


def print_regret(groups: list[dict]) -> None:
    """Deont and Util regret per game, reference (before) vs fine-tuned (after), structured prompt, original order,
    per token set."""
    from games import TEST_GAMES
    table = {(g["tokens"], g["model"], g["game"]): g for g in groups
             if g["variant"] == "structured" and g["table_order"] == "original"}
    rank = {game: i for i, game in enumerate(TEST_GAMES)}
    pairs = [(tokens, game) for tokens, model, game in table
             if model == "finetuned" and (tokens, "reference", game) in table]
    print(f"{'tokens':>9} {'game':>5} {'De before':>10} {'De after':>10} {'Ut before':>10} {'Ut after':>10}")
    for tokens, game in sorted(pairs, key=lambda p: (p[0], rank.get(p[1], len(rank)))):
        before, after = table[tokens, "reference", game], table[tokens, "finetuned", game]
        print(f"{tokens:>9} {game:>5} {before['deont_regret']:10.3f} {after['deont_regret']:10.3f} "
              f"{before['util_regret']:10.3f} {after['util_regret']:10.3f}")


# -------------------------------------------------------------------------------------------------------- report
def report_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"{prog} report", description="Tables and figures across run folders, or of a sweep "
                                                         "folder (grouped by condition, 95% intervals over seeds).")
    p.add_argument("runs", nargs="+", type=path_arg, metavar="RUN_FOLDER|SWEEP_DIR")
    p.add_argument("--out", required=True, type=path_arg, metavar="DIR",
                   help="folder for the tables (.md, .csv) and figures (.png)")
    p.add_argument("--tokens", metavar="SET", help="token set of the evaluation tables (default action34 if present)")
    return p


def report(argv: list[str], prog: str = PROG) -> None:
    from .report import report as make_report

    from .sweep import is_sweep_folder

    args = report_parser(prog).parse_args(argv)
    sweeps = [r for r in args.runs if is_sweep_folder(r)]
    if sweeps and len(args.runs) > 1:
        usage_error(f"report takes one sweep folder or run folders, not both: {' '.join(args.runs)}")
    if not sweeps:
        require_run_folders(args.runs)
    require_writable(args.out)
    try:
        if sweeps:
            from .report.sweep import report_sweep
            result = report_sweep(sweeps[0], args.out, tokens=args.tokens)
        else:
            result = make_report(args.runs, args.out, tokens=args.tokens)
    except ValueError as exc:
        usage_error(str(exc))
    for path in result["tables"] + result["figures"]:
        print(path)
    if result.get("message"):
        print(result["message"])


# --------------------------------------------------------------------------------------------------------- sweep
ENGINE_OPTIONS = ("address", "cpus_per_run", "gpus_per_run", "retries")
ENGINE_DEFAULTS = {"cpus_per_run": 1.0, "retries": 2}  # filled in by _engine_settings, so that "not given" shows


def add_engine_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--address", help="join this Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS "
                   "if set, else a local Ray instance sized to this machine)")
    p.add_argument("--cpus-per-run", type=positive_float,
                   help=f"CPUs of each {what} task; also its torch threads (default {ENGINE_DEFAULTS['cpus_per_run']:g})")
    p.add_argument("--gpus-per-run", type=nonnegative_float,
                   help="GPUs of each task; fractions share a GPU, e.g. 0.25 packs four runs on one "
                        "(default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--retries", type=nonnegative_int,
                   help=f"retries of a task whose worker process died (default {ENGINE_DEFAULTS['retries']}); the retry "
                        "resumes the run")


def _engine_settings(args) -> dict:
    """The engine's settings from the command line (its options are None when not given)."""
    return {"address": args.address, "gpus": args.gpus_per_run,
            "cpus": ENGINE_DEFAULTS["cpus_per_run"] if args.cpus_per_run is None else args.cpus_per_run,
            "retries": ENGINE_DEFAULTS["retries"] if args.retries is None else args.retries}


def _with_usage_errors(fn, *args, **kwargs):
    from .config import UsageError
    try:
        return fn(*args, **kwargs)
    except UsageError as exc:
        usage_error(str(exc))


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def nonnegative_int(text: str) -> int:
    return _count(text, 0, "is negative")


def sweep_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"{prog} sweep", description="Train every run of an experiment grid (a TOML file with "
                      "[run] options for every run and [grid] lists whose combinations are the runs) on Ray. "
                      "Launching it again skips finished runs and resumes the others.")
    p.add_argument("grid", type=path_arg, metavar="GRID.toml")
    p.add_argument("--out", type=path_arg, help="sweep folder (default sweeps/GRID_NAME)")
    p.add_argument("--dry-run", action="store_true",
                   help="print every run as one `python run.py ...` line, which writes what the sweep's run would, "
                        "byte for byte (its --threads follows --cpus-per-run); start nothing")
    p.add_argument("--no-progress", action="store_true", help="a line per finished run instead of a progress bar")
    add_engine_options(p, "training")
    return p


def sweep(argv: list[str], prog: str = PROG) -> None:
    from .sweep import command_line, plan, run_sweep

    args = sweep_parser(prog).parse_args(argv)
    quiet_libraries()
    out = args.out or os.path.join("sweeps", os.path.splitext(os.path.basename(args.grid))[0])
    specs = _with_usage_errors(plan, args.grid, out)
    if args.dry_run:
        for spec in specs:
            print(command_line(spec, out, _engine_settings(args)["cpus"]))
        return
    require_writable(out)
    try:
        import ray  # noqa: F401
    except ImportError:
        usage_error("the sweep runs on Ray, which is not installed: pip install -e '.[sweep]'")
    print(f"sweep {args.grid}: {len(specs)} runs -> {out}/ (progress in {out}/sweep.json)", flush=True)
    code = _with_usage_errors(run_sweep, specs, out, args.grid, **_engine_settings(args),
                              progress=not args.no_progress)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------------------- main
COMMANDS = {"train": train, "eval": evaluate, "report": report, "sweep": sweep}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Dispatch to a subcommand; anything that is not a subcommand's name is `train`'s arguments."""
    if sys.platform == "win32":  # moral.runio locks run folders with flock(2), which Windows lacks
        sys.stderr.write("error: this program needs a POSIX system such as Linux (it locks run folders with flock); "
                         "on Windows run it under WSL2, the Windows Subsystem for Linux\n")
        sys.exit(2)
    if argv is None:
        argv = sys.argv[1:]
        prog = prog or ("moral-ppo" if os.path.basename(sys.argv[0]) == "moral-ppo" else PROG)
    prog = prog or PROG
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:], prog)
    else:
        train(argv, prog)
