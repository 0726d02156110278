"""The training loop: episodes of iterated games -> one PPO step per episode (per learner); logs and checkpoints.

An episode starts G independent games (G = --parallel-games, 1 in the paper) from random last moves and plays N
sequential steps (N = 5 vs a fixed opponent, 3 vs another LLM). At each step the G prompts are answered in one batched
sampling call; the opponent moves; the reward scores each answer; the state advances. The G x N (query, response,
reward) triples then make one PPO step. Against `--opponent llm` two adapters with their own value heads and
trainers share one base model.

Random streams (as in the paper, one seed): initial states, each of the two option-order shuffles, and the Random
opponent have their own streams; the PPO seed drives sampling and minibatch shuffling.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from games import ACTION_TYPES, GAMES, LLM, OPPONENT_NAMES, IteratedGame, action_type, get_tokens, initial_move, \
    make_opponent, structured_prompt
from ppo_core import LoraSettings, NonFiniteError, PPOConfig, PPOTrainer, PolicyModel, load_causal_lm
from ppo_core.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_state, save_checkpoint
from ppo_core.model import QUANTIZE_CHOICES, compute_dtype_for, cpu_has_native_bf16, default_device

from .agent import FORMAT_AIDS, Codec, decide
from .embedded import EMBEDDED_MODEL, ensure_embedded_model
from .rewards import Phase, RewardSettings, moral_reward, parse_schedule

CSV_COLUMNS = ("episode", "step", "slot", "phase", "learner", "game", "opponent", "own_last", "opp_last", "action",
               "opp_action", "action_type", "reward", "response", "p_c", "p_d")
STREAMS = ("tokens", "ppo", "initial", "shuffle1", "shuffle2", "opponent")  # the paper's six streams, in order

# Defaults that depend on the model. The embedded model's episode count and learning rate come from its measured
# learning curves (README, "Learning curves of the embedded model").
EMBEDDED_DEFAULTS = {"episodes": 300, "lr": 1.41e-5, "format_aid": "prefix", "save_every": 100}
PAPER_DEFAULTS = {"episodes": 1000, "lr": 1.41e-5, "format_aid": "none", "save_every": 100}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES_BY_TORCH = {v: k for k, v in DTYPES.items()}


class UsageError(ValueError):
    """Bad settings: the CLI prints the message on one line and exits with code 2."""


class RunError(RuntimeError):
    """A run that cannot go on (disk full, persistent NaNs): the CLI prints the message and exits with code 1."""


# Stop after this many PPO steps in a row were skipped for non-finite rewards.
MAX_NONFINITE_REWARD_STEPS = 5


@dataclass
class RunConfig:
    reward: str = "deont"
    opponent: str = "tft"
    model: str = EMBEDDED_MODEL
    episodes: int | None = None
    steps: int | None = None
    parallel_games: int = 1
    seed: int = 0
    lr: float | None = None
    lora_rank: int = 64
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    quantize: str | None = None
    ppo_epochs: int = 1
    tokens: str = "action12"
    format_aid: str | None = None
    lenient: bool = False
    illegal: float = -6.0
    xi: float = 3.0
    init_kl_coef: float = 0.2
    score_norm: bool = True
    reset_at_switch: bool = False
    save_every: int | None = None
    keep_checkpoints: int = 2
    out: str | None = None
    threads: int | None = None
    device: str | None = None
    dtype: str | None = None
    temperature: float = 1.0
    derived: dict = field(default_factory=dict)

    def resolve(self) -> "RunConfig":
        """Fill model-dependent defaults and validate everything; raises UsageError naming the bad value."""
        c = dataclasses.replace(self, derived=dict(self.derived))
        defaults = EMBEDDED_DEFAULTS if c.model == EMBEDDED_MODEL else PAPER_DEFAULTS
        if c.opponent not in OPPONENT_NAMES:
            raise UsageError(f"--opponent {c.opponent!r}: choose one of {', '.join(OPPONENT_NAMES)}")
        for name in ("episodes", "steps", "parallel_games", "lora_rank", "ppo_epochs", "save_every",
                     "keep_checkpoints", "threads", "lora_alpha"):
            value = getattr(c, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"--{name.replace('_', '-')} {value!r}: must be a positive integer")
        try:
            phases = parse_schedule(c.reward, c.episodes if "," in c.reward or ":" in c.reward else
                                    (c.episodes or defaults["episodes"]))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        c.episodes = sum(p.episodes for p in phases)
        c.steps = c.steps or (3 if c.opponent == LLM else 5)
        c.lr = defaults["lr"] if c.lr is None else c.lr
        if not (isinstance(c.lr, float) and 0 < c.lr < 1):
            raise UsageError(f"--lr {c.lr!r}: must be a number in (0, 1)")
        c.format_aid = c.format_aid or defaults["format_aid"]
        if c.format_aid not in FORMAT_AIDS:
            raise UsageError(f"--format-aid {c.format_aid!r}: choose one of {', '.join(FORMAT_AIDS)}")
        c.save_every = c.save_every or defaults["save_every"]
        try:
            get_tokens(c.tokens)
            RewardSettings(c.illegal, c.xi)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        device = torch.device(c.device) if c.device else default_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {c.device!r}: CUDA is not available on this machine")
        c.device = str(device)
        c.quantize = c.quantize or ("4bit" if device.type == "cuda" else "none")
        if c.dtype is None:
            auto = compute_dtype_for(device) if device.type == "cuda" else \
                (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
            c.dtype = DTYPES_BY_TORCH[auto]
        if c.dtype not in DTYPES:
            raise UsageError(f"--dtype {c.dtype!r}: choose one of {', '.join(DTYPES)}")
        if c.quantize not in QUANTIZE_CHOICES:
            raise UsageError(f"--quantize {c.quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
        if not (c.temperature > 0):
            raise UsageError(f"--temperature {c.temperature!r}: must be > 0")
        c.derived["phases"] = [dataclasses.asdict(p) for p in phases]
        c.derived["batch_size"] = c.steps * c.parallel_games
        return c

    @property
    def phases(self) -> list[Phase]:
        return [Phase(**p) for p in self.derived["phases"]]


# ------------------------------------------------------------------------------------------------- random streams
def make_streams(seed: int) -> dict:
    """The paper's separate streams from one seed: SeedSequence(seed).spawn(6), in its order."""
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: random.Random(int(child.generate_state(1, np.uint64)[0])) for name, child in zip(STREAMS, children)}


