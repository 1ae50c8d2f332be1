"""Compatibility alias: ``neurodetox.trainer`` re-exports :mod:`neurodetox.send`."""

from neurodetox.send import SeNDConfig, SeNDTrainer, last_checkpoint

__all__ = ["SeNDConfig", "SeNDTrainer", "last_checkpoint"]
