"""Exact probability that a model answers the training prompt legally, with and without the answer prefix.

    python -m moral.diagnostics [--model ID_OR_FOLDER] [--tokens action12]

Averages over the 16 distinct training prompts (4 states x 2 x 2 option orders), no sampling noise.
"""

from __future__ import annotations

import itertools

import torch

from games import GAMES, C, D, get_tokens, structured_prompt

from .agent import Codec, ModelUnavailable, model_source
from .cli import OneLineParser


def training_queries(codec: Codec, tokens) -> tuple[list, list[torch.Tensor]]:
    """The 16 training prompts' query ids, and the (C, D) answers' ids after the answer prefix."""
    pair = (tokens.c, tokens.d)
    prompts = [structured_prompt(GAMES["IPD"], tokens, own, other, first, second)
               for own, other in itertools.product((C, D), (C, D))
               for first in (pair, pair[::-1]) for second in (pair, pair[::-1])]
    prefix = len(codec.plan.prefix_ids)
    return [codec.query(prompt) for prompt in prompts], [torch.tensor(ids[prefix:]) for ids in codec.plan.action_ids]


@torch.no_grad()
def answer_probabilities(policy, tokenizer, tokens, format_aid: str) -> dict:
    """Mean over the 16 training prompts of P(C string), P(D string) and P(legal) as the next tokens."""
    codec = Codec(tokenizer, tokens, format_aid)
    queries, rests = training_queries(codec, tokens)
    out = policy.forward_responses([q for q in queries for _ in rests], [r for _ in queries for r in rests],
                                   with_values=False)  # one batched pass over the 16 prompts x 2 answers
    p = out["logprobs"].sum(1).exp().view(len(queries), len(rests)).mean(0).tolist()
    totals = {"p_c": p[0], "p_d": p[1]}
    totals["p_legal"] = totals["p_c"] + totals["p_d"]
    totals["query_tokens"] = len(queries[0])
    totals["sampled_tokens"] = codec.plan.gen_len
    return totals


def parser() -> OneLineParser:
    from games import TOKEN_SETS

    from .embedded import EMBEDDED_MODEL

    p = OneLineParser(prog="python -m moral.diagnostics", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help=f"Hugging Face id or folder (default: the embedded {EMBEDDED_MODEL})")
    p.add_argument("--tokens", default="action12", metavar="SET",
                   help=f"action strings: {', '.join(TOKEN_SETS)}, or two strings C,D (default action12)")
    return p


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    from ppo_core import LoraSettings, PolicyModel, load_causal_lm

    p = parser()
    args = p.parse_args(argv)
    try:
        tokens = get_tokens(args.tokens)
    except ValueError as exc:
        p.error(f"--tokens {exc}")
    try:
        path = model_source(args.model)
    except ModelUnavailable as exc:
        p.error(f"--model {exc}")
    policy = PolicyModel(load_causal_lm(path), adapters=("agent",), lora=LoraSettings(r=1))  # LoRA B = 0: the base
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"{'format aid':>10} {'query tok':>9} {'sampled':>7} {'P(C)':>8} {'P(D)':>8} {'P(legal)':>8}")
    for aid in ("none", "prefix"):
        r = answer_probabilities(policy, tokenizer, tokens, aid)
        print(f"{aid:>10} {r['query_tokens']:9d} {r['sampled_tokens']:7d} {r['p_c']:8.4f} {r['p_d']:8.4f} "
              f"{r['p_legal']:8.4f}")


if __name__ == "__main__":
    main()
