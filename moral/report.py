"""Tables and figures from run folders (paper-spec §5.7, §6, §7).

A run folder holds ``config.json`` (at least "reward", "opponent", "episodes", "seed"), the training log ``games.csv``
and, once evaluated, ``eval/decisions.csv``. :func:`report` groups runs by their *model type*, i.e. the training
reward (schedule) — plus the opponent when the runs were trained against more than one — and writes:

Tables (``.md`` and ``.csv``; means over runs, 95% Student-t CIs from :func:`moral.regret.aggregate`):
    regret               model type x game: Deontological and Utilitarian regret (paper Fig. 4)
    test_action_types    model type x game: shares of each action type at test (Fig. "other games")
    reciprocity_ipd      model type: the four legal action types on the IPD and the reciprocity index
    training_curves      run x tenth of the run: action-type shares and mean reward during fine-tuning

Figures (PNG, only if matplotlib is installed: ``pip install -e '.[plot]'``):
    training_action_types.png   stacked areas of action types per episode, summed over runs (paper Fig. 2 / 3)
    regret_by_game.png          grouped bars, (a) Deontological and (b) Utilitarian regret (paper Fig. 4)
    test_action_types.png       one panel per model type, a stacked bar per game
    reciprocity_ipd.png         grouped bars of C|C, C|D, D|C, D|D on the IPD, dashed chance level at 25%

"No fine-tuning" is the reference model's answers (``model == "reference"``) pooled from every run, one value per
run; the value-prompted reference answers ("reference+deont", "reference+util") give "No fine-tuning, Deont.
prompted" / "No fine-tuning, Util. prompted". Evaluation tables use one prompt variant, table order and token set
(default: structured, original, action34 when present) like the paper's Fig. 4.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas: no pyplot, no global backend change,
nothing left open.
"""

from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from games import TEST_GAMES
from moral.regret import LEGAL_TYPES, aggregate, classify, per_run_metrics, read_csv_rows, run_illegal

# ---------------------------------------------------------------------------------------------------- constants
CATEGORIES = ("C|C", "C|D", "D|C", "D|D", "illegal")
CATEGORY_COLOURS = {"C|C": "#28641E", "C|D": "#B0DC82", "D|C": "#FBE6F1", "D|D": "#8E0B52", "illegal": "#A9A9A9"}
GAME_COLOURS = {"IPD": "turquoise", "ISH": "darkorchid", "ICN": "goldenrod", "BOS": "green", "ICD": "cornflowerblue"}
TEST_TYPES = ("C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D", "illegal")

REWARD_LABELS = {"game": "Game payoffs", "deont": "Deontological", "util": "Utilitarian",
                 "game+deont": "Game + Deont."}
SHORT_LABELS = {"game": "Game", "deont": "Deont.", "util": "Util.", "game+deont": "Game + Deont."}
NO_FINETUNING = "No fine-tuning"
REFERENCE_MODELS = {"reference": NO_FINETUNING, "reference+deont": "No fine-tuning, Deont. prompted",
                    "reference+util": "No fine-tuning, Util. prompted"}
MODEL_ORDER = (NO_FINETUNING, "Game payoffs", "Deontological", "Utilitarian", "Game + Deont.",
               "Game, then Deont.", "Game, then Util.")
SMOOTHING = 10  # episodes in the rolling mean of the training figure


def model_type_label(reward: str) -> str:
    """The model type of a run from its training reward: "deont" -> "Deontological", "game:500,deont:500" ->
    "Game, then Deont.", a one-phase schedule "util:1000" -> "Utilitarian"."""
    phases = [part.strip().partition(":")[0] for part in str(reward).split(",") if part.strip()]
    if len(phases) == 1:
        return REWARD_LABELS.get(phases[0], phases[0])
    return ", then ".join(SHORT_LABELS.get(p, p) for p in phases)


