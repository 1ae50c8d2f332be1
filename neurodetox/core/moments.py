"""Per-neuron running moments with the Chan et al. parallel merge.

``RunningMoments`` keeps ``count``, ``mean`` and ``M2`` (sum of squared
deviations) in float64 for ``width`` neurons. A batch is folded in with the
pairwise update of Chan, Golub & LeVeque ("Updating formulae and a pairwise
algorithm for computing sample variances", 1979), which is also how moments
from several processes are merged exactly.
"""

from __future__ import annotations

from typing import Optional

import torch


class RunningMoments:
    """Running mean and variance of ``width`` neurons.

    Args:
        width: number of neurons ``n``.
        device: where the float64 accumulators live (default CPU).

    Attributes:
        count: number of samples (tokens) seen, a Python int.
        mean: ``[n]`` float64.
        m2: ``[n]`` float64, sum of squared deviations from the mean.
    """

    def __init__(self, width: int, device: Optional[torch.device] = None):
        self.width = int(width)
        self.count = 0
        self.mean = torch.zeros(self.width, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(self.width, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Fold in samples ``x`` of shape ``[N, n]`` (any float dtype)."""
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"expected samples of shape [N, {self.width}], got {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        x = x.detach().to(device=self.mean.device, dtype=torch.float64)
        b_mean = x.mean(0)
        b_m2 = ((x - b_mean) ** 2).sum(0)
        self.merge_(n, b_mean, b_m2)

    def merge_(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan merge of another set's ``(count, mean [n], M2 [n])`` into this one."""
        n_a = self.count
        n = n_a + n_b
        if n_b == 0:
            return
        delta = mean_b.to(self.mean) - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b.to(self.m2) + delta**2 * (n_a * n_b / n)
        self.count = n

    def merge(self, other: RunningMoments) -> None:
        """Merge ``other`` (same width) into this one."""
        self.merge_(other.count, other.mean, other.m2)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance ``M2 / count`` ``[n]`` (NaN before any sample)."""
        return self.m2 / self.count if self.count else torch.full_like(self.m2, float("nan"))

    @property
    def sample_variance(self) -> torch.Tensor:
        """Unbiased variance ``M2 / (count - 1)`` ``[n]``."""
        return self.m2 / (self.count - 1) if self.count > 1 else torch.full_like(self.m2, float("nan"))

    def state_dict(self) -> dict:
        return {"count": torch.tensor(self.count, dtype=torch.int64), "mean": self.mean.cpu(), "m2": self.m2.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state["mean"].shape != (self.width,):
            raise ValueError(f"saved moments have width {state['mean'].shape[0]}, expected {self.width}")
        self.count = int(state["count"])
        self.mean = state["mean"].to(self.mean)
        self.m2 = state["m2"].to(self.m2)
