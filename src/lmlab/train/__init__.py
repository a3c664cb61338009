"""Training: the loop (trainer.py), optimizers and schedules (optim.py), checkpoints (checkpoint.py), GRPO
reinforcement learning (grpo.py; ``train.objective: grpo``).

Usage::

    lmlab train CONFIG.yaml [dotted.key=value ...]
    python -m lmlab.train CONFIG.yaml [dotted.key=value ...]
"""

from lmlab.train.grpo import GRPOTrainer, build_trainer, train_run
from lmlab.train.trainer import Trainer, TrainingError

__all__ = ["GRPOTrainer", "Trainer", "TrainingError", "build_trainer", "train_run"]
