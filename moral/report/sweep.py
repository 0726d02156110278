"""The report of a sweep folder (moral.sweep): runs grouped by condition (every setting but the seed), means and 95%
t-intervals across seeds, the paper's numbers beside ours.

    sweep_results.csv / .md   per condition: the last 10% of training, action-type shares (mean [95% CI] over seeds),
                              beside the paper's read-off numbers (paper-spec §7.1, §7.2)
    learning.png              action types per episode during training, one panel per reward, one row per opponent
                              (vs TFT, LLM vs LLM; the ICLR paper's Fig. 3): mean share over seeds, 95% band
    unlearning.png            the same for reward schedules (Game, then Deont. / Util.), the switch marked (Fig. 4)
and everything `moral.report.report` writes for the finished runs: regret per game for every condition (Fig. 5),
reciprocity, test action types, the training tables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moral.regret import aggregate
from moral.summary import CATEGORIES, category, tenth_size

from . import figures
from . import report as report_runs
from .tables import SMOOTHING, load_runs, model_type_label, opponent_label, rolling_mean, write_csv, \
    write_markdown

# The paper's last-10% action types per condition, read off its figures (paper-spec §7.1-7.2; Gemma-2-2b-it, 5 runs,
# 1000 episodes or 500 + 500). Keys: (reward phases joined by ",", opponent).
PAPER = {
    ("game", "tft"): "D|D 85-90%, rest mostly D|C",
    ("deont", "tft"): "C|C 55-60%, C|D 4-12%, D|C ~0%, D|D 25-30%",
    ("util", "tft"): "C|C ~80%, C|D 8-12%, few D|D",
    ("game+deont", "tft"): "D|D ~60%, C|C 20-30%, some D|C and C|D",
    ("game,deont", "tft"): "C|C 50-60%, C|D ~8%, D|D 30-40%",
    ("game,util", "tft"): "C|C 30-40%, D|D 50-60%",
    ("game", "llm"): "D|D 73-80%, D|C 13-20%",
    ("deont", "llm"): "C|C ~53%, C|D ~13%, D|C ~7%, D|D 20-27%",
    ("util", "llm"): "C|C 47-53%, C|D ~13%, D|D ~20%",
    ("game+deont", "llm"): "D|D 60-67%, C|C 13-20%, D|C ~13%",
    ("game,deont", "llm"): "C|C 33-47% (only after ~750 episodes)",
    ("game,util", "llm"): "C|C ~27%, C|D 13-20%",
}
LINE_COLOURS = {"C|C": "#28641E", "C|D": "#7FBF3F", "D|C": "#E377C2", "D|D": "#8E0B52", "illegal": "#808080"}
SINGLE_REWARDS = ("game", "deont", "util", "game+deont")


def phases_of(reward: str) -> tuple[str, ...]:
    return tuple(part.strip().partition(":")[0] for part in str(reward).split(",") if part.strip())


@dataclass
class Condition:
    """The runs of one condition: every setting equal but the seed."""
    key: tuple
    label: str
    reward: str
    opponent: str
    runs: list


def conditions(runs, axes: Sequence[str] = ()) -> list[Condition]:
    """Group runs by reward, opponent and the sweep's other grid axes (settings' names), i.e. all but the seed."""
    varied = [k for k in axes if k not in ("reward", "opponent", "seed")]
    groups: dict[tuple, Condition] = {}
    for run in runs:
        reward, opponent = str(run.config.get("reward")), str(run.config.get("opponent"))
        key = (",".join(phases_of(reward)), opponent, *(repr(run.config.get(k)) for k in varied))
        if key not in groups:
            extra = "".join(f", {k}={run.config.get(k)}" for k in varied)
            label = f"{model_type_label(reward)} (vs {opponent_label(opponent)}{extra})"
            groups[key] = Condition(key, label, reward, opponent, [])
        groups[key].runs.append(run)
    order = {r: i for i, r in enumerate(SINGLE_REWARDS + ("game,deont", "game,util"))}
    return sorted(groups.values(), key=lambda c: (c.opponent != "tft", order.get(c.key[0], 99), c.key))


def per_episode_shares(run) -> np.ndarray:
    """categories x episodes: the agent's share of each action-type category in each episode."""
    counts = np.zeros((len(CATEGORIES), run.episodes))
    for r in run.train_rows:
        counts[CATEGORIES.index(category(r["action_type"])), int(r["episode"])] += 1
    return counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)


def results_table(groups: Sequence[Condition]) -> list[dict]:
    """Per condition: runs, episodes, and each category's last-10% share, mean and 95% CI over seeds."""
    rows = []
    for c in groups:
        row = {"condition": c.label, "reward": c.reward, "opponent": c.opponent, "seeds": len(c.runs),
               "episodes": c.runs[0].episodes}
        for k, cat in enumerate(CATEGORIES):
            values = []
            for run in c.runs:
                shares = per_episode_shares(run)
                last = tenth_size(run.episodes)
                values.append(float(shares[k, -last:].mean()))
            agg = aggregate(values)
            row.update({cat: agg["mean"], f"{cat}_ci95_low": agg["ci95_low"], f"{cat}_ci95_high": agg["ci95_high"]})
        row["paper"] = PAPER.get(c.key[:2], "")
        rows.append(row)
    return rows


def _share_ci(row: Mapping, cat: str) -> str:
    mean, lo, hi = row[cat], row[f"{cat}_ci95_low"], row[f"{cat}_ci95_high"]
    if row["seeds"] < 2:
        return f"{100 * mean:.0f}%"
    return f"{100 * mean:.0f}% [{100 * max(lo, 0):.0f}, {100 * min(hi, 1):.0f}]"


