"""Fine-tune a causal LM with PPO on a reward of your own: ppo_core on its own, no games, no moral rewards.

    python examples/custom_reward.py    # teaches SmolLM2-135M-Instruct to open its answers with "Yes"
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
    from transformers import AutoTokenizer

    from moral.embedded import ensure_embedded_model  # any Hugging Face id or folder works here
    from ppo_core import load_causal_lm

    path = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = PolicyModel(load_causal_lm(path), adapters=("default",), lora=LoraSettings(r=16, alpha=32))
    questions = ["Is the sky blue?", "Do you like tea?", "Shall we play a game?", "Is seven a prime number?"] * 2
    queries = [torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]) for q in questions]
    starts_with_yes = lambda response: float(tokenizer.decode(response).strip().lower().startswith("yes"))
    history = train(policy, queries, starts_with_yes, steps=30, lr=1e-4)
    print(f"share of answers starting with 'Yes': {history[0]:.2f} -> {history[-1]:.2f}")
