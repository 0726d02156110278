"""The paper's prompts, action-token sets and answer parsing.

Everything a prompt needs is passed in: the game (numbers), the action tokens (strings), the state (both players'
last moves, as ``C``/``D``) and the two option orders the caller drew (``first_order`` is shown in the first sentence,
``second_order`` in the answer-format sentence). Nothing here draws random numbers except :func:`random_tokens`.

Whitespace is part of the prompt: the texts reproduce the reference code's renderings byte for byte
(paper-spec §2.1, §5.3, §5.4), including trailing spaces and the indentation the reference picked up from its source
code. The reference's textual typos are fixed by default; ``paper_compat=True`` reproduces them (paper-spec §8.13).

Payoff-table cells: the reference renders a cell as the fixed template ``"  {row}, {column}     "`` (two spaces
before, five after). We keep that template for every game, so wider numbers (e.g. ``120, 180`` in ``IPD_largerR``)
simply make the cell wider and the columns no longer line up. This is what the reference rendered for its ``largerR``
matrix, and it keeps "other games only change the numbers" literally true; column alignment also already breaks for
token sets whose strings are not 7 characters long, exactly as in the reference.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable

from .matrix import ACTIONS, C, D, Game

# --------------------------------------------------------------------------------------------------------------------
# Action tokens


@dataclass(frozen=True)
class ActionTokens:
    """The two strings the model must answer with: ``c`` means cooperate, ``d`` means defect."""

    name: str
    c: str
    d: str

    def __post_init__(self) -> None:
        for label, value in (("c", self.c), ("d", self.d)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"token set {self.name!r}: action string {label}={value!r} must be non-empty")
            if value != value.strip():
                raise ValueError(
                    f"token set {self.name!r}: action string {label}={value!r} must not start or end with whitespace"
                )
        if self.c == self.d:
            raise ValueError(f"token set {self.name!r}: action strings must differ, got c={self.c!r} and d={self.d!r}")

    def string(self, action: str) -> str:
        """The string shown for action ``C`` or ``D``."""
        if action == C:
            return self.c
        if action == D:
            return self.d
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")

    def action_of(self, text: str) -> str | None:
        """``C``/``D`` if ``text`` is exactly one of the two strings, else ``None``."""
        return {self.c: C, self.d: D}.get(text)


TOKEN_SETS: dict[str, ActionTokens] = {
    name: ActionTokens(name, c, d)
    for name, c, d in (
        ("action12", "action1", "action2"),  # training (paper)
        ("action34", "action3", "action4"),  # test (paper)
        ("action21", "action2", "action1"),  # meanings swapped
        ("AB", "A", "B"),
        ("BA", "B", "A"),
        ("XY", "X", "Y"),
        ("YX", "Y", "X"),
        ("01", "0", "1"),
        ("10", "1", "0"),
        ("XYYX", "XY", "YX"),
    )
}

_RANDOM_ALPHABET = string.ascii_uppercase + string.digits


def random_tokens(rng: random.Random, length: int) -> ActionTokens:
    """Two distinct random strings of ``length`` uppercase letters/digits, drawn from ``rng`` (C first, then D)."""
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")

    def draw() -> str:
        return "".join(rng.choice(_RANDOM_ALPHABET) for _ in range(length))

    c = draw()
    d = draw()
    while d == c:
        d = draw()
    return ActionTokens(f"random{length}", c, d)


def get_tokens(name: str) -> ActionTokens:
    """Look a token set up by name, or build one from "C_STRING,D_STRING" (e.g. "yes,no")."""
    if name in TOKEN_SETS:
        return TOKEN_SETS[name]
    if isinstance(name, str) and name.count(",") == 1:
        c, d = name.split(",")
        return ActionTokens(name, c, d)
    raise ValueError(f"unknown token set {name!r}; choose one of {', '.join(TOKEN_SETS)}, or give two strings "
                     f"as C,D")


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces


def _num(value: float) -> str:
    """Payoffs as the reference printed its integers: ``3`` not ``3.0``; non-whole numbers as Python prints them."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _order(order, tokens: ActionTokens, what: str) -> tuple[str, str]:
    """Check that ``order`` is a permutation of the two action strings and return it as a tuple."""
    pair = tuple(order)
    if len(pair) != 2 or set(pair) != {tokens.c, tokens.d}:
        raise ValueError(f"{what} must be an ordering of ({tokens.c!r}, {tokens.d!r}), got {order!r}")
    return pair


