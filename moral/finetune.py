"""The training loop: episodes of iterated games -> one PPO step per episode (per learner); checkpoints.

An episode (`run_episode`) starts G independent games (G = --parallel-games, 1 in the paper) from random last moves
and plays N sequential steps (`play_step`; N = 5 vs a fixed opponent, 3 vs another LLM): the G prompts are answered
in one batched sampling call, the opponent moves, the reward scores each answer, the state advances. The G x N
(query, response, reward) triples then make one PPO step per learner (`update`). Against `--opponent llm` two
adapters with their own value heads and trainers share one base model.

Random streams (as in the paper, one seed; moral.config.make_streams): initial states, each of the two option-order
shuffles and the Random opponent have their own streams; the PPO seed drives sampling and minibatch shuffling.
Settings live in moral.config, run files in moral.runio, summaries in moral.summary.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from games import GAMES, LLM, IteratedGame, action_type, get_tokens, initial_move, make_opponent, structured_prompt
from ppo_core import NonFiniteError, PPOTrainer
from ppo_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ppo_core.model import save_adapter

from .agent import Codec, decide, load_agent_model
from .config import RunConfig, UsageError, make_streams, ppo_config
from .rewards import Phase, RewardSettings, moral_reward
from .runio import FolderLock, FolderLocked, RunLogs, checkpoint_name, complete_checkpoints, latest_checkpoint, read_csv_rows, \
    remove_partial_writes, remove_tree, write_json_atomic
from .summary import RunningShares, shares_line, summarise
from .trackers import open_tracker

# Stop after this many PPO steps in a row were skipped for non-finite rewards.
MAX_NONFINITE_REWARD_STEPS = 5


class RunError(RuntimeError):
    """A run that cannot go on (disk full, persistent NaNs): the CLI prints the message and exits with code 1."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: the episode was finished and a checkpoint written."""


@dataclass
class Episode:
    """What one episode produced: its games.csv rows and each learner's PPO statistics."""
    rows: list[dict]
    stats: dict[str, dict[str, float]]


@dataclass
class Batch:
    """One learner's samples of an episode: the input of its PPO step."""
    queries: list = field(default_factory=list)
    responses: list = field(default_factory=list)
    scores: list = field(default_factory=list)


