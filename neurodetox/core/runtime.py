"""Run-time helpers shared by the trainer and the callbacks (imports neither)."""

from __future__ import annotations

import os

import torch

PREFIX_CHECKPOINT_DIR = "checkpoint"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def in_backward_recompute() -> bool:
    """True while autograd runs a backward pass (e.g. a gradient-checkpoint recompute).

    Hooks use it to avoid counting recomputed activations twice.
    """
    return torch._C._current_graph_task_id() != -1
