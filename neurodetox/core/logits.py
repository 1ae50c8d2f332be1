"""Logits of the last positions only: the LM head skipped where nothing reads it.

The LM head of a small model is a large share of a forward pass (SmolLM2-135M:
a 576 × 49152 matrix, about a fifth of the compute per token). Code that reads
the logits of the final position(s) only asks transformers for those
(``logits_to_keep``); a model whose ``forward`` lacks that argument computes
all positions and is sliced, so the result is the same either way.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import nn

from neurodetox.core.sites import base_model

__all__ = ["tail_logits"]


@cache
def _accepts_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - unusual forward
        return False


def tail_logits(model: nn.Module, keep: int, **inputs) -> torch.Tensor:
    """Run ``model(**inputs, use_cache=False)`` and return the logits of the last ``keep`` positions.

    Args:
        model: a transformers causal LM (PEFT wrappers are looked through to
            decide whether ``logits_to_keep`` is supported).
        keep: how many final positions to return, ``1 ≤ keep``; larger than
            the sequence means all of it.
        inputs: ``input_ids`` or ``inputs_embeds``, ``attention_mask``, …

    Returns:
        ``[batch, min(keep, seq), vocab]`` in the model's dtype (with grad
        when called with grad enabled).

    Raises:
        ValueError: ``keep < 1``.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 position, got {keep}")
    inputs.setdefault("use_cache", False)
    if _accepts_logits_to_keep(type(base_model(model))):
        return model(**inputs, logits_to_keep=int(keep)).logits[:, -keep:]
    return model(**inputs).logits[:, -keep:]
