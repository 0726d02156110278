"""The prompt tree (ppo_core.tree): packed sequences with ancestor-only attention give what separate sequences give
(log-probs, values, entropies, LoRA gradients; fp32, tolerance 1e-5), on Llama and Gemma-2 (soft-capping, a sliding
window shorter than the sequences), eager and SDPA attention, and with 4-bit NF4 base weights; under bf16 autocast
the tree is as accurate as separate sequences against float64; the backbone sees each distinct token once."""

import warnings

import pytest
import torch

from conftest import random_queries, tiny_policy, with_nonzero_lora
from ppo_core import LoraSettings, PPOConfig, PPOTrainer, PolicyModel
from ppo_core.generation import sample
from ppo_core.testing import tiny_llama, tiny_llama_config
from ppo_core.tree import PromptTree, subtree_chunks, tree_size

TOL = 1e-5


def tiny_gemma2_config(window: int = 8):
    from transformers import Gemma2Config
    return Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
                        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                        max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def make_policy(arch: str, attn: str, seed: int = 0) -> PolicyModel:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    config = tiny_gemma2_config() if arch == "gemma2" else tiny_llama_config()
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn.removesuffix("-only")).eval()
    policy = PolicyModel(lm, adapters=("agent",), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    if attn == "sdpa-only":  # small packed passes with gradients keep SDPA instead of switching to eager
        policy.EAGER_PAIRS_CPU = 0
    return with_nonzero_lora(policy, seed)


def padded(policy):
    """The same policy on its padded path (as for a model that cannot take the tree's mask)."""
    policy.use_prompt_tree = False
    return policy


g = torch.Generator().manual_seed(3)
BASE = torch.randint(3, 64, (20,), generator=g)
OTHER = torch.randint(3, 64, (14,), generator=g)
CASES = {  # (queries, responses of 1 or 2 tokens)
    "share nothing": [BASE, OTHER],
    "shared prefix": [BASE, torch.cat([BASE[:11], OTHER[:6]])],
    "identical": [BASE, BASE.clone()],
    "prefix of another": [BASE, BASE[:9]],
}
ARCHS = [("llama", "eager"), ("llama", "sdpa"), ("llama", "sdpa-only"),
         ("gemma2", "eager")]  # Gemma-2 has no SDPA in transformers
ALL_QUERIES = [CASES["share nothing"][1], *CASES["shared prefix"], CASES["identical"][1], CASES["prefix of another"][1]]
ALL_RESPONSES = [torch.tensor([5 + i, 9]) for i in range(len(ALL_QUERIES))]


def tree_and_padded(make_policy_fn, queries=ALL_QUERIES, responses=ALL_RESPONSES):
    """forward_responses (default: every case at once, two-token answers) and its LoRA gradients, with the tree and
    on the padded path: {"tree" | "padded": ({logprobs, values, entropy} float64, [gradients])}."""
    results = {}
    for mode in ("tree", "padded"):
        policy = make_policy_fn()
        if mode == "padded":
            padded(policy)
        assert policy.tree_supported == (mode == "tree")
        out = policy.forward_responses(queries, responses, with_entropy=True)
        (out["logprobs"].sum() + out["values"].sum()).backward()
        results[mode] = ({k: v.detach().double() for k, v in out.items()},
                         [p.grad.clone() for p in policy.trainable_parameters("agent")])
    return results


def assert_tree_matches(results) -> None:
    """Tree and padded results of tree_and_padded agree to TOL."""
    (tree, tree_grads), (sep, sep_grads) = results["tree"], results["padded"]
    for key in ("logprobs", "values", "entropy"):
        assert torch.allclose(tree[key], sep[key], atol=TOL, rtol=TOL), key
    for a, b in zip(tree_grads, sep_grads):
        assert torch.allclose(a, b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("answer", [1, 2], ids=["one-token", "two-token"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch, attn", ARCHS, ids=[f"{a}-{b}" for a, b in ARCHS])
def test_tree_matches_separate_sequences(arch, attn, case, answer):
    responses = [torch.tensor([5, 9][:answer]), torch.tensor([7, 5][:answer])]
    assert_tree_matches(tree_and_padded(lambda: make_policy(arch, attn), CASES[case], responses))


def test_tree_with_4bit_base_weights_matches_separate_sequences(tiny_model_dir):
    """bitsandbytes NF4 base weights (CPU backend, fp32 compute): the tree gives what separate sequences give, to
    the fp32 tolerance (1e-5)."""
    from ppo_core import load_causal_lm
    import bitsandbytes as bnb

    def make():
        lm = load_causal_lm(tiny_model_dir, quantize="4bit", device="cpu")
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in lm.modules())
        return with_nonzero_lora(PolicyModel(lm, adapters=("agent",), lora=LoraSettings(r=4, alpha=8, dropout=0.0)))

    assert_tree_matches(tree_and_padded(make))


def test_tree_under_bf16_autocast_is_as_accurate_as_separate_sequences():
    """bf16 autocast rounds differently in a packed pass than in separate sequences, so the two cannot agree to
    fp32's tolerance. Against a float64 computation of the same model, the tree's relative errors (mean |error| of
    log-probs and values, L2 of the LoRA gradient), averaged over 6 random models, are at most 1.25x the padded
    path's; both are bf16-sized (under 10%). Seed by seed they differ up to 2x either way. `pytest
    tests/test_tree.py -k bf16 -s` prints them (2-core EPYC: log-probs 0.62% tree vs 0.61% padded, values 3.2% vs
    2.9%, gradients 4.4% vs 4.3%)."""
    def make(seed, dtype=torch.bfloat16):
        lm = tiny_llama(seed, initializer_range=0.2)
        policy = PolicyModel(lm, adapters=("agent",), lora=LoraSettings(r=8, alpha=16, dropout=0.0),
                             compute_dtype=dtype)
        return with_nonzero_lora(policy, seed)

    def make64(seed):
        policy = make(seed, torch.float32).double()
        policy.compute_dtype = torch.float64
        return policy

    def relative(a, b):
        return float((a - b).abs().mean() / b.abs().mean())

    errors = {mode: {"logprobs": [], "values": [], "gradients": []} for mode in ("tree", "padded")}
    for seed in range(6):
        exact, exact_grads = tree_and_padded(lambda: make64(seed))["padded"]
        for mode, (out, grads) in tree_and_padded(lambda: make(seed)).items():
            errors[mode]["logprobs"].append(relative(out["logprobs"], exact["logprobs"]))
            errors[mode]["values"].append(relative(out["values"], exact["values"]))
            g = torch.cat([x.flatten().double() for x in grads])
            g64 = torch.cat([x.flatten() for x in exact_grads])
            errors[mode]["gradients"].append(float((g - g64).norm() / g64.norm()))
    mean = {mode: {key: sum(v) / len(v) for key, v in kinds.items()} for mode, kinds in errors.items()}
    print({mode: {key: f"{v:.2%}" for key, v in kinds.items()} for mode, kinds in mean.items()})
    for key, padded_error in mean["padded"].items():
        assert 0 < padded_error < 0.1 and 0 < mean["tree"][key] <= 1.25 * padded_error, key


@pytest.mark.parametrize("answer", [1, 2])
@pytest.mark.parametrize("arch, attn", ARCHS, ids=[f"{a}-{b}" for a, b in ARCHS])
def test_sampling_into_one_tree_across_calls_matches_separate_sampling(arch, attn, answer):
    """Sequential calls that grow one tree (with graph, as in an episode) sample the same tokens with the same
    log-probs and values as padded sampling, and backpropagate to the same LoRA gradients."""
    results = {}
    for mode in ("tree", "padded"):
        policy = make_policy(arch, attn)
        if mode == "padded":
            padded(policy)
        generator = torch.Generator().manual_seed(0)
        tree = PromptTree(policy) if mode == "tree" else None
        rollouts = [sample(policy, [q], max_new_tokens=answer, generator=generator, keep_graph=True, tree=tree)
                    for q in (BASE, torch.cat([BASE[:11], OTHER[:6]]), BASE, BASE[:9])]
        loss = sum(r.logprobs_graph.sum() + r.values_graph.sum() for r in rollouts)
        loss.backward()
        results[mode] = ([r.responses[0].tolist() for r in rollouts], torch.cat([r.logprobs for r in rollouts]),
                         [p.grad.clone() for p in policy.trainable_parameters("agent")],
                         None if tree is None else len(tree))
    (tokens, logprobs, grads, nodes), (tokens_p, logprobs_p, grads_p, _) = results["tree"], results["padded"]
    assert tokens == tokens_p
    assert torch.allclose(logprobs, logprobs_p, atol=TOL, rtol=TOL)
    for a, b in zip(grads, grads_p):
        assert torch.allclose(a, b, atol=TOL, rtol=TOL)
    # the tree holds each distinct token once: 20 + 6 (the second prompt's own suffix) + the answers' children
    answers = {tuple([q] + t[:answer - 1]) for q, t in zip((20, 17, 20, 9), tokens)} if answer > 1 else set()
    assert nodes == 20 + 6 + len(answers)


def test_the_backbone_sees_each_tree_node_once(tiny_chat_model_dir, tmp_path):
    """One training episode (5 real prompts): the sampling calls compute exactly the nodes of the tree of the
    episode's queries, and the reference pass (a cold cache: every sample misses) exactly the tree of its distinct
    query + answer sequences; ppo/tokens_computed counts both."""
    from moral.config import RunConfig
    from moral.finetune import FineTuning
    config = RunConfig(model=tiny_chat_model_dir, episodes=1, lora_rank=4, format_aid="prefix", device="cpu",
                       dtype="fp32").resolve()
    run = FineTuning(config, str(tmp_path / "run"), progress=False)
    trainer, seen = run.trainers["agent"], {}
    real_step = trainer.step

    def step(queries, responses, scores):
        seen.update(queries=queries, responses=responses)
        return real_step(queries, responses, scores)

    trainer.step = step
    try:
        episode = run.run_episode()
    finally:
        run.logs.close()
        trainer.discard_rollouts()
        run._restore_signal_handlers()
    assert run.policy.tree_supported
    queries = sorted({tuple(q.tolist()) for q in seen["queries"]})
    sequences = sorted({tuple(q.tolist()) + tuple(r.tolist()) for q, r in zip(seen["queries"], seen["responses"])})
    sampled, referenced = sum(tree_size(queries)), sum(tree_size(sequences))
    assert episode.stats["agent"]["ppo/tokens_computed"] == sampled + referenced
    assert sampled < sum(len(q) for q in queries) or len(queries) == 1  # the prompts share their head


def test_tree_and_padded_updates_agree_fused_and_recomputed():
    """The fused single update and the recomputed 2-epoch update give the same gradients and losses with the tree
    as without it (fp32; rtol 1e-4, atol 1e-6, the fused-vs-recomputed tolerance)."""
    queries = random_queries(6, seed=11)
    scores = [1.0, -1.0, 0.5, 0.0, 2.0, -2.0]
    for epochs in (1, 2):
        results = {}
        for mode in ("tree", "padded"):
            policy = tiny_policy(0)
            if mode == "padded":
                padded(policy)
            config = PPOConfig(batch_size=6, mini_batch_size=6 if epochs == 1 else 3, ppo_epochs=epochs,
                               learning_rate=1e-3, seed=0)
            trainer = PPOTrainer(config, policy, "agent")
            rollout = trainer.generate(queries, max_new_tokens=2)
            stats = trainer.step(queries, rollout.responses, scores)
            assert stats["ppo/fused_rollout"] == float(epochs == 1)
            results[mode] = ([r.tolist() for r in rollout.responses], [p.grad.clone() for p in trainer.params],
                             stats)
        (tokens, grads, stats), (tokens_p, grads_p, stats_p) = results["tree"], results["padded"]
        assert tokens == tokens_p
        for a, b in zip(grads, grads_p):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        for key in ("ppo/loss/policy", "ppo/loss/value", "objective/kl"):
            assert stats[key] == pytest.approx(stats_p[key], rel=1e-4, abs=1e-6)
        assert stats["ppo/tokens_computed"] < stats_p["ppo/tokens_computed"]  # the padded path pays for padding


def test_small_packed_passes_run_eager_attention_on_the_cpu():
    """An SDPA model runs a packed pass of at most EAGER_PAIRS_CPU (query, key) pairs with eager attention, with
    and without gradients, and larger ones with SDPA; the model's own setting is back after each pass."""
    policy = make_policy("llama", "sdpa")
    seen = []
    layer = policy.lm.get_base_model().model.layers[0].self_attn
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    assert policy.attention_for(20, 40) == "eager" and policy.attention_for(600, 600) == "sdpa"
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            tree = PromptTree(policy, keep_cache=False)
            tree.insert(BASE.tolist())
            tree.compute()
    policy.EAGER_PAIRS_CPU = 10
    tree = PromptTree(policy, keep_cache=False)
    tree.insert(BASE.tolist())
    tree.compute()
    assert seen == ["eager", "eager", "sdpa"] and policy.config._attn_implementation == "sdpa"


def test_a_model_that_cannot_take_the_mask_falls_back_with_one_warning(monkeypatch):
    policy = tiny_policy(0)
    monkeypatch.setattr(PolicyModel, "attention_mask_4d", lambda self, visible, implementation=None: None)  # the mask gets lost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert policy.tree_supported is False and policy.tree_supported is False
    assert len([w for w in caught if "prompt tree" in str(w.message)]) == 1
    rollout = sample(policy, random_queries(3), max_new_tokens=2, generator=torch.Generator().manual_seed(0))
    assert [len(r) for r in rollout.responses] == [2, 2, 2]


@pytest.mark.parametrize("max_tokens", [None, 48])
def test_the_padded_path_pads_to_the_gpus_multiple_of_8_without_changing_a_value(max_tokens):
    """On CUDA the trainer pads the padded path's sequences to a multiple of 8 (pad_multiple, never used on the
    CPU): right padding that causal attention never sees, within the same token budget. Log-probs, values and
    entropies agree with unpadded lengths (fp32, 1e-6)."""
    policy = padded(make_policy("llama", "eager"))
    out = {m: policy.forward_responses(ALL_QUERIES, ALL_RESPONSES, with_entropy=True, max_tokens=max_tokens,
                                       pad_multiple=m) for m in (1, 8)}
    for key in ("logprobs", "values", "entropy"):
        torch.testing.assert_close(out[8][key], out[1][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_lost", [False, True])
def test_the_probe_judges_the_mask_in_fp32_inside_a_callers_autocast(mask_lost, monkeypatch):
    """A caller who wraps the loop in torch.autocast(bf16) around an fp32 policy made the one-time probe compare
    bf16 passes against the fp32 tolerance: it failed (relative error 0.0055), switched the tree off for good and
    warned that the model "cannot take the mask". The probe now runs outside the caller's autocast; a mask that
    really gets lost is still caught there."""
    policy = tiny_policy(0)
    if mask_lost:
        monkeypatch.setattr(PolicyModel, "attention_mask_4d", lambda self, visible, implementation=None: None)
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        assert policy.tree_supported is (not mask_lost)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is as it was
    assert len([w for w in caught if "prompt tree" in str(w.message)]) == int(mask_lost)


def test_subtree_chunks_split_within_the_budget_and_never_truncate():
    seqs = sorted([(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 9), (7, 8, 9, 10, 11, 12), (7, 8), (20,) * 9])
    assert sum(tree_size(seqs)) == len({s[:i] for s in seqs for i in range(1, len(s) + 1)})  # distinct prefixes
    chunks = subtree_chunks(seqs, 8)
    assert sorted(i for c in chunks for i in c) == list(range(len(seqs)))
    for chunk in chunks:
        nodes = len({seqs[i][:k] for i in chunk for k in range(1, len(seqs[i]) + 1)})
        assert nodes <= 8 or len(chunk) == 1
    assert subtree_chunks(seqs, None) == [list(range(len(seqs)))]


@pytest.mark.parametrize("arch, attn", ARCHS, ids=[f"{a}-{b}" for a, b in ARCHS])
def test_drafted_answers_sample_the_same_in_one_pass_per_call(arch, attn):
    """Sequential two-token calls growing one tree with graph, as in an episode: drafting every possible first
    token (so every draw follows a draft) samples the same tokens with the same log-probs, values and LoRA
    gradients as no draft (fp32, TOL), in one backbone pass per call whose query adds nodes (the undrafted calls
    take two each); the drafted nodes nobody follows are computed once and change nothing."""
    queries = (BASE, torch.cat([BASE[:11], OTHER[:6]]), BASE, BASE[:9])
    vocab = 64
    results = {}
    for mode in ("draft", "none"):
        policy = make_policy(arch, attn)
        tree = PromptTree(policy)
        generator = torch.Generator().manual_seed(0)
        draft = [(t,) for t in range(vocab)] if mode == "draft" else None
        rollouts = [sample(policy, [q], max_new_tokens=2, generator=generator, keep_graph=True, tree=tree,
                           draft=draft) for q in queries]
        loss = sum(r.logprobs_graph.sum() + r.values_graph.sum() for r in rollouts)
        loss.backward()
        results[mode] = ([r.responses[0].tolist() for r in rollouts], torch.cat([r.logprobs for r in rollouts]),
                         torch.cat([r.values_graph.detach() for r in rollouts]),
                         [p.grad.clone() for p in policy.trainable_parameters("agent")],
                         (policy.backbone_passes, policy.backbone_tokens), len(tree))  # the probe uncounted
    (tokens, logprobs, values, grads, (passes, computed), nodes) = results["draft"]
    (tokens_n, logprobs_n, values_n, grads_n, (passes_n, computed_n), nodes_n) = results["none"]
    assert tokens == tokens_n
    assert torch.allclose(logprobs, logprobs_n, atol=TOL, rtol=TOL)
    assert torch.allclose(values, values_n, atol=TOL, rtol=TOL)
    for a, b in zip(grads, grads_n):
        assert torch.allclose(a, b, atol=TOL, rtol=TOL)
    # the third query is the first again (nothing new); the fourth ends inside the first, where no draft hangs yet
    assert passes == 3 and passes_n > passes
    # three distinct query ends, each drafted once; the draft BASE[9] below BASE[:9] is a node of the first query
    assert nodes == 20 + 6 + 3 * vocab - 1 and computed == nodes
    assert computed_n == nodes_n


def test_a_wrong_draft_changes_nothing_but_its_own_tokens_and_drafts_fit_the_budget():
    """A draft that no draw follows: the same tokens and log-probs as no draft, one extra node per distinct query
    (and per draft token), in the passes the undrafted call takes; drafts beyond max_new_tokens - 1 tokens are cut,
    and a one-token answer drafts nothing. Fresh trees split by the budget count the drafted nodes."""
    queries = random_queries(6, seed=4)
    out = {}
    for draft in (None, [(63, 62, 61)]):
        policy = make_policy("llama", "eager")
        generator = torch.Generator().manual_seed(1)
        rollout = sample(policy, queries, max_new_tokens=2, generator=generator, draft=draft)
        out[draft is None] = (rollout, policy.backbone_passes, policy.backbone_tokens)
    (drafted, passes, computed), (plain, passes_n, computed_n) = out[False], out[True]
    assert all(r[0] != 63 for r in plain.responses)  # the draft is wrong for every query
    assert [r.tolist() for r in drafted.responses] == [r.tolist() for r in plain.responses]
    assert torch.allclose(drafted.logprobs, plain.logprobs, atol=TOL, rtol=TOL)
    distinct = len({tuple(q.tolist()) for q in queries})
    assert passes == passes_n == 2 and computed == computed_n + distinct

    policy = make_policy("llama", "eager")
    tree = PromptTree(policy)
    sample(policy, [BASE], max_new_tokens=1, tree=tree, draft=[(5, 6)])
    assert len(tree) == len(BASE)
    with pytest.raises(ValueError, match=r"draft \[\(64,\)\]: token ids must be in \[0, 64\)"):
        sample(policy, [BASE], max_new_tokens=2, draft=[(64, 1)])

    seqs = sorted({tuple(q.tolist()) for q in queries})
    for budget in (10, 16, 25):
        for chunk in subtree_chunks(seqs, budget, extra=2):
            nodes = len({seqs[i][:k] for i in chunk for k in range(1, len(seqs[i]) + 1)}) + 2 * len(chunk)
            assert nodes <= budget or len(chunk) == 1


def test_a_fused_update_after_drafted_sampling_is_the_update_without_drafts():
    """PPOTrainer: three sequential two-token calls and one fused step, drafting every first token or nothing: the
    same answers, losses and LoRA gradients (fp32; rtol 1e-4, atol 1e-6); ppo/tokens_computed counts the drafted
    nodes too, and ppo/backbone_passes one pass per call where every draw follows the draft."""
    queries = random_queries(6, seed=12)
    scores = [1.0, -1.0, 0.5, 0.0, 2.0, -2.0]
    results = {}
    for draft in ([(t,) for t in range(64)], None):
        trainer = PPOTrainer(PPOConfig(batch_size=6, mini_batch_size=6, ppo_epochs=1, learning_rate=1e-3, seed=0),
                             tiny_policy(0), "agent")
        responses = []
        for pair in (queries[:2], queries[2:4], queries[4:]):
            responses += trainer.generate(pair, max_new_tokens=2, draft=draft).responses
        stats = trainer.step(queries, responses, scores)
        assert stats["ppo/fused_rollout"] == 1.0
        results[draft is None] = ([r.tolist() for r in responses], [p.grad.clone() for p in trainer.params], stats)
    (tokens, grads, stats), (tokens_n, grads_n, stats_n) = results[False], results[True]
    assert tokens == tokens_n
    for a, b in zip(grads, grads_n):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for key in ("ppo/loss/policy", "ppo/loss/value", "objective/kl", "objective/entropy"):
        assert stats[key] == pytest.approx(stats_n[key], rel=1e-4, abs=1e-6)
    assert stats["ppo/tokens_computed"] > stats_n["ppo/tokens_computed"]
    # one pass per call instead of two, and one reference pass (a cold cache) in both
    assert (stats["ppo/backbone_passes"], stats_n["ppo/backbone_passes"]) == (3 + 1, 6 + 1)


def test_a_model_whose_attention_takes_no_mask_packs_its_tree_with_sdpa():
    """Flash attention takes no 4-D mask, and torch 2.13's flex attention on the CPU crashed the process (segfault in
    its compiled kernel) on the tree's mask; packed passes now run SDPA (or eager) whatever the model's own
    attention. The stand-in here is causal attention that ignores any mask, exact for one unpadded sequence (as
    flash attention is): before, the probe found the tree wrong (0.38) and switched it off with a warning."""
    import torch.nn.functional as F
    from transformers import AttentionInterface, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def maskless(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("ppo_core_test_maskless", maskless)
    AttentionMaskInterface.register("ppo_core_test_maskless", sdpa_mask)

    def make():
        config = tiny_llama_config()
        config._attn_implementation = "ppo_core_test_maskless"
        torch.manual_seed(0)
        return with_nonzero_lora(PolicyModel(LlamaForCausalLM(config).eval(), adapters=("agent",),
                                             lora=LoraSettings(r=4, alpha=8, dropout=0.0)), 0)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ppo_core")
        policy = make()
        assert policy.tree_supported and policy.attention_for(1000, 1000) == "sdpa"
    tree = policy.forward_responses(ALL_QUERIES, ALL_RESPONSES, with_entropy=True)
    one_by_one = padded(make())  # one sequence per pass: no padding for the mask to ignore
    for i, (query, response) in enumerate(zip(ALL_QUERIES, ALL_RESPONSES)):
        alone = one_by_one.forward_responses([query], [response], with_entropy=True)
        for key in ("logprobs", "values", "entropy"):
            assert torch.allclose(tree[key][i].detach(), alone[key][0].detach(), atol=TOL, rtol=TOL), (i, key)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_model_whose_every_layer_slides_gets_the_window_in_its_tree_mask(attn):
    """Mistral (as Phi-3 and Starcoder2) has a sliding window and no layer types: every layer slides. Its tree mask
    used to ignore the window, so the probe failed (0.11) and the tree was off for such models; sequences of 20
    tokens against a window of 8."""
    from transformers import MistralConfig, MistralForCausalLM

    def make():
        torch.manual_seed(0)
        config = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                               max_position_embeddings=256, initializer_range=0.2, attn_implementation=attn)
        return with_nonzero_lora(PolicyModel(MistralForCausalLM(config).eval(), adapters=("agent",),
                                             lora=LoraSettings(r=4, alpha=8, dropout=0.0)), 0)

    assert make().sliding_window == 8
    assert_tree_matches(tree_and_padded(make))


def _arch_config(arch: str):
    import transformers as tf
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
    return {
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "phi3": lambda: tf.Phi3Config(**common, sliding_window=8, pad_token_id=0),  # every layer slides
        "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                              layer_types=["sliding_attention", "full_attention"]),
        "olmo2": lambda: tf.Olmo2Config(**common),
        "cohere": lambda: tf.CohereConfig(**common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=256, initializer_range=0.2),
        "gpt2": lambda: tf.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      initializer_range=0.2),  # learned absolute positions
        # Granite-3's multipliers (embeddings, residuals, attention scale, logits). With all four at 1 the tiny model's
        # LoRA gradients reach 12 and tree and padded differ by 3.5e-5, both as far from a float64 run (1.9e-5 and
        # 1.5e-5 relative): fp32 rounding, not the tree.
        "granite": lambda: tf.GraniteConfig(**common, embedding_multiplier=12.0, residual_multiplier=0.22,
                                            attention_multiplier=0.0078125, logits_scaling=8.0),
    }[arch]()


@pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")  # peft on GPT-2's Conv1D layers
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma3", "olmo2", "cohere", "gpt_neox", "gpt2", "granite"])
def test_other_architectures_take_the_tree_and_match_separate_sequences(arch, attn):
    """Beyond Llama and Gemma-2: what a researcher may load instead (per-layer and every-layer sliding windows,
    QK norms, parallel attention, learned positions, Granite's multipliers); 20-token sequences, windows of 8; fp32, 1e-5."""
    from transformers import AutoModelForCausalLM

    def make():
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(_arch_config(arch), attn_implementation=attn).eval()
        return with_nonzero_lora(PolicyModel(lm, adapters=("agent",), lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
                                 0)

    assert_tree_matches(tree_and_padded(make))


def test_a_tree_is_extended_only_with_the_adapter_it_was_computed_with():
    """A tree passed to sample() (or extended by hand) under another adapter, or under the reference, used to mix two
    policies' states silently: the new nodes attended to keys and values of the other policy. Now that is one
    RuntimeError naming both; the same adapter extends it, with the numbers of a fresh tree (fp32, 1e-5)."""
    policy = with_nonzero_lora(tiny_policy(0, adapters=("agent", "opponent")))
    first, second = random_queries(2, seed=4)
    with torch.no_grad():
        tree = PromptTree(policy)
        with policy.adapter("agent"):
            sample(policy, [first], max_new_tokens=1, tree=tree)
        for context, says in ((policy.adapter("opponent"), "adapter 'opponent'"),
                              (policy.reference(), "the reference")):
            with context, pytest.raises(RuntimeError, match=f"computed with adapter 'agent'; extending it with {says}"):
                sample(policy, [second], max_new_tokens=1, tree=tree)
        with policy.adapter("agent"):
            extended = sample(policy, [second], max_new_tokens=1, tree=tree, probe_tokens=[5, 6]).probe_logprobs
            fresh = sample(policy, [second], max_new_tokens=1, tree=PromptTree(policy), probe_tokens=[5, 6])
        assert torch.allclose(extended, fresh.probe_logprobs, rtol=0, atol=1e-5)
        with policy.adapter("opponent"):
            other = sample(policy, [second], max_new_tokens=1, probe_tokens=[5, 6]).probe_logprobs
        assert (other - extended).abs().max() > 1e-3  # what the mixed tree would have served in part