class FineTuning:
    """One fine-tuning run: its settings, model, trainers, streams and logs."""

    def __init__(self, config: RunConfig, folder: str, resume: bool = False, progress: bool = True,
                 on_episode=None, holder: str | None = None):
        """`on_episode(run)` is called after every episode (the sweep reports progress with it); `holder` says who
        holds the run folder's lock (default: this process's command line)."""
        self.folder, self.progress, self.on_episode = folder, progress, on_episode
        # One writer per run folder: a second process (run.py --resume, a sweep) exits at once naming this one.
        self._lock = FolderLock(folder)
        try:
            self._lock.acquire(holder)
        except FolderLocked as exc:
            raise UsageError(str(exc)) from None
        # From here on SIGINT/SIGTERM only ask the run to stop after the current episode; train() (or a failed
        # set-up) puts the previous handlers back.
        self._stop_signal = None
        self._previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._set_up(config, resume)
        except BaseException:
            self._restore_signal_handlers()
            self._lock.release()
            raise

    def _set_up(self, config: RunConfig, resume: bool) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        self.tokens = get_tokens(config.tokens)
        self.settings = RewardSettings(config.illegal, config.xi)
        self.streams = make_streams(config.seed)
        self.policy, self.tokenizer = load_agent_model(config, init_seed=config.seed)
        self.codec = Codec(self.tokenizer, self.tokens, config.format_aid, config.lenient)
        self.config = config = config.with_answer_plan(self.codec.answer_prefix, self.codec.plan)
        pad = self.tokenizer.pad_token_id or 0
        self.trainers = {name: PPOTrainer(ppo_config(config, seed=config.derived.ppo_seed + i), self.policy, name,
                                          pad_token_id=pad) for i, name in enumerate(config.learners)}
        if len(self.trainers) > 1:  # one frozen base, one reference cache
            self.trainers["opponent"].reference_cache = self.trainers["agent"].reference_cache
        self.episode = 0
        self.skipped_nonfinite_rewards = 0  # PPO steps skipped because a reward was NaN or infinite
        self._nonfinite_streak = 0
        self.shares = RunningShares()
        if resume:
            self._resume()
        else:
            os.makedirs(os.path.join(self.folder, "checkpoints"), exist_ok=True)
            write_json_atomic(os.path.join(self.folder, "config.json"), config.to_dict())
            self.logs = RunLogs(self.folder, tracker=self._tracker(None))

    def _tracker(self, resume_episode: int | None):
        return open_tracker(self.config.report_to, self.folder, self.config.to_dict(), resume_episode)

    # -- the loop --------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the remaining episodes, then write the final adapters and summary.json; returns the summary."""
        from tqdm import tqdm
        c = self.config
        bar = tqdm(total=c.episodes, initial=self.episode, disable=not self.progress, dynamic_ncols=True,
                   desc=f"{c.reward} vs {c.opponent}")
        t_start = time.perf_counter()
        try:
            try:
                self._loop(bar)
            except OSError as exc:
                raise RunError(f"cannot write to {self.folder} ({exc.strerror or exc}); the last complete checkpoint "
                               f"is {latest_checkpoint(self.folder) or 'none'}; free space and continue with "
                               f"--resume {self.folder}") from None
            except NonFiniteError as exc:
                raise RunError(f"{exc}; the last complete checkpoint is {latest_checkpoint(self.folder) or 'none'}") \
                    from None
            rows = [r for r in read_csv_rows(os.path.join(self.folder, "games.csv")) if r["learner"] == "agent"]
            summary = {**summarise(rows, c.episodes), "wall_s_this_session": time.perf_counter() - t_start,
                       "skipped_nonfinite_rewards": self.skipped_nonfinite_rewards}
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
            self.close()
        return summary

    def close(self) -> None:
        """Close the logs and release the run folder (train() does it; for a run driven episode by episode)."""
        try:
            self.logs.close()
        except OSError:  # a full disk: train() raised RunError saying so
            pass
        self._lock.release()

    def _loop(self, bar) -> None:
        c = self.config
        while self.episode < c.episodes:
            self.run_episode()
            bar.set_postfix(shares_line(self.shares.last), refresh=False)
            bar.update(1)
            if self.on_episode is not None:
                self.on_episode(self)
            saved = self.episode % c.save_every == 0 or self.episode == c.episodes
            if saved:
                self._save_checkpoint()
            if self._stop_signal is not None and self.episode < c.episodes:
                if not saved:
                    self._save_checkpoint()
                raise Interrupted(self._stop_signal)

    def run_episode(self) -> Episode:
        """One episode: G games from random last moves, N steps, one PPO update per learner."""
        index = self.phase_index(self.episode)
        phase = self.config.phases[index]
        if self.config.reset_at_switch and self.episode > 0 and self.phase_index(self.episode - 1) != index:
            self._reset_learning_state()
        games, opponents = self._start_games()
        batch = {name: Batch() for name in self.trainers}
        rows = []
        for step in range(self.config.steps):
            rows += self.play_step(step, phase, games, opponents, batch)
        self.logs.write_rows(rows)
        stats = self.update(phase, batch)
        agent = [r for r in rows if r["learner"] == "agent"]
        self.shares.add([r["action_type"] for r in agent], [r["reward"] for r in agent])
        self.logs.end_episode(self.episode, self.shares.last)
        self.episode += 1
        return Episode(rows, stats)

    def play_step(self, step: int, phase: Phase, games: list[IteratedGame], opponents: list, batch: dict) -> list[dict]:
        """Every game's learners answer their prompts (one sampling call per learner), the fixed opponents move,
        the rewards score the answers into `batch`, and the games advance; returns one row per decision."""
        c, two_learners = self.config, self.config.opponent == LLM
        views = {"agent": [(g.agent_last, g.opp_last) for g in games]}
        answers = {"agent": self._answer("agent", games, views["agent"])}
        if two_learners:
            views["opponent"] = [g.opponent_view() for g in games]
            answers["opponent"] = self._answer("opponent", games, views["opponent"])
        rows = []
        for k, g in enumerate(games):
            mine = answers["agent"][k]
            if two_learners:
                theirs = answers["opponent"][k]
                opp_action = theirs.action
            else:
                theirs, opp_action = None, opponents[k].move(g.agent_last, g.opp_last, self.streams["opponent"])
            outcome = {"agent": (mine, opp_action if opp_action is not None else g.opp_last, g.opp_last)}
            if two_learners:  # an illegal answer counts as the player's last legal move for the other's reward
                outcome["opponent"] = (theirs, mine.action if mine.action is not None else g.agent_last, g.agent_last)
            for learner, (decision, other_action, other_prev) in outcome.items():
                reward = moral_reward(phase.reward, g.game, decision.action, other_action, other_prev, self.settings)
                b = batch[learner]
                b.queries.append(decision.query), b.responses.append(decision.response), b.scores.append(reward)
                own_last, opp_last = views[learner][k]
                other_raw = opp_action if learner == "agent" else mine.action
                rows.append({"episode": self.episode, "step": step, "slot": k, "phase": phase.reward,
                             "learner": learner, "game": g.game.name, "opponent": c.opponent,
                             "own_last": own_last, "opp_last": opp_last,
                             "action": decision.action or "illegal", "opp_action": other_raw or "illegal",
                             "action_type": action_type(decision.action, opp_last), "reward": reward,
                             "response": decision.text, "p_c": _fmt(decision.p_c), "p_d": _fmt(decision.p_d)})
            g.step(mine.action, opp_action)
        return rows

    def update(self, phase: Phase, batch: dict) -> dict[str, dict[str, float]]:
        """One PPO step per learner on its episode's samples (skipped, and counted, when a reward is not finite);
        returns the statistics of each learner that stepped."""
        stepped = {}
        for learner, trainer in self.trainers.items():
            b = batch[learner]
            record = {"episode": self.episode, "phase": phase.reward, "learner": learner}
            if not all(math.isfinite(x) for x in b.scores):
                trainer.discard_rollouts()
                self.skipped_nonfinite_rewards += 1
                self._nonfinite_streak += 1
                self.logs.write_ppo({**record, "skipped": "non-finite reward",
                                     "skipped_nonfinite_rewards": self.skipped_nonfinite_rewards})
                if self._nonfinite_streak >= MAX_NONFINITE_REWARD_STEPS:
                    raise NonFiniteError(f"{self._nonfinite_streak} PPO steps in a row had non-finite rewards")
                continue
            self._nonfinite_streak = 0
            stepped[learner] = trainer.step(b.queries, b.responses, b.scores)
            self.logs.write_ppo(record, stepped[learner])
        return stepped

    def phase_index(self, episode: int) -> int:
        """Index in config.phases of the reward phase an episode belongs to."""
        ends = np.cumsum([p.episodes for p in self.config.phases])
        return int(np.searchsorted(ends, episode, side="right"))

    def _start_games(self) -> tuple[list[IteratedGame], list]:
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
        return games, opponents

    def _prompt(self, game: IteratedGame, own: str, other: str) -> str:
        pair = (self.tokens.c, self.tokens.d)
        first = pair if self.streams["shuffle1"].random() < 0.5 else pair[::-1]
        second = pair if self.streams["shuffle2"].random() < 0.5 else pair[::-1]
        return structured_prompt(game.game, self.tokens, own, other, first, second)

    def _answer(self, learner: str, games, views) -> list:
        prompts = [self._prompt(g, own, other) for g, (own, other) in zip(games, views)]
        return decide(self.codec, self.trainers[learner].generate, prompts)

    def _reset_learning_state(self) -> None:
        for name, trainer in self.trainers.items():
            fresh = PPOTrainer(trainer.config, self.policy, trainer.adapter, pad_token_id=trainer.pad_token_id,
                               reference_cache=trainer.reference_cache)
            fresh.sample_generator.set_state(trainer.sample_generator.get_state())
            fresh.shuffle_generator.set_state(trainer.shuffle_generator.get_state())
            self.trainers[name] = fresh

    # -- signals ---------------------------------------------------------------------------------------------
    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        extra = {"episode": self.episode, "log_offsets": self.logs.sync(),
                 "streams": {name: rng.getstate() for name, rng in self.streams.items()},
                 "skipped_nonfinite_rewards": self.skipped_nonfinite_rewards,
                 "nonfinite_streak": self._nonfinite_streak}
        folder = os.path.join(self.folder, "checkpoints", checkpoint_name(self.episode))
        save_checkpoint(folder, policy=self.policy, trainers=self.trainers, extra=extra, config=self.config.to_dict())
        for old in complete_checkpoints(self.folder)[:-self.config.keep_checkpoints]:
            remove_tree(old)

    def _save_final(self) -> None:
        final = os.path.join(self.folder, "final")
        if os.path.exists(final):
            return
        tmp = f"{final}.tmp-{os.getpid()}"
        remove_tree(tmp)
        for trainer in self.trainers.values():
            save_adapter(self.policy, trainer.adapter, os.path.join(tmp, trainer.adapter))
        self.tokenizer.save_pretrained(tmp)
        os.rename(tmp, final)

    def _resume(self) -> None:
        if not os.path.isfile(os.path.join(self.folder, "games.csv")):
            raise UsageError(f"--resume {self.folder}: not a run folder (games.csv is missing)")
        os.makedirs(os.path.join(self.folder, "checkpoints"), exist_ok=True)
        done = complete_checkpoints(self.folder)
        if not done:  # stopped before its first checkpoint: start again from episode 0 (same seed, same run)
            self.logs = RunLogs(self.folder, tracker=self._tracker(0))
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
        self.logs = RunLogs(self.folder, offsets=extra["log_offsets"], tracker=self._tracker(self.episode))
        remove_partial_writes(self.folder)


def _fmt(p: float | None) -> str:
    return "" if p is None else f"{p:.6f}"


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
