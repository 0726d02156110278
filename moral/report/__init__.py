"""Tables and figures from run folders (paper-spec §5.7, §6, §7): `report()` writes them; `tables` builds and
writes the tables, `figures` draws the figures.

A run folder holds ``config.json`` (at least "reward", "opponent", "episodes", "seed"), the training log ``games.csv``
and, once evaluated, ``eval/decisions.csv``. Runs are grouped by their *model type*, i.e. the training reward
(schedule), plus the opponent when the runs were trained against more than one. "No fine-tuning" is the reference
model's answers (``model == "reference"``) pooled from every run, one value per run; the value-prompted reference
answers give "No fine-tuning, Deont. prompted" / "No fine-tuning, Util. prompted". Evaluation tables use one prompt
variant, table order and token set (default: structured, original, action34 when present) like the paper's Fig. 4.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from moral.regret import run_illegal

from . import figures
from .tables import action_type_table, eval_groups, evaluated_tokens, load_runs, model_type_label, order_model_types, \
    pick_tokens, reciprocity_table, regret_table, rolling_mean, training_series, training_table, write_reciprocity, \
    write_regret, write_test_action_types, write_training

__all__ = ["model_type_label", "order_model_types", "report", "rolling_mean"]


def report(run_folders: Sequence[str], out_dir: str, variant: str = "structured", table_order: str = "original",
           tokens: str | None = None) -> dict:
    """Write the tables (and figures, when matplotlib is installed) for `run_folders` into `out_dir`.

    Returns {"tables": [paths], "figures": [paths], "figure_axes": {file name: number of panels},
    "model_types": [...], "message": str}."""
    if not run_folders:
        raise ValueError("report needs at least one run folder")
    os.makedirs(out_dir, exist_ok=True)
    runs = load_runs(run_folders)
    evaluated = evaluated_tokens(runs, variant, table_order)
    if tokens is not None and evaluated and tokens not in evaluated:
        raise ValueError(f"--tokens {tokens!r}: these runs were evaluated with {', '.join(evaluated)} "
                         f"({variant} prompt, {table_order} table order)")
    tokens = tokens or pick_tokens(runs, variant, table_order)
    scope = f"{variant} prompt, {table_order} table order, tokens {tokens}"
    plotting = figures.available()
    tables, drawn, notes = [], figures.Drawn(out_dir), []

    groups = eval_groups(runs, variant, table_order, tokens) if tokens else {}
    if groups:
        regret, actions, recip = regret_table(groups), action_type_table(groups), reciprocity_table(groups)
        tables += write_regret(regret, out_dir, scope) + write_test_action_types(actions, out_dir, scope)
        tables += write_reciprocity(recip, out_dir, scope) if recip else []
        if plotting:
            deont_max = max(abs(run_illegal(r.folder)) for r in runs)
            drawn.save(figures.plot_regret(regret, scope, deont_max), "regret_by_game.png")
            drawn.save(figures.plot_test_action_types(actions, scope), "test_action_types.png")
            if recip:
                drawn.save(figures.plot_reciprocity(recip, scope), "reciprocity_ipd.png")
    else:
        notes.append(f"no {variant}/{table_order} evaluation decisions (eval/decisions.csv) found: evaluation "
                     "tables and figures skipped")

    training = training_table(runs)
    if training:
        tables += write_training(training, out_dir)
        if plotting:
            drawn.save(figures.plot_training_action_types(training_series(runs)), "training_action_types.png")
    else:
        notes.append("no training log (games.csv) found: training table and figure skipped")

    model_types = order_model_types({k[0] for k in groups} | {r.model_type for r in runs})
    message = (f"{len(runs)} run(s), {len(model_types)} model type(s): wrote {len(tables)} table file(s)"
               f"{f' and {len(drawn.paths)} figure(s)' if plotting else ''} to {out_dir}")
    if not plotting:
        notes.append("matplotlib is not installed, so no figures: pip install -e '.[plot]' gives figures")
    if notes:
        message += "; " + "; ".join(notes)
    return {"tables": tables, "figures": drawn.paths, "figure_axes": drawn.axes, "model_types": model_types,
            "message": message}
