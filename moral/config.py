"""Run settings: RunConfig (frozen, one docstring per field), what it derives, the random streams of a run, and the
one function that turns run settings into a PPOConfig (used by the training loop and the benchmarks).

    config = RunConfig(reward="deont", opponent="tft").resolve()   # model-dependent defaults, validated
    ppo_config(config)                                              # -> ppo_core.PPOConfig

config.json in a run folder is `config.to_dict()`; `RunConfig.from_dict` reads it back (also round one's files).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np

from games import LLM, OPPONENT_NAMES, get_tokens
from ppo_core import PPOConfig
from ppo_core.model import QUANTIZE_CHOICES

from .agent import FORMAT_AIDS
from .embedded import EMBEDDED_MODEL
from .rewards import Phase, RewardSettings, parse_schedule

DTYPE_NAMES = ("fp32", "bf16", "fp16")
STREAMS = ("tokens", "ppo", "initial", "shuffle1", "shuffle2", "opponent")  # the paper's six streams, in order

# Defaults that depend on the model. The embedded model's episode count comes from its measured learning curves
# (README, "Learning curves").
EPISODES_EMBEDDED, EPISODES_PAPER = 300, 1000


SEED_LIMIT = 2 ** 63
SEED_RULE = "must be an integer in [0, 2^63)"  # every seed becomes an int64 somewhere


class UsageError(ValueError):
    """Bad settings: the command line prints the message on one line and exits with code 2."""


@dataclass(frozen=True)
class Derived:
    """What the settings imply, recorded in config.json under "derived" (filled by `resolve()`; the answer plan by
    `with_answer_plan()` once the tokenizer is loaded)."""
    phases: tuple[Phase, ...] = ()
    """The reward schedule: (reward, episodes) per phase; one phase unless the reward is a schedule."""
    batch_size: int = 0
    """Samples per PPO step: steps x parallel games."""
    ppo_seed: int | None = None
    """Seed of the PPO trainer's streams (sampling, minibatch shuffling): the first draw of the "ppo" stream."""
    ppo: dict | None = None
    """The PPOConfig of the agent's trainer, as a dict (the opponent's differs only in its seed: ppo_seed + 1)."""
    versions: dict | None = None
    """Python, torch, transformers and peft versions that resolved the settings."""
    answer_prefix: str | None = None
    """Text appended to every query so that only the distinguishing action tokens are sampled ("" for none)."""
    gen_len: int | None = None
    """Tokens sampled per answer."""
    action_token_ids: tuple[tuple[int, ...], ...] | None = None
    """Token ids of the C and D action strings at the answer position."""

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["phases"] = [dataclasses.asdict(p) for p in self.phases]
        if self.action_token_ids is not None:
            d["action_token_ids"] = [list(ids) for ids in self.action_token_ids]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Derived":
        d = dict(d)
        d["phases"] = tuple(Phase(**p) for p in d.get("phases", ()))
        if d.get("action_token_ids") is not None:
            d["action_token_ids"] = tuple(tuple(ids) for ids in d["action_token_ids"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a fine-tuning run; the command line's options (dashes become underscores)."""
    reward: str = "deont"
    """game, deont, util, game+deont, or a schedule such as game:500,deont:500 (unlearning)."""
    opponent: str = "tft"
    """A fixed strategy (tft, ac, ad, random, grim, wsls, alternate) or llm: a second learner on the same base."""
    model: str = EMBEDDED_MODEL
    """Hugging Face id or local folder; the default is the embedded SmolLM2-135M-Instruct."""
    episodes: int | None = None
    """Episodes (None: 300 for the embedded model, 1000 otherwise; a schedule's counts add up to it)."""
    steps: int | None = None
    """Sequential steps per episode = PPO batch per game (None: 5, or 3 against llm)."""
    parallel_games: int = 1
    """Independent games per episode, answered in one batched sampling call (1 in the paper)."""
    seed: int = 0
    """One seed for every random stream of the run (see STREAMS) and for LoRA / value-head initialisation."""
    lr: float = 1.41e-5
    """Adam learning rate (the paper's)."""
    lora_rank: int = 64
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout (off in every PPO forward pass and in sampling; kept for peft's adapter config)."""
    quantize: str | None = None
    """Base weights: none, 4bit (NF4) or 8bit (None: 4bit on GPU, none on CPU)."""
    ppo_epochs: int = 1
    """PPO epochs per batch (1 = the paper's effective update)."""
    tokens: str = "action12"
    """Action-token set (games.TOKEN_SETS) or two strings "C,D"."""
    format_aid: str | None = None
    """prefix: start the answer with the actions' shared first tokens; none: the paper's protocol (None: prefix for
    the embedded model, none otherwise)."""
    lenient: bool = False
    """Accept an action string anywhere in the answer."""
    illegal: float = -6.0
    """Reward of an illegal answer (R_illegal)."""
    xi: float = 3.0
    """Deontological punishment for defecting against a cooperator."""
    init_kl_coef: float = 0.2
    """Initial coefficient of the adaptive KL penalty."""
    score_norm: bool = True
    """Scale and normalise scores with running moments (TRL's use_score_scaling and use_score_norm)."""
    reset_at_switch: bool = False
    """Reset optimiser, KL coefficient and score moments when a reward schedule switches."""
    save_every: int = 100
    """Checkpoint every N episodes."""
    keep_checkpoints: int = 2
    """Checkpoints kept (the newest)."""
    threads: int | None = None
    """CPU threads for torch (None: torch's default, all cores)."""
    device: str | None = None
    """cpu or cuda (None: cuda if available)."""
    dtype: str | None = None
    """Compute dtype fp32, bf16 or fp16 (None: bf16 on GPUs that support it and on CPUs with native bf16, fp16 on
    V100, fp32 otherwise)."""
    temperature: float = 1.0
    """Sampling temperature."""
    report_to: str = "none"
    """Experiment tracker: none, tensorboard, wandb or trackio (moral.trackers)."""
    derived: Derived = field(default_factory=Derived)
    """What the settings imply (see Derived)."""

    # ------------------------------------------------------------------------------------------------- resolve
    def resolve(self) -> "RunConfig":
        """Fill the model-dependent defaults, validate every setting and derive the rest; raises UsageError naming
        the bad value and the allowed ones."""
        import torch

        from ppo_core.model import compute_dtype_for, cpu_has_native_bf16

        from .trackers import TRACKERS, TrackerUnavailable, check_installed

        self._check_types()
        embedded = self.model == EMBEDDED_MODEL
        if self.opponent not in OPPONENT_NAMES:
            raise UsageError(f"--opponent {self.opponent!r}: choose one of {', '.join(OPPONENT_NAMES)}")
        for name in ("episodes", "steps", "parallel_games", "lora_rank", "ppo_epochs", "save_every",
                     "keep_checkpoints", "threads", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 1 <= value < 2 ** 63):
                raise UsageError(f"{option_name(name)} {value!r}: must be a positive integer below 2^63")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < SEED_LIMIT:
            raise UsageError(f"--seed {self.seed!r}: {SEED_RULE}")
        schedule = "," in self.reward or ":" in self.reward
        try:
            phases = parse_schedule(self.reward, self.episodes if schedule else
                                    (self.episodes or (EPISODES_EMBEDDED if embedded else EPISODES_PAPER)))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not (isinstance(self.lr, float) and 0 < self.lr < 1):
            raise UsageError(f"--lr {self.lr!r}: must be a number in (0, 1)")
        format_aid = self.format_aid or ("prefix" if embedded else "none")
        if format_aid not in FORMAT_AIDS:
            raise UsageError(f"--format-aid {format_aid!r}: choose one of {', '.join(FORMAT_AIDS)}")
        try:
            get_tokens(self.tokens)
            RewardSettings(self.illegal, self.xi)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        device = parse_device(self.device)
        quantize = self.quantize or ("4bit" if device.type == "cuda" else "none")
        dtype = self.dtype
        if dtype is None:
            auto = compute_dtype_for(device) if device.type == "cuda" else \
                (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
            dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[auto]
        if dtype not in DTYPE_NAMES:
            raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
        if quantize not in QUANTIZE_CHOICES:
            raise UsageError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
        if not (self.temperature > 0):
            raise UsageError(f"--temperature {self.temperature!r}: must be > 0")
        if self.report_to not in TRACKERS:
            raise UsageError(f"--report-to {self.report_to!r}: choose one of {', '.join(TRACKERS)}")
        try:
            check_installed(self.report_to)
        except TrackerUnavailable as exc:
            raise UsageError(str(exc)) from None
        steps = self.steps or (3 if self.opponent == LLM else 5)
        if steps * self.parallel_games < 2:
            raise UsageError(f"--batch-size {steps}: a PPO batch needs at least 2 samples (its scores are scaled by "
                             f"their running std and its advantages whitened); use --batch-size 2 or more, or "
                             f"--parallel-games 2 or more")
        resolved = dataclasses.replace(
            self, episodes=sum(p.episodes for p in phases), steps=steps, format_aid=format_aid, device=str(device),
            quantize=quantize, dtype=dtype,
            derived=Derived(phases=tuple(phases), batch_size=steps * self.parallel_games,
                            ppo_seed=make_streams(self.seed)["ppo"].randrange(10_000), versions=_versions()))
        try:
            ppo = ppo_config(resolved)
        except ValueError as exc:  # a PPOConfig field set from this config (init_kl_coef), named by PPOConfig
            raise UsageError(str(exc)) from None
        return resolved.with_derived(ppo=ppo.to_dict())

    def _check_types(self) -> None:
        """Settings of the wrong kind (from the Python API; the command line and grid files parse theirs) are a
        UsageError naming them, not a TypeError deep inside."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        kinds = (("text", lambda v: isinstance(v, str), ("reward", "model", "opponent", "tokens", "report_to")),
                 ("text or None", lambda v: v is None or isinstance(v, str),
                  ("quantize", "format_aid", "device", "dtype")),
                 ("True or False", lambda v: isinstance(v, bool), ("lenient", "score_norm", "reset_at_switch")),
                 ("a finite number", lambda v: number(v) and math.isfinite(v),
                  ("lr", "lora_dropout", "illegal", "xi", "init_kl_coef", "temperature")),
                 ("an integer", lambda v: number(v) and isinstance(v, int),
                  ("parallel_games", "ppo_epochs", "lora_rank", "lora_alpha", "save_every", "keep_checkpoints",
                   "seed")))
        for kind, is_kind, names in kinds:
            for name in names:
                if not is_kind(getattr(self, name)):
                    raise UsageError(f"{option_name(name)} {getattr(self, name)!r}: must be {kind}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora-dropout {self.lora_dropout!r}: must be in [0, 1)")

    def with_derived(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, derived=dataclasses.replace(self.derived, **changes))

    def with_answer_plan(self, answer_prefix: str, plan) -> "RunConfig":
        """Record how answers are tokenised (moral.agent.AnswerPlan), known once the tokenizer is loaded."""
        return self.with_derived(answer_prefix=answer_prefix, gen_len=plan.gen_len,
                                 action_token_ids=tuple(plan.action_ids))

    def speed_note(self) -> str | None:
        """Lines for the console when the resolved settings run far slower than this machine's default: bf16 on a
        CPU without bf16 instructions, where torch emulates it (measured with `pytest
        benchmarks/test_cpu_smollm2.py --bench-emulated-bf16`; benchmarks/RESULTS.md), or more torch threads than
        cores (threads_note)."""
        from ppo_core.model import cpu_has_native_bf16
        notes = [threads_note(self.threads, self.device)]
        if self.device == "cpu" and self.dtype == "bf16" and not cpu_has_native_bf16():
            notes.append("note: --dtype bf16 on a CPU without bf16 instructions runs emulated, far slower than fp32 (a "
                         "PPO step of the embedded model: about 100 s against 4 s on a 2-core AVX2 machine); without "
                         "--dtype this CPU uses fp32")
        return "\n".join(n for n in notes if n) or None

    @property
    def phases(self) -> tuple[Phase, ...]:
        return self.derived.phases

    @property
    def learners(self) -> tuple[str, ...]:
        """The adapters trained: the agent, and the opponent when it is a second LLM."""
        return ("agent", "opponent") if self.opponent == LLM else ("agent",)

    # -------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["derived"] = self.derived.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Read config.json (unknown keys are an error naming them; round one's "out" is dropped)."""
        d = {k: v for k, v in d.items() if k != "out"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d["derived"] = Derived.from_dict(d.get("derived") or {})
        return cls(**d)


def require_trained_device(config: "RunConfig", where: str) -> None:
    """UsageError unless this machine has the device a started run trained on (a run folder copied from a GPU
    machine continues only where there is one)."""
    why = device_unavailable(config.device)
    if why:
        raise UsageError(f"{where}: the run was trained on {config.device}, which this machine cannot use ({why}); "
                         f"continue it on a machine that has it (`run.py eval` of its checkpoints and final adapter "
                         f"works here)")


def device_unavailable(name: str) -> str | None:
    """Why this machine cannot run on the valid device `name` (cuda, cuda:N), or None when it can."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"this machine has CUDA devices cuda:0 to cuda:{torch.cuda.device_count() - 1}"
    return None


def option_name(setting: str) -> str:
    """A setting as the command line spells it: cpus_per_run -> --cpus-per-run."""
    return "--" + setting.replace("_", "-")


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, as under taskset or Slurm)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_note(threads: int | None, device: str | None) -> str | None:
    """One line when a CPU run asks for more torch threads than it has cores (a run folder's --threads from a larger
    machine, resumed on a laptop): the threads wait on each other. Measured on a 2-core Xeon (`python run.py --episodes
    6 --threads T`, less the load): 2.3 s per episode at T=2, 4.0 at 4, 5.3 at 8, 7.0 at 16."""
    cores = usable_cpus()
    kind = parse_device(None).type if device is None else str(device).split(":")[0]
    if not threads or threads <= cores or kind != "cpu":
        return None
    return (f"note: --threads {threads} is more than the {cores} CPU core{'s' * (cores != 1)} this process may use: "
            f"torch's threads wait on each other (16 on 2 cores: the main job's episodes 3x slower); --threads "
            f"{cores} changes it, with --resume too")


def parse_device(name: str | None):
    """--device: cpu, cuda or cuda:N (default: cuda if available, else cpu) as a torch.device; UsageError naming the
    value otherwise (torch would take e.g. mps, and the model would then load on the CPU)."""
    import torch

    from ppo_core.model import default_device
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: choose cpu, cuda or cuda:N")
    why = device_unavailable(name)
    if why:
        raise UsageError(f"--device {name!r}: {why}")
    return device


def ppo_config(run: RunConfig, **changes) -> PPOConfig:
    """The PPO settings of a run: one optimiser step per episode over its G x N samples (the paper's effective
    update), its learning rate, KL and score settings. `changes` override fields (e.g. seed=..., fuse_rollout=...).
    An unresolved config works too (default steps; give seed=)."""
    n = run.derived.batch_size or run.parallel_games * (run.steps or (3 if run.opponent == LLM else 5))
    settings = dict(learning_rate=run.lr, batch_size=n, mini_batch_size=n, ppo_epochs=run.ppo_epochs,
                    init_kl_coef=run.init_kl_coef, use_score_scaling=run.score_norm, use_score_norm=run.score_norm,
                    temperature=run.temperature, seed=run.derived.ppo_seed)
    settings.update(changes)
    return PPOConfig(**settings)


def make_streams(seed: int) -> dict[str, random.Random]:
    """The paper's separate random streams from one seed: SeedSequence(seed).spawn(6), in its order."""
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: random.Random(int(child.generate_state(1, np.uint64)[0])) for name, child in zip(STREAMS, children)}


def _versions() -> dict:
    """The versions a run records, read from the installed packages' metadata: importing peft took 3.8 s
    (`python -X importtime run.py sweep grids/embedded.toml --out X --dry-run`, idle AVX2 machine)."""
    from importlib.metadata import version

    import torch
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": version("transformers"),
            "peft": version("peft")}