def opponent_label(name: str) -> str:
    """Display name of a training opponent: "tft" -> "TFT", "llm" -> "LLM", "random" -> "Random"."""
    name = str(name)
    return name.upper() if name in ("tft", "llm", "ac", "ad", "wsls") else name.capitalize()


def order_model_types(labels) -> list[str]:
    """No fine-tuning first, then the paper's order, then other trained types, then the value-prompted baselines."""
    labels = set(labels)
    prompted = [REFERENCE_MODELS[k] for k in ("reference+deont", "reference+util")]

    def key(label):
        base = label.split(" (vs ")[0]
        if base in MODEL_ORDER:
            return (MODEL_ORDER.index(base), label)
        if label in prompted:
            return (len(MODEL_ORDER) + 1 + prompted.index(label), label)
        return (len(MODEL_ORDER), label)
    return sorted(labels, key=key)


# ------------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    folder: str
    name: str
    config: dict
    model_type: str = ""
    train_rows: list = field(default_factory=list)
    metrics: list = field(default_factory=list)

    @property
    def episodes(self) -> int:
        """Episodes of the run: config "episodes", else one more than the last logged episode."""
        if self.config.get("episodes"):
            return int(self.config["episodes"])
        return max((int(r["episode"]) for r in self.train_rows), default=-1) + 1


def _run_names(folders: Sequence[str]) -> list[str]:
    """Short unique names: the folder's basename, or its path relative to the folders' common parent."""
    absolute = [os.path.abspath(f) for f in folders]
    names = [os.path.basename(f) for f in absolute]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath(absolute)
    return [os.path.relpath(f, os.path.dirname(common) if len(absolute) == 1 else common) for f in absolute]


def load_runs(run_folders: Sequence[str]) -> list[Run]:
    """Read config.json, the agent's rows of games.csv and the metrics of eval/decisions.csv of each folder."""
    runs = []
    for folder, name in zip(run_folders, _run_names(run_folders)):
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no config.json — is this a run folder?")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        run = Run(folder, name, config)
        games_csv = os.path.join(folder, "games.csv")
        if os.path.isfile(games_csv):
            run.train_rows = [r for r in read_csv_rows(games_csv) if r.get("learner", "agent") == "agent"]
        decisions = os.path.join(folder, "eval", "decisions.csv")
        if os.path.isfile(decisions):
            run.metrics = per_run_metrics(decisions)
        runs.append(run)
    opponents = {str(r.config.get("opponent", "?")) for r in runs}
    for run in runs:
        run.model_type = model_type_label(run.config.get("reward", "?"))
        if len(opponents) > 1:
            run.model_type += f" (vs {opponent_label(run.config.get('opponent', '?'))})"
    return runs


