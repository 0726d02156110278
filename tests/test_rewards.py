"""Rewards exhaustively (every joint action x previous opponent move, each reward) and reward schedules."""

import itertools

import pytest

from games import GAMES
from moral.rewards import REWARDS, Phase, RewardSettings, moral_reward, parse_schedule, reward_range

# Hand-written IPD table (paper Table 1 with smallerR payoffs, xi = 3, R_illegal = -6):
# (own, opp, opp_prev) -> (game, deont, util, game+deont)
IPD_EXPECTED = {
    ("C", "C", "C"): (3, 0, 6, 3), ("C", "C", "D"): (3, 0, 6, 3),
    ("C", "D", "C"): (0, 0, 4, 0), ("C", "D", "D"): (0, 0, 4, 0),
    ("D", "C", "C"): (4, -3, 4, 1), ("D", "C", "D"): (4, 0, 4, 4),
    ("D", "D", "C"): (1, -3, 2, -2), ("D", "D", "D"): (1, 0, 2, 1),
}


@pytest.mark.parametrize("own, opp, prev", list(IPD_EXPECTED))
def test_ipd_rewards_by_hand(own, opp, prev):
    got = tuple(moral_reward(kind, GAMES["IPD"], own, opp, prev) for kind in REWARDS)
    assert got == IPD_EXPECTED[own, opp, prev]


@pytest.mark.parametrize("kind", REWARDS)
def test_illegal_answer_gets_r_illegal(kind):
    for opp, prev in itertools.product("CD", "CD"):
        assert moral_reward(kind, GAMES["IPD"], None, opp, prev) == -6.0
        assert moral_reward(kind, GAMES["IPD"], None, opp, prev, RewardSettings(illegal=-15.0)) == -15.0


@pytest.mark.parametrize("game", ["ISH", "ICN", "BOS", "ICD"])
def test_every_game_uses_its_own_matrix(game):
    g = GAMES[game]
    for own, opp, prev in itertools.product("CD", "CD", "CD"):
        mine, theirs = g.payoff(own, opp)
        punish = -3.0 if (own == "D" and prev == "C") else 0.0
        assert moral_reward("game", g, own, opp, prev) == mine
        assert moral_reward("util", g, own, opp, prev) == mine + theirs
        assert moral_reward("deont", g, own, opp, prev) == punish
        assert moral_reward("game+deont", g, own, opp, prev) == mine + punish


def test_xi_is_configurable_and_ranges():
    assert moral_reward("deont", GAMES["IPD"], "D", "C", "C", RewardSettings(xi=4.0)) == -4.0
    assert reward_range("util", GAMES["IPD"]) == (-6.0, 6.0)
    assert reward_range("deont", GAMES["IPD"]) == (-6.0, 0.0)
    with pytest.raises(ValueError, match="unknown reward 'kant'"):
        moral_reward("kant", GAMES["IPD"], "C", "C", "C")


def test_schedules():
    assert parse_schedule("deont", 300) == [Phase("deont", 300)]
    assert parse_schedule("game:500,deont:500") == [Phase("game", 500), Phase("deont", 500)]
    assert parse_schedule("game:2,util:3", 5) == [Phase("game", 2), Phase("util", 3)]
    for bad, message in (("kant", "unknown reward 'kant'"), ("game:0,deont:5", "positive integer"),
                         ("game:x", "positive integer"), ("game,deont:5", "needs a count"),
                         ("game:2,deont:3", "has 5 episodes but --episodes is 4"), ("", "give one of")):
        with pytest.raises(ValueError, match=message):
            parse_schedule(bad, 4 if bad == "game:2,deont:3" else None)
