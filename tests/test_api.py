"""ppo_core's public API stays what the README documents: other projects import it.

A deliberate change to a signature below is made here too (and in the README's "Using ppo_core" section); an
accidental one fails this test. Private helpers and modules other than `functional` are free to change."""

import dataclasses
import inspect

import ppo_core
from ppo_core import functional

STABLE = {
    "AdaptiveKLController": {
        "__init__": "(self, init_kl_coef: 'float', target: 'float', horizon: 'float')",
        "update": "(self, current_kl: 'float', n_steps: 'int') -> 'None'",
        "state_dict": "(self) -> 'dict'",
        "load_state_dict": "(self, state: 'dict') -> 'None'"},
    "CheckpointError": {},
    "FixedKLController": {
        "__init__": "(self, kl_coef: 'float')",
        "update": "(self, current_kl: 'float', n_steps: 'int') -> 'None'",
        "state_dict": "(self) -> 'dict'",
        "load_state_dict": "(self, state: 'dict') -> 'None'"},
    "LoraSettings": {
        "fields": "r=64, alpha=32, dropout=0.05, target_modules='all-linear'",
        "peft_config": "(self)"},
    "NonFiniteError": {},
    "PPOConfig": {
        "fields": "learning_rate=1.41e-05, batch_size=128, mini_batch_size=128, gradient_accumulation_steps=1, "
                  "ppo_epochs=4, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, "
                  "adap_kl_ctrl=True, init_kl_coef=0.2, kl_penalty='kl', target=6.0, horizon=10000.0, "
                  "use_score_scaling=False, use_score_norm=False, score_clip=None, whiten_rewards=False, "
                  "max_grad_norm=None, early_stopping=False, target_kl=1.0, ratio_threshold=10.0, seed=0, "
                  "temperature=1.0, micro_batch_tokens=None, adam_eps=1e-08, reference_cache_mb=64.0, "
                  "fuse_rollout=True",
        "to_dict": "(self) -> 'dict'"},
    "PPOTrainer": {
        "__init__": "(self, config: 'PPOConfig', policy, adapter: 'str | None' = None, *, pad_token_id: 'int' = 0, "
                    "reference_cache: 'ReferenceCache | None' = None)",
        "reference_cache": "property",
        "generate": "(self, queries: 'list[torch.Tensor]', *, max_new_tokens: 'int', top_k: 'int' = 0, top_p: "
                    "'float' = 1.0, stop_at_eos: 'bool' = False, eos_token_id=None, probe_tokens: 'list[int] | None' "
                    "= None, draft: 'list[tuple[int, ...]] | None' = None) -> 'Rollout'",
        "discard_rollouts": "(self) -> 'None'",
        "step": "(self, queries: 'list[torch.Tensor]', responses: 'list[torch.Tensor]', scores) -> "
                "'dict[str, float]'",
        "state_dict": "(self) -> 'dict'",
        "load_state_dict": "(self, state: 'dict') -> 'None'"},
    "PolicyModel": {
        "__init__": "(self, lm: 'nn.Module', adapters: 'tuple[str, ...]' = ('default',), lora: 'LoraSettings | "
                    "None' = LoraSettings(r=64, alpha=32, dropout=0.05, target_modules='all-linear'), "
                    "value_head_dropout: 'float' = 0.1, adapter_paths: 'dict[str, str] | None' = None, "
                    "compute_dtype: 'torch.dtype | None' = None)",
        "set_adapter": "(self, name: 'str') -> 'None'",
        "adapter": "(self, name: 'str')",
        "reference": "(self)",
        "trainable_parameters": "(self, name: 'str') -> 'list[nn.Parameter]'",
        "adapter_state_dict": "(self, name: 'str') -> 'dict[str, torch.Tensor]'",
        "device": "property",
        "tree_supported": "property",
        "hidden_states": "(self, input_ids: 'torch.Tensor', attention_mask: 'torch.Tensor | None' = None, "
                         "position_ids: 'torch.Tensor | None' = None, past_key_values=None, use_cache: 'bool' = "
                         "False)",
        "logits": "(self, hidden: 'torch.Tensor', temperature: 'float' = 1.0) -> 'torch.Tensor'",
        "values": "(self, hidden: 'torch.Tensor', adapter: 'str | None' = None) -> 'torch.Tensor'",
        "forward_responses": "(self, queries: 'list[torch.Tensor]', responses: 'list[torch.Tensor]', *, "
                             "temperature: 'float' = 1.0, with_values: 'bool' = True, full_logprobs: 'bool' = False, "
                             "with_entropy: 'bool' = False, max_tokens: 'int | None' = None, pad_multiple: 'int' = 1, "
                             "pad_token_id: 'int' = 0) -> 'dict[str, torch.Tensor]'"},
    "PromptTree": {
        "__init__": "(self, policy, *, keep_cache: 'bool' = True)",
        "insert": "(self, tokens, parent: 'int' = -1) -> 'list[int]'",
        "pending": "property",
        "compute": "(self, max_tokens: 'int | None' = None) -> 'int'",
        "hidden": "(self, nodes) -> 'torch.Tensor'"},
    "ReferenceCache": {
        "__init__": "(self, budget_mb: 'float')",
        "get": "(self, key: 'tuple[int, ...]') -> 'torch.Tensor | None'",
        "put": "(self, key: 'tuple[int, ...]', row: 'torch.Tensor') -> 'None'",
        "state_dict": "(self) -> 'dict'",
        "load_state_dict": "(self, state: 'dict', device: 'torch.device') -> 'None'"},
    "Rollout": {
        "fields": "responses, logprobs, mask, logprobs_graph=None, values_graph=None, entropy=None, "
                  "probe_logprobs=None"},
    "RunningMoments": {
        "__init__": "(self)",
        "update": "(self, xs: 'torch.Tensor') -> 'tuple[float, float]'",
        "state_dict": "(self) -> 'dict'",
        "load_state_dict": "(self, state: 'dict') -> 'None'"},
    "compute_dtype_for": "(device: 'torch.device | str') -> 'torch.dtype'",
    "load_causal_lm": "(name_or_path: 'str', *, quantize: 'str' = 'none', device: 'torch.device | str | None' = "
                      "None, dtype: 'torch.dtype | None' = None, attn_implementation: 'str | None' = None, "
                      "local_files_only: 'bool | None' = None, **kwargs)",
    "load_checkpoint": "(folder: 'str', *, policy, trainers: 'dict', restore_global_rng: 'bool' = True) -> 'dict'",
    "sample": "(policy, queries: 'list[torch.Tensor]', *, max_new_tokens: 'int', temperature: 'float' = 1.0, top_k: "
              "'int' = 0, top_p: 'float' = 1.0, stop_at_eos: 'bool' = False, eos_token_id=None, pad_token_id: 'int' "
              "= 0, generator: 'torch.Generator | None' = None, keep_graph: 'bool' = False, tree: 'PromptTree | "
              "None' = None, max_tokens: 'int | None' = None, memo: 'dict | None' = None, probe_tokens: "
              "'list[int] | None' = None, draft: 'list[tuple[int, ...]] | None' = None) -> 'Rollout'",
    "save_adapter": "(policy: 'PolicyModel', name: 'str', folder: 'str') -> 'None'",
    "save_checkpoint": "(folder: 'str', *, policy, trainers: 'dict', extra: 'dict | None' = None, config: "
                       "'dict | None' = None) -> 'str'",
}

