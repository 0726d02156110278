"""Fixed-strategy opponents.

The protocol is small: an opponent has a ``name``, a ``reset()`` called at the start of every episode, and
``move(agent_last, own_last, rng) -> C | D``, where ``agent_last`` is the agent's last *legal* move (the one shown in
the prompt) and ``own_last`` is the opponent's own last move. ``move`` may update internal state (Grim trigger does).
Random draws come only from the ``rng`` passed in.

The paper used TFT, AC, AD and Random (paper-spec §1.5); Grim, WSLS and Alternating are extras. When a strategy needs
a previous move that does not exist (``None``), it cooperates.
"""

from __future__ import annotations

import random
from typing import Protocol

from .matrix import C, D

LLM = "llm"  # a second learning LLM; created by the trainer, not here


def _other(action: str) -> str:
    return D if action == C else C


class Opponent(Protocol):
    name: str

    def reset(self) -> None: ...

    def move(self, agent_last: str | None, own_last: str | None, rng: random.Random) -> str: ...


class _Stateless:
    """Base for strategies without memory beyond the state they are given."""

    name = ""

    def reset(self) -> None:
        """Nothing to forget."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TitForTat(_Stateless):
    """Plays the agent's last legal move (cooperates if there is none)."""

    name = "tft"

    def move(self, agent_last, own_last, rng):
        return agent_last if agent_last in (C, D) else C


class AlwaysCooperate(_Stateless):
    name = "ac"

    def move(self, agent_last, own_last, rng):
        return C


class AlwaysDefect(_Stateless):
    name = "ad"

    def move(self, agent_last, own_last, rng):
        return D


class RandomOpponent(_Stateless):
    """Uniform over C/D, drawn with ``rng.choice([C, D])``."""

    name = "random"

    def move(self, agent_last, own_last, rng):
        return rng.choice([C, D])


class GrimTrigger:
    """Cooperates until it has seen the agent defect once, then defects for the rest of the episode.

    The agent's initial (random) last move counts: an episode that starts with the agent's "last move" = D makes
    Grim defect from the first step.
    """

    name = "grim"

    def __init__(self) -> None:
        self.triggered = False

    def reset(self) -> None:
        self.triggered = False

    def move(self, agent_last, own_last, rng):
        if agent_last == D:
            self.triggered = True
        return D if self.triggered else C

    def __repr__(self) -> str:
        return f"GrimTrigger(triggered={self.triggered})"


class WinStayLoseShift(_Stateless):
    """Pavlov: cooperate if both players made the same move last round (CC or DD), otherwise defect.

    Equivalently: after a good outcome for itself (CC: 3, DC from its view: 4) it repeats its move, after a bad one
    (CD from its view: 0, DD: 1) it switches. Cooperates if either last move is unknown.
    """

    name = "wsls"

    def move(self, agent_last, own_last, rng):
        if agent_last is None or own_last is None:
            return C
        return C if agent_last == own_last else D


class Alternating(_Stateless):
    """Plays the opposite of its own last move: C, D, C, D, ... (starts with C if it has no last move)."""

    name = "alternate"

    def move(self, agent_last, own_last, rng):
        return C if own_last is None else _other(own_last)


OPPONENTS: dict[str, type] = {
    cls.name: cls for cls in (TitForTat, AlwaysCooperate, AlwaysDefect, RandomOpponent, GrimTrigger,
                              WinStayLoseShift, Alternating)
}

OPPONENT_NAMES = (*OPPONENTS, LLM)


def make_opponent(name: str):
    """A fresh opponent by name (case-insensitive, so the reference's "TFT"/"AC"/"AD"/"Random" work too)."""
    key = name.lower()
    if key == LLM:
        raise ValueError("the 'llm' opponent is a second learning model and is created by the trainer, not by "
                         "games.make_opponent")
    try:
        return OPPONENTS[key]()
    except KeyError:
        raise ValueError(f"unknown opponent {name!r}; choose one of {', '.join(OPPONENT_NAMES)}") from None


def initial_move(opponent_name: str | None, rng: random.Random) -> str:
    """A player's random "last move" at the start of an episode (paper-spec §1.4).

    Always-cooperate starts from C, always-defect from D, everyone else (the agent: ``None``) from
    ``rng.choice([C, D])``.
    """
    key = opponent_name.lower() if opponent_name else None
    if key == AlwaysCooperate.name:
        return C
    if key == AlwaysDefect.name:
        return D
    return rng.choice([C, D])
