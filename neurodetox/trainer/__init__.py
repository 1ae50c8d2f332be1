"""SeND training: :class:`SeNDTrainer` and its :class:`SeNDConfig`."""

from .config import SeNDConfig
from .send_trainer import SeNDTrainer, last_checkpoint

__all__ = ["SeNDConfig", "SeNDTrainer", "last_checkpoint"]
