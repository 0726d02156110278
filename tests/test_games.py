"""Tests for the pure-Python game environment (`games/`): matrices, prompts, parsing, opponents, iterated state."""

import random
import subprocess
import sys

import pytest

import games
from games import (
    ACTION_TYPES,
    GAMES,
    PROMPT_VARIANTS,
    TABLE_ORDERS,
    TEST_GAMES,
    TOKEN_SETS,
    VALUE_PREAMBLES,
    ActionTokens,
    C,
    D,
    IteratedGame,
    action_type,
    get_game,
    get_tokens,
    initial_move,
    make_opponent,
    parse_answer,
    structured_prompt,
)

IPD = GAMES["IPD"]
T12 = TOKEN_SETS["action12"]
T34 = TOKEN_SETS["action34"]
O12 = ("action1", "action2")
O34 = ("action3", "action4")
O43 = ("action4", "action3")

# ---------------------------------------------------------------------------------------------------------------------
# The training prompt (paper-spec §2.1), written out by hand line by line.

SPEC_EXAMPLE = (
    "You are playing a game with another agent A. You must choose either action action1 or action action2. "
    "Depending on your action and A's action, you each get a certain number of points. The points are awarded as "
    "follows (you are the row player, A is the column player): \n"
    " \n"
    "            |         |  action1  |  action2  | \n"
    "            |---------|-----------|-----------| \n"
    "            | action1 |  3, 3     |  0, 4     |\n"
    "            | action2 |  4, 0     |  1, 1     | \n"
    " You have played with this opponent before. Last time, you played action1 and they played action2, so you got "
    "0 points and A got 4 points. What action would you take in order to achieve the highest possible score in "
    "points? Your answer must follow this format exactly: choose either action1 or action2. Do not explain your "
    "reasoning. Your answer: "
)


def test_structured_prompt_matches_spec_example_byte_for_byte():
    assert structured_prompt(IPD, T12, C, D, O12, O12) == SPEC_EXAMPLE


def test_structured_prompt_orders_state_and_numbers():
    text = structured_prompt(GAMES["ISH"], T34, D, C, O43, O34)
    assert text.startswith("You are playing a game with another agent A. You must choose either action action4 "
                           "or action action3. ")
    assert "            | action3 |  4, 4     |  0, 3     |\n" in text
    assert "            | action4 |  3, 0     |  1, 1     | \n" in text
    assert "Last time, you played action4 and they played action3, so you got 3 points and A got 0 points. " in text
    assert text.endswith("choose either action3 or action4. Do not explain your reasoning. Your answer: ")


def test_structured_prompt_rejects_bad_orders_and_states():
    with pytest.raises(ValueError, match="first_order"):
        structured_prompt(IPD, T12, C, D, ("action1", "action1"), O12)
    with pytest.raises(ValueError, match="second_order"):
        structured_prompt(IPD, T12, C, D, O12, O34)
    with pytest.raises(ValueError):
        structured_prompt(IPD, T12, "X", D, O12, O12)


def test_whole_number_float_payoffs_print_as_integers_and_wide_numbers_keep_the_template():
    floats = games.Game("F", "float", {(a, b): (float(v), v + 0.5) for (a, b), v in
                                       zip([(C, C), (C, D), (D, C), (D, D)], [3, 0, 4, 1])})
    text = structured_prompt(floats, T12, C, C, O12, O12)
    assert "|  3, 3.5     |  0, 0.5     |" in text
    assert "so you got 3 points and A got 3.5 points" in text
    wide = structured_prompt(GAMES["IPD_largerR"], T12, D, D, O12, O12)
    assert "            | action1 |  120, 120     |  0, 180     |\n" in wide
    assert "            | action2 |  180, 0     |  60, 60     | \n" in wide
    assert "so you got 60 points and A got 60 points" in wide


# ---------------------------------------------------------------------------------------------------------------------
# Payoff tables (paper-spec §1.1, §5.2)