def write_results(rows: Sequence[Mapping], out_dir: str) -> list[str]:
    return [write_csv(os.path.join(out_dir, "sweep_results.csv"), rows), write_markdown(
        os.path.join(out_dir, "sweep_results.md"), "Last 10% of training, per condition",
        "The agent's action-type shares in the last 10% of each run's episodes: mean over seeds [95% t-interval, "
        "clipped to 0-100%]. Paper: Gemma-2-2b-it, 5 runs, 1000 episodes (500 + 500 for schedules), read off its "
        "figures (paper-spec §7.1-7.2).",
        ["Condition", "Seeds", "Episodes", *CATEGORIES, "Paper (last episodes)"],
        [[r["condition"], r["seeds"], r["episodes"], *[_share_ci(r, c) for c in CATEGORIES], r["paper"]]
         for r in rows])]


def plot_conditions(panels: Sequence[tuple[str, Condition | None]], rows: int, cols: int, title: str,
                    window: int = SMOOTHING):
    """One panel per condition: each category's share per episode (trailing rolling mean of `window` episodes per
    run), mean over seeds with a 95% t-band; dashed lines where a reward schedule switches."""
    fig = figures._new_figure((max(4.6 * cols, 8.0), 3.4 * rows + 1.0))
    grid = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, (name, cond) in zip(grid.ravel(), panels):
        if cond is None:
            ax.set_axis_off()
            ax.set_title(f"{name}\n(not in this sweep)", fontsize=10, color="grey")
            continue
        length = min(run.episodes for run in cond.runs)
        smoothed = np.stack([np.stack([rolling_mean(s, window) for s in per_episode_shares(run)[:, :length]])
                             for run in cond.runs])  # runs x categories x episodes
        x = np.arange(length)
        for k, cat in enumerate(CATEGORIES):
            series = smoothed[:, k, :]
            mean = series.mean(axis=0)
            ax.plot(x, 100 * mean, color=LINE_COLOURS[cat], linewidth=1.6, label=cat)
            if len(cond.runs) > 1:
                band = [aggregate(series[:, t]) for t in range(length)]
                lo = np.clip([b["ci95_low"] for b in band], 0, 1)
                hi = np.clip([b["ci95_high"] for b in band], 0, 1)
                ax.fill_between(x, 100 * lo, 100 * hi, color=LINE_COLOURS[cat], alpha=0.07, linewidth=0)
        start = 0
        for phase_episodes in _phase_lengths(cond.runs[0])[:-1]:
            start += phase_episodes
            ax.axvline(start, color="black", linestyle="--", linewidth=1.2)
            ax.text(start, 97, " switch", fontsize=8, va="top")
        ax.set_xlim(0, max(length - 1, 1))
        ax.set_ylim(-2, 102)
        ax.set_title(f"{name}\n({len(cond.runs)} seed{'s' if len(cond.runs) != 1 else ''})", fontsize=10)
        ax.set_xlabel("episode")
        ax.grid(alpha=0.3)
    for r in range(rows):
        grid[r, 0].set_ylabel(f"% of decisions\n(rolling mean of {window})")
    handles, labels = next(((a.get_legend_handles_labels()) for a in grid.ravel() if a.lines), ([], []))
    fig.legend(handles, labels, loc="lower center", ncol=len(CATEGORIES), frameon=False,
               title="action type (own action | opponent's previous move); band: 95% interval over seeds")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.09 if rows == 1 else 0.06, 1, 0.97))
    return fig


def _phase_lengths(run) -> list[int]:
    phases = run.config.get("derived", {}).get("phases") or []
    return [int(p["episodes"]) for p in phases] or [run.episodes]


def report_sweep(sweep_dir: str, out_dir: str, tokens: str | None = None) -> dict:
    """Write the sweep's tables and figures into `out_dir` (finished runs only; the message says how many were
    left out)."""
    from moral.sweep import sweep_axes, sweep_runs
    folders = sweep_runs(sweep_dir)
    finished = sweep_runs(sweep_dir, finished_only=True)
    if not finished:
        raise ValueError(f"{sweep_dir}: no finished run yet ({len(folders)} started)")
    result = report_runs(finished, out_dir, tokens=tokens)
    runs = load_runs(finished)
    groups = conditions(runs, sweep_axes(sweep_dir))
    result["tables"] += write_results(results_table(groups), out_dir)
    if figures.available():
        drawn = figures.Drawn(out_dir)
        by_key = {c.key[:2]: c for c in groups}
        opponents = [o for o in ("tft", "llm") if any(c.opponent == o for c in groups)]
        opponents += sorted({c.opponent for c in groups} - set(opponents))
        singles = [r for r in SINGLE_REWARDS if any(c.key[0] == r for c in groups)]
        if singles:
            panels = [(f"{model_type_label(r)}, vs {opponent_label(o)}", by_key.get((r, o)))
                      for o in opponents for r in singles]
            drawn.save(plot_conditions(panels, len(opponents), len(singles),
                                       "Action types during fine-tuning (mean over seeds)"), "learning.png")
        schedules = sorted({c.key[0] for c in groups if "," in c.key[0]})
        if schedules:
            panels = [(f"{model_type_label(s)}, vs {opponent_label(o)}", by_key.get((s, o)))
                      for o in opponents for s in schedules]
            drawn.save(plot_conditions(panels, len(opponents), len(schedules),
                                       "Unlearning: the reward switches at the dashed line (mean over seeds)"),
                       "unlearning.png")
        result["figures"] += drawn.paths
    left_out = len(folders) - len(finished)
    result["message"] += (f"; {len(groups)} condition(s) in sweep_results.md"
                          + (f"; {left_out} unfinished run(s) left out" if left_out else ""))
    return result
