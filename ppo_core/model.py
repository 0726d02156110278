"""Loading a causal LM (optionally 4-bit / 8-bit) and wrapping it as a PPO policy: named LoRA adapters, one value
head per adapter, and the reference policy as the same weights with the adapters disabled (never a second copy).

The policy exposes the pieces of a forward pass separately (backbone -> hidden states; LM head -> logits only where
they are needed; value head), so that callers never compute [B, T, V] logits they do not use.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


# ------------------------------------------------------------------------------------------- device and dtype
def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype_for(device: torch.device | str) -> torch.dtype:
    """bf16 where the GPU supports it (A100, H100), fp16 on compute capability 7.x (V100, T4), fp32 otherwise
    (on CPU too; see cpu_has_native_bf16 for CPUs where bf16 is much faster)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if major == 7:
        return torch.float16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where oneDNN runs bf16 matmuls several
    times faster than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


QUANTIZE_CHOICES = ("4bit", "8bit", "none")


def quantization_config(quantize: str, dtype: torch.dtype):
    """A bitsandbytes config for '4bit' (NF4, compute in dtype) or '8bit'; None for 'none'."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}: must be one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_causal_lm(name_or_path: str, *, quantize: str = "none", device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                   local_files_only: bool | None = None, **kwargs):
    """Load any Hugging Face causal LM by id or folder, frozen and in eval mode.

    Non-quantised weights are kept in the compute dtype (bf16/fp16 on GPU, fp32 on CPU).
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or compute_dtype_for(device)
    qconfig = quantization_config(quantize, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, quantization_config=qconfig,
        device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"},
        attn_implementation=attn_implementation, local_files_only=local_files_only, **kwargs)
    prepare_frozen(model)
    return model


def prepare_frozen(model: nn.Module) -> nn.Module:
    """Freeze every weight, switch dropout off, and keep bitsandbytes' CPU 4-bit layers on their autograd path.

    bitsandbytes repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel the first time it runs without grad
    in eval mode; that kernel has no autograd, so a later forward *with* grad would silently cut the gradient that
    flows through the frozen base weights into earlier LoRA layers. We switch the repacking off.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------- value head
class ValueHead(nn.Module):
    """Dropout + Linear(hidden, 1) in fp32 on the final (normed) hidden state. [..., H] -> [...]."""

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return self.summary(self.dropout(hidden.to(self.summary.weight.dtype))).squeeze(-1)


# -------------------------------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings; the paper's are r=64, alpha=32, dropout=0.05 on all linear layers."""
    r: int = 64
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraSettings.r={self.r!r}: must be an integer >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraSettings.dropout={self.dropout!r}: must be in [0, 1)")

    def peft_config(self):
        """These settings as peft's LoraConfig (no bias, causal LM)."""
        from peft import LoraConfig
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                          task_type="CAUSAL_LM", target_modules=target)