# --------------------------------------------------------------------------------------------- table building
def eval_groups(runs: Sequence[Run], variant: str, table_order: str, tokens: str) -> dict[tuple, list[dict]]:
    """(model type, game) -> one metrics dict per run, for the chosen variant / table order / tokens."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for m in run.metrics:
            if (m["variant"], m["table_order"], m["tokens"]) != (variant, table_order, tokens):
                continue
            if m["model"] == "finetuned":
                label = run.model_type
            elif m["model"] in REFERENCE_MODELS:
                label = REFERENCE_MODELS[m["model"]]
            else:
                continue
            groups.setdefault((label, m["game"]), []).append(m)
    return groups


def _sorted_keys(groups: Mapping[tuple, list]) -> list[tuple]:
    types = order_model_types({k[0] for k in groups})
    games = list(TEST_GAMES) + sorted({k[1] for k in groups} - set(TEST_GAMES))
    return [(t, g) for t in types for g in games if (t, g) in groups]


def regret_table(groups: Mapping[tuple, list[dict]]) -> list[dict]:
    """Rows (model type, game) with mean and 95% CI over runs of both regrets (paper Fig. 4)."""
    rows = []
    for label, game in _sorted_keys(groups):
        ms = groups[label, game]
        row = {"model_type": label, "game": game, "n_runs": len(ms)}
        for metric in ("deont_regret", "util_regret", "deont_regret_normalised"):
            agg = aggregate(m[metric] for m in ms)
            row.update({f"{metric}_mean": agg["mean"], f"{metric}_ci95_low": agg["ci95_low"],
                        f"{metric}_ci95_high": agg["ci95_high"]})
        rows.append(row)
    return rows


def action_type_table(groups: Mapping[tuple, list[dict]]) -> list[dict]:
    """Rows (model type, game): mean over runs of each action-type share at test and of the cooperation rate."""
    rows = []
    for label, game in _sorted_keys(groups):
        ms = groups[label, game]
        row = {"model_type": label, "game": game, "n_runs": len(ms),
               "decisions_per_run": float(np.mean([m["n"] for m in ms]))}
        for kind in (*TEST_TYPES, "cooperation_rate"):
            row[kind] = aggregate(m[kind] for m in ms)["mean"]
        rows.append(row)
    return rows


def reciprocity_table(groups: Mapping[tuple, list[dict]], game: str = "IPD") -> list[dict]:
    """Rows per model type on `game`: the four legal action types as shares of legal decisions (mean and CI over
    runs) and the reciprocity index P(C|C) - P(C|D)."""
    rows = []
    for label, g in _sorted_keys(groups):
        if g != game:
            continue
        ms = groups[label, g]
        row = {"model_type": label, "game": g, "n_runs": len(ms)}
        for kind in LEGAL_TYPES:
            agg = aggregate(m["reciprocity"][kind] for m in ms)
            row.update({kind: agg["mean"], f"{kind}_ci95_low": agg["ci95_low"], f"{kind}_ci95_high": agg["ci95_high"]})
        agg = aggregate(m["reciprocity_index"] for m in ms)
        row.update({"reciprocity_index": agg["mean"], "reciprocity_index_ci95_low": agg["ci95_low"],
                    "reciprocity_index_ci95_high": agg["ci95_high"],
                    "cooperation_rate_legal": aggregate(m["cooperation_rate_legal"] for m in ms)["mean"],
                    "illegal": aggregate(m["illegal"] for m in ms)["mean"]})
        rows.append(row)
    return rows


def _category(row: Mapping) -> str:
    kind = classify(row)
    return "illegal" if kind.split("|")[0] not in ("C", "D") else kind


def training_table(runs: Sequence[Run]) -> list[dict]:
    """Rows run x tenth of the run: the agent's action-type shares, its mean reward and the phase(s) trained."""
    rows = []
    for run in runs:
        if not run.train_rows:
            continue
        episodes = run.episodes
        for k in range(10):
            lo, hi = k * episodes // 10, (k + 1) * episodes // 10
            part = [r for r in run.train_rows if lo <= int(r["episode"]) < hi]
            n = len(part)
            if not n:  # a run shorter than 10 episodes has empty tenths
                continue
            phases = list(dict.fromkeys(r.get("phase", "") for r in part))
            row = {"run": run.name, "model_type": run.model_type, "seed": run.config.get("seed"),
                   "opponent": run.config.get("opponent"), "tenth": k + 1, "episode_lo": lo, "episode_hi": hi,
                   "phase": "+".join(p for p in phases if p), "decisions": n}
            for cat in CATEGORIES:
                row[cat] = sum(_category(r) == cat for r in part) / n if n else math.nan
            row["mean_reward"] = float(np.mean([float(r["reward"]) for r in part])) if n else math.nan
            rows.append(row)
    return rows


@dataclass
class TrainingSeries:
    """Decisions of each category per episode, summed over the runs of one model type."""
    model_type: str
    runs: int
    opponents: list
    episodes: np.ndarray
    counts: dict
    switches: list
    phases: list  # (first episode, phase name) of each phase


