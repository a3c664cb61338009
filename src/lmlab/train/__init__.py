"""Training: the loop (trainer.py), optimizers and schedules (optim.py), checkpoints (checkpoint.py).

Usage::

    lmlab train CONFIG.yaml [dotted.key=value ...]
    python -m lmlab.train CONFIG.yaml [dotted.key=value ...]
"""

from lmlab.train.trainer import Trainer, TrainingError

__all__ = ["Trainer", "TrainingError"]