# ---------------------------------------------------------------------------------------------------------- logs
class RunLogs:
    """games.csv, ppo.jsonl and timing.jsonl, appended once per episode, flushed and fsynced before a checkpoint
    records their sizes (so a resume can cut them back to exactly that point)."""

    FILES = ("games.csv", "ppo.jsonl", "timing.jsonl")

    def __init__(self, folder: str, offsets: dict | None = None):
        """offsets=None starts the logs afresh; otherwise they are cut back to those byte sizes and appended to."""
        self.folder = folder
        self.handles = {}
        for name in self.FILES:
            path = os.path.join(folder, name)
            if offsets is not None:
                with open(path, "r+b") as f:
                    f.truncate(offsets[name])
            self.handles[name] = open(path, "a" if offsets is not None else "w", newline="", encoding="utf-8")
        if offsets is None:
            self.handles["games.csv"].write(",".join(CSV_COLUMNS) + "\n")

    def write_rows(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
        writer.writerows(rows)
        self.handles["games.csv"].write(buffer.getvalue())

    def write_json(self, name: str, record: dict) -> None:
        self.handles[name].write(json.dumps(record, sort_keys=True) + "\n")

    def sync(self) -> dict:
        offsets = {}
        for name, f in self.handles.items():
            f.flush()
            os.fsync(f.fileno())
            offsets[name] = f.tell()
        return offsets

    def close(self) -> None:
        for f in self.handles.values():
            f.close()


def write_json_atomic(path: str, data) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ the run
class Interrupted(Exception):
    pass


class FineTuning:
    """One fine-tuning run: its settings, model, trainers, streams and logs."""

    def __init__(self, config: RunConfig, folder: str, resume: bool = False, progress: bool = True):
        self.config, self.folder, self.progress = config, folder, progress
        # From here on SIGINT/SIGTERM only ask the run to stop after the current episode; train() (or a failed
        # set-up) puts the previous handlers back.
        self._stop_signal = None
        self._previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._set_up(config, folder, resume)
        except BaseException:
            self._restore_signal_handlers()
            raise

    def _set_up(self, config: RunConfig, folder: str, resume: bool) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        self.tokens = get_tokens(config.tokens)
        self.settings = RewardSettings(config.illegal, config.xi)
        self.streams = make_streams(config.seed)
        ppo_seed = self.streams["ppo"].randrange(10_000)
        torch.manual_seed(config.seed)  # LoRA and value-head initialisation
        self.policy, self.tokenizer = self._load_model()
        learners = ("agent", "opponent") if config.opponent == LLM else ("agent",)
        self.trainers = {}
        for i, name in enumerate(learners):
            self.trainers[name] = PPOTrainer(self._ppo_config(ppo_seed + i), self.policy, name,
                                             pad_token_id=self.tokenizer.pad_token_id or 0)
        if len(learners) > 1:  # one frozen base, one reference cache
            self.trainers["opponent"].reference_cache = self.trainers["agent"].reference_cache
        self.codec = Codec(self.tokenizer, self.tokens, config.format_aid, config.lenient)
        self.episode = 0
        self.skipped_nonfinite_rewards = 0  # PPO steps skipped because a reward was NaN or infinite
        self._nonfinite_streak = 0
        config.derived.update({"answer_prefix": self.codec.answer_prefix, "gen_len": self.codec.plan.gen_len,
                               "action_token_ids": self.codec.plan.action_ids, "ppo_seed": ppo_seed,
                               "ppo": self.trainers["agent"].config.to_dict(),
                               "versions": _versions()})
        if resume:
            self._resume()
        else:
            os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
            write_json_atomic(os.path.join(folder, "config.json"), dataclasses.asdict(config))
            self.logs = RunLogs(folder)

    # -- setup -----------------------------------------------------------------------------------------------
    def _load_model(self):
        from transformers import AutoTokenizer
        c = self.config
        path = ensure_embedded_model() if c.model == EMBEDDED_MODEL else c.model
        tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = DTYPES[c.dtype]
        lm = load_causal_lm(path, quantize=c.quantize, device=self.device, dtype=dtype)
        adapters = ("agent", "opponent") if c.opponent == LLM else ("agent",)
        lora = LoraSettings(r=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout)
        return PolicyModel(lm, adapters=adapters, lora=lora, compute_dtype=dtype), tokenizer

    def _ppo_config(self, seed: int) -> PPOConfig:
        c = self.config
        n = c.derived["batch_size"]
        return PPOConfig(learning_rate=c.lr, batch_size=n, mini_batch_size=n, ppo_epochs=c.ppo_epochs,
                         init_kl_coef=c.init_kl_coef, use_score_scaling=c.score_norm, use_score_norm=c.score_norm,
                         temperature=c.temperature, seed=seed)

    # -- the loop --------------------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm import tqdm
        c = self.config
        window: list[list[str]] = []
        bar = tqdm(total=c.episodes, initial=self.episode, disable=not self.progress, dynamic_ncols=True,
                   desc=f"{c.reward} vs {c.opponent}")
        t_start = time.perf_counter()
        try:
            try:
                self._loop(bar, window)
            except OSError as exc:
                latest = latest_checkpoint(self.folder)
                raise RunError(f"cannot write to {self.folder} ({exc.strerror or exc}); the last complete checkpoint "
                               f"is {latest or 'none'}; free space and continue with --resume {self.folder}") from None
            except NonFiniteError as exc:
                raise RunError(f"{exc}; the last complete checkpoint is {latest_checkpoint(self.folder) or 'none'}") \
                    from None
            summary = summarise(self.folder, c, wall_s=time.perf_counter() - t_start)
            summary["skipped_nonfinite_rewards"] = self.skipped_nonfinite_rewards
            try:
                self._save_final()
                write_json_atomic(os.path.join(self.folder, "summary.json"), summary)
            except OSError as exc:
                raise RunError(f"cannot write the final adapter or summary to {self.folder} "
                               f"({exc.strerror or exc}); every checkpoint is complete; continue with --resume "
                               f"{self.folder}") from None
        finally:  # a signal during the final save only sets the stop flag; the handlers go back once all is written
            bar.close()
            for trainer in self.trainers.values():  # an episode cut short leaves kept graphs and weight casts
                trainer.discard_rollouts()
            self._restore_signal_handlers()
        self.logs.close()
        return summary

    def _loop(self, bar, window) -> None:
        c = self.config
        while self.episode < c.episodes:
            _, phase = self._phase_of(self.episode)
            if self._at_switch(self.episode) and c.reset_at_switch:
                self._reset_learning_state()
            rows = self._episode(phase)
            self.episode += 1
            window.append([r["action_type"] for r in rows if r["learner"] == "agent"])
            del window[:-20]
            bar.set_postfix(_shares_postfix(window, [r["reward"] for r in rows if r["learner"] == "agent"]),
                            refresh=False)
            bar.update(1)
            saved = self.episode % c.save_every == 0 or self.episode == c.episodes
            if saved:
                self._save_checkpoint()
            if self._stop_signal is not None and self.episode < c.episodes:
                if not saved:
                    self._save_checkpoint()
                raise Interrupted(self._stop_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name

    def _phase_of(self, episode: int) -> tuple[int, Phase]:
        start = 0
        for i, phase in enumerate(self.config.phases):
            if episode < start + phase.episodes:
                return i, phase
            start += phase.episodes
        raise IndexError(episode)

    def _at_switch(self, episode: int) -> bool:
        starts = np.cumsum([0] + [p.episodes for p in self.config.phases])[1:-1]
        return episode in set(starts.tolist())

    def _reset_learning_state(self) -> None:
        for name, trainer in self.trainers.items():
            fresh = PPOTrainer(trainer.config, self.policy, trainer.adapter, pad_token_id=trainer.pad_token_id,
                               reference_cache=trainer.reference_cache)
            fresh.sample_generator.set_state(trainer.sample_generator.get_state())
            fresh.shuffle_generator.set_state(trainer.shuffle_generator.get_state())
            self.trainers[name] = fresh

    def _prompt(self, game: IteratedGame, own: str, other: str) -> str:
        pair = (self.tokens.c, self.tokens.d)
        first = pair if self.streams["shuffle1"].random() < 0.5 else pair[::-1]
        second = pair if self.streams["shuffle2"].random() < 0.5 else pair[::-1]
        return structured_prompt(game.game, self.tokens, own, other, first, second)

    def _episode(self, phase: Phase) -> list[dict]:
        c, s = self.config, self.streams
        two_learners = c.opponent == LLM
        games, opponents = [], []
        for _ in range(c.parallel_games):
            agent_first = initial_move(None, s["initial"])
            opp_first = initial_move(None if two_learners else c.opponent, s["initial"])
            games.append(IteratedGame(GAMES["IPD"], agent_first, opp_first, opp_is_learner=two_learners))
            if not two_learners:
                opponents.append(make_opponent(c.opponent))
                opponents[-1].reset()
        batch = {name: ([], [], []) for name in self.trainers}
        rows = []
        for step in range(c.steps):
            views = {"agent": [(g.agent_last, g.opp_last) for g in games]}
            answers = {"agent": self._answer("agent", games, views["agent"])}
            if two_learners:
                views["opponent"] = [g.opponent_view() for g in games]
                answers["opponent"] = self._answer("opponent", games, views["opponent"])
            for k, g in enumerate(games):
                mine = answers["agent"][k]
                if two_learners:
                    theirs = answers["opponent"][k]
                    opp_action = theirs.action
                else:
                    theirs, opp_action = None, opponents[k].move(g.agent_last, g.opp_last, s["opponent"])
                outcome = {"agent": (mine, opp_action if opp_action is not None else g.opp_last, g.opp_last)}
                if two_learners:  # an illegal answer counts as the player's last legal move for the other's reward
                    outcome["opponent"] = (theirs, mine.action if mine.action is not None else g.agent_last,
                                           g.agent_last)
                for learner, (decision, other_action, other_prev) in outcome.items():
                    reward = moral_reward(phase.reward, g.game, decision.action, other_action, other_prev,
                                          self.settings)
                    q, r, sc = batch[learner]
                    q.append(decision.query), r.append(decision.response), sc.append(reward)
                    own_last, opp_last = views[learner][k]
                    other_raw = opp_action if learner == "agent" else mine.action
                    rows.append({"episode": self.episode, "step": step, "slot": k, "phase": phase.reward,
                                 "learner": learner, "game": g.game.name, "opponent": c.opponent,
                                 "own_last": own_last, "opp_last": opp_last,
                                 "action": decision.action or "illegal", "opp_action": other_raw or "illegal",
                                 "action_type": action_type(decision.action, opp_last), "reward": reward,
                                 "response": decision.text, "p_c": _fmt(decision.p_c),
                                 "p_d": _fmt(decision.p_d)})
                g.step(mine.action, opp_action)
        self.logs.write_rows(rows)
        for learner, trainer in self.trainers.items():
            queries, responses, scores = batch[learner]
            record = {"episode": self.episode, "phase": phase.reward, "learner": learner}
            if not all(math.isfinite(x) for x in scores):
                trainer.discard_rollouts()
                self.skipped_nonfinite_rewards += 1
                self._nonfinite_streak += 1
                self.logs.write_json("ppo.jsonl", {**record, "skipped": "non-finite reward",
                                                   "skipped_nonfinite_rewards": self.skipped_nonfinite_rewards})
                if self._nonfinite_streak >= MAX_NONFINITE_REWARD_STEPS:
                    raise NonFiniteError(f"{self._nonfinite_streak} PPO steps in a row had non-finite rewards")
                continue
            self._nonfinite_streak = 0
            stats = trainer.step(queries, responses, scores)
            self.logs.write_json("ppo.jsonl", {**record, **{k: v for k, v in stats.items()
                                                              if not k.startswith("time/")}})
            self.logs.write_json("timing.jsonl", {**record, **{k: v for k, v in stats.items()
                                                                 if k.startswith("time/")}})
        return rows

    def _answer(self, learner: str, games, views) -> list:
        prompts = [self._prompt(g, own, other) for g, (own, other) in zip(games, views)]
        return decide(self.codec, self.trainers[learner].generate, prompts)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _checkpoint_dir(self) -> str:
        return os.path.join(self.folder, "checkpoints")

    def _save_checkpoint(self) -> None:
        extra = {"episode": self.episode, "log_offsets": self.logs.sync(),
                 "streams": {name: rng.getstate() for name, rng in self.streams.items()},
                 "skipped_nonfinite_rewards": self.skipped_nonfinite_rewards,
                 "nonfinite_streak": self._nonfinite_streak}
        folder = os.path.join(self._checkpoint_dir(), f"ckpt-{self.episode:06d}")
        save_checkpoint(folder, policy=self.policy, trainers=self.trainers, extra=extra)
        for old in complete_checkpoints(self.folder)[:-self.config.keep_checkpoints]:
            _remove_tree(old)

    def _save_final(self) -> None:
        from ppo_core.model import save_adapter
        final = os.path.join(self.folder, "final")
        if os.path.exists(final):
            return
        tmp = f"{final}.tmp-{os.getpid()}"
        _remove_tree(tmp)
        for trainer in self.trainers.values():
            save_adapter(self.policy, trainer.adapter, os.path.join(tmp, trainer.adapter))
        self.tokenizer.save_pretrained(tmp)
        os.rename(tmp, final)

    def _resume(self) -> None:
        if not os.path.isfile(os.path.join(self.folder, "games.csv")):
            raise UsageError(f"--resume {self.folder}: not a run folder (games.csv is missing)")
        os.makedirs(self._checkpoint_dir(), exist_ok=True)
        done = complete_checkpoints(self.folder)
        if not done:  # stopped before its first checkpoint: start again from episode 0 (same seed, same run)
            self.logs = RunLogs(self.folder)
            return
        latest = done[-1]
        try:
            extra = load_checkpoint(latest, policy=self.policy, trainers=self.trainers)
        except CheckpointError as exc:
            older = f"; remove it to resume from {os.path.basename(done[-2])}" if len(done) > 1 else ""
            raise UsageError(f"--resume {self.folder}: {exc}{older}") from None
        self.episode = int(extra["episode"])
        self.skipped_nonfinite_rewards = int(extra["skipped_nonfinite_rewards"])
        self._nonfinite_streak = int(extra["nonfinite_streak"])
        for name, state in extra["streams"].items():
            self.streams[name].setstate(_as_tuple(state))
        self.logs = RunLogs(self.folder, offsets=extra["log_offsets"])
        for name in os.listdir(self.folder):  # a final adapter written before the crash, or half of one
            if name == "final" or name.startswith("final.tmp-"):
                _remove_tree(os.path.join(self.folder, name))
        for name in os.listdir(self._checkpoint_dir()):
            if ".tmp-" in name:
                _remove_tree(os.path.join(self._checkpoint_dir(), name))


def complete_checkpoints(folder: str) -> list[str]:
    """Checkpoint folders of a run, oldest first (half-written ones, still named *.tmp-PID, excluded)."""
    ckpt_dir = os.path.join(folder, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return [os.path.join(ckpt_dir, d) for d in sorted(os.listdir(ckpt_dir))
            if d.startswith("ckpt-") and ".tmp" not in d]


def latest_checkpoint(folder: str) -> str | None:
    """The newest checkpoint that can be read."""
    for path in reversed(complete_checkpoints(folder)):
        try:
            read_checkpoint_state(path)
            return path
        except CheckpointError:
            continue
    return None


def _fmt(p: float | None) -> str:
    return "" if p is None else f"{p:.6f}"


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _remove_tree(path: str) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def _versions() -> dict:
    import peft
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


# ------------------------------------------------------------------------------------------------------ summary
def _shares_postfix(window: list[list[str]], rewards: list[float]) -> dict:
    flat = [t for episode in window for t in episode]
    n = max(len(flat), 1)
    shares = {t: sum(x == t for x in flat) / n for t in ("C|C", "C|D", "D|C", "D|D")}
    shares["ill"] = sum(x.startswith("illegal") for x in flat) / n
    out = {k: f"{v:.2f}" for k, v in shares.items()}
    out["R"] = f"{sum(rewards) / max(len(rewards), 1):+.2f}"
    return out


def action_type_shares(rows: list[dict]) -> dict:
    n = max(len(rows), 1)
    shares = {t: sum(r["action_type"] == t for r in rows) / n for t in ACTION_TYPES}
    shares["illegal"] = shares.pop("illegal|C") + shares.pop("illegal|D")
    return shares


def read_rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "games.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def summarise(folder: str, config: RunConfig, wall_s: float | None = None) -> dict:
    """Action-type shares of the agent in the first and last 10% of episodes (and per tenth), mean rewards."""
    rows = [r for r in read_rows(folder) if r["learner"] == "agent"]
    episodes = config.episodes
    tenth = max(episodes // 10, 1)
    by_tenth = []
    for k in range(10):
        lo, hi = k * episodes // 10, (k + 1) * episodes // 10
        part = [r for r in rows if lo <= int(r["episode"]) < hi]
        by_tenth.append({"episodes": [lo, hi], **action_type_shares(part),
                         "mean_reward": float(np.mean([float(r["reward"]) for r in part])) if part else None})
    first = [r for r in rows if int(r["episode"]) < tenth]
    last = [r for r in rows if int(r["episode"]) >= episodes - tenth]
    summary = {"episodes": episodes, "decisions": len(rows), "first_10pct": action_type_shares(first),
               "last_10pct": action_type_shares(last), "by_tenth": by_tenth,
               "mean_reward_first_10pct": float(np.mean([float(r["reward"]) for r in first])) if first else None,
               "mean_reward_last_10pct": float(np.mean([float(r["reward"]) for r in last])) if last else None}
    if wall_s is not None:
        summary["wall_s_this_session"] = wall_s
    return summary
