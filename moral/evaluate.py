"""Generalisation tests: the fine-tuned agent and the untrained reference (adapters off) answer the same prompts
against a Random opponent, on five games, four payoff-table orders and the paper's prompt variants.

The work is laid out as blocks (model group x variant x game x table order), each with `episodes` independent
trajectories of `steps` steps. Every block draws its initial states, option-order shuffles and opponent moves from its
own copy of the same seeded streams, so all games and models face the same opponent sequence (as in the paper). The
state advances with the fine-tuned agent's moves; the reference answers the same prompts. The value-prompted
baselines (the reference with a Deontological or Utilitarian preamble) advance with their own moves.
All trajectories of all blocks advance together: one sampling call per model per step.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch

from games import GAMES, PROMPT_VARIANTS, TABLE_ORDERS, TEST_GAMES, FOLLOWUP_QUESTIONS, IteratedGame, action_type, \
    followup_messages, get_tokens, initial_move, make_opponent, with_value_preamble
from ppo_core.generation import sample

from .agent import Codec, decide, load_agent_model
from .config import RunConfig, UsageError, make_streams, option_name, threads_note
from .rewards import REWARDS, RewardSettings, moral_reward
from .runio import read_json, write_csv_atomic, write_json_atomic

EVAL_COLUMNS = ("model", "variant", "game", "table_order", "tokens", "episode", "step", "own_last", "opp_last",
                "opp_action", "response", "action", "action_type", *(f"reward_{k}" for k in REWARDS), "p_c", "p_d")
VARIANTS = tuple(PROMPT_VARIANTS)
IPD_ONLY_VARIANTS = ("unstructured", "poetic", "explicit_ipd", "action_only", "action_game", "action_game_state")
BASELINES = ("deont", "util")


@dataclass
class EvalConfig:
    episodes: int = 10
    steps: int = 5
    games: tuple[str, ...] = TEST_GAMES
    tokens: tuple[str, ...] = ("action34",)
    orders: tuple[str, ...] = TABLE_ORDERS
    variants: tuple[str, ...] = VARIANTS
    baselines: bool = True
    followup: bool = False
    followup_tokens: int = 100
    seed: int = 100
    checkpoint: str | None = None
    token_budget: int = 2048
    """Nodes of one packed prompt tree: each sampling call answers its prompts in trees of at most this size."""

    def validate(self) -> None:
        for name in ("episodes", "steps", "followup_tokens", "token_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{option_name(name)} {getattr(self, name)}: must be a positive integer")
        if isinstance(self.tokens, str):
            self.tokens = (self.tokens,)
        for name in self.tokens:
            get_tokens(name)
        for value, allowed, what in ((self.games, GAMES, "game"), (self.orders, TABLE_ORDERS, "table order"),
                                     (self.variants, VARIANTS, "variant")):
            for v in value:
                if v not in allowed:
                    raise ValueError(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")


@dataclass(frozen=True)
class Block:
    """`episodes` trajectories of one (group, variant, game, order, token set); group 'main' = fine-tuned +
    reference."""
    group: str
    variant: str
    game: str
    order: str
    tokens: str


def plan_blocks(cfg: EvalConfig) -> list[Block]:
    blocks = []
    for tokens in cfg.tokens:
        blocks += [Block("main", "structured", g, o, tokens) for g in cfg.games for o in cfg.orders]
        blocks += [Block("main", v, "IPD", "original", tokens) for v in cfg.variants if v != "structured"]
        if cfg.baselines:
            blocks += [Block(f"reference+{value}", "structured", g, "original", tokens) for value in BASELINES
                       for g in cfg.games]
    return blocks


class Trajectory:
    """One iterated game of a block against a Random opponent."""

    def __init__(self, block: Block, streams: dict, episode: int):
        self.block, self.streams, self.episode = block, streams, episode
        self.state = IteratedGame(GAMES[block.game], initial_move(None, streams["initial"]),
                                  initial_move("random", streams["initial"]))
        self.opponent = make_opponent("random")

    def prompt(self, tokens) -> str:
        pair = (tokens.c, tokens.d)
        first = pair if self.streams["shuffle1"].random() < 0.5 else pair[::-1]
        second = pair if self.streams["shuffle2"].random() < 0.5 else pair[::-1]
        text = PROMPT_VARIANTS[self.block.variant](self.state.game, tokens, self.state.agent_last,
                                                   self.state.opp_last, first, second, self.block.order)
        if self.block.group.startswith("reference+"):
            text = with_value_preamble(text, self.block.group.split("+", 1)[1], variant=self.block.variant)
        return text


def load_run_policy(run_folder: str, config: RunConfig, checkpoint: str | None = None):
    """The base model of a run with its trained agent adapter (final/agent or a checkpoint's)."""
    adapter_dir = os.path.join(checkpoint, "adapters", "agent") if checkpoint else \
        os.path.join(run_folder, "final", "agent")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ValueError(f"{run_folder}: no trained adapter at {adapter_dir} (has the run finished?)")
    return load_agent_model(config, adapter_paths={"agent": adapter_dir})


def device_for_eval(run_config: RunConfig, device: str | None) -> tuple[RunConfig, str | None]:
    """The run's settings on this machine, and a note when they change: `device` if given, else the run's device
    where this machine has it, else this machine's default (a run trained on a GPU, evaluated on a laptop). A 16-bit
    compute dtype that this machine's CPU would only emulate becomes fp32 (emulated bf16 is about 25x slower:
    RunConfig.speed_note). The quantisation stays the run's: its adapter was trained on that base."""
    from ppo_core.model import cpu_has_native_bf16, default_device

    from .config import device_unavailable, parse_device

    trained_on, note = run_config.device, None
    if device is None:
        if not device_unavailable(trained_on):
            return run_config, None
        device = str(default_device())
    dtype = run_config.dtype
    if parse_device(device).type == "cpu" and dtype != "fp32" and not (dtype == "bf16" and cpu_has_native_bf16()):
        dtype = "fp32"
    if device != trained_on or dtype != run_config.dtype:
        note = f"note: the run was trained on {trained_on} in {run_config.dtype}; evaluating on {device} in {dtype}"
    return dataclasses.replace(run_config, device=device, dtype=dtype), note


def evaluate(run_folder: str, cfg: EvalConfig = EvalConfig(), device: str | None = None,
             threads: int | None = None, progress: bool = True) -> dict:
    """Run the generalisation tests of one run folder; writes eval/decisions.csv, eval/metrics.json
    (and eval/followup.csv with cfg.followup; without it an earlier eval's followup.csv is removed); returns the
    metrics."""
    from tqdm import tqdm

    from .regret import per_run_metrics

    cfg.validate()
    run_config, note = device_for_eval(RunConfig.from_dict(read_json(os.path.join(run_folder, "config.json"))), device)
    if note:
        print(f"{run_folder}: {note}", file=sys.stderr, flush=True)
    if threads:
        torch.set_num_threads(threads)
        note = threads_note(threads, run_config.device)
        if note:
            print(f"{run_folder}: {note}", file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    policy, tokenizer = load_run_policy(run_folder, run_config, cfg.checkpoint)
    positions = getattr(policy.config.get_text_config(), "max_position_embeddings", None)
    if cfg.followup and positions and cfg.followup_tokens >= positions:  # refused before the decisions, not after
        raise UsageError(f"--followup-tokens {cfg.followup_tokens}: {run_config.model} has {positions} positions, "
                         f"prompt included")
    codecs = {name: Codec(tokenizer, get_tokens(name), run_config.format_aid, run_config.lenient)
              for name in cfg.tokens}
    settings = RewardSettings(run_config.illegal, run_config.xi)
    generator = torch.Generator(device=policy.device).manual_seed(cfg.seed + 1)
    memos = {"finetuned": {}, "reference": {}}  # padded fallback only (models that cannot take the tree's mask)
    tokens_before = policy.backbone_tokens

    def sampler(model: str):
        def run(queries, max_new_tokens, probe_tokens=None, draft=None):
            context = policy.reference() if model == "reference" else policy.adapter("agent")
            with torch.no_grad(), context:
                return sample(policy, queries, max_new_tokens=max_new_tokens, temperature=run_config.temperature,
                              pad_token_id=tokenizer.pad_token_id or 0, generator=generator,
                              memo=memos[model], probe_tokens=probe_tokens, max_tokens=cfg.token_budget,
                              draft=draft)
        return run

    blocks = plan_blocks(cfg)
    trajectories = []
    for block in blocks:
        streams = make_streams(cfg.seed)  # the same draws in every block
        trajectories += [Trajectory(block, streams, e) for e in range(cfg.episodes)]
    rows, followups = [], []
    for step in tqdm(range(cfg.steps), disable=not progress, desc="eval steps"):
        prompts = [t.prompt(codecs[t.block.tokens].tokens) for t in trajectories]
        answers = {"finetuned": {}, "reference": {}}
        for name, codec in codecs.items():  # one sampling call per model and token set
            mine = [i for i, t in enumerate(trajectories) if t.block.tokens == name]
            main = [i for i in mine if trajectories[i].block.group == "main"]
            answers["finetuned"].update(zip(main, decide(codec, sampler("finetuned"), [prompts[i] for i in main])))
            answers["reference"].update(zip(mine, decide(codec, sampler("reference"), [prompts[i] for i in mine])))
        for i, t in enumerate(trajectories):
            opp_move = t.opponent.move(t.state.agent_last, t.state.opp_last, t.streams["opponent"])
            mover = "finetuned" if t.block.group == "main" else "reference"
            for model in (("finetuned", "reference") if t.block.group == "main" else ("reference",)):
                d = answers[model][i]
                label = model if t.block.group == "main" else t.block.group
                rows.append(_row(label, t, step, d, opp_move, settings))
                if cfg.followup and t.block == Block("main", "structured", "IPD", "original", cfg.tokens[0]):
                    followups += [(label, t.episode, step, prompts[i], d.text, q, model) for q in FOLLOWUP_QUESTIONS]
            t.state.step(answers[mover][i].action, opp_move)

    # Everything is computed before the first file is written, so a run stopped earlier leaves eval/ as it was.
    followup_rows = ask_followups(policy, tokenizer, followups, cfg.followup_tokens, generator) if followups else None
    out_dir = os.path.join(run_folder, "eval")
    os.makedirs(out_dir, exist_ok=True)
    # Stale files go first: metrics.json comes back last (while it exists it describes the files beside it, so an
    # eval stopped between two writes is never taken for finished; `run.py eval SWEEP` redoes it), and an earlier
    # eval's followup.csv answered decisions that are no longer these.
    metrics_path, followup_path = os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "followup.csv")
    for stale in (metrics_path, followup_path):
        if os.path.exists(stale):
            os.remove(stale)
    write_csv_atomic(os.path.join(out_dir, "decisions.csv"), EVAL_COLUMNS, rows)
    if followup_rows is not None:
        write_csv_atomic(followup_path, ("model", "episode", "step", "question", "answer", "followup_response"),
                         followup_rows)
    metrics = {"run": os.path.abspath(run_folder), "eval": dataclasses.asdict(cfg),
               "groups": per_run_metrics(os.path.join(out_dir, "decisions.csv")),
               "wall_s": time.perf_counter() - t_start, "decisions": len(rows),
               "backbone_tokens": policy.backbone_tokens - tokens_before}
    write_json_atomic(metrics_path, metrics)
    return metrics


def _row(model: str, t: Trajectory, step: int, d, opp_move: str, settings: RewardSettings) -> dict:
    s = t.state
    row = {"model": model, "variant": t.block.variant, "game": t.block.game, "table_order": t.block.order,
           "tokens": t.block.tokens, "episode": t.episode, "step": step, "own_last": s.agent_last, "opp_last": s.opp_last,
           "opp_action": opp_move, "response": d.text, "action": d.action or "illegal",
           "action_type": action_type(d.action, s.opp_last),
           "p_c": "" if d.p_c is None else f"{d.p_c:.6f}", "p_d": "" if d.p_d is None else f"{d.p_d:.6f}"}
    for kind in REWARDS:
        row[f"reward_{kind}"] = moral_reward(kind, s.game, d.action, opp_move, s.opp_last, settings)
    return row


@torch.no_grad()
def ask_followups(policy, tokenizer, items, max_tokens: int, generator) -> list[dict]:
    """Ask each model "Why..." / "What strategy..." after its own answer, as a proper multi-turn chat."""
    out = []
    for model in ("finetuned", "reference"):
        mine = [x for x in items if x[6] == model]
        if not mine:
            continue
        queries = [torch.tensor(tokenizer(tokenizer.apply_chat_template(
            followup_messages(prompt, answer, question), tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"], device=policy.device)
            for _, _, _, prompt, answer, question, _ in mine]
        context = policy.reference() if model == "reference" else policy.adapter("agent")
        with context:
            rollout = sample(policy, queries, max_new_tokens=max_tokens, stop_at_eos=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                             generator=generator)
        for (label, episode, step, _, answer, question, _), response in zip(mine, rollout.responses):
            out.append({"model": label, "episode": episode, "step": step, "question": question, "answer": answer,
                        "followup_response": tokenizer.decode(response, skip_special_tokens=True)})
    return out
