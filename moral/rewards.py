"""Moral rewards (paper Table 1), from the row player's (the learner's) point of view, and reward schedules.

    game        payoff_M(a_M, a_O)                                   the selfish game payoff
    deont       -xi if a_M = D and the opponent's previous move was C, else 0     (conditional reciprocity)
    util        payoff_M(a_M, a_O) + payoff_O(a_M, a_O)              the collective payoff
    game+deont  game - xi if a_M = D after an opponent's C
An illegal answer gets R_illegal whatever the reward. a_O is the opponent's current move; the Deontological norm
looks at its previous move, the one shown in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from games import C, D, Game

REWARDS = ("game", "deont", "util", "game+deont")


@dataclass(frozen=True)
class RewardSettings:
    illegal: float = -6.0
    """R_illegal, the reward of an answer that is neither action string."""
    xi: float = 3.0
    """The Deontological punishment for defecting against a cooperator (the reward is -xi)."""

    def __post_init__(self):
        if self.xi < 0:
            raise ValueError(f"xi={self.xi}: must be >= 0 (the punishment is -xi)")


def moral_reward(kind: str, game: Game, own: str | None, opp: str, opp_prev: str,
                 settings: RewardSettings = RewardSettings()) -> float:
    """Reward `kind` for the learner's action `own` (None = illegal) against the opponent's current action `opp`,
    given the opponent's previous move `opp_prev`."""
    if kind not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}; choose one of {', '.join(REWARDS)}")
    if own is None:
        return settings.illegal
    mine, theirs = game.payoff(own, opp)
    betrayal = -settings.xi if (own == D and opp_prev == C) else 0.0
    if kind == "game":
        return float(mine)
    if kind == "deont":
        return betrayal
    if kind == "util":
        return float(mine + theirs)
    return float(mine) + betrayal


def reward_range(kind: str, game: Game, settings: RewardSettings = RewardSettings()) -> tuple[float, float]:
    """(min, max) of a reward over every legal and illegal outcome of `game`."""
    values = [moral_reward(kind, game, own, opp, prev, settings)
              for own in (C, D, None) for opp in (C, D) for prev in (C, D)]
    return min(values), max(values)


@dataclass(frozen=True)
class Phase:
    reward: str
    episodes: int


def parse_schedule(text: str, episodes: int | None = None) -> list[Phase]:
    """'deont' -> one phase of `episodes`; 'game:500,deont:500' -> two phases (the unlearning experiment).

    A schedule's counts must agree with `episodes` when both are given."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"reward {text!r}: give one of {', '.join(REWARDS)} or a schedule such as game:500,deont:500")
    phases = []
    for part in text.split(","):
        name, _, count = part.strip().partition(":")
        if name not in REWARDS:
            where = f" in {text!r}" if part.strip() != text.strip() else ""
            raise ValueError(f"unknown reward {name!r}{where}; choose one of {', '.join(REWARDS)}")
        if count:
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"episode count {count!r} in {text!r} must be a positive integer")
            phases.append(Phase(name, int(count)))
        else:
            if "," in text:
                raise ValueError(f"schedule {text!r}: every phase needs a count, e.g. game:500,deont:500")
            if episodes is None:
                raise ValueError(f"reward {text!r} needs an episode count")
            phases.append(Phase(name, episodes))
    if episodes is not None and sum(p.episodes for p in phases) != episodes:
        raise ValueError(f"schedule {text!r} has {sum(p.episodes for p in phases)} episodes but --episodes is "
                         f"{episodes}")
    return phases
