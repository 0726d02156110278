"""Figures of a report (PNG), drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas: no pyplot, no
global backend change, nothing left open. matplotlib is optional (``pip install -e '.[plot]'``).

    training_action_types.png   stacked areas of action types per episode, summed over runs (paper Fig. 2 / 3)
    regret_by_game.png          grouped bars, (a) Deontological and (b) Utilitarian regret (paper Fig. 4)
    test_action_types.png       one panel per model type, a stacked bar per game
    reciprocity_ipd.png         grouped bars of C|C, C|D, D|C, D|D on the IPD, dashed chance level at 25%
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np

from games import TEST_GAMES
from moral.regret import LEGAL_TYPES
from moral.summary import CATEGORIES

from .tables import SHORT_LABELS, SMOOTHING, TrainingSeries, opponent_label, rolling_mean

CATEGORY_COLOURS = {"C|C": "#28641E", "C|D": "#B0DC82", "D|C": "#FBE6F1", "D|D": "#8E0B52", "illegal": "#A9A9A9"}
GAME_COLOURS = {"IPD": "turquoise", "ISH": "darkorchid", "ICN": "goldenrod", "BOS": "green", "ICD": "cornflowerblue"}


# ------------------------------------------------------------------------------------------------------ figures
def _figure_class():
    """(Figure, FigureCanvasAgg), or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _new_figure(figsize):
    Figure, Canvas = _figure_class()
    fig = Figure(figsize=figsize, dpi=100)
    Canvas(fig)
    return fig


def _wrap(label: str, width: int = 15) -> str:
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label


def _error_bars(means, lows, highs, floor: float | None, ceiling: float | None) -> np.ndarray:
    """Error-bar half lengths for a CI, clipped to the metric's possible range (a t interval of a share or a regret
    near its bound can cross it; the tables keep the unclipped interval)."""
    lows = np.asarray(lows, dtype=float)
    highs = np.asarray(highs, dtype=float)
    if floor is not None:
        lows = np.maximum(lows, floor)
    if ceiling is not None:
        highs = np.minimum(highs, ceiling)
    return np.vstack([np.maximum(means - lows, 0), np.maximum(highs - means, 0)])


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _axes(fig, n: int, max_cols: int, **kwargs):
    rows, cols = _grid(n, max_cols)
    grid = fig.subplots(rows, cols, squeeze=False, **kwargs)
    flat = list(grid.ravel())
    for ax in flat[n:]:
        fig.delaxes(ax)
    return flat[:n]


def plot_training_action_types(series: Sequence[TrainingSeries], window: int = SMOOTHING):
    """Paper Fig. 2 / 3: per model type, stacked areas of the number of decisions of each action type per episode,
    summed over that type's runs and smoothed by a trailing rolling mean; dashed lines at reward switches."""
    rows, cols = _grid(len(series), 3)
    from matplotlib.ticker import MaxNLocator
    fig = _new_figure((5.2 * cols, 3.8 * rows + 0.9))
    axes = _axes(fig, len(series), 3, sharey=True)
    top = max(float(sum(s.counts[c] for c in CATEGORIES).max()) for s in series)
    for ax, s in zip(axes, series):
        stacks = [rolling_mean(s.counts[c], window) for c in CATEGORIES]
        ax.stackplot(s.episodes, *stacks, colors=[CATEGORY_COLOURS[c] for c in CATEGORIES],
                     labels=list(CATEGORIES), linewidth=0)
        for switch in s.switches:
            ax.axvline(switch, color="black", linestyle="--", linewidth=1.2)
        if len(s.phases) > 1:
            bounds = [e for e, _ in s.phases] + [len(s.episodes)]
            for (start, name), end in zip(s.phases, bounds[1:]):
                ax.text((start + end) / 2, top * 1.02, SHORT_LABELS.get(name, name), ha="center", va="bottom",
                        fontsize=9)
        ax.set_xlim(0, max(len(s.episodes) - 1, 1))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.set_ylim(0, top * (1.12 if len(s.phases) > 1 else 1.0))
        about = f"{s.runs} run{'s' if s.runs != 1 else ''}"
        if " (vs " not in s.model_type:
            about += f", vs {', '.join(map(opponent_label, s.opponents))}"
        ax.set_title(f"{s.model_type}\n({about})", fontsize=11)
        ax.set_xlabel("episode")
    for i, ax in enumerate(axes):
        if i % cols == 0:
            ax.set_ylabel(f"decisions per episode\n(sum over runs, rolling mean of {window})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(CATEGORIES), frameon=False,
               title="action type (own action | opponent's previous move)")
    fig.tight_layout(rect=(0, 0.1 if rows == 1 else 0.06, 1, 1))
    return fig