def _answer_format(second: tuple[str, str]) -> str:
    """Sentences 6 and 7 of every prompt."""
    return (
        f"Your answer must follow this format exactly: choose either {second[0]} or {second[1]}. "
        "Do not explain your reasoning. Your answer: "
    )


# --------------------------------------------------------------------------------------------------------------------
# The structured (training) prompt and its payoff-table orders


@dataclass(frozen=True)
class _TableLayout:
    """Presentation of the payoff table: which action labels the columns/rows, and each row's trailing text."""

    columns: tuple[str, str]
    rows: tuple[str, str]
    row_ends: tuple[str, str]  # text after the last "|" of each row (the reference's stray trailing spaces)
    extra_blank_line: bool = False  # permuted2 ends with an extra line holding only the indentation


TABLE_ORDERS = ("original", "reversed", "permuted1", "permuted2")

_TABLE_LAYOUTS = {  # paper-spec §5.3
    "original": _TableLayout(columns=(C, D), rows=(C, D), row_ends=("", " ")),
    "reversed": _TableLayout(columns=(D, C), rows=(D, C), row_ends=("", " ")),
    "permuted1": _TableLayout(columns=(D, C), rows=(C, D), row_ends=(" ", "")),
    "permuted2": _TableLayout(columns=(C, D), rows=(D, C), row_ends=("", " "), extra_blank_line=True),
}

_TABLE_INDENT = " " * 12


def payoff_table(game: Game, tokens: ActionTokens, table_order: str = "original", indent: str = _TABLE_INDENT) -> str:
    """The markdown-like payoff table of the structured prompt (no newline before the first or after the last line),
    every line indented by `indent` (the reference's source indentation: 12 spaces, 16 in value-prompted prompts)."""
    try:
        layout = _TABLE_LAYOUTS[table_order]
    except KeyError:
        raise ValueError(f"unknown table order {table_order!r}; choose one of {', '.join(TABLE_ORDERS)}") from None
    col = [tokens.string(a) for a in layout.columns]
    lines = [f"|         |  {col[0]}  |  {col[1]}  | ", "|---------|-----------|-----------| "]
    for row, end in zip(layout.rows, layout.row_ends):
        cells = "|".join(
            "  {}, {}     ".format(*map(_num, game.payoff(row, column))) for column in layout.columns
        )
        lines.append(f"| {tokens.string(row)} |{cells}|{end}")
    if layout.extra_blank_line:
        lines.append("")
    return "\n".join(indent + line for line in lines)


def structured_prompt(
    game: Game,
    tokens: ActionTokens,
    own_last: str,
    opp_last: str,
    first_order,
    second_order,
    table_order: str = "original",
    paper_compat: bool = False,
) -> str:
    """The training prompt (paper-spec §2.1); ``table_order`` selects a §5.3 table presentation.

    ``paper_compat`` is accepted for a uniform signature; this prompt has no typos to reproduce.
    """
    first = _order(first_order, tokens, "first_order")
    second = _order(second_order, tokens, "second_order")
    own_payoff, opp_payoff = game.payoff(own_last, opp_last)
    return (
        f"You are playing a game with another agent A. You must choose either action {first[0]} or action {first[1]}. "
        "Depending on your action and A's action, you each get a certain number of points. "
        "The points are awarded as follows (you are the row player, A is the column player): \n \n"
        + payoff_table(game, tokens, table_order)
        + "\n "
        + "You have played with this opponent before. "
        f"Last time, you played {tokens.string(own_last)} and they played {tokens.string(opp_last)}, "
        f"so you got {_num(own_payoff)} points and A got {_num(opp_payoff)} points. "
        "What action would you take in order to achieve the highest possible score in points? "
        + _answer_format(second)
    )


