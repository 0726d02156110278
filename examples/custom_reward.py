"""Fine-tune a causal LM with PPO on a reward of your own: ppo_core on its own, no games, no moral rewards.

    python examples/custom_reward.py [SEED]   # teaches SmolLM2-135M-Instruct to open its answers with "Yes"

`python examples/custom_reward.py 0` (then 1, 2) on a 2-core Intel Xeon (AMX, bf16): the exact probability that an
answer starts with "Yes" goes from 0.012 to 0.69, 0.73, 0.66 in 30 steps of 32 samples at lr 1e-3, about 17 s per run
(`/usr/bin/time`). The 32 samples are 4 questions asked 8 times: the prompt tree computes each question once. The
earlier version of this example (lr 1e-4, 8 samples; `git show d60dbf0:examples/custom_reward.py`) printed
"0.12 -> 0.12": it learned nothing in 30 steps.
"""

import torch

from ppo_core import LoraSettings, PPOConfig, PPOTrainer, PolicyModel


def train(policy, queries, reward_fn, *, steps=40, lr=1e-3, max_new_tokens=1, seed=0):
    """PPO on `reward_fn(response_ids) -> float` for a fixed list of queries; returns the mean reward per step."""
    config = PPOConfig(batch_size=len(queries), mini_batch_size=len(queries), ppo_epochs=1, learning_rate=lr,
                       seed=seed)
    trainer = PPOTrainer(config, policy)
    history = []
    for _ in range(steps):
        rollout = trainer.generate(queries, max_new_tokens=max_new_tokens)
        scores = [reward_fn(response) for response in rollout.responses]
        trainer.step(queries, rollout.responses, scores)
        history.append(sum(scores) / len(scores))
    return history


if __name__ == "__main__":
    import sys

    from transformers import AutoTokenizer

    from moral.embedded import ensure_embedded_model  # any Hugging Face id or folder works here
    from ppo_core import load_causal_lm, sample

    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    torch.manual_seed(seed)
    path = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = PolicyModel(load_causal_lm(path), adapters=("default",), lora=LoraSettings(r=16, alpha=32))
    questions = ["Is the sky blue?", "Do you like tea?", "Shall we play a game?", "Is seven a prime number?"]
    queries = [torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]) for q in questions]
    yes = tokenizer.encode("Yes", add_special_tokens=False)[0]

    def p_yes() -> float:
        """The exact probability that the answer's first token is "Yes", averaged over the questions."""
        with torch.no_grad(), policy.adapter("default"):
            return sample(policy, queries, max_new_tokens=1, probe_tokens=[yes]).probe_logprobs.exp().mean().item()

    starts_with_yes = lambda response: float(tokenizer.decode(response).strip().lower().startswith("yes"))
    before = p_yes()
    history = train(policy, queries * 8, starts_with_yes, steps=30, lr=1e-3, seed=seed)
    print(f"P(answer starts with 'Yes'): {before:.3f} -> {p_yes():.3f}; share of sampled answers starting with "
          f"'yes': {sum(history[:5]) / 5:.2f} in the first 5 steps, {sum(history[-5:]) / 5:.2f} in the last 5")