def training_series(runs: Sequence[Run]) -> list[TrainingSeries]:
    by_type: dict[str, list[Run]] = {}
    for run in runs:
        if run.train_rows:
            by_type.setdefault(run.model_type, []).append(run)
    series = []
    for label in order_model_types(by_type):
        group = by_type[label]
        length = max(max(run.episodes, max(int(r["episode"]) for r in run.train_rows) + 1) for run in group)
        counts = {cat: np.zeros(length) for cat in CATEGORIES}
        starts: dict[int, str] = {}
        for run in group:
            previous = None
            for r in sorted(run.train_rows, key=lambda r: int(r["episode"])):
                episode = int(r["episode"])
                counts[_category(r)][episode] += 1
                phase = r.get("phase", "")
                if phase != previous:
                    starts.setdefault(episode, phase)
                    previous = phase
        phases = sorted(starts.items())
        series.append(TrainingSeries(label, len(group), sorted({str(r.config.get("opponent")) for r in group}),
                                     np.arange(length), counts, [e for e, _ in phases[1:]], phases))
    return series


def rolling_mean(x: np.ndarray, window: int = SMOOTHING) -> np.ndarray:
    """Trailing rolling mean; the first window - 1 points average what is available (pandas min_periods=1)."""
    x = np.asarray(x, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[lo]) / (idx - lo)


