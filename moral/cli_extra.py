"""`python run.py eval ...` and `python run.py report ...` (argument parsing only; the work is in evaluate/report)."""

from __future__ import annotations

import os
import sys


def _parser(prog: str):
    from run import OneLineParser
    return OneLineParser(prog=f"run.py {prog}")


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def eval(argv: list[str]) -> None:  # noqa: A001 - the subcommand's name
    from games import TABLE_ORDERS, TEST_GAMES, TOKEN_SETS
    from run import _quiet_libraries, positive_int

    from .evaluate import VARIANTS, EvalConfig, evaluate

    p = _parser("eval")
    p.add_argument("runs", nargs="+", metavar="RUN_FOLDER")
    p.add_argument("--episodes", type=positive_int, default=10, help="test episodes per game (default 10)")
    p.add_argument("--steps", type=positive_int, default=5, help="steps per test episode (default 5)")
    p.add_argument("--games", nargs="+", default=list(TEST_GAMES), metavar="GAME", help=" ".join(TEST_GAMES))
    p.add_argument("--tokens", nargs="+", default=["action34"], metavar="SET",
                   help=f"one or more of {', '.join(TOKEN_SETS)}, or two strings C,D (default action34)")
    p.add_argument("--orders", nargs="+", default=list(TABLE_ORDERS), choices=TABLE_ORDERS, metavar="ORDER")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT")
    p.add_argument("--no-baselines", action="store_true", help="skip the value-prompted reference baselines")
    p.add_argument("--followup", action="store_true", help="ask the follow-up questions after each IPD decision")
    p.add_argument("--followup-tokens", type=positive_int, default=100, help="answer length (default 100)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--checkpoint", help="evaluate this checkpoint folder instead of the run's final adapter")
    p.add_argument("--device")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = EvalConfig(episodes=args.episodes, steps=args.steps, games=tuple(args.games), tokens=tuple(args.tokens),
                     orders=tuple(args.orders), variants=tuple(args.variants), baselines=not args.no_baselines,
                     followup=args.followup, followup_tokens=args.followup_tokens, seed=args.seed,
                     checkpoint=args.checkpoint)
    try:
        cfg.validate()
    except ValueError as exc:
        _fail(str(exc))
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "config.json")):
            _fail(f"{run} is not a run folder (no config.json)")
    _quiet_libraries()
    for run in args.runs:
        try:
            metrics = evaluate(run, cfg, device=args.device, threads=args.threads, progress=not args.no_progress)
        except ValueError as exc:
            _fail(str(exc))
        print(f"{run}: {metrics['decisions']} decisions in {metrics['wall_s']:.0f} s -> {run}/eval/")
        print_regret(metrics["groups"])


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


def report(argv: list[str]) -> None:
    from .report import report as make_report

    p = _parser("report")
    p.add_argument("runs", nargs="+", metavar="RUN_FOLDER")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--tokens", metavar="SET", help="token set of the evaluation tables (default action34 if present)")
    args = p.parse_args(argv)
    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "config.json")):
            _fail(f"{run} is not a run folder (no config.json)")
    try:
        result = make_report(args.runs, args.out, tokens=args.tokens)
    except ValueError as exc:
        _fail(str(exc))
    for path in result["tables"] + result["figures"]:
        print(path)
    if result.get("message"):
        print(result["message"])