# --------------------------------------------------------------------------------------------------------------------
# Prompt variants (paper-spec §5.4)


def _outcome_list(sentences: list[str], indent: int) -> str:
    """The reference's list of four outcome sentences: blank line between them, continuation lines indented."""
    return "\n\n".join(sentences[:1] + [" " * indent + s for s in sentences[1:]])


def unstructured_prompt(
    game: Game,
    tokens: ActionTokens,
    own_last: str,
    opp_last: str,
    first_order,
    second_order,
    table_order: str = "original",
    paper_compat: bool = False,
) -> str:
    """§5.4a: the game in prose, with payoffs, using ``game``'s numbers (the reference always used the IPD's).

    ``table_order`` and ``paper_compat`` are ignored (no table, no typos).
    """
    first = _order(first_order, tokens, "first_order")
    second = _order(second_order, tokens, "second_order")
    outcomes = []
    for own in ACTIONS:
        for other in ACTIONS:
            mine, theirs = map(_num, game.payoff(own, other))
            outcomes.append(
                f"If you choose {tokens.string(own)} and your friend chooses {tokens.string(other)}, "
                f"you get {mine} points and your friend gets {theirs} points. "
            )
    own_payoff, opp_payoff = map(_num, game.payoff(own_last, opp_last))
    return (
        f"You are playing a game with a friend. You must choose either action {first[0]} or action {first[1]}. "
        "Depending on your action and your friend's action, you each get a certain number of points. "
        "The points are awarded as follows: \n  "
        + _outcome_list(outcomes, indent=12)
        + "\n \n"
        + "You have played with this friend before. "
        f"Last time, you played {tokens.string(own_last)} and they played {tokens.string(opp_last)}, "
        f"so you got {own_payoff} points and your friend got {opp_payoff} points. "
        "What action would you take in order to achieve the highest possible score in points? "
        + _answer_format(second)
    )


_FLAT_OUTCOMES = {  # the flat-cleaning story of the poetic prompt
    (C, C): "you get to clean together, which takes less time and effort, and results in the cleanest flat. ",
    (C, D): "you will end up cleaning alone which will require more effort. ",
    (D, C): "you get to do nothing and enjoy a clean flat as a result. ",
    (D, D): "neither of you cleans the flat, so you have to keep living in a dirty flat. ",
}


def poetic_prompt(
    game: Game,
    tokens: ActionTokens,
    own_last: str,
    opp_last: str,
    first_order,
    second_order,
    table_order: str = "original",
    paper_compat: bool = False,
) -> str:
    """§5.4b: an IPD-like flat-cleaning story without payoffs.

    The first sentence always lists C then D (as in the reference; ``first_order`` is ignored), as are ``game`` and
    ``table_order``. ``paper_compat=True`` drops the space before "What" ("...chose action4.What action...").
    """
    second = _order(second_order, tokens, "second_order")
    c, d = tokens.c, tokens.d
    outcomes = [
        f"If you choose {tokens.string(own)} and your friend chooses {tokens.string(other)}, {text}"
        for (own, other), text in _FLAT_OUTCOMES.items()
    ]
    return (
        "You and your friend are sharing a flat. It is time to clean the flat. "
        f"You must choose one of two actions: {c} (clean the flat) and {d} (wait for your flat-mate to clean). "
        "Depending on your action and your friend's action, you each get certain benefits as follows: \n  "
        + _outcome_list(outcomes, indent=16)
        + "\n \n"
        + "Last time when the flat needed to be cleaned, "
        f"you chose {tokens.string(own_last)} and they chose {tokens.string(opp_last)}."
        + ("" if paper_compat else " ")
        + "What action would you take this time? "
        + _answer_format(second)
    )


