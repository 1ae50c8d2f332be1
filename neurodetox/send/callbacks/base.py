"""Shared plumbing: callbacks whose state travels with every Trainer checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from neurodetox.core.runtime import checkpoint_dir


class CheckpointedCallback(TrainerCallback):
    """A callback that saves its state inside each Trainer checkpoint folder.

    :class:`neurodetox.send.SeNDTrainer` calls :meth:`save_state` while the
    checkpoint is still being assembled (so the checkpoint is complete or
    absent) and :meth:`load_state` when resuming. With a plain
    ``transformers.Trainer`` the state is written in ``on_save`` and you call
    ``callback.load_state(checkpoint_dir)`` before ``trainer.train(resume_from_checkpoint=...)``.
    """

    #: file name (without extension) inside the checkpoint folder
    state_name = "neurodetox_state"

    def __init__(self):
        self._pending_resume: Optional[str] = None
        self._saved_steps: set[int] = set()

    # -- to implement -------------------------------------------------------
    def save_state(self, directory: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_state(self, directory: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def sync(self) -> None:
        """Collective step run on **every** rank before rank 0 saves (default: nothing)."""

    def has_state(self, directory: str) -> bool:
        return any(Path(directory).glob(f"{self.state_name}.*"))

    # -- wiring ------------------------------------------------------------
    def resume_from(self, directory: Optional[str]) -> None:
        """Load state from ``directory`` at the start of the next ``train()``."""
        self._pending_resume = directory

    def _maybe_resume(self) -> bool:
        d, self._pending_resume = self._pending_resume, None
        if d and self.has_state(d):
            self.load_state(d)
            return True
        return False

    def save_into_checkpoint(self, directory: str, step: int, write: bool = True) -> None:
        """Called by SeNDTrainer on every rank (after :meth:`sync`); only the writer writes."""
        if write:
            self.save_state(directory)
        self._saved_steps.add(step)

    def on_save(self, args, state, control, **kwargs):
        if state.global_step in self._saved_steps:
            return
        self.sync()  # plain Trainer: every rank gets here
        d = checkpoint_dir(args.output_dir, state.global_step)
        if state.is_world_process_zero and os.path.isdir(d):
            self.save_state(d)
