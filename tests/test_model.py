"""Model loading, 4-bit correctness, adapter save/load, and the LM-head path for other architectures."""

import os
import warnings

import pytest
import torch

from conftest import tiny_policy, with_nonzero_lora
from ppo_core import LoraSettings, PolicyModel, compute_dtype_for, load_causal_lm, save_adapter
from ppo_core.testing import tiny_llama


def _dequantised_twin(m4):
    """An fp32 LlamaForCausalLM whose linear weights are the 4-bit model's weights, dequantised."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM
    twin = LlamaForCausalLM(m4.config).eval()
    state = {k: v for k, v in m4.state_dict().items() if k in twin.state_dict()}
    for name, module in m4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data,
                                                                      module.weight.quant_state).float()
    twin.load_state_dict(state)
    return twin


def _lora_grads(policy, x):
    h, _ = policy.hidden_states(x)
    loss = policy.logits(h[:, -2:]).logsumexp(-1).sum() + policy.values(h).sum()
    loss.backward()
    return [p.grad.clone() for p in policy.trainable_parameters("agent")]


def _policy_with_nonzero_lora(lm):
    torch.manual_seed(5)
    policy = PolicyModel(lm, adapters=("agent",), lora=LoraSettings(r=4, alpha=8))
    torch.manual_seed(6)
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return policy


def test_4bit_lora_gradients_match_dequantised_fp32(tiny_model_dir):
    """A LoRA step on a bitsandbytes NF4 model on CPU gives the gradients of the same model with the dequantised
    weights in fp32 (relative L2 error < 1e-5), also after a no-grad forward (which is when bitsandbytes would
    repack its weights for a CPU kernel without autograd)."""
    m4 = load_causal_lm(tiny_model_dir, quantize="4bit", device="cpu")
    twin = _dequantised_twin(m4)
    p4, p32 = _policy_with_nonzero_lora(m4), _policy_with_nonzero_lora(twin)
    x = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p4.hidden_states(x)
    for g4, g32 in zip(_lora_grads(p4, x), _lora_grads(p32, x)):
        assert (g4 - g32).norm() <= 1e-5 * g32.norm() + 1e-12


def test_bitsandbytes_default_cpu_path_would_be_silently_wrong(tiny_model_dir):
    """Control for the test above: with bitsandbytes' own setting on an AVX512-BF16 CPU, the same check fails by a
    wide margin, so the comparison above can detect the problem it guards against."""
    from bitsandbytes.backends.cpu.ops import has_avx512bf16
    m4 = load_causal_lm(tiny_model_dir, quantize="4bit", device="cpu")
    twin = _dequantised_twin(m4)
    p4, p32 = _policy_with_nonzero_lora(m4), _policy_with_nonzero_lora(twin)
    for module in p4.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = has_avx512bf16()
    x = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p4.hidden_states(x)
    errors = [float((g4 - g32).norm() / g32.norm()) for g4, g32 in zip(_lora_grads(p4, x), _lora_grads(p32, x))]
    if has_avx512bf16():
        assert max(errors) > 0.1
    else:  # no repacking on this CPU: the default path is the autograd path
        assert max(errors) < 1e-5


def test_a_save_that_fails_midway_leaves_the_adapter_saved_before_it(tmp_path, monkeypatch):
    """save_adapter wrote its three files in place, one after the other: a save that died after the LoRA weights
    (disk full, a kill) left new weights beside the old value head."""
    import safetensors.torch
    from ppo_core.model import load_adapter_weights
    policy, folder = tiny_policy(0), str(tmp_path / "agent")
    save_adapter(policy, "agent", folder)
    saved = [p.detach().clone() for p in policy.trainable_parameters("agent")]
    with torch.no_grad():
        for p in policy.trainable_parameters("agent"):
            p.add_(1.0)
    real = safetensors.torch.save_file

    def fail_on_the_value_head(tensors, path, metadata=None):
        if path.endswith("value_head.safetensors"):
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_the_value_head)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(policy, "agent", folder)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"]
    load_adapter_weights(policy, "agent", folder)
    assert all(torch.equal(a, b) for a, b in zip(policy.trainable_parameters("agent"), saved))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft, called by the test
def test_saved_adapter_loads_with_peft_and_gives_the_same_outputs(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    policy = tiny_policy(0)
    with torch.no_grad():
        for p in policy.trainable_parameters("agent"):
            p.add_(0.05 * torch.randn_like(p))
    save_adapter(policy, "agent", str(tmp_path / "agent"))
    assert (tmp_path / "agent" / "adapter_config.json").exists()
    assert (tmp_path / "agent" / "value_head.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "agent")).eval()
    x = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        ours = policy.logits(policy.hidden_states(x)[0])
        theirs = loaded(input_ids=x).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # and it reloads into a PolicyModel, value head included
    again = PolicyModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters=("agent",),
                        adapter_paths={"agent": str(tmp_path / "agent")})
    h = policy.hidden_states(x)[0]
    assert torch.allclose(again.values(again.hidden_states(x)[0]), policy.values(h), atol=1e-5)


def test_gemma2_softcapping_head_matches_the_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0,
                       attn_logit_softcapping=50.0, attn_implementation="eager")
    policy = PolicyModel(Gemma2ForCausalLM(cfg), adapters=("agent",), lora=LoraSettings(r=4, alpha=8))
    x = torch.randint(0, 96, (2, 7))
    assert policy.check_head(x) < 1e-5
    logits = policy.logits(policy.hidden_states(x)[0])
    assert logits.abs().max() <= 3.0  # soft-capped


def test_device_dtype_rules():
    assert compute_dtype_for("cpu") == torch.float32
    with pytest.raises(ValueError, match="quantize='2bit'"):
        load_causal_lm("unused", quantize="2bit")
    with pytest.raises(ValueError, match="adapter 'nope'"):
        tiny_policy(0).set_adapter("nope")


def test_the_key_value_cache_is_read_without_the_deprecated_name(monkeypatch):
    """transformers 5 renamed an output's `past_key_values` to `cache` (the old name warns, and goes in v6): the
    cached path reads the cache under the name the backbone takes, and the cache it returns continues the sequence."""
    from transformers.utils import generic

    def old_name(self):
        raise AssertionError("read output.past_key_values")
    # raising=False: transformers before the rename (5.17) has no such alias, and its backbones take past_key_values
    monkeypatch.setattr(generic.ModelOutput, "past_key_values", property(old_name), raising=False)
    policy = tiny_policy(0)
    x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, _ = policy.hidden_states(x)
        _, cache = policy.hidden_states(x[:, :6], use_cache=True)
        rest, _ = policy.hidden_states(x[:, 6:], past_key_values=cache, position_ids=torch.arange(6, 9)[None])
    assert cache is not None
    torch.testing.assert_close(rest, whole[:, 6:], rtol=0, atol=1e-5)


def test_reference_computes_what_peft_disable_adapter_does_and_leaves_requires_grad_alone():
    """PolicyModel.reference() switches every LoRA layer off by its flag alone: the same numbers as peft's
    disable_adapter() (bit for bit), nesting restores, and no parameter's requires_grad changes (peft's context
    freezes the inactive adapter on exit, which a kept graph of that adapter needs live)."""
    policy = with_nonzero_lora(tiny_policy(0, adapters=("agent", "opponent")))
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    assert all(p.requires_grad for n in policy.adapter_names for p in policy.trainable_parameters(n))
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))

    def hidden():
        with torch.no_grad():
            return policy.hidden_states(x)[0]

    adapted = hidden()
    with policy.reference():
        ours = hidden()
        with policy.reference():
            nested = hidden()
        after_nested = hidden()
        assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    assert torch.equal(hidden(), adapted)
    with policy.lm.disable_adapter():
        theirs = hidden()
    assert torch.equal(ours, theirs) and torch.equal(nested, theirs) and torch.equal(after_nested, theirs)
    assert (ours - adapted).abs().max() > 1e-3


def _under_each_adapter(policy, switch, compute):
    """{adapter: [compute() after switch(adapter)]} for every adapter in turn, then the first one again."""
    out = {}
    for name in (*policy.adapter_names, policy.adapter_names[0]):
        switch(name)
        with torch.no_grad():
            out.setdefault(name, []).append(compute())
    return out


def _assert_same_outputs(ours, theirs):
    for name in ours:
        for a, b in zip(ours[name], theirs[name]):
            assert torch.equal(a, b)


def test_switching_adapters_computes_what_peft_set_adapter_does_and_keeps_every_adapter_trainable():
    """PolicyModel.set_adapter sets the active adapter on each LoRA layer directly (peft's set_adapter walks every
    module and freezes the inactive adapters): the same numbers as peft's switch, bit for bit, the same bookkeeping,
    no requires_grad changed, and a graph built under one adapter still backpropagates into it after a switch."""
    policy = with_nonzero_lora(tiny_policy(0, adapters=("agent", "opponent", "third")))
    assert not policy._through_peft
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    ours = _under_each_adapter(policy, policy.set_adapter, lambda: policy.hidden_states(x)[0])
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    for layer in policy._lora_layers:
        assert layer.active_adapters == ["agent"]
    assert policy.lm.active_adapter == "agent" and policy.lm.base_model.active_adapter == "agent"

    theirs = _under_each_adapter(policy, policy.lm.set_adapter, lambda: policy.hidden_states(x)[0])
    _assert_same_outputs(ours, theirs)
    assert (ours["agent"][0] - ours["opponent"][0]).abs().max() > 1e-3
    assert torch.equal(ours["agent"][0], ours["agent"][1])

    policy = with_nonzero_lora(tiny_policy(0, adapters=("agent", "opponent")))
    x = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    with policy.adapter("agent"):
        loss = policy.hidden_states(x)[0].square().mean()
    with policy.adapter("opponent"):
        loss.backward()
    assert all(p.grad is not None for p in policy.trainable_parameters("agent")[:-2])
    assert all(p.grad is None for p in policy.trainable_parameters("opponent"))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft, called by the test
def test_adapters_with_extra_trainable_modules_switch_and_switch_off_through_peft(tmp_path):
    """Adapters saved with modules_to_save (whole modules trained beside LoRA) switch, and switch off for the
    reference, through peft, which also swaps those modules: the LoRA layers' own state alone would keep a trained
    copy of the LM head in the reference pass."""
    from peft import LoraConfig, get_peft_model

    from ppo_core.testing import tiny_llama
    folders = {}
    for k, name in enumerate(("agent", "opponent")):
        lm = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            modules_to_save=["lm_head"]))
        with torch.no_grad():
            for n, p in lm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 0.05)
        lm.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    policy = PolicyModel(tiny_llama(seed=0), adapters=("agent", "opponent"), adapter_paths=folders)
    assert policy._through_peft
    x = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))

    def logits():
        return policy.lm(input_ids=x).logits
    ours = _under_each_adapter(policy, policy.set_adapter, logits)
    assert all(p.requires_grad for n in policy.adapter_names for p in policy.trainable_parameters(n))
    with torch.no_grad(), policy.reference():
        reference = logits()
    assert all(p.requires_grad for n in policy.adapter_names for p in policy.trainable_parameters(n))
    theirs = _under_each_adapter(policy, policy.lm.set_adapter, logits)
    _assert_same_outputs(ours, theirs)
    assert (ours["agent"][0] - ours["opponent"][0]).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(reference, tiny_llama(seed=0)(input_ids=x).logits, rtol=0, atol=1e-6)


def test_building_a_policy_passes_on_no_library_deprecation_warning(tmp_path):
    """peft reads transformers' deprecated `is_gradient_checkpointing` while it wraps the model; a user of ppo_core
    cannot act on that warning, so building a policy (new adapters, or saved ones) shows none."""
    import warnings

    from ppo_core.testing import tiny_llama
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = PolicyModel(tiny_llama(0), adapters=("agent", "opponent"), lora=LoraSettings(r=4, alpha=8))
        for name in policy.adapter_names:
            save_adapter(policy, name, str(tmp_path / name))
        PolicyModel(tiny_llama(0), adapters=("agent", "opponent"),
                    adapter_paths={n: str(tmp_path / n) for n in ("agent", "opponent")})
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_train_mode_warns_and_keeps_dropout_off():
    """A training loop's habit, policy.train(), used to switch LoRA dropout and the value head's dropout on, so the
    sampling pass and the recomputed passes drew different masks."""
    policy = with_nonzero_lora(tiny_policy(lora_dropout=0.5, value_head_dropout=0.5))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    before = policy.hidden_states(ids)[0]
    with pytest.warns(UserWarning, match="stay in eval mode"):
        assert policy.train() is policy
    assert not any(m.training for m in policy.modules())
    assert torch.equal(policy.hidden_states(ids)[0], before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.eval()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft, called by the test
def test_a_model_that_already_has_peft_adapters_is_refused_with_one_line():
    """A PeftModel used to be wrapped again: its adapter stayed on in every pass, the reference included, under
    PolicyModel's own. (transformers' own add_adapter, caught by the same check, needs peft >= 0.22, unreleased.)"""
    from peft import LoraConfig, get_peft_model
    from ppo_core.testing import tiny_llama
    with pytest.raises(ValueError, match=r"already a peft model \(PeftModel, adapters default\).*adapter_paths"):
        PolicyModel(get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules="all-linear")))
    lm = tiny_llama(0)
    PolicyModel(lm, lora=LoraSettings(r=4))
    with pytest.raises(ValueError, match=r"carries peft adapters \(default\): it is the base of another PolicyModel"):
        PolicyModel(lm, lora=LoraSettings(r=4))  # one base, two policies: the second would wrap the first's LoRA


def test_a_lora_rank_above_every_layers_smaller_dimension_is_refused():
    """The tiny Llama's largest min(in_features, out_features) is 64 (hidden 64, MLP 128, keys/values 32): r=64 is
    accepted, r=65 (and 10^23, which overflowed inside peft) refused naming the limit; adapters loaded from folders
    keep their own rank, so the settings are not checked then."""
    from ppo_core.model import lora_rank_limit
    from ppo_core.testing import tiny_llama
    from transformers import GPT2Config, GPT2LMHeadModel
    assert lora_rank_limit(tiny_llama(0)) == 64
    assert lora_rank_limit(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))) == 32  # Conv1D
    assert PolicyModel(tiny_llama(0), lora=LoraSettings(r=64)).lm.peft_config["default"].r == 64
    for r in (65, 10 ** 23):
        with pytest.raises(ValueError, match=rf"LoraSettings.r={r}: above 64, the largest rank"):
            PolicyModel(tiny_llama(0), lora=LoraSettings(r=r))


def test_gradient_checkpointing_switched_on_by_the_caller_gets_one_warning_that_it_saves_nothing():
    """A QLoRA habit: lm.gradient_checkpointing_enable() (activation_checkpointing_enable in newer transformers,
    which sets the same flag). transformers checkpoints only in training mode, and the policy keeps every module in
    eval mode, so it used to save no memory, silently."""
    from ppo_core.testing import tiny_llama
    lm = tiny_llama(0)
    (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()  # 5.24 / 5.17
    with pytest.warns(UserWarning, match="gradient checkpointing saves nothing here"):
        PolicyModel(lm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PolicyModel(tiny_llama(0))


def test_a_model_loaded_in_bf16_computes_in_bf16_by_default_and_keeps_the_prompt_tree():
    """PolicyModel(load_causal_lm(...)) on a GPU gets bf16 weights; the policy used to default to fp32 compute (no
    autocast), so the tree's probe judged bf16 arithmetic by the fp32 tolerance (relative error 0.0069 on this
    tiny model), switched the tree off for good and warned that the model cannot take the mask."""
    from ppo_core.model import weights_compute_dtype
    from ppo_core.testing import tiny_llama
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        policy = PolicyModel(tiny_llama(0).to(torch.bfloat16), lora=LoraSettings(r=4))
        assert policy.compute_dtype == torch.bfloat16
        assert policy.tree_supported
        assert PolicyModel(tiny_llama(0), lora=LoraSettings(r=4)).compute_dtype == torch.float32
        # fp32 asked for explicitly: the bf16 weights still round, and the probe allows for it
        assert PolicyModel(tiny_llama(0).to(torch.bfloat16), lora=LoraSettings(r=4),
                           compute_dtype=torch.float32).tree_supported
    lora_a = next(p for n, p in policy.named_parameters() if "lora_A" in n)
    assert lora_a.dtype == torch.float32 and policy.value_heads["default"].summary.weight.dtype == torch.float32
    # a 4-bit model's compute dtype, as transformers keeps it (an object, or a dict after a save and load)
    lm = tiny_llama(0)
    lm.config.quantization_config = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"}
    assert weights_compute_dtype(lm) == torch.bfloat16
    lm.config.quantization_config = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
    assert weights_compute_dtype(lm) == torch.float32


@pytest.mark.parametrize("adapters, message", [
    ((), "need one or more distinct names"),
    (("a1", "a1"), "need one or more distinct names"),
    (("a.b",), "adapter name 'a.b': must be a non-empty string without '.'"),
    (("",), "adapter name '': must be a non-empty string"),
    ((3,), "adapter name 3: must be a non-empty string"),
    (("agent", "ora"), "adapter name 'ora': .* not part of 'lora_'"),
])
def test_bad_adapter_names_are_one_value_error(adapters, message):
    """They were peft's KeyError ('.', ''), a TypeError (3), or peft's warning that the adapter may be
    reinitialised when loaded (a name inside 'lora_')."""
    with pytest.raises(ValueError, match=message):
        PolicyModel(tiny_llama(0), adapters=adapters)


def test_one_adapter_name_as_a_string_is_one_adapter():
    """adapters="agent" made five adapters, 'a', 'g', 'e', 'n' and 't'."""
    assert PolicyModel(tiny_llama(0), adapters="agent", lora=LoraSettings(r=2)).adapter_names == ("agent",)
