"""Run summaries: action-type shares, the per-tenth binning of a run, and the merging of the two illegal types.

An action type is "own action | opponent's previous move" (games.ACTION_TYPES). Summaries show five categories:
the four legal types and "illegal" (illegal|C and illegal|D merged). Used by the training loop (progress bar,
trackers, summary.json), the report and the command line. Standard library and numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from games import ACTION_TYPES

LEGAL_TYPES = ("C|C", "C|D", "D|C", "D|D")
CATEGORIES = (*LEGAL_TYPES, "illegal")


def category(action_type: str) -> str:
    """The summary category of an action type: a legal type stays, any illegal own answer is "illegal"."""
    return action_type if action_type.split("|")[0] in ("C", "D") else "illegal"


def action_type_shares(types: Sequence[str]) -> dict[str, float]:
    """Share of each of the five categories among `types` (action-type strings); all 0 for no decisions."""
    n = max(len(types), 1)
    shares = {t: sum(x == t for x in types) / n for t in ACTION_TYPES}
    shares["illegal"] = shares.pop("illegal|C") + shares.pop("illegal|D")
    return shares


def tenths(episodes: int) -> list[tuple[int, int]]:
    """[lo, hi) episode bounds of the ten tenths of a run (empty tenths for runs shorter than 10 episodes)."""
    return [(k * episodes // 10, (k + 1) * episodes // 10) for k in range(10)]


def tenth_size(episodes: int) -> int:
    """Episodes in the "first/last 10%" windows (at least one)."""
    return max(episodes // 10, 1)


def mean_reward(rows: Iterable[Mapping]) -> float | None:
    rewards = [float(r["reward"]) for r in rows]
    return float(np.mean(rewards)) if rewards else None


def in_episodes(rows: Iterable[Mapping], lo: int, hi: int) -> list[Mapping]:
    return [r for r in rows if lo <= int(r["episode"]) < hi]


def summarise(rows: Sequence[Mapping], episodes: int) -> dict:
    """The agent's action-type shares in the first and last 10% of a run's episodes and per tenth, and its mean
    rewards; `rows` are games.csv rows of one learner."""
    tenth = tenth_size(episodes)
    by_tenth = []
    for lo, hi in tenths(episodes):
        part = in_episodes(rows, lo, hi)
        by_tenth.append({"episodes": [lo, hi], **action_type_shares([r["action_type"] for r in part]),
                         "mean_reward": mean_reward(part)})
    first, last = in_episodes(rows, 0, tenth), in_episodes(rows, episodes - tenth, episodes)
    return {"episodes": episodes, "decisions": len(rows),
            "first_10pct": action_type_shares([r["action_type"] for r in first]),
            "last_10pct": action_type_shares([r["action_type"] for r in last]), "by_tenth": by_tenth,
            "mean_reward_first_10pct": mean_reward(first), "mean_reward_last_10pct": mean_reward(last)}


class RunningShares:
    """Action-type shares and mean reward over the last `window` episodes (progress bar and trackers)."""

    def __init__(self, window: int = 20):
        self.window = window
        self.types: list[list[str]] = []
        self.last: dict[str, float] = {}
        """The shares of the window and the last episode's mean reward ("reward")."""

    def add(self, types: list[str], rewards: list[float]) -> dict[str, float]:
        """Add one episode's decisions; returns (and keeps as `last`) the window's shares and the episode's mean
        reward."""
        self.types.append(types)
        del self.types[:-self.window]
        self.last = action_type_shares([t for episode in self.types for t in episode])
        self.last["reward"] = sum(rewards) / max(len(rewards), 1)
        return self.last


def shares_line(shares: Mapping[str, float]) -> dict[str, str]:
    """The progress bar's postfix: two-decimal shares ("ill" for illegal) and the signed mean reward ("R")."""
    out = {t: f"{shares[t]:.2f}" for t in LEGAL_TYPES}
    out["ill"] = f"{shares['illegal']:.2f}"
    out["R"] = f"{shares['reward']:+.2f}"
    return out


def format_summary(summary: Mapping) -> str:
    """The first- and last-10% table the training command prints at the end."""
    cols = (*LEGAL_TYPES, "illegal")
    lines = [f"{'episodes':>16} " + " ".join(f"{c:>8}" for c in cols)]
    for label, key in (("first 10%", "first_10pct"), ("last 10%", "last_10pct")):
        lines.append(f"{label:>16} " + " ".join(f"{summary[key][c]:8.1%}" for c in cols))
    return "\n".join(lines)
