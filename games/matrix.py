"""Two-player 2x2 matrix games.

A game is pure data: a name, a title and a payoff table. Actions are the strings ``"C"`` (cooperate, index 0 in the
reference code) and ``"D"`` (defect, index 1). Every cell maps ``(row action, column action)`` to
``(row payoff, column payoff)``; the learning agent is always the row player and its opponent the column player.

Adding a game is one entry in :data:`GAMES`.
"""

from __future__ import annotations

from dataclasses import dataclass

C, D = "C", "D"
ACTIONS = (C, D)

_CELLS = tuple((own, other) for own in ACTIONS for other in ACTIONS)  # CC, CD, DC, DD


@dataclass(frozen=True)
class Game:
    """A 2x2 matrix game.

    Attributes:
        name: short identifier, e.g. ``"IPD"``.
        title: human-readable name, e.g. ``"Iterated Prisoner's Dilemma"``.
        payoffs: ``(row action, column action) -> (row payoff, column payoff)`` for all four cells.
    """

    name: str
    title: str
    payoffs: dict[tuple[str, str], tuple[float, float]]

    def __post_init__(self) -> None:
        if set(self.payoffs) != set(_CELLS):
            raise ValueError(f"game {self.name!r} must define exactly the cells {_CELLS}, got {tuple(self.payoffs)}")
        for cell, value in self.payoffs.items():
            if len(value) != 2:
                raise ValueError(f"game {self.name!r}: cell {cell} must hold (row payoff, column payoff), got {value}")

    def payoff(self, own: str, other: str) -> tuple[float, float]:
        """``(own payoff, other's payoff)`` when the row player plays ``own`` and the column player ``other``."""
        try:
            return self.payoffs[(own, other)]
        except KeyError:
            raise ValueError(f"actions must be one of {ACTIONS}, got ({own!r}, {other!r})") from None

    def row_payoff(self, own: str, other: str) -> float:
        """The row player's payoff only."""
        return self.payoff(own, other)[0]

    def joint_payoff(self, own: str, other: str) -> float:
        """Sum of both players' payoffs (the Utilitarian quantity)."""
        return sum(self.payoff(own, other))

    @property
    def max_joint(self) -> float:
        """Largest joint payoff over the four cells (the Utilitarian optimum)."""
        return max(sum(value) for value in self.payoffs.values())


def _game(name: str, title: str, cc, cd, dc, dd) -> Game:
    """Build a game from its four cells in the order CC, CD (row C, column D), DC, DD."""
    return Game(name, title, dict(zip(_CELLS, (cc, cd, dc, dd))))


GAMES: dict[str, Game] = {
    game.name: game
    for game in (
        # Training matrices (paper-spec §1.1). "IPD" is the `smallerR` version used in every paper run.
        _game("IPD", "Iterated Prisoner's Dilemma", (3, 3), (0, 4), (4, 0), (1, 1)),
        _game("IPD_largerR", "Iterated Prisoner's Dilemma (larger rewards)", (120, 120), (0, 180), (180, 0), (60, 60)),
        _game("IPD_smallerRno0", "Iterated Prisoner's Dilemma (no zero payoff)", (3, 3), (1, 4), (4, 1), (2, 2)),
        # Test-time games (paper-spec §5.2).
        _game("ISH", "Iterated Stag Hunt", (4, 4), (0, 3), (3, 0), (1, 1)),
        _game("ICN", "Iterated Chicken", (2, 2), (1, 4), (4, 1), (0, 0)),
        _game("BOS", "Iterated Bach-or-Stravinsky", (3, 2), (0, 0), (0, 0), (2, 3)),
        _game("ICD", "Iterated Defective Coordination", (1, 1), (0, 0), (0, 0), (4, 4)),
        # Defined in the reference code but never evaluated; the reference gives no long name for it.
        _game("IVD", "IVD (defined in the reference code, never evaluated)", (3, 3), (1, 4), (4, 1), (0, 0)),
    )
}

#: Games evaluated at test time, in the reference order.
TEST_GAMES = ("IPD", "ISH", "ICN", "BOS", "ICD")


def get_game(name: str) -> Game:
    """Look a game up by its short name."""
    try:
        return GAMES[name]
    except KeyError:
        raise ValueError(f"unknown game {name!r}; choose one of {', '.join(GAMES)}") from None