# --------------------------------------------------------------------------------------------------- writing
def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def write_csv(path: str, rows: Sequence[Mapping]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    return path


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _with_ci(row: Mapping, key: str, digits: int = 2) -> str:
    mean = row[f"{key}_mean"] if f"{key}_mean" in row else row[key]
    lo, hi = row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
    if math.isnan(mean):
        return "n/a"
    if lo == hi:
        return _num(mean, digits)
    return f"{_num(mean, digits)} [{_num(lo, digits)}, {_num(hi, digits)}]"


def _md(cell) -> str:
    """A markdown table cell: "C|C" must not split the column."""
    return str(cell).replace("|", "\\|")


def write_markdown(path: str, title: str, note: str, headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    text = [f"# {title}", "", note, "", "| " + " | ".join(map(_md, headers)) + " |", "|" + "---|" * len(headers)]
    text += ["| " + " | ".join(map(_md, line)) + " |" for line in lines]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")
    return path


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


def save_figure(fig, path: str) -> str:
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------------------------------ report
def _pick_tokens(runs: Sequence[Run], variant: str, table_order: str) -> str | None:
    found = sorted({m["tokens"] for r in runs for m in r.metrics
                    if m["variant"] == variant and m["table_order"] == table_order})
    if not found:
        return None
    return "action34" if "action34" in found else found[0]


def report(run_folders: Sequence[str], out_dir: str, variant: str = "structured", table_order: str = "original",
           tokens: str | None = None) -> dict:
    """Write the tables (and figures, when matplotlib is installed) for `run_folders` into `out_dir`.

    Returns {"tables": [paths], "figures": [paths], "figure_axes": {file name: number of panels},
    "model_types": [...], "message": str}."""
    if not run_folders:
        raise ValueError("report needs at least one run folder")
    os.makedirs(out_dir, exist_ok=True)
    runs = load_runs(run_folders)
    tokens = tokens or _pick_tokens(runs, variant, table_order)
    tables, figures, axes_count, notes = [], [], {}, []
    plotting = _figure_class() is not None
    scope = f"{variant} prompt, {table_order} table order, tokens {tokens}"

    def out(name):
        return os.path.join(out_dir, name)

    def save(fig, name):
        axes_count[name] = len(fig.axes)
        figures.append(save_figure(fig, out(name)))

    groups = eval_groups(runs, variant, table_order, tokens) if tokens else {}
    if groups:
        regret = regret_table(groups)
        tables.append(write_csv(out("regret.csv"), regret))
        tables.append(write_markdown(
            out("regret.md"), "Moral regret at test",
            f"Mean over runs [95% Student-t CI]; {scope}. Deont. regret = mean of 0 - R_De per decision "
            "(0 = never defects against a cooperator; xi per D after C, |R_illegal| per illegal answer). "
            "Util. regret = mean of (U_max - U) / (U_max - R_illegal), 0..1.",
            ["Model type", "Game", "Runs", "Deont. regret", "Util. regret"],
            [[r["model_type"], r["game"], r["n_runs"], _with_ci(r, "deont_regret"), _with_ci(r, "util_regret")]
             for r in regret]))
        actions = action_type_table(groups)
        tables.append(write_csv(out("test_action_types.csv"), actions))
        tables.append(write_markdown(
            out("test_action_types.md"), "Action types at test",
            f"Share of test decisions of each action type (own action | opponent's previous move), mean over runs; "
            f"{scope}.",
            ["Model type", "Game", "Runs", *TEST_TYPES, "cooperation"],
            [[r["model_type"], r["game"], r["n_runs"], *[_pct(r[k]) for k in TEST_TYPES],
              _pct(r["cooperation_rate"])] for r in actions]))
        recip = reciprocity_table(groups)
        if recip:
            tables.append(write_csv(out("reciprocity_ipd.csv"), recip))
            tables.append(write_markdown(
                out("reciprocity_ipd.md"), "Reciprocity on the IPD",
                f"Legal action types as shares of legal decisions (mean over runs [95% CI]; chance level 25% each); "
                f"reciprocity index = P(C | opponent's previous C) - P(C | opponent's previous D), +1 = Tit-for-Tat, "
                f"0 = unconditional; {scope}.",
                ["Model type", "Runs", *LEGAL_TYPES, "reciprocity index", "illegal"],
                [[r["model_type"], r["n_runs"],
                  *[_with_ci({**r, f"{k}_mean": 100 * r[k], f"{k}_ci95_low": 100 * r[f"{k}_ci95_low"],
                              f"{k}_ci95_high": 100 * r[f"{k}_ci95_high"]}, k, 1) + "%" for k in LEGAL_TYPES],
                  _with_ci(r, "reciprocity_index"), _pct(r["illegal"])] for r in recip]))
        if plotting:
            deont_max = max(abs(run_illegal(r.folder)) for r in runs)
            save(plot_regret(regret, scope, deont_max), "regret_by_game.png")
            save(plot_test_action_types(actions, scope), "test_action_types.png")
            if recip:
                save(plot_reciprocity(recip, scope), "reciprocity_ipd.png")
    else:
        notes.append(f"no {variant}/{table_order} evaluation decisions (eval/decisions.csv) found: evaluation "
                     "tables and figures skipped")

    training = training_table(runs)
    if training:
        tables.append(write_csv(out("training_curves.csv"), training))
        tables.append(write_markdown(
            out("training_curves.md"), "Action types during fine-tuning",
            "The agent's action-type shares and mean training reward per tenth of each run.",
            ["Run", "Model type", "Seed", "Tenth", "Episodes", "Phase", *CATEGORIES, "mean reward"],
            [[r["run"], r["model_type"], r["seed"], r["tenth"], f"{r['episode_lo']}-{r['episode_hi'] - 1}",
              r["phase"], *[_pct(r[c]) for c in CATEGORIES], _num(r["mean_reward"])] for r in training]))
        if plotting:
            save(plot_training_action_types(training_series(runs)), "training_action_types.png")
    else:
        notes.append("no training log (games.csv) found: training table and figure skipped")

    model_types = order_model_types({k[0] for k in groups} | {r.model_type for r in runs})
    message = (f"{len(runs)} run(s), {len(model_types)} model type(s): wrote {len(tables)} table file(s)"
               f"{f' and {len(figures)} figure(s)' if plotting else ''} to {out_dir}")
    if not plotting:
        notes.append("matplotlib is not installed, so no figures: pip install -e '.[plot]' gives figures")
    if notes:
        message += "; " + "; ".join(notes)
    return {"tables": tables, "figures": figures, "figure_axes": axes_count, "model_types": model_types,
            "message": message}
