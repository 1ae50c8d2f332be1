"""Deterministic neuron dropout masks applied through site hooks.

The mask zeroes a fixed set of neurons in **training** forward passes only
(``module.training``); evaluation, generation and tracking forwards are never
masked. A mask is only changed between optimizer steps, so a gradient-
checkpoint recompute sees exactly the mask of its forward pass.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from neurodetox.core.sites import NeuronSite, register_site_hook


class NeuronDropout:
    """Zero chosen neurons at a set of sites during training.

    Args:
        sites: the sites to mask.
        rescale: multiply kept neurons by ``width / (width − dropped)``
            (inverted-dropout scaling). The SeND paper does not rescale;
            default ``False``.
    """

    def __init__(self, sites: Sequence[NeuronSite], rescale: bool = False):
        self.sites = {s.key: s for s in sites}
        self.rescale = rescale
        self.dropped: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self._handles = [register_site_hook(s, self._make_hook(s)) for s in sites]

    def _make_hook(self, site: NeuronSite):
        key = site.key

        def hook(activation: torch.Tensor):
            if not site.module.training or key not in self.dropped:
                return None
            return activation * self._mask(key, activation)

        return hook

    def _mask(self, key: str, like: torch.Tensor) -> torch.Tensor:
        ck = (key, like.dtype, like.device)
        m = self._cache.get(ck)
        if m is None:
            width = self.sites[key].width
            m = torch.ones(width, dtype=torch.float32)
            idx = self.dropped[key]
            m[idx] = 0.0
            if self.rescale and len(idx):
                m *= width / (width - len(idx))
            m = m.to(device=like.device, dtype=like.dtype)
            self._cache[ck] = m
        return m

    def set(self, dropped: dict[str, Sequence[int]]) -> None:
        """Drop ``dropped[site_key]`` (neuron indices) from now on; other sites unmasked."""
        for key in dropped:
            if key not in self.sites:
                raise KeyError(f"unknown site {key!r}; known: {', '.join(self.sites)}")
        self.dropped = {k: torch.as_tensor(list(v), dtype=torch.long) for k, v in dropped.items()}
        self._cache.clear()

    def clear(self) -> None:
        """Stop dropping anything."""
        self.set({})

    def mask(self, key: str) -> Optional[torch.Tensor]:
        """The float32 mask ``[width]`` of a site, or ``None`` if unmasked."""
        if key not in self.dropped:
            return None
        return self._mask(key, torch.empty(0))

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