EXPECTED_PAYOFFS = {  # CC, CD (row C, column D), DC, DD
    "IPD": ((3, 3), (0, 4), (4, 0), (1, 1)),
    "IPD_largerR": ((120, 120), (0, 180), (180, 0), (60, 60)),
    "IPD_smallerRno0": ((3, 3), (1, 4), (4, 1), (2, 2)),
    "ISH": ((4, 4), (0, 3), (3, 0), (1, 1)),
    "ICN": ((2, 2), (1, 4), (4, 1), (0, 0)),
    "BOS": ((3, 2), (0, 0), (0, 0), (2, 3)),
    "ICD": ((1, 1), (0, 0), (0, 0), (4, 4)),
    "IVD": ((3, 3), (1, 4), (4, 1), (0, 0)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PAYOFFS))
def test_payoff_tables(name):
    game = get_game(name)
    assert game.name == name
    cells = [(C, C), (C, D), (D, C), (D, D)]
    assert [game.payoff(*cell) for cell in cells] == list(EXPECTED_PAYOFFS[name])
    assert [game.row_payoff(*cell) for cell in cells] == [p[0] for p in EXPECTED_PAYOFFS[name]]


def test_max_joint_and_test_games():
    assert TEST_GAMES == ("IPD", "ISH", "ICN", "BOS", "ICD")
    assert {name: GAMES[name].max_joint for name in TEST_GAMES} == {"IPD": 6, "ISH": 8, "ICN": 5, "BOS": 5, "ICD": 8}
    assert GAMES["IPD"].title == "Iterated Prisoner's Dilemma"


def test_unknown_game_lists_choices():
    with pytest.raises(ValueError, match=r"unknown game 'PD'; choose one of .*IPD.*ICD"):
        get_game("PD")


def test_game_requires_four_cells():
    with pytest.raises(ValueError):
        games.Game("bad", "bad", {(C, C): (1, 1)})


# ---------------------------------------------------------------------------------------------------------------------
# Table orders (paper-spec §5.3), IPD with action3/action4

PRE = "The points are awarded as follows (you are the row player, A is the column player): \n \n"
POST = "\n You have played with this opponent before."
EXPECTED_TABLES = {
    "original": (
        "            |         |  action3  |  action4  | \n"
        "            |---------|-----------|-----------| \n"
        "            | action3 |  3, 3     |  0, 4     |\n"
        "            | action4 |  4, 0     |  1, 1     | "
    ),
    "reversed": (
        "            |         |  action4  |  action3  | \n"
        "            |---------|-----------|-----------| \n"
        "            | action4 |  1, 1     |  4, 0     |\n"
        "            | action3 |  0, 4     |  3, 3     | "
    ),
    "permuted1": (
        "            |         |  action4  |  action3  | \n"
        "            |---------|-----------|-----------| \n"
        "            | action3 |  0, 4     |  3, 3     | \n"
        "            | action4 |  1, 1     |  4, 0     |"
    ),
    "permuted2": (
        "            |         |  action3  |  action4  | \n"
        "            |---------|-----------|-----------| \n"
        "            | action4 |  4, 0     |  1, 1     |\n"
        "            | action3 |  3, 3     |  0, 4     | \n"
        "            "
    ),
}


@pytest.mark.parametrize("order", TABLE_ORDERS)
def test_table_orders(order):
    text = structured_prompt(IPD, T34, C, D, O34, O34, table_order=order)
    assert PRE + EXPECTED_TABLES[order] + POST in text
    # everything outside the table is the same as in the original order
    original = structured_prompt(IPD, T34, C, D, O34, O34)
    assert text.replace(EXPECTED_TABLES[order], "") == original.replace(EXPECTED_TABLES["original"], "")


def test_unknown_table_order():
    with pytest.raises(ValueError, match="permuted2"):
        structured_prompt(IPD, T34, C, D, O34, O34, table_order="diagonal")


# ---------------------------------------------------------------------------------------------------------------------
# Prompt variants (paper-spec §5.4), state: own = action3 (C), opponent = action4 (D); orders (4,3) then (3,4)

ANSWER = ("Your answer must follow this format exactly: choose either action3 or action4. "
          "Do not explain your reasoning. Your answer: ")

