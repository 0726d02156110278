"""An LLM player: prompt text -> chat-template tokens -> sampled answer -> parsed action.

The `Codec` turns prompt texts into query token ids with the model's own chat template (keeping a template's default
system prompt, e.g. SmolLM2's "You are a helpful AI assistant named SmolLM...") and, when an answer prefix is used,
appends the tokens that both action strings start with, so that only the distinguishing tokens are sampled.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

import torch

from games import ActionTokens, chat_messages, parse_answer

FORMAT_AIDS = ("none", "prefix")


@dataclass(frozen=True)
class AnswerPlan:
    """How answers are tokenised at the answer position."""
    action_ids: tuple[tuple[int, ...], tuple[int, ...]]
    """Token ids of the C and D strings right after the generation prompt."""
    prefix_ids: tuple[int, ...]
    """Ids appended to every query (the shared first tokens of both actions; empty without a prefix)."""
    gen_len: int
    """Tokens to sample: the longer action's length minus the prefix."""


def plan_answers(tokenizer, tokens: ActionTokens, format_aid: str = "none") -> AnswerPlan:
    """Tokenise both action strings at the answer position and decide the prefix and generation length.

    format_aid='none' is the paper's protocol (sample the whole action string); 'prefix' starts the assistant's answer
    with the longest token prefix the two actions share (for SmolLM2, 'action'), leaving only the digit to sample.
    """
    if format_aid not in FORMAT_AIDS:
        raise ValueError(f"format aid {format_aid!r}: choose one of {', '.join(FORMAT_AIDS)}")
    head = render_chat(tokenizer, "x")
    head_ids = encode(tokenizer, head)
    action_ids = []
    for text in (tokens.c, tokens.d):
        full = encode(tokenizer, head + text)
        if full[:len(head_ids)] != head_ids:
            raise ValueError(f"the tokenizer merges the action {text!r} with the end of the chat template")
        action_ids.append(tuple(full[len(head_ids):]))
    shared = 0
    if format_aid == "prefix":
        while (shared < min(map(len, action_ids)) - 1 and action_ids[0][shared] == action_ids[1][shared]):
            shared += 1
    prefix = action_ids[0][:shared]
    return AnswerPlan(tuple(action_ids), prefix, max(map(len, action_ids)) - shared)


def render_chat(tokenizer, prompt: str) -> str:
    """The prompt as one user turn in the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Codec:
    """Prompt texts <-> token ids for one token set (queries are cached: the same prompts recur all the time)."""

    def __init__(self, tokenizer, tokens: ActionTokens, format_aid: str = "none", lenient: bool = False):
        self.tokenizer, self.tokens, self.lenient = tokenizer, tokens, lenient
        self.plan = plan_answers(tokenizer, tokens, format_aid)
        self._queries: dict[str, torch.Tensor] = {}

    @property
    def answer_prefix(self) -> str:
        return self.tokenizer.decode(list(self.plan.prefix_ids))

    def query(self, prompt: str, device: torch.device | str = "cpu") -> torch.Tensor:
        ids = self._queries.get(prompt)
        if ids is None:
            ids = torch.tensor(encode(self.tokenizer, render_chat(self.tokenizer, prompt)) + list(self.plan.prefix_ids))
            self._queries[prompt] = ids
        return ids.to(device)

    def answer_text(self, response: torch.Tensor) -> str:
        """The whole answer (prefix + sampled tokens), special tokens dropped."""
        return self.tokenizer.decode(list(self.plan.prefix_ids) + response.tolist(), skip_special_tokens=True)

    def action(self, text: str) -> str | None:
        return parse_answer(text, self.tokens, lenient=self.lenient)

    @property
    def answer_ids(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The C and D actions' tokens after the prefix: what is sampled when the model answers with them."""
        return tuple(ids[len(self.plan.prefix_ids):] for ids in self.plan.action_ids)

    @property
    def draft(self) -> list[tuple[int, ...]] | None:
        """The actions' tokens after the prefix, to be computed with the queries (ppo_core's `draft`): a model that
        answers with them samples a multi-token answer in one pass. None for one-token answers."""
        return sorted(set(self.answer_ids)) if self.plan.gen_len > 1 else None

    @property
    def probe_tokens(self) -> list[int] | None:
        """When each action is one token after the prefix, those two tokens: their first-step probabilities are
        then the exact probabilities of answering C and D."""
        c, d = self.answer_ids
        return [c[0], d[0]] if len(c) == len(d) == 1 else None


