"""Command line: fine-tune (default), evaluate or report. Parses arguments and calls moral/; nothing else lives here.

    python run.py --reward deont --opponent tft                 fine-tune the embedded model (the main job)
    python run.py --resume runs/deont-tft-seed0-...             continue a stopped run
    python run.py eval RUN_FOLDER [RUN_FOLDER ...]               generalisation tests (issue: evaluation)
    python run.py report RUN_FOLDER [...] --out DIR             tables and figures
"""

from __future__ import annotations

import argparse
import os
import sys


class OneLineParser(argparse.ArgumentParser):
    """Bad input: one line naming the problem, exit code 2 (argparse prints the whole usage otherwise)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def usage_error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def finite_float(text: str) -> float:
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def train_parser() -> argparse.ArgumentParser:
    from games import OPPONENT_NAMES, TOKEN_SETS
    from moral.agent import FORMAT_AIDS
    from moral.embedded import EMBEDDED_MODEL
    from moral.rewards import REWARDS
    from ppo_core.model import QUANTIZE_CHOICES

    p = OneLineParser(prog="run.py", description="Fine-tune an LLM agent with a moral reward on the IPD (PPO).")
    p.add_argument("--reward", default="deont",
                   help=f"{', '.join(REWARDS)}, or a schedule such as game:500,deont:500 (default deont)")
    p.add_argument("--opponent", default="tft", choices=OPPONENT_NAMES, metavar="NAME",
                   help=f"{', '.join(OPPONENT_NAMES)} (default tft)")
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help=f"Hugging Face id or folder (default: the embedded {EMBEDDED_MODEL})")
    p.add_argument("--episodes", type=positive_int, help="episodes (default: 300 embedded model, 1000 otherwise)")
    p.add_argument("--batch-size", dest="steps", type=positive_int,
                   help="steps per episode = PPO batch per game (default 5; 3 vs llm)")
    p.add_argument("--parallel-games", type=positive_int, default=1, help="independent games per episode (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=finite_float, help="learning rate (default 1.41e-5)")
    p.add_argument("--lora-rank", type=positive_int, default=64)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, metavar="Q",
                   help=f"{', '.join(QUANTIZE_CHOICES)} (default: 4bit on GPU, none on CPU)")
    p.add_argument("--ppo-epochs", type=positive_int, default=1,
                   help="PPO epochs per batch (default 1 = the paper's effective update)")
    p.add_argument("--tokens", default="action12", metavar="SET",
                   help=f"action strings: {', '.join(TOKEN_SETS)}, or two strings C,D (default action12)")
    p.add_argument("--format-aid", choices=FORMAT_AIDS, metavar="AID",
                   help="prefix: start the answer with the actions' shared first token(s); none: the paper's "
                        "protocol (default: prefix for the embedded model, none otherwise)")
    p.add_argument("--lenient", action="store_true", help="accept an action string anywhere in the answer")
    p.add_argument("--illegal-reward", dest="illegal", type=finite_float, default=-6.0)
    p.add_argument("--xi", type=finite_float, default=3.0, help="Deontological punishment (default 3)")
    p.add_argument("--reset-at-switch", action="store_true",
                   help="reset optimiser, KL coefficient and score moments when a reward schedule switches")
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N episodes (default 100)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2)
    p.add_argument("--out", help="run folder (default runs/REWARD-OPPONENT-seedS-TIME)")
    p.add_argument("--resume", metavar="RUN_FOLDER", help="continue a stopped run with its own settings")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), metavar="DTYPE",
                   help="compute dtype: fp32, bf16, fp16 (default: bf16 on GPUs that support it and on CPUs with "
                        "native bf16 instructions, fp16 on V100, fp32 otherwise)")
    p.add_argument("--no-progress", action="store_true")
    return p


def train(argv: list[str]) -> None:
    import json
    import time

    from moral.finetune import FineTuning, Interrupted, RunConfig, RunError, UsageError

    args = train_parser().parse_args(argv)
    try:
        if args.resume:
            path = os.path.join(args.resume, "config.json")
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as exc:
                usage_error(f"--resume {args.resume}: cannot read {path} ({type(exc).__name__})")
            config = RunConfig(**saved)
            if args.threads:
                config.threads = args.threads
            folder, resume = args.resume, True
        else:
            settings = {k: v for k, v in vars(args).items() if k not in ("resume", "no_progress", "out")}
            config = RunConfig(**settings).resolve()
            folder = args.out or os.path.join(
                "runs", f"{config.reward.replace(':', '').replace(',', '_')}-{config.opponent}-seed{config.seed}-"
                        f"{time.strftime('%Y%m%d-%H%M%S')}")
            if os.path.exists(folder) and os.listdir(folder):
                usage_error(f"--out {folder}: the folder exists; continue it with --resume {folder} or choose "
                            f"another --out")
            try:
                os.makedirs(folder, exist_ok=True)
                probe = os.path.join(folder, ".write-test")
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
            except OSError as exc:
                usage_error(f"--out {folder}: cannot write there ({exc.strerror or exc})")
            resume = False
        _quiet_libraries()
        try:
            run = FineTuning(config, folder, resume=resume, progress=not args.no_progress)
        except (OSError, ValueError) as exc:
            if isinstance(exc, UsageError):
                raise
            usage_error(f"--model {config.model!r} cannot be loaded: {str(exc).splitlines()[0][:300]}")
        print(f"run folder: {folder}", flush=True)
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
    print_summary(summary)


def print_summary(summary: dict) -> None:
    cols = ("C|C", "C|D", "D|C", "D|D", "illegal")
    print(f"{'episodes':>16} " + " ".join(f"{c:>8}" for c in cols))
    for label, key in (("first 10%", "first_10pct"), ("last 10%", "last_10pct")):
        print(f"{label:>16} " + " ".join(f"{summary[key][c]:8.1%}" for c in cols))


def _quiet_libraries() -> None:
    import logging
    import warnings
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # asks for the `kernels` hub package
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*should not be contained in the prefix.*")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("eval", "report"):
        from moral import cli_extra
        getattr(cli_extra, argv[0])(argv[1:])
    else:
        train(argv)


if __name__ == "__main__":
    main()