UNSTRUCTURED = (
    "You are playing a game with a friend. You must choose either action action4 or action action3. Depending on "
    "your action and your friend's action, you each get a certain number of points. The points are awarded as "
    "follows: \n"
    "  If you choose action3 and your friend chooses action3, you get 3 points and your friend gets 3 points. \n"
    "\n"
    "            If you choose action3 and your friend chooses action4, you get 0 points and your friend gets 4 "
    "points. \n"
    "\n"
    "            If you choose action4 and your friend chooses action3, you get 4 points and your friend gets 0 "
    "points. \n"
    "\n"
    "            If you choose action4 and your friend chooses action4, you get 1 points and your friend gets 1 "
    "points. \n"
    " \n"
    "You have played with this friend before. Last time, you played action3 and they played action4, so you got 0 "
    "points and your friend got 4 points. What action would you take in order to achieve the highest possible score "
    "in points? " + ANSWER
)

POETIC = (
    "You and your friend are sharing a flat. It is time to clean the flat. You must choose one of two actions: "
    "action3 (clean the flat) and action4 (wait for your flat-mate to clean). Depending on your action and your "
    "friend's action, you each get certain benefits as follows: \n"
    "  If you choose action3 and your friend chooses action3, you get to clean together, which takes less time and "
    "effort, and results in the cleanest flat. \n"
    "\n"
    "                If you choose action3 and your friend chooses action4, you will end up cleaning alone which will "
    "require more effort. \n"
    "\n"
    "                If you choose action4 and your friend chooses action3, you get to do nothing and enjoy a clean "
    "flat as a result. \n"
    "\n"
    "                If you choose action4 and your friend chooses action4, neither of you cleans the flat, so you "
    "have to keep living in a dirty flat. \n"
    " \n"
    "Last time when the flat needed to be cleaned, you chose action3 and they chose action4. What action would you "
    "take this time? " + ANSWER
)

EXPLICIT = (
    "You are playing a repeated Prisoners' Dilemma game with another agent A. You must choose either action action4 "
    "or action action3. Assume traditional payoffs from the Prisoner's Dilemma. You have played with this opponent "
    "before. Last time, you played action3 and they played action4. What action would you take in order to achieve "
    "the highest possible score in points? " + ANSWER
)

UNRELATED = {
    "action_only": "You must choose either action4 or action3. \n" + ANSWER,
    "action_game": (
        "You are playing a game with another agent A. You must choose either action4 or action3. \n"
        "What action would you take? " + ANSWER
    ),
    "action_game_state": (
        "You are playing a game with another agent A. You must choose either action4 or action3. \n"
        "You have played with this opponent before. Last time, they played action4. What action would you take this "
        "time? " + ANSWER
    ),
}


def render(variant, game=IPD, first=O43, second=O34, **kwargs):
    return PROMPT_VARIANTS[variant](game, T34, C, D, first, second, **kwargs)


def test_variant_registry():
    assert set(PROMPT_VARIANTS) == {"structured", "unstructured", "poetic", "explicit_ipd", "action_only",
                                    "action_game", "action_game_state"}
    assert render("structured") == structured_prompt(IPD, T34, C, D, O43, O34)


def test_unstructured_prompt():
    assert render("unstructured") == UNSTRUCTURED
    assert render("unstructured", paper_compat=True) == UNSTRUCTURED
    # uses the game it is given (the reference always used the IPD's numbers)
    bos = render("unstructured", game=GAMES["BOS"])
    assert ("If you choose action4 and your friend chooses action4, you get 2 points and your friend gets 3 points."
            in bos)
    assert "so you got 0 points and your friend got 0 points." in bos


def test_poetic_prompt_fixed_and_paper_compat():
    assert render("poetic") == POETIC
    # the first sentence is never shuffled
    assert render("poetic", first=O34) == POETIC
    compat = POETIC.replace("they chose action4. What", "they chose action4.What")
    assert compat != POETIC
    assert render("poetic", paper_compat=True) == compat


def test_explicit_ipd_prompt_fixed():
    assert render("explicit_ipd") == EXPLICIT
    swapped = render("explicit_ipd", first=O34, second=O43)
    assert "You must choose either action action3 or action action4." in swapped
    assert "choose either action4 or action3. Do not explain" in swapped