@dataclass
class Decision:
    query: torch.Tensor
    response: torch.Tensor
    text: str
    action: str | None
    p_c: float | None = None
    """Exact probability of answering C at this prompt (one-token actions only), else None."""
    p_d: float | None = None


def decide(codec: Codec, sampler, prompts: list[str]) -> list[Decision]:
    """Answer a batch of prompts with one sampling call.
    sampler(queries, max_new_tokens=n, probe_tokens=..., draft=...)."""
    queries = [codec.query(p) for p in prompts]  # host tensors: ppo_core keys them on the CPU
    probe = codec.probe_tokens
    rollout = sampler(queries, max_new_tokens=codec.plan.gen_len, probe_tokens=probe, draft=codec.draft)
    probs = rollout.probe_logprobs.exp().tolist() if probe else [(None, None)] * len(queries)
    out = []
    for q, r, (p_c, p_d) in zip(queries, rollout.responses, probs):
        text = codec.answer_text(r)
        out.append(Decision(q, r, text, codec.action(text), p_c, p_d))
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_agent_model(config, adapter_paths: dict[str, str] | None = None, init_seed: int | None = None):
    """The base model of a run (moral.config.RunConfig) with one LoRA adapter and value head per learner, or with
    the trained adapters in `adapter_paths` ({name: folder}); returns (PolicyModel, tokenizer).

    init_seed seeds torch right before the adapters and value heads are initialised, after the base model is
    loaded (the embedded model's one-time conversion draws random numbers: seeding earlier made a run's first
    use of the model differ from every later run with the same seed)."""
    from transformers import AutoTokenizer

    from ppo_core import LoraSettings, PolicyModel, load_causal_lm
    from ppo_core.model import lora_rank_limit

    from .config import UsageError

    path = model_source(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = DTYPES[config.dtype]
    lm = load_causal_lm(path, quantize=config.quantize, device=config.device, dtype=dtype)
    adapters = tuple(adapter_paths) if adapter_paths else config.learners
    limit = lora_rank_limit(lm)
    if not adapter_paths and limit is not None and config.lora_rank > limit:
        raise UsageError(f"--lora-rank {config.lora_rank}: at most {limit} for {config.model} (the "
                         f"largest min(in_features, out_features) of its linear layers; a larger rank adds memory, "
                         f"not expressiveness)")
    lora = LoraSettings(r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout)
    if init_seed is not None:
        torch.manual_seed(init_seed)
    policy = PolicyModel(lm, adapters=adapters, lora=lora, adapter_paths=adapter_paths, compute_dtype=dtype)
    return policy, tokenizer


class ModelUnavailable(ValueError):
    """A model that cannot be loaded: a path that is not a folder, or a Hub id that is not in the local cache while
    the Hub cannot be reached (or offline mode is on)."""


HUB_PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def model_source(model: str) -> str:
    """The folder or Hugging Face Hub id to load `model` from: the embedded model's converted folder, a local folder
    (~ expanded; a path that is not a folder raises ModelUnavailable), or a Hub id. When the Hub cannot be reached,
    huggingface_hub is switched to offline mode for this process and its children, so the id loads from the local
    cache at once (instead of huggingface_hub's five retries per file, 1 + 2 + 4 + 8 + 8 s of backoff, each with a
    warning line); an id that is not in the cache then raises ModelUnavailable naming it."""
    from .embedded import EMBEDDED_MODEL, ensure_embedded_model

    if model == EMBEDDED_MODEL:
        return ensure_embedded_model()
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.expanduser(model)
    if is_folder_path(model):
        raise ModelUnavailable(f"{model!r}: no such folder (give a Hugging Face Hub id or a model folder)")
    from huggingface_hub import constants, try_to_load_from_cache

    offline = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else None
    if offline is None and hub_reachable() is False:
        offline = f"{urllib.parse.urlsplit(constants.ENDPOINT).hostname} cannot be reached"
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True  # read at import time; is_offline_mode() reads this attribute
    if offline and not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise ModelUnavailable(f"{model!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                               f"{offline}")
    return model


def is_folder_path(model: str) -> bool:
    """Whether `model` is written as a path (from /, ./, ../ or ~) rather than as a Hugging Face Hub id."""
    return model.startswith(("/", "./", "../", "~"))


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool | None:
    """Whether a TCP connection to the Hugging Face Hub's endpoint (HF_ENDPOINT) opens within timeout_s; None (not
    probed) behind a proxy, whose route a direct connection says nothing about."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    from huggingface_hub import constants

    from .network import tcp_unreachable

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    return tcp_unreachable(url.hostname, url.port or (443 if url.scheme == "https" else 80), timeout_s) is None