FORMULAS = {  # ppo_core.functional, in the order of the formula sheet (README: "Using ppo_core")
    "logprobs_from_logits": "(logits: 'torch.Tensor', tokens: 'torch.Tensor') -> 'torch.Tensor'",
    "masked_whiten": "(values: 'torch.Tensor', mask: 'torch.Tensor', shift_mean: 'bool' = True, eps: 'float' = "
                     "1e-08) -> 'torch.Tensor'",
    "kl_penalty": "(logprobs: 'torch.Tensor', ref_logprobs: 'torch.Tensor', kind: 'str' = 'kl') -> 'torch.Tensor'",
    "compute_rewards": "(scores: 'torch.Tensor', kl: 'torch.Tensor', mask: 'torch.Tensor', kl_coef: 'float') -> "
                       "'tuple[torch.Tensor, torch.Tensor]'",
    "compute_gae": "(rewards: 'torch.Tensor', values: 'torch.Tensor', mask: 'torch.Tensor', gamma: 'float', lam: "
                   "'float') -> 'tuple[torch.Tensor, torch.Tensor]'",
    "policy_loss": "(logprobs: 'torch.Tensor', old_logprobs: 'torch.Tensor', advantages: 'torch.Tensor', mask: "
                   "'torch.Tensor', cliprange: 'float', n_tokens: 'torch.Tensor | float | None' = None) -> "
                   "'tuple[torch.Tensor, dict[str, torch.Tensor]]'",
    "value_loss": "(values: 'torch.Tensor', old_values: 'torch.Tensor', returns: 'torch.Tensor', mask: "
                  "'torch.Tensor', cliprange_value: 'float', n_tokens: 'torch.Tensor | float | None' = None) -> "
                  "'tuple[torch.Tensor, dict[str, torch.Tensor]]'",
}


def describe(obj, member: str):
    """'property', a dataclass's fields with their defaults, or a callable's signature, as one string."""
    if member == "fields":
        return ", ".join(f.name if f.default is dataclasses.MISSING else f"{f.name}={f.default!r}"
                         for f in dataclasses.fields(obj))
    value = inspect.getattr_static(obj, member)
    if isinstance(value, property):
        return "property"
    return str(inspect.signature(getattr(obj, member)))


def documented(obj, member: str | None = None) -> bool:
    if member is None or member == "fields":
        return bool(inspect.getdoc(obj))
    value = inspect.getattr_static(obj, member)
    value = value.fget if isinstance(value, property) else getattr(obj, member)
    return member == "__init__" or bool(value.__doc__)


def test_the_package_exports_exactly_the_documented_names():
    assert sorted(ppo_core.__all__) == sorted(STABLE)
    assert all(hasattr(ppo_core, name) for name in ppo_core.__all__)


def test_public_signatures_are_unchanged_and_documented():
    changed, undocumented = [], []
    for name, expected in STABLE.items():
        obj = getattr(ppo_core, name)
        members = expected.items() if isinstance(expected, dict) else [(None, expected)]
        for member, want in members:
            got = str(inspect.signature(obj)) if member is None else describe(obj, member)
            if got != want:
                changed.append(f"{name}.{member or ''}: {got} (recorded: {want})")
            if not documented(obj, member):
                undocumented.append(f"{name}.{member or ''}")
    for name, want in FORMULAS.items():
        got = str(inspect.signature(getattr(functional, name)))
        if got != want:
            changed.append(f"functional.{name}: {got} (recorded: {want})")
        if not getattr(functional, name).__doc__:
            undocumented.append(f"functional.{name}")
    assert not changed, "public API changed (update README and this test if deliberate):\n" + "\n".join(changed)
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_a_changed_signature_is_reported():
    """The check itself can fail: a default changed in a copy of PPOConfig's recorded fields is caught."""
    want = STABLE["PPOConfig"]["fields"].replace("cliprange=0.2,", "cliprange=0.3,")
    assert describe(ppo_core.PPOConfig, "fields") != want
    assert describe(ppo_core.PPOTrainer, "reference_cache") == "property"