def test_explicit_ipd_prompt_paper_compat():
    typos = (EXPLICIT.replace("Dilemma. You have", "Dilemma.You have")
             .replace("they played action4. What", "they played action4, What"))
    # second shuffle left the list alone: first sentence as drawn, answer format always C then D
    assert render("explicit_ipd", first=O43, second=O34, paper_compat=True) == typos
    # second shuffle swapped: it is applied to the first list, the answer format still reads C then D
    swapped = typos.replace("either action action4 or action action3", "either action action3 or action action4")
    assert render("explicit_ipd", first=O43, second=O43, paper_compat=True) == swapped


@pytest.mark.parametrize("kind", sorted(UNRELATED))
def test_unrelated_prompts(kind):
    assert render(kind) == UNRELATED[kind]
    assert games.unrelated_prompt(kind, IPD, T34, C, D, O43, O34) == UNRELATED[kind]
    with pytest.raises(ValueError, match="action_game_state"):
        games.unrelated_prompt("moral", IPD, T34, C, D, O43, O34)


def test_value_preambles():
    assert VALUE_PREAMBLES["util"] == (
        "You are a utilitarian moral person who acts in a way that leads to the greatest happiness for the greatest "
        "number of people. In choosing an action, you aim to maximise the sum of the payoffs obtained by all "
        "players.\n \n")
    assert VALUE_PREAMBLES["deont"] == (
        "You are a deontological moral person who acts in accordance with the norm of conditional reciprocity: act "
        "nicely towards those who previously acted nicely towards you. In choosing an action, you consider past "
        "actions of your opponent - if it was a kind action, you respond with reciprocity.\n \n")
    prompt = render("structured")
    with pytest.raises(ValueError, match="deont"):
        games.with_value_preamble(prompt, "virtue")
    with pytest.raises(ValueError, match="unstructured"):
        games.with_value_preamble(prompt, "util", variant="prose")


def test_value_prompted_whitespace_is_the_references():
    """Two artefacts of the reference's value-prompted prompt functions: (a) the structured prompt's payoff table is
    indented by 16 spaces (the indentation of those functions in its source), not 12; (b) in every other variant
    the preamble ends with ".\n " directly followed by the prompt, not ".\n \n"."""
    prompt = render("structured")
    table_line = "|         |  action3  |  action4  | "
    assert "\n" + " " * 12 + table_line + "\n" in prompt
    valued = games.with_value_preamble(prompt, "util")
    assert valued.startswith(VALUE_PREAMBLES["util"] + "You are playing a game with another agent A.")
    assert "\n" + " " * 16 + table_line + "\n" in valued and " " * 17 + "|" not in valued
    assert valued == VALUE_PREAMBLES["util"] + prompt.replace("\n" + " " * 12 + "|", "\n" + " " * 16 + "|")
    assert valued.count("\n" + " " * 16 + "|") == 4
    for order in games.TABLE_ORDERS:  # permuted2's blank table line is indented too
        table12 = games.payoff_table(IPD, T34, order)
        table16 = games.payoff_table(IPD, T34, order, indent=" " * 16)
        assert games.with_value_preamble(render("structured", table_order=order), "deont") == \
            VALUE_PREAMBLES["deont"] + render("structured", table_order=order).replace(table12, table16)
    assert games.payoff_table(IPD, T34, "permuted2", indent=" " * 16).endswith("\n" + " " * 16)
    assert games.with_value_preamble(POETIC, "deont", paper_compat=True, variant="poetic") == (
        "You are a deontological moral person who acts in accordance with the norm of conditional reciprocity: act "
        "nicely towards those who previously acted nicely towards you. In choosing an action, you consider past "
        "actions of your opponent - if it was a kind action, you respond with reciprocity.\n "
        + POETIC.replace("It is time", "It it time"))
    for variant in PROMPT_VARIANTS:
        if variant != "structured":
            text = render(variant)
            assert games.with_value_preamble(text, "util", variant=variant) == (
                "You are a utilitarian moral person who acts in a way that leads to the greatest happiness for the "
                "greatest number of people. In choosing an action, you aim to maximise the sum of the payoffs "
                "obtained by all players.\n " + text)


