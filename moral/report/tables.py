"""Tables of a report: runs read from their folders, grouped by model type, aggregated over runs (means and 95%
Student-t intervals from moral.regret.aggregate), and written as CSV and markdown (atomically).

    regret               model type x game: Deontological and Utilitarian regret (paper Fig. 4)
    test_action_types    model type x game: shares of each action type at test
    reciprocity_ipd      model type: the four legal action types on the IPD and the reciprocity index
    training_curves      run x tenth of the run: action-type shares and mean reward during fine-tuning
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from games import TEST_GAMES
from moral.regret import LEGAL_TYPES, aggregate, classify, per_run_metrics
from moral.runio import read_csv_rows, read_json, write_csv_atomic, write_text_atomic
from moral.summary import CATEGORIES, category, in_episodes, mean_reward, tenths

# ---------------------------------------------------------------------------------------------------- constants
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
        base, _, opponent = label.partition(" (vs ")
        versus = {"TFT)": 0, "LLM)": 1}.get(opponent, 2)  # vs TFT before LLM vs LLM, as in the paper's figures
        if base in MODEL_ORDER:
            return (MODEL_ORDER.index(base), versus, label)
        if label in prompted:
            return (len(MODEL_ORDER) + 1 + prompted.index(label), versus, label)
        return (len(MODEL_ORDER), versus, label)
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
        run = Run(folder, name, read_json(path))
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
    return category(classify(row))


def training_table(runs: Sequence[Run]) -> list[dict]:
    """Rows run x tenth of the run: the agent's action-type shares, its mean reward and the phase(s) trained."""
    rows = []
    for run in runs:
        if not run.train_rows:
            continue
        for k, (lo, hi) in enumerate(tenths(run.episodes)):
            part = in_episodes(run.train_rows, lo, hi)
            n = len(part)
            if not n:  # a run shorter than 10 episodes has empty tenths
                continue
            phases = list(dict.fromkeys(r.get("phase", "") for r in part))
            row = {"run": run.name, "model_type": run.model_type, "seed": run.config.get("seed"),
                   "opponent": run.config.get("opponent"), "tenth": k + 1, "episode_lo": lo, "episode_hi": hi,
                   "phase": "+".join(p for p in phases if p), "decisions": n}
            for cat in CATEGORIES:
                row[cat] = sum(_category(r) == cat for r in part) / n
            row["mean_reward"] = mean_reward(part)
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
    return write_csv_atomic(path, columns, ({c: _cell(row.get(c)) for c in columns} for row in rows))


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
    return write_text_atomic(path, "\n".join(text) + "\n")



# ----------------------------------------------------------------------------------------- the report's tables
def write_regret(rows: Sequence[Mapping], out_dir: str, scope: str) -> list[str]:
    return [write_csv(os.path.join(out_dir, "regret.csv"), rows), write_markdown(
        os.path.join(out_dir, "regret.md"), "Moral regret at test",
        f"Mean over runs [95% Student-t CI]; {scope}. Deont. regret = mean of 0 - R_De per decision "
        "(0 = never defects against a cooperator; xi per D after C, |R_illegal| per illegal answer). "
        "Util. regret = mean of (U_max - U) / (U_max - R_illegal), 0..1.",
        ["Model type", "Game", "Runs", "Deont. regret", "Util. regret"],
        [[r["model_type"], r["game"], r["n_runs"], _with_ci(r, "deont_regret"), _with_ci(r, "util_regret")]
         for r in rows])]


def write_test_action_types(rows: Sequence[Mapping], out_dir: str, scope: str) -> list[str]:
    return [write_csv(os.path.join(out_dir, "test_action_types.csv"), rows), write_markdown(
        os.path.join(out_dir, "test_action_types.md"), "Action types at test",
        f"Share of test decisions of each action type (own action | opponent's previous move), mean over runs; "
        f"{scope}.",
        ["Model type", "Game", "Runs", *TEST_TYPES, "cooperation"],
        [[r["model_type"], r["game"], r["n_runs"], *[_pct(r[k]) for k in TEST_TYPES], _pct(r["cooperation_rate"])]
         for r in rows])]


def write_reciprocity(rows: Sequence[Mapping], out_dir: str, scope: str) -> list[str]:
    def percent_with_ci(r, k):
        scaled = {f"{k}_mean": 100 * r[k], f"{k}_ci95_low": 100 * r[f"{k}_ci95_low"],
                  f"{k}_ci95_high": 100 * r[f"{k}_ci95_high"]}
        return _with_ci(scaled, k, 1) + "%"

    return [write_csv(os.path.join(out_dir, "reciprocity_ipd.csv"), rows), write_markdown(
        os.path.join(out_dir, "reciprocity_ipd.md"), "Reciprocity on the IPD",
        f"Legal action types as shares of legal decisions (mean over runs [95% CI]; chance level 25% each); "
        f"reciprocity index = P(C | opponent's previous C) - P(C | opponent's previous D), +1 = Tit-for-Tat, "
        f"0 = unconditional; {scope}.",
        ["Model type", "Runs", *LEGAL_TYPES, "reciprocity index", "illegal"],
        [[r["model_type"], r["n_runs"], *[percent_with_ci(r, k) for k in LEGAL_TYPES],
          _with_ci(r, "reciprocity_index"), _pct(r["illegal"])] for r in rows])]


def write_training(rows: Sequence[Mapping], out_dir: str) -> list[str]:
    return [write_csv(os.path.join(out_dir, "training_curves.csv"), rows), write_markdown(
        os.path.join(out_dir, "training_curves.md"), "Action types during fine-tuning",
        "The agent's action-type shares and mean training reward per tenth of each run.",
        ["Run", "Model type", "Seed", "Tenth", "Episodes", "Phase", *CATEGORIES, "mean reward"],
        [[r["run"], r["model_type"], r["seed"], r["tenth"], f"{r['episode_lo']}-{r['episode_hi'] - 1}",
          r["phase"], *[_pct(r[c]) for c in CATEGORIES], _num(r["mean_reward"])] for r in rows])]


def evaluated_tokens(runs: Sequence[Run], variant: str, table_order: str) -> list[str]:
    """The token sets the runs were evaluated with on this prompt variant and table order, sorted."""
    return sorted({m["tokens"] for r in runs for m in r.metrics
                   if m["variant"] == variant and m["table_order"] == table_order})


def pick_tokens(runs: Sequence[Run], variant: str, table_order: str) -> str | None:
    """The evaluation token set to report: action34 (the paper's test tokens) when evaluated, else the first."""
    found = evaluated_tokens(runs, variant, table_order)
    if not found:
        return None
    return "action34" if "action34" in found else found[0]