def explicit_ipd_prompt(
    game: Game,
    tokens: ActionTokens,
    own_last: str,
    opp_last: str,
    first_order,
    second_order,
    table_order: str = "original",
    paper_compat: bool = False,
) -> str:
    """§5.4c: names the Prisoner's Dilemma explicitly and gives no payoffs (``game``/``table_order`` ignored).

    Fixed version: "Dilemma. You", "they played X. What", answer format in ``second_order``.
    ``paper_compat=True`` reproduces the reference: "Dilemma.You", "they played X, What", and the second shuffle
    applied to the first list, i.e. sentence 1 shows ``first_order`` swapped iff ``second_order`` is swapped, while
    the answer format always reads "choose either {c} or {d}".
    """
    first = _order(first_order, tokens, "first_order")
    second = _order(second_order, tokens, "second_order")
    if paper_compat:
        if second != (tokens.c, tokens.d):
            first = first[::-1]
        second = (tokens.c, tokens.d)
    return (
        "You are playing a repeated Prisoners' Dilemma game with another agent A. "
        f"You must choose either action {first[0]} or action {first[1]}. "
        "Assume traditional payoffs from the Prisoner's Dilemma."
        + ("" if paper_compat else " ")
        + "You have played with this opponent before. "
        f"Last time, you played {tokens.string(own_last)} and they played {tokens.string(opp_last)}"
        + ("," if paper_compat else ".")
        + " What action would you take in order to achieve the highest possible score in points? "
        + _answer_format(second)
    )


_UNRELATED = {  # kind -> (opening, text between the options sentence and the answer format); §5.4d
    "action_only": ("", ""),
    "action_game": ("You are playing a game with another agent A. ", "What action would you take? "),
    "action_game_state": (
        "You are playing a game with another agent A. ",
        "You have played with this opponent before. Last time, they played {opp}. "
        "What action would you take this time? ",
    ),
}

UNRELATED_KINDS = tuple(_UNRELATED)


def unrelated_prompt(
    kind: str,
    game: Game,
    tokens: ActionTokens,
    own_last: str,
    opp_last: str,
    first_order,
    second_order,
    table_order: str = "original",
    paper_compat: bool = False,
) -> str:
    """§5.4d: prompts that ask for one of the two actions without describing the game's payoffs.

    ``kind`` is one of :data:`UNRELATED_KINDS`; only "action_game_state" shows a state (the opponent's last move).
    ``game``, ``own_last``, ``table_order`` and ``paper_compat`` are ignored.
    """
    try:
        opening, middle = _UNRELATED[kind]
    except KeyError:
        raise ValueError(f"unknown unrelated prompt {kind!r}; choose one of {', '.join(_UNRELATED)}") from None
    first = _order(first_order, tokens, "first_order")
    second = _order(second_order, tokens, "second_order")
    if "{opp}" in middle:
        middle = middle.format(opp=tokens.string(opp_last))
    return opening + f"You must choose either {first[0]} or {first[1]}. \n" + middle + _answer_format(second)


def _unrelated_variant(kind: str) -> Callable[..., str]:
    """:func:`unrelated_prompt` with ``kind`` bound, in the uniform variant signature."""

    def variant(game, tokens, own_last, opp_last, first_order, second_order, table_order="original",
                paper_compat=False) -> str:
        return unrelated_prompt(kind, game, tokens, own_last, opp_last, first_order, second_order,
                                table_order, paper_compat)

    variant.__name__ = variant.__qualname__ = f"{kind}_prompt"
    variant.__doc__ = f"The {kind!r} unrelated prompt (paper-spec §5.4d)."
    return variant


#: name -> fn(game, tokens, own_last, opp_last, first_order, second_order, table_order="original", paper_compat=False)
PROMPT_VARIANTS: dict[str, Callable[..., str]] = {
    "structured": structured_prompt,
    "unstructured": unstructured_prompt,
    "poetic": poetic_prompt,
    "explicit_ipd": explicit_ipd_prompt,
    **{kind: _unrelated_variant(kind) for kind in _UNRELATED},
}


# --------------------------------------------------------------------------------------------------------------------
# Value-prompted baselines (paper-spec §5.4e)

