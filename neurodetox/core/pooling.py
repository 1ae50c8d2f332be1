"""Token pooling over real (non-padding) tokens, and the batch's attention mask.

Site hooks only see activations ``[B, T, n]``; :class:`AttentionMaskTracker`
remembers the ``attention_mask`` of the forward pass in flight so that
statistics and embeddings can exclude padding.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from neurodetox.core.sites import base_model


class AttentionMaskTracker:
    """Remember the ``attention_mask`` ``[B, T]`` of the current forward pass.

    A ``forward_pre_hook`` on the transformers model (inside PEFT/DeepSpeed
    wrappers) stores ``attention_mask`` from the call's kwargs; ``mask`` is
    ``None`` when the call had none (then every token counts as real).
    Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module):
        self.mask: Optional[torch.Tensor] = None
        self._handle = base_model(model).register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.mask = kwargs.get("attention_mask")
        return None

    def mask_for(self, activation: torch.Tensor) -> Optional[torch.Tensor]:
        """The stored mask if it matches ``activation``'s ``[B, T]``, else ``None``."""
        m = self.mask
        if m is None or m.ndim != 2 or tuple(m.shape) != tuple(activation.shape[:2]):
            return None
        return m

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def real_tokens(activation: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of ``activation`` ``[B, T, n]`` at real tokens, as ``[N_real, n]``."""
    flat = activation.reshape(-1, activation.shape[-1])
    if attention_mask is None:
        return flat
    return flat[attention_mask.reshape(-1).bool()]


def sentence_embedding(activation: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SeND's sentence embedding: ``½ (mean over real tokens + last real token)``.

    Works for left and right padding.

    Args:
        activation: ``[B, T, n]``.
        attention_mask: ``[B, T]`` (1 = real token) or ``None`` (all real).

    Returns:
        ``[B, n]`` in float32.
    """
    a = activation.float()
    B, T, _ = a.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=a.device)
    m = attention_mask.to(a.device).float()
    counts = m.sum(1).clamp(min=1.0)
    mean = (a * m.unsqueeze(-1)).sum(1) / counts.unsqueeze(-1)
    positions = torch.arange(T, device=a.device).expand(B, T)
    last = torch.where(m.bool(), positions, torch.full_like(positions, -1)).max(1).values.clamp(min=0)
    last_tok = a[torch.arange(B, device=a.device), last]
    return 0.5 * (mean + last_tok)
