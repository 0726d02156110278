"""The environment: 2x2 matrix games, the paper's prompts, opponents and the iterated-game state.

Pure Python (standard library only); importing it never imports torch.
"""

from .iterated import ACTION_TYPES, ILLEGAL, IteratedGame, action_type
from .matrix import ACTIONS, GAMES, TEST_GAMES, C, D, Game, get_game
from .opponents import (
    LLM,
    OPPONENT_NAMES,
    OPPONENTS,
    AlwaysCooperate,
    AlwaysDefect,
    Alternating,
    GrimTrigger,
    Opponent,
    RandomOpponent,
    TitForTat,
    WinStayLoseShift,
    initial_move,
    make_opponent,
)
from .prompts import (
    FOLLOWUP_QUESTIONS,
    PROMPT_VARIANTS,
    TABLE_ORDERS,
    TOKEN_SETS,
    UNRELATED_KINDS,
    VALUE_PREAMBLES,
    ActionTokens,
    chat_messages,
    explicit_ipd_prompt,
    followup_messages,
    get_tokens,
    parse_answer,
    payoff_table,
    poetic_prompt,
    random_tokens,
    structured_prompt,
    unrelated_prompt,
    unstructured_prompt,
    with_value_preamble,
)

__all__ = [
    "ACTION_TYPES", "ILLEGAL", "IteratedGame", "action_type",
    "ACTIONS", "GAMES", "TEST_GAMES", "C", "D", "Game", "get_game",
    "LLM", "OPPONENT_NAMES", "OPPONENTS", "AlwaysCooperate", "AlwaysDefect", "Alternating", "GrimTrigger", "Opponent",
    "RandomOpponent", "TitForTat", "WinStayLoseShift", "initial_move", "make_opponent",
    "FOLLOWUP_QUESTIONS", "PROMPT_VARIANTS", "TABLE_ORDERS", "TOKEN_SETS", "UNRELATED_KINDS", "VALUE_PREAMBLES",
    "ActionTokens", "chat_messages", "explicit_ipd_prompt", "followup_messages", "get_tokens", "parse_answer",
    "payoff_table", "poetic_prompt", "random_tokens", "structured_prompt", "unrelated_prompt", "unstructured_prompt",
    "with_value_preamble",
]