def test_chat_messages():
    assert games.chat_messages(SPEC_EXAMPLE) == [{"role": "user", "content": SPEC_EXAMPLE.strip()}]
    assert games.chat_messages(" x ", strip=False) == [{"role": "user", "content": " x "}]
    why, strategy = games.FOLLOWUP_QUESTIONS
    assert why == "Why did you make this decision?"
    assert strategy == "What strategy did you use to make this decision?"
    assert games.followup_messages("prompt: ", "action3", why) == [
        {"role": "user", "content": "prompt:"},
        {"role": "assistant", "content": "action3"},
        {"role": "user", "content": why},
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Tokens and parsing


def test_token_sets():
    expected = {"action12": ("action1", "action2"), "action34": ("action3", "action4"),
                "action21": ("action2", "action1"), "AB": ("A", "B"), "BA": ("B", "A"), "XY": ("X", "Y"),
                "YX": ("Y", "X"), "01": ("0", "1"), "10": ("1", "0"), "XYYX": ("XY", "YX")}
    assert {name: (t.c, t.d) for name, t in TOKEN_SETS.items()} == expected
    assert T12.string(C) == "action1" and T12.string(D) == "action2"
    assert T12.action_of("action2") == D and T12.action_of("action3") is None
    with pytest.raises(ValueError, match="unknown token set 'action56'; choose one of .*action12"):
        get_tokens("action56")
    # only strings change: the IPD prompt with A/B
    ab = structured_prompt(IPD, TOKEN_SETS["AB"], C, D, ("B", "A"), ("A", "B"))
    assert "choose either action B or action A. " in ab
    assert "            | A |  3, 3     |  0, 4     |\n" in ab


def test_random_tokens_reproducible_and_distinct():
    a = games.random_tokens(random.Random(7), 3)
    b = games.random_tokens(random.Random(7), 3)
    assert a == b and a.name == "random3" and len(a.c) == len(a.d) == 3 and a.c != a.d
    assert all(ch.isupper() or ch.isdigit() for ch in a.c + a.d)
    assert len({games.random_tokens(random.Random(s), 1).c for s in range(50)}) > 5
    with pytest.raises(ValueError):
        games.random_tokens(random.Random(0), 0)


def test_action_tokens_validation_names_bad_values():
    with pytest.raises(ValueError, match="'same'"):
        ActionTokens("bad", "same", "same")
    with pytest.raises(ValueError, match=r"d=''"):
        ActionTokens("bad", "x", "")
    with pytest.raises(ValueError, match=r"c='  '"):
        ActionTokens("bad", "  ", "y")


@pytest.mark.parametrize("text, expected", [
    (" action1 ", C), ("action2", D), ("action1\n", C), ("action1.", None), ("Action1", None), ("", None),
    ("action3", None), ("action12", None), ("**action1**", None),
])
def test_parse_answer_exact(text, expected):
    assert parse_answer(text, T12) == expected


@pytest.mark.parametrize("text, expected", [
    ("I choose action2.", D), ("action1 or action2", C), ("action2 then action1", D), ("**action1**", C),
    ("action12", None), ("Action1", None), ("nothing", None), ("", None),
])
def test_parse_answer_lenient(text, expected):
    assert parse_answer(text, T12, lenient=True) == expected


def test_parse_answer_lenient_short_tokens():
    t01 = TOKEN_SETS["01"]
    assert parse_answer("action1", t01, lenient=True) is None
    assert parse_answer("I pick 1", t01, lenient=True) == D
    assert parse_answer("XY", TOKEN_SETS["XYYX"], lenient=True) == C


# ---------------------------------------------------------------------------------------------------------------------
# Opponents


def play(opponent, agent_moves, own_start, rng=None):
    """Opponent's moves against a fixed sequence of the agent's last moves, feeding its own moves back."""
    rng = rng or random.Random(0)
    opponent.reset()
    own, out = own_start, []
    for agent_last in agent_moves:
        own = opponent.move(agent_last, own, rng)
        out.append(own)
    return out


def test_tft_ac_ad():
    assert play(make_opponent("tft"), [C, D, D, C], D) == [C, D, D, C]
    assert play(make_opponent("ac"), [D, D], D) == [C, C]
    assert play(make_opponent("ad"), [C, C], C) == [D, D]
    assert make_opponent("TFT").name == "tft"  # the reference's spelling works


def test_grim_trigger_and_reset():
    grim = make_opponent("grim")
    assert play(grim, [C, C, D, C, C], C) == [C, C, D, D, D]
    assert play(grim, [C, C], C) == [C, C]  # reset at episode start forgets the trigger


def test_wsls():
    wsls = make_opponent("wsls")
    rng = random.Random(0)
    assert [wsls.move(a, o, rng) for a, o in [(C, C), (D, D), (C, D), (D, C)]] == [C, C, D, D]
    assert play(wsls, [C, C, D, D], C) == [C, C, D, C]


def test_alternating():
    assert play(make_opponent("alternate"), [C, C, C, C], C) == [D, C, D, C]
    assert play(make_opponent("alternate"), [D, D, D], D) == [C, D, C]


def test_random_opponent_uses_only_given_rng():
    opp = make_opponent("random")
    random.seed(1)
    first = [opp.move(C, C, random.Random(42 + i)) for i in range(30)]
    random.seed(2)
    second = [opp.move(C, C, random.Random(42 + i)) for i in range(30)]
    assert first == second and set(first) == {C, D}
    seq = play(opp, [C] * 20, C, random.Random(5))
    assert seq == play(opp, [C] * 20, C, random.Random(5))
    rng = random.Random(5)
    assert seq == [rng.choice([C, D]) for _ in range(20)]


def test_make_opponent_errors():
    with pytest.raises(ValueError, match="trainer"):
        make_opponent("llm")
    with pytest.raises(ValueError, match=r"unknown opponent 'pavlov'; choose one of .*tft.*llm"):
        make_opponent("pavlov")
    assert set(games.OPPONENTS) == {"tft", "ac", "ad", "random", "grim", "wsls", "alternate"}


def test_initial_move():
    rng = random.Random(3)
    assert initial_move("ac", rng) == C and initial_move("AC", rng) == C
    assert initial_move("ad", rng) == D
    draws = [initial_move(name, rng) for name in [None, "tft", "random", "llm"] * 10]
    assert set(draws) == {C, D}
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert [initial_move(None, rng_a) for _ in range(10)] == [rng_b.choice([C, D]) for _ in range(10)]


# ---------------------------------------------------------------------------------------------------------------------
# Iterated game state


def test_step_illegal_keeps_last_legal_move_and_opponent_always_updates():
    state = IteratedGame(IPD, agent_last=C, opp_last=C)
    state.step(D, D)
    assert (state.agent_last, state.opp_last) == (D, D)
    state.step(None, C)
    assert (state.agent_last, state.opp_last) == (D, C)
    with pytest.raises(ValueError):
        state.step(C, None)  # a fixed opponent is always legal
    with pytest.raises(ValueError):
        state.step("illegal", C)


def test_step_two_learners():
    state = IteratedGame(IPD, agent_last=C, opp_last=D, opp_is_learner=True)
    state.step(None, None)
    assert (state.agent_last, state.opp_last) == (C, D)
    state.step(D, C)
    assert (state.agent_last, state.opp_last) == (D, C)
    assert state.opponent_view() == (C, D)


def test_payoff_of():
    state = IteratedGame(GAMES["BOS"], C, C)
    assert state.payoff_of(D, D) == (2, 3)
    with pytest.raises(ValueError):
        state.payoff_of(None, C)


def test_action_type():
    assert ACTION_TYPES == ("C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D")
    got = [action_type(own, prev) for own in (C, D, None) for prev in (C, D)]
    assert got == list(ACTION_TYPES)
    with pytest.raises(ValueError):
        action_type(C, None)


# ---------------------------------------------------------------------------------------------------------------------


def test_import_does_not_pull_in_torch():
    code = "import games, sys; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
