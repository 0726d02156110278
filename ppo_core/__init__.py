"""ppo_core: token-level PPO for causal language models, in plain PyTorch.

Imports nothing from the moral-alignment packages (games/, moral/); use it for any RL fine-tuning of a causal LM.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PPOConfig
from .control import AdaptiveKLController, FixedKLController, RunningMoments
from .generation import Rollout, sample
from .model import LoraSettings, PolicyModel, compute_dtype_for, load_causal_lm, save_adapter
from .shortcuts import ReferenceCache
from .trainer import NonFiniteError, PPOTrainer
from .tree import PromptTree

__all__ = [
    "AdaptiveKLController", "CheckpointError", "FixedKLController", "LoraSettings", "NonFiniteError", "PPOConfig",
    "PPOTrainer", "PolicyModel", "PromptTree", "ReferenceCache", "Rollout", "RunningMoments", "compute_dtype_for",
    "load_causal_lm", "load_checkpoint", "sample", "save_adapter", "save_checkpoint",
]
