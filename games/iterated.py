"""One iterated game: the state shown in the prompt, one step, and the legality rules (paper-spec §1.3).

The state is memory-1: the agent's last legal move and the opponent's last move. ``None`` stands for an illegal
answer throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from .matrix import ACTIONS, Game

ILLEGAL = "illegal"
ACTION_TYPES = ("C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D")


def _check(action: str | None, who: str, allow_illegal: bool) -> None:
    if action in ACTIONS or (allow_illegal and action is None):
        return
    allowed = ACTIONS + ((None,) if allow_illegal else ())
    raise ValueError(f"{who} action must be one of {allowed}, got {action!r}")


@dataclass
class IteratedGame:
    """State of one iterated game.

    Attributes:
        game: the payoff matrix.
        agent_last: the agent's last legal move, shown as "you played" in the next prompt.
        opp_last: the opponent's last move, shown as "they played".
        opp_is_learner: True when the opponent is a second LLM; its illegal answers then also keep its last legal move
            (two-learner rule). A fixed-strategy opponent is always legal.
    """

    game: Game
    agent_last: str
    opp_last: str
    opp_is_learner: bool = False

    def __post_init__(self) -> None:
        _check(self.agent_last, "agent's last", allow_illegal=False)
        _check(self.opp_last, "opponent's last", allow_illegal=False)

    def step(self, agent_action: str | None, opp_action: str | None) -> None:
        """Advance the state after one round.

        An illegal agent answer (``None``) keeps the agent's last legal move. The opponent's last move becomes
        ``opp_action``; ``None`` is only allowed for a learning opponent and then keeps its last legal move.
        """
        _check(agent_action, "agent", allow_illegal=True)
        _check(opp_action, "opponent", allow_illegal=self.opp_is_learner)
        if agent_action is not None:
            self.agent_last = agent_action
        if opp_action is not None:
            self.opp_last = opp_action

    def payoff_of(self, agent_action: str, opp_action: str) -> tuple[float, float]:
        """(agent payoff, opponent payoff) for two legal actions."""
        _check(agent_action, "agent", allow_illegal=False)
        _check(opp_action, "opponent", allow_illegal=False)
        return self.game.payoff(agent_action, opp_action)

    def opponent_view(self) -> tuple[str, str]:
        """(own last, other's last) from the opponent's side, for a second learner's prompt."""
        return self.opp_last, self.agent_last


def action_type(own_action: str | None, opp_prev: str) -> str:
    """"own action|opponent's previous move", e.g. "D|C" = defecting against a cooperator; ``None`` -> "illegal"."""
    _check(own_action, "own", allow_illegal=True)
    _check(opp_prev, "opponent's previous", allow_illegal=False)
    return f"{ILLEGAL if own_action is None else own_action}|{opp_prev}"