def lora_rank_limit(lm: nn.Module) -> int | None:
    """The largest LoRA rank that can add expressiveness to some linear layer of `lm` (the LM head aside): LoRA's
    update B @ A of an in x out layer has rank at most min(r, in, out), so this is the largest min(in, out); None
    when `lm` has no such layer. Linear layers (4-bit ones included) and GPT-2's Conv1D count."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    dims = []
    for module in lm.modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            dims.append(min(module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            dims.append(min(module.weight.shape))
    return max(dims, default=None)


class PolicyModel(nn.Module):
    """A frozen causal LM with named LoRA adapters and one fp32 value head per adapter.

    ``with policy.adapter(name):`` selects the learner; ``with policy.reference():`` disables every adapter (the
    reference policy pi_ref). Dropout stays off: every method runs the modules in eval mode.
    compute_dtype: bf16 or fp16 runs the LM under autocast (LoRA master weights and value heads stay fp32); None
    takes the dtype the model's own weights compute in (its embeddings', or a 4-bit model's compute dtype when that
    is 16-bit), so a model loaded in bf16 computes in bf16 and one loaded in fp32 in fp32.
    """

    def __init__(self, lm: nn.Module, adapters: tuple[str, ...] = ("default",),
                 lora: LoraSettings | None = LoraSettings(), value_head_dropout: float = 0.1,
                 adapter_paths: dict[str, str] | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        from peft import PeftModel, get_peft_model

        if isinstance(adapters, str):
            adapters = (adapters,)  # one name, not its letters
        if not adapters or len(set(adapters)) != len(adapters):
            raise ValueError(f"adapters={adapters!r}: need one or more distinct names")
        for name in adapters:
            if not isinstance(name, str) or not name or "." in name or name in "lora_":
                raise ValueError(f"adapter name {name!r}: must be a non-empty string without '.' and not part of "
                                 f"'lora_' (peft's parameter names hold it between dots)")
        if isinstance(lm, PeftModel):
            raise ValueError(f"lm is already a peft model ({type(lm).__name__}, adapters "
                             f"{', '.join(getattr(lm, 'peft_config', {})) or 'none'}); PolicyModel adds its own: "
                             f"pass the base model, and a saved adapter as adapter_paths={{name: folder}}")
        if getattr(lm, "peft_config", None):
            raise ValueError(f"lm already carries peft adapters ({', '.join(lm.peft_config)}): it is the base of "
                             f"another PolicyModel, or had adapters added; pass a base model of its own (one "
                             f"PolicyModel holds several adapters: adapters=(...)), and a saved adapter as "
                             f"adapter_paths={{name: folder}}")
        if any(getattr(m, "gradient_checkpointing", False) for m in lm.modules()):
            warnings.warn("ppo_core: gradient checkpointing saves nothing here (transformers checkpoints only in "
                          "training mode, and every module stays in eval mode); bound memory with "
                          "PPOConfig(micro_batch_tokens=...) or fuse_rollout=False", stacklevel=2)
        adapter_paths = adapter_paths or {}
        if lora is not None and set(adapters) - set(adapter_paths):
            limit = lora_rank_limit(lm)
            if limit is not None and lora.r > limit:
                raise ValueError(f"LoraSettings.r={lora.r}: above {limit}, the largest rank any of this model's linear "
                                 f"layers can take (min(in_features, out_features)); a larger r adds memory, not "
                                 f"expressiveness")
        prepare_frozen(lm)
        first = adapters[0]
        with warnings.catch_warnings():  # peft reads a transformers property that warns of its own deprecation
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if first in adapter_paths:
                self.lm = PeftModel.from_pretrained(lm, adapter_paths[first], adapter_name=first, is_trainable=True)
            else:
                self.lm = get_peft_model(lm, lora.peft_config(), adapter_name=first)
        for name in adapters[1:]:
            if name in adapter_paths:
                self.lm.load_adapter(adapter_paths[name], adapter_name=name, is_trainable=True)
            else:
                self.lm.add_adapter(name, lora.peft_config())
        self.adapter_names = tuple(adapters)
        self._trainable: dict[str, list[nn.Parameter]] = {}
        base = self.lm.get_base_model()
        self.config = base.config
        hidden_size = self.config.get_text_config().hidden_size
        self.value_heads = nn.ModuleDict({name: ValueHead(hidden_size, value_head_dropout) for name in adapters})
        device = next(p.device for p in base.parameters())
        self.value_heads.to(device)
        for name, path in adapter_paths.items():
            load_value_head(self.value_heads[name], path)
        self._backbone = base.get_decoder()
        self._lm_head = base.get_output_embeddings()
        self._softcap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        self._active = first
        self.lm.set_adapter(first)
        # bf16/fp16 compute: run the LM (LoRA branches included; their fp32 master weights are cast per op) under
        # autocast. The value head stays fp32.
        self.compute_dtype = compute_dtype or weights_compute_dtype(base)
        from peft.tuners.lora import LoraLayer
        self._lora_layers = [m for m in self.lm.modules() if isinstance(m, LoraLayer)]
        # Adapters that train whole modules or token rows beside LoRA switch (and switch off) through peft, which
        # also swaps those; set_adapter() and reference() otherwise set only the LoRA layers' own state.
        self._through_peft = any(getattr(c, "modules_to_save", None) or getattr(c, "trainable_token_indices", None)
                                 for c in self.lm.peft_config.values())
        self._cast_holders: dict[int, weakref.finalize] = {}  # id(owner) -> what ends its hold
        self._tree_supported: bool | None = None
        self.use_prompt_tree = True
        """False: compute padded sequences even where the prompt tree works (benchmarks compare the two)."""
        self.backbone_tokens = 0
        """Tokens that went through the backbone so far (padding included), for ppo/tokens_computed."""
        self.backbone_passes = 0
        """Forward passes through the backbone so far (each has a fixed cost, whatever its tokens)."""
        import inspect
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self._backbone.forward).parameters \
            else "past_key_values"
        for p in self.parameters():
            p.requires_grad_(False)
        self._keep_adapters_trainable()
        self.eval()

    def train(self, mode: bool = True) -> PolicyModel:
        """Every module stays in eval mode: dropout is off in every pass, as PPO's ratio and the kept sampling
        graphs need. train() (a training loop's habit) warns and changes nothing."""
        if mode:
            warnings.warn("PolicyModel.train(): ppo_core keeps dropout off in every pass; the modules stay in eval "
                          "mode", stacklevel=2)
        return super().train(False)

    @property
    def _autocast(self) -> bool:
        return self.compute_dtype in (torch.bfloat16, torch.float16)

    def _apply(self, fn, recurse: bool = True):
        """policy.to(torch.bfloat16) / .half() / .bfloat16() (a habit): the base takes that dtype and the policy then
        computes in it under autocast, but the LoRA weights and value heads stay fp32 (in bf16 Adam's small updates
        were rounded away: tests/test_trainer.py::test_policy_to_bf16_computes_in_bf16_and_keeps_fp32_master_weights_that_learn).
        .to(device), .float() and .double() are nn.Module's."""
        super()._apply(fn, recurse)
        if getattr(self, "_cast_holders", None) is None:  # still in __init__
            return self
        trainable = [p for name in self.adapter_names for p in self.trainable_parameters(name)]
        low = {p.dtype for p in trainable} & {torch.bfloat16, torch.float16}
        if low:
            with torch.no_grad():
                for p in trainable:
                    p.data = p.data.float()
                    if p.grad is not None:
                        p.grad = p.grad.float()
            self.compute_dtype = low.pop()
        self.weights_changed()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> PolicyModel:
        """True: every adapter's LoRA weights and value head become trainable; the base stays frozen (nn.Module's
        version would unfreeze it too: a gradient the size of the model, computed in every step and never used).
        False: freezes them all, as nn.Module's does (a step then refuses to run until they are trainable again)."""
        for name in self.adapter_names:
            for p in self.trainable_parameters(name):
                p.requires_grad_(requires_grad)
        return self

    # -- adapters -------------------------------------------------------------------------------------------
    def set_adapter(self, name: str) -> None:
        """Make adapter `name` the one every later forward pass uses (every adapter stays trainable)."""
        if name not in self.adapter_names:
            raise ValueError(f"adapter {name!r}: must be one of {', '.join(self.adapter_names)}")
        if name == self._active:
            return
        if self._through_peft:
            self.lm.set_adapter(name)
            self._keep_adapters_trainable()
        else:
            # What peft's set_adapter leaves behind, set directly: it walks every module twice and sets
            # requires_grad on every adapter weight (which we then had to undo): 15-20 ms per switch on SmolLM2's
            # 210 LoRA layers against 0.3-0.6 ms for this (`python -m benchmarks.cpu_shortcuts switch`).
            self.lm.active_adapter = name
            self.lm.base_model.active_adapter = name
            for layer in self._lora_layers:
                layer._active_adapter = [name]
        self._active = name

    @property
    def active_view(self) -> str | None:
        """The adapter the next forward pass computes with, or None inside reference() (every adapter off)."""
        off = self._lora_layers[0]._disable_adapters if self._lora_layers else False
        return None if off else self._active

    @contextlib.contextmanager
    def adapter(self, name: str):
        """``with policy.adapter(name):`` runs the block with adapter `name`, then restores the previous one."""
        previous = self._active
        self.set_adapter(name)
        try:
            yield self
        finally:
            self.set_adapter(previous)

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the same base weights with every adapter disabled."""
        # Sets only the flag each LoRA layer's forward reads. peft's disable_adapter() does the same after walking
        # every module for a status report, and on exit resets requires_grad (freezing inactive adapters, whose kept
        # graphs need them live): 36-63 ms per use on SmolLM2's 210 LoRA layers against 0.6-1.1 ms for this
        # (`python -m benchmarks.cpu_shortcuts reference`).
        if self._through_peft:
            try:
                with self.lm.disable_adapter():
                    yield self
            finally:
                self._keep_adapters_trainable()
            return
        previous = [layer._disable_adapters for layer in self._lora_layers]
        for layer in self._lora_layers:
            layer._disable_adapters = True
        try:
            yield self
        finally:
            for layer, disabled in zip(self._lora_layers, previous):
                layer._disable_adapters = disabled

    def _keep_adapters_trainable(self) -> None:
        # peft's switches freeze the inactive adapters; graphs built earlier under them need them live.
        for name in self.adapter_names:
            for p in self.trainable_parameters(name):
                p.requires_grad_(True)

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """LoRA weights of adapter `name` followed by its value head, in a fixed order."""
        if name not in self._trainable:
            marker = f".{name}."
            lora = [p for n, p in self.lm.named_parameters() if "lora_" in n and marker in n]
            self._trainable[name] = lora + list(self.value_heads[name].parameters())
        return self._trainable[name]

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s weights in peft's layout. The vocabulary is never resized here, so the embedding layers
        are not saved (peft's "auto" would ask the Hub for the base model's config at every save)."""
        from peft import get_peft_model_state_dict
        return get_peft_model_state_dict(self.lm, adapter_name=name, save_embedding_layers=False)

    # -- forward pieces --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the forward passes run (the LM head's device)."""
        return self._lm_head.weight.device

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, past_key_values=None,
                      use_cache: bool = False):
        """Final (normed) hidden states. input_ids [B, T] -> ([B, T, H], cache or None)."""
        cache = {self._cache_kwarg: past_key_values} if past_key_values is not None else {}
        out = self._backbone_pass(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=use_cache, **cache)
        return out.last_hidden_state, (getattr(out, self._cache_kwarg) if use_cache else None)

    def _backbone_pass(self, input_ids: torch.Tensor, **kwargs):
        """The one place the backbone runs, counted in backbone_tokens and backbone_passes."""
        self.backbone_tokens += input_ids.numel()
        self.backbone_passes += 1
        with self._compute_context():
            return self._backbone(input_ids=input_ids, **kwargs)

    # -- the prompt tree (ppo_core.tree) ---------------------------------------------------------------------------
    @property
    def sliding_window(self) -> int | None:
        """Window of the model's sliding-window layers (they get a mask of their own), None without such layers.
        A config with a window and no layer types (Mistral, Phi-3, Starcoder2) slides in every layer."""
        window = getattr(self.config.get_text_config(), "sliding_window", None)
        types = self._layer_types
        return window if window and (types is None or "sliding_attention" in types) else None

    @property
    def _layer_types(self) -> list[str] | None:
        return getattr(self.config.get_text_config(), "layer_types", None)

    @property
    def _every_layer_slides(self) -> bool:
        """A window and no layer types: the model gets one mask, the sliding one."""
        return self._layer_types is None and self.sliding_window is not None

    def attention_mask_4d(self, visible: torch.Tensor, implementation: str | None = None) -> torch.Tensor:
        """[Q, K] bool (True = may attend) -> the [1, 1, Q, K] mask the attention `implementation` (default: the
        model's) takes: boolean for SDPA, additive float (0 or the most negative float) for eager attention."""
        if (implementation or self.config.get_text_config()._attn_implementation) == "sdpa":
            return visible[None, None]
        return torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, torch.finfo(torch.float32).min)[
            None, None]

    EAGER_PAIRS_CPU = 2 ** 18
    """On the CPU a packed pass whose attention scores at most this many (query, key) pairs runs eager attention
    instead of SDPA, whose masked flash-attention backward is the slower one there at these sizes; SDPA stays for
    larger passes (`python -m benchmarks.cpu_shortcuts` on the 2-core EPYC: the main job's replayed episode 2.27 s with
    this rule vs 2.43 s with SDPA only; one pass of 230 tokens with backward 0.93 vs 1.12 s, 990 tokens 6.0 vs 5.0 s,
    3,080 tokens forward only 18.4 vs 9.1 s). The choice depends on the sizes only, so the same pass with and without
    gradients computes the same numbers (a first PPO epoch's ratio stays 1)."""

    def attention_for(self, queries: int, keys: int) -> str:
        """The attention implementation a packed pass of `queries` new tokens over `keys` keys runs with: SDPA (or
        eager, see EAGER_PAIRS_CPU) whatever the model's own, since only these two take the tree's 4-D mask as it is
        (flash attention takes none; torch 2.13's flex attention on the CPU crashed the process on one)."""
        implementation = self.config.get_text_config()._attn_implementation
        if implementation not in ("eager", "sdpa"):
            implementation = "sdpa" if getattr(self.lm.get_base_model(), "_supports_sdpa", False) else "eager"
        if implementation == "sdpa" and self.device.type == "cpu" and queries * keys <= self.EAGER_PAIRS_CPU:
            return "eager"
        return implementation

    def packed_hidden_states(self, input_ids: torch.Tensor, visible: dict[str, torch.Tensor],
                             position_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Final hidden states of a packed tree pass. input_ids, position_ids [1, T]; visible {"full_attention",
        optional "sliding_attention"}: [T, cached + T] bool, True where a token may attend; cache: a DynamicCache to
        attend to and extend."""
        implementation = self.attention_for(*visible["full_attention"].shape)
        masks = {kind: self.attention_mask_4d(m, implementation) for kind, m in visible.items()}
        if "sliding_attention" not in masks:
            mask = masks["full_attention"]
        else:
            mask = masks["sliding_attention"] if self._every_layer_slides else masks
        config = self.config.get_text_config()
        chosen = config._attn_implementation
        try:
            if implementation != chosen:
                config._attn_implementation = implementation  # read by every attention layer at call time
            out = self._backbone_pass(input_ids, attention_mask=mask, position_ids=position_ids,
                                      use_cache=cache is not None,
                                      **({self._cache_kwarg: cache} if cache is not None else {}))
        finally:
            if implementation != chosen:
                config._attn_implementation = chosen
        return out.last_hidden_state

    @property
    def tree_supported(self) -> bool:
        """Whether this model computes a packed prompt tree exactly: probed once on two short sequences that share
        a prefix (tree vs separate sequences, relative to the logits' scale: 1e-4 in fp32, 5e-2 where the model or
        its compute dtype is 16-bit). A model that fails keeps the padded path, with one warning. False too when
        use_prompt_tree is switched off."""
        if not self.use_prompt_tree:
            return False
        if self._tree_supported is None:
            counted = self.backbone_tokens, self.backbone_passes  # the probe is not any step's work
            self._tree_supported = self._probe_tree()
            self.backbone_tokens, self.backbone_passes = counted
        return self._tree_supported

    @torch.no_grad()
    def _probe_tree(self) -> bool:
        import warnings

        from .tree import PromptTree
        vocab = self.config.get_text_config().vocab_size
        g = torch.Generator().manual_seed(0)
        a = torch.randint(3, vocab, (7,), generator=g)
        b = torch.cat([a[:4], torch.randint(3, vocab, (5,), generator=g)])
        try:  # a caller's own autocast region must not judge the mask by its rounding: ours is the only one here
            with torch.autocast(self.device.type, enabled=False):
                tree = PromptTree(self, keep_cache=False)
                ends = [tree.insert(a.tolist())[-1], tree.insert(b.tolist())[-1]]
                tree.compute()
                packed = self.logits(tree.hidden(ends)).float()
                separate = torch.cat([self.logits(self.hidden_states(s[None].to(self.device))[0][:, -1]).float()
                                      for s in (a, b)])
            error = float((packed - separate).abs().max() / separate.abs().max().clamp(min=1e-6))
            low = self._autocast or weights_compute_dtype(self.lm.get_base_model()) != torch.float32
            tolerance = 5e-2 if low else 1e-4
            ok = error <= tolerance
            reason = f"packed and separate logits differ by {error:.2g} (relative)"
        except Exception as exc:  # noqa: BLE001 - any failure means: do not pack for this model
            ok, reason = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if not ok:
            warnings.warn(f"ppo_core: {type(self.lm.get_base_model()).__name__} cannot take the prompt tree's 4-D "
                          f"attention mask ({reason}); using padded sequences instead", stacklevel=3)
        return ok

    def _compute_context(self):
        if not self._autocast:
            return contextlib.nullcontext()
        return self._autocast_context()

    @contextlib.contextmanager
    def _autocast_context(self):
        # Under autocast peft's cast of each LoRA input to the fp32 of the LoRA weights is undone by autocast's cast
        # to the compute dtype (a round trip that changes no value): skip both copies, forward and backward.
        for m in self._lora_layers:
            m.cast_input_dtype_enabled = False
        try:
            # A no-grad call must not fill the cache that hold_casts keeps open: before PyTorch's fix (pull request
            # 165068, Dec 2025) a cast cached without grad served the later calls with grad, cutting the LoRA
            # weights out of the graph (torch 2.6: the first fused update changed no LoRA weight).
            with torch.autocast(self.device.type, dtype=self.compute_dtype, cache_enabled=torch.is_grad_enabled()):
                yield
        finally:
            for m in self._lora_layers:
                m.cast_input_dtype_enabled = True

    # Autocast casts the fp32 LoRA weights to the compute dtype in every forward call, and a graph kept for a later
    # backward keeps each call's copy (Gemma-2-2b, r=64: 83.1 M LoRA parameters x 2 bytes = 166 MB a call, counted by
    # benchmarks.bench.Dims). Autocast caches casts of trainable leaves until its outermost region exits; holding one
    # nesting level open between calls makes the calls of a rollout share one copy. The cost: gradients from the calls
    # sum in the compute dtype before the cast back to fp32.
    def hold_casts(self, owner) -> None:
        """Share the low-precision LoRA weight copies across forward calls until release_casts(owner), or until
        owner is garbage (a trainer dropped between generate and step must not keep them, nor itself, alive)."""
        if self._autocast and id(owner) not in self._cast_holders:
            torch.autocast_increment_nesting()
            end = weakref.finalize(owner, _end_cast_hold, self._cast_holders, id(owner))
            end.atexit = False
            self._cast_holders[id(owner)] = end

    def release_casts(self, owner) -> None:
        """End owner's hold_casts(); the cached copies are freed when no owner holds them any more."""
        end = self._cast_holders.get(id(owner))
        if end is not None:
            end()

    def weights_changed(self) -> None:
        """Call after every optimiser step or load: cached low-precision copies of the old weights must not serve a
        later forward (ours, held by hold_casts, or those of a caller's own autocast region around the loop)."""
        torch.clear_autocast_cache()

    def logits(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """LM head (+ the model's final soft-capping) on the given hidden states only. [..., H] -> [..., V]."""
        with self._compute_context():
            logits = self._lm_head(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits / temperature if temperature != 1.0 else logits

    def values(self, hidden: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """Value of each state. hidden [..., H] -> [...] fp32."""
        return self.value_heads[adapter or self._active](hidden)

    def forward_responses(self, queries: list[torch.Tensor], responses: list[torch.Tensor], *,
                          temperature: float = 1.0, with_values: bool = True, full_logprobs: bool = False,
                          with_entropy: bool = False, max_tokens: int | None = None, pad_multiple: int = 1,
                          pad_token_id: int = 0) -> dict[str, torch.Tensor]:
        """Log-probs (and values, entropies, full log-distributions) of each response token given its query and
        the response tokens before it, in response space [B, R] (R = longest response; zero on padding).

        The distinct (query + response) sequences are packed into prompt trees (ppo_core.tree) of at most
        `max_tokens` nodes each, so a token they share is computed once; a model that cannot take the tree's mask
        gets right-padded chunks of at most `max_tokens` padded tokens (identical pairs computed once).
        The LM head and value head run only at the positions that emit response tokens.
        Grad follows torch.is_grad_enabled().
        Returns {"logprobs", "values" (with_values), "entropy" (with_entropy), "full" [B, R, V] (full_logprobs)}.
        """
        from .batching import pad_right, token_budget_chunks
        from .functional import entropy_from_logits, log_softmax_fp32, logprobs_from_logits
        from .tree import PromptTree, subtree_chunks

        pairs = sorted({(tuple(q.tolist()), tuple(r.tolist())) for q, r in zip(queries, responses)})
        slot = {pair: j for j, pair in enumerate(pairs)}  # canonical order: same set -> same computation
        inverse = [slot[tuple(q.tolist()), tuple(r.tolist())] for q, r in zip(queries, responses)]
        uniq = [q + r for q, r in pairs]
        q_len, r_len = [len(q) for q, _ in pairs], [len(r) for _, r in pairs]
        R = max(r_len)
        offsets = torch.arange(R, device=self.device)
        tree = self.tree_supported
        chunks = subtree_chunks(uniq, max_tokens) if tree else \
            token_budget_chunks([len(k) for k in uniq], max_tokens, pad_multiple)
        parts: dict[int, dict[str, torch.Tensor]] = {}
        for chunk in chunks:
            rows_q = torch.tensor([q_len[j] for j in chunk], device=self.device)
            rows_r = torch.tensor([r_len[j] for j in chunk], device=self.device)
            rmask = offsets[None, :] < rows_r[:, None]
            if tree:  # the state before response token t of sequence j is node path_j[q_len_j - 1 + t]
                packed = PromptTree(self, keep_cache=False)
                paths = [packed.insert(uniq[j]) for j in chunk]
                packed.compute()
                at = [[path[q_len[j] - 1 + min(t, r_len[j] - 1)] for t in range(R)] for path, j in zip(paths, chunk)]
                h = packed.hidden([n for row in at for n in row]).view(len(chunk), R, -1)
                targets = torch.tensor([[uniq[j][q_len[j] + min(t, r_len[j] - 1)] for t in range(R)] for j in chunk],
                                       device=self.device)
            else:  # right padding: causal attention never looks right, so no attention mask is needed
                ids = pad_right([torch.tensor(uniq[j], device=self.device) for j in chunk], pad_token_id,
                                pad_multiple)
                hidden, _ = self.hidden_states(ids)
                positions = torch.where(rmask, rows_q[:, None] - 1 + offsets[None, :], rows_q[:, None] - 1)
                targets = torch.gather(ids, 1, torch.where(rmask, positions + 1, positions))
                h = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
            logits = self.logits(h, temperature)
            out = {"logprobs": logprobs_from_logits(logits, targets) * rmask}
            if with_values:
                out["values"] = self.values(h) * rmask
            if with_entropy:
                out["entropy"] = entropy_from_logits(logits) * rmask
            if full_logprobs:
                out["full"] = log_softmax_fp32(logits)
            for row, j in enumerate(chunk):
                parts[j] = {k: v[row] for k, v in out.items()}
        index = torch.tensor(inverse, device=self.device)
        return {k: torch.stack([parts[j][k] for j in range(len(uniq))])[index] for k in parts[0]}

    @torch.no_grad()
    def check_head(self, input_ids: torch.Tensor) -> float:
        """Max |difference| between our hidden->logits path and the model's own forward (fp32); a guard for
        architectures whose LM head does more than a projection and soft-capping."""
        ours = self.logits(self.hidden_states(input_ids)[0]).float()
        theirs = self.lm(input_ids=input_ids).logits.float()
        return float((ours - theirs).abs().max())


def _end_cast_hold(holders: dict, key: int) -> None:
    """Ends one hold_casts(): run by release_casts, or when its owner is garbage (at most once either way)."""
    del holders[key]
    level = torch.autocast_decrement_nesting()
    if level < 0:  # the level was reset under the hold (a test fixture does): leave it at 0
        torch.autocast_increment_nesting()
    elif level == 0:
        torch.clear_autocast_cache()


def weights_compute_dtype(lm: nn.Module) -> torch.dtype:
    """The dtype a loaded model computes in by itself: its input embeddings' (a model loaded in bf16 computes in
    bf16), or the compute dtype of its 4-bit layers where that is 16-bit; fp32 for anything else."""
    low = (torch.bfloat16, torch.float16)
    quant = getattr(getattr(lm, "config", None), "quantization_config", None)
    four_bit = quant.get("bnb_4bit_compute_dtype") if isinstance(quant, dict) else \
        getattr(quant, "bnb_4bit_compute_dtype", None)
    if isinstance(four_bit, str):
        four_bit = getattr(torch, four_bit.removeprefix("torch."), None)
    if four_bit in low:
        return four_bit
    try:
        dtype = lm.get_input_embeddings().weight.dtype
    except (AttributeError, NotImplementedError):  # a model without the usual accessor: its first float weight's
        dtype = next((p.dtype for p in lm.parameters() if p.is_floating_point()), torch.float32)
    return dtype if dtype in low else torch.float32


# -------------------------------------------------------------------------------------------- save / load
def save_adapter(policy: PolicyModel, name: str, folder: str) -> None:
    """Write adapter `name` in peft's layout (adapter_config.json + adapter_model.safetensors) plus its value head
    into `folder` (flat), so that ``PeftModel.from_pretrained(base, folder)`` loads it. The files are written beside
    it first and then each replaces its old version whole: a save that fails or is killed while writing leaves the
    adapter saved before it as it was."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=folder)
    try:
        policy.lm.peft_config[name].save_pretrained(staging)
        state = {k: v.detach().contiguous().cpu() for k, v in policy.adapter_state_dict(name).items()}
        save_file(state, os.path.join(staging, "adapter_model.safetensors"), metadata={"format": "pt"})
        head = {k: v.detach().contiguous().cpu() for k, v in policy.value_heads[name].state_dict().items()}
        save_file(head, os.path.join(staging, VALUE_HEAD_FILE), metadata={"format": "pt"})
        for file in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, file), os.path.join(folder, file))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_value_head(head: ValueHead, folder: str) -> None:
    from safetensors.torch import load_file
    path = os.path.join(folder, VALUE_HEAD_FILE)
    if os.path.exists(path):
        state = load_file(path, device=str(head.summary.weight.device))
        head.load_state_dict(state)


def load_adapter_weights(policy: PolicyModel, name: str, folder: str) -> None:
    """Load adapter weights and value head saved by save_adapter into an existing adapter (exact, in place)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with open(os.path.join(folder, "adapter_config.json")) as f:
        saved = json.load(f)
    ours = policy.lm.peft_config[name]
    if saved.get("r") != ours.r:
        raise ValueError(f"adapter in {folder} has LoRA rank {saved.get('r')}, this model uses {ours.r}")
    state = load_file(os.path.join(folder, "adapter_model.safetensors"), device=str(policy.device))
    result = set_peft_model_state_dict(policy.lm, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter in {folder} does not fit this model: unexpected keys {unexpected[:3]}")
    load_value_head(policy.value_heads[name], folder)
    policy.weights_changed()