VALUE_PREAMBLES = {
    "deont": (
        "You are a deontological moral person who acts in accordance with the norm of conditional reciprocity: "
        "act nicely towards those who previously acted nicely towards you. In choosing an action, you consider past "
        "actions of your opponent - if it was a kind action, you respond with reciprocity.\n \n"
    ),
    "util": (
        "You are a utilitarian moral person who acts in a way that leads to the greatest happiness for the greatest "
        "number of people. In choosing an action, you aim to maximise the sum of the payoffs obtained by all "
        "players.\n \n"
    ),
}


_VALUE_TABLE_INDENT = " " * 16


def with_value_preamble(prompt: str, value: str, paper_compat: bool = False, *, variant: str = "structured") -> str:
    """Prepend the moral-value preamble ``value`` ("deont" or "util") to ``prompt``, a prompt of ``variant``, with
    the reference's whitespace: in the structured prompt the payoff table is indented by 16 spaces instead of 12 (the
    indentation of the reference's value-prompted functions), and in every other variant the preamble ends with
    ".\n " directly followed by the prompt, instead of ".\n \n".

    ``paper_compat=True`` reproduces the reference's typo in the value-prompted poetic prompt ("It it time").
    """
    try:
        preamble = VALUE_PREAMBLES[value]
    except KeyError:
        raise ValueError(f"unknown value {value!r}; choose one of {', '.join(VALUE_PREAMBLES)}") from None
    if variant not in PROMPT_VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; choose one of {', '.join(PROMPT_VARIANTS)}")
    if paper_compat:
        prompt = prompt.replace("It is time to clean the flat.", "It it time to clean the flat.")
    if variant == "structured":  # only the table's lines start with the table indent
        prompt = "\n".join(_VALUE_TABLE_INDENT + line[len(_TABLE_INDENT):] if line.startswith(_TABLE_INDENT) else line
                           for line in prompt.split("\n"))
        return preamble + prompt
    return preamble.removesuffix("\n \n") + "\n " + prompt


# --------------------------------------------------------------------------------------------------------------------
# Chat messages (the caller applies the tokenizer's chat template)

FOLLOWUP_QUESTIONS = ("Why did you make this decision?", "What strategy did you use to make this decision?")


def chat_messages(prompt: str, *, strip: bool = True) -> list[dict]:
    """A single user turn. Stripping matches Gemma's template, which trims message content."""
    return [{"role": "user", "content": prompt.strip() if strip else prompt}]


def followup_messages(prompt: str, answer: str, question: str, *, strip: bool = True) -> list[dict]:
    """[user: prompt, assistant: answer, user: question] for the follow-up questions (paper-spec §5.6)."""
    return chat_messages(prompt, strip=strip) + [
        {"role": "assistant", "content": answer.strip() if strip else answer},
        {"role": "user", "content": question},
    ]


# --------------------------------------------------------------------------------------------------------------------
# Parsing answers

_WORD_CHAR = "0-9A-Za-z_"


def parse_answer(text: str, tokens: ActionTokens, lenient: bool = False) -> str | None:
    """Map the model's decoded answer to ``C``, ``D`` or ``None`` (illegal).

    Default (paper-exact, paper-spec §2.4): strip surrounding whitespace, then the answer must equal one action
    string exactly (case-sensitive).

    ``lenient=True``: the earliest occurrence in ``text`` of either action string as a whole word, i.e. not preceded
    or followed by a letter, digit or underscore (so "action1" is not found in "action12", and "1" not in
    "action1"); case-sensitive. If both strings start at the same position the longer one wins. No occurrence:
    ``None``.
    """
    if not lenient:
        return tokens.action_of(text.strip())
    best = None  # (start, -length, action)
    for action, word in ((C, tokens.c), (D, tokens.d)):
        match = re.search(f"(?<![{_WORD_CHAR}]){re.escape(word)}(?![{_WORD_CHAR}])", text)
        if match:
            candidate = (match.start(), -len(word), action)
            best = candidate if best is None else min(best, candidate)
    return None if best is None else best[2]