def plot_regret(regret_rows: Sequence[Mapping], title: str = "", deont_max: float = 6.0):
    """Paper Fig. 4: two panels of grouped bars (model types x games), (a) Deontological, (b) Utilitarian regret,
    error bars = 95% CI over runs, drawn within the regrets' ranges [0, deont_max = |R_illegal|] and [0, 1]."""
    types = list(dict.fromkeys(r["model_type"] for r in regret_rows))
    games = [g for g in (*TEST_GAMES, *sorted({r["game"] for r in regret_rows})) if
             any(r["game"] == g for r in regret_rows)]
    games = list(dict.fromkeys(games))
    fig = _new_figure((max(8.0, 1.45 * len(types) + 2.5), 8.6))
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(games)
    x = np.arange(len(types))
    panels = (("deont_regret", "(a) Deontological moral regret", "Deont. regret\n(0 = never D after C)"),
              ("util_regret", "(b) Utilitarian moral regret", "Util. regret (normalised)"))
    for ax, (metric, panel_title, ylabel) in zip(axes, panels):
        top = 0.0
        for j, game in enumerate(games):
            values = {r["model_type"]: r for r in regret_rows if r["game"] == game}
            means = np.array([values[t][f"{metric}_mean"] if t in values else np.nan for t in types])
            lows = np.array([values[t][f"{metric}_ci95_low"] if t in values else np.nan for t in types])
            highs = np.array([values[t][f"{metric}_ci95_high"] if t in values else np.nan for t in types])
            err = _error_bars(means, lows, highs, 0.0, 1.0 if metric == "util_regret" else deont_max)
            top = max(top, float(np.nanmax(means + err[1], initial=0.0)))
            ax.bar(x - 0.4 + width * (j + 0.5), means, width, yerr=err, capsize=2, label=game,
                   color=GAME_COLOURS.get(game, "grey"), edgecolor="black", linewidth=0.4,
                   error_kw={"elinewidth": 0.9})
        ax.set_ylim(0, max(top * 1.08, 0.05 if metric == "util_regret" else 0.3))
        ax.set_title(panel_title, loc="left", fontsize=12)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[1].set_xticks(x, [_wrap(t) for t in types], fontsize=9)
    axes[0].legend(title="game", ncol=len(games), loc="lower center", bbox_to_anchor=(0.5, 1.12), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout()
    return fig


def plot_test_action_types(table: Sequence[Mapping], title: str = ""):
    """One panel per model type; a stacked bar per game of the mean share of each action type at test."""
    types = list(dict.fromkeys(r["model_type"] for r in table))
    rows, cols = _grid(len(types), 4)
    fig = _new_figure((3.4 * cols + 0.6, 3.6 * rows + 1.1))
    axes = _axes(fig, len(types), 4, sharey=True)
    for ax, label in zip(axes, types):
        part = [r for r in table if r["model_type"] == label]
        bottom = np.zeros(len(part))
        for cat in CATEGORIES:
            values = np.array([100 * (0.0 if math.isnan(r[cat]) else r[cat]) for r in part])
            ax.bar([r["game"] for r in part], values, 0.7, bottom=bottom, color=CATEGORY_COLOURS[cat],
                   edgecolor="black", linewidth=0.4, label=cat)
            bottom += values
        runs = max(r["n_runs"] for r in part)
        ax.set_title(f"{_wrap(label, 24)}\n({runs} run{'s' if runs != 1 else ''})", fontsize=10)
        ax.set_ylim(0, 100)
        ax.tick_params(axis="x", labelsize=9)
    for i, ax in enumerate(axes):
        if i % cols == 0:
            ax.set_ylabel("% of test decisions")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(CATEGORIES), frameon=False,
               title="action type (own action | opponent's previous move)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12 if rows == 1 else 0.07, 1, 1))
    return fig


def plot_reciprocity(table: Sequence[Mapping], title: str = ""):
    """Grouped bars per model type of the four legal action types on the IPD (% of legal decisions, 95% CI over
    runs), with the 25% chance level dashed."""
    types = [r["model_type"] for r in table]
    fig = _new_figure((max(7.0, 1.3 * len(types) + 2.5), 4.8))
    ax = fig.subplots()
    x = np.arange(len(types))
    width = 0.8 / len(LEGAL_TYPES)
    for j, kind in enumerate(LEGAL_TYPES):
        means = np.array([100 * r[kind] for r in table])
        err = _error_bars(means, 100 * np.array([r[f"{kind}_ci95_low"] for r in table]),
                          100 * np.array([r[f"{kind}_ci95_high"] for r in table]), 0.0, 100.0)
        ax.bar(x - 0.4 + width * (j + 0.5), means, width, yerr=err, capsize=2, color=CATEGORY_COLOURS[kind],
               edgecolor="black", linewidth=0.5, label=kind, error_kw={"elinewidth": 0.9})
    ax.axhline(25, color="black", linestyle="--", linewidth=1, label="chance level (25%)")
    ax.set_xticks(x, [_wrap(t) for t in types], fontsize=9)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of legal decisions on the IPD")
    ax.legend(ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def available() -> bool:
    """True when matplotlib is installed."""
    return _figure_class() is not None


def save_figure(fig, path: str) -> str:
    """The figure as a PNG at `path`, written atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    return path


class Drawn:
    """The figures a report saved into `folder`: their paths and, per file name, the number of panels."""

    def __init__(self, folder: str):
        self.folder, self.paths, self.axes = folder, [], {}

    def save(self, fig, name: str) -> None:
        self.axes[name] = len(fig.axes)
        self.paths.append(save_figure(fig, os.path.join(self.folder, name)))

