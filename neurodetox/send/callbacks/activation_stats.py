"""Per-neuron activation statistics during training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from neurodetox.core.distributed import is_distributed, merge_moments, rank
from neurodetox.core.io import atomic_save_safetensors
from neurodetox.core.moments import RunningMoments
from neurodetox.core.pooling import AttentionMaskTracker, real_tokens
from neurodetox.core.runtime import in_backward_recompute
from neurodetox.core.sites import LayerSpec, resolve_sites
from neurodetox.send.callbacks.base import CheckpointedCallback


class ActivationStatsCallback(CheckpointedCallback):
    """Running mean and variance of every neuron at chosen sites.

    Counts real (non-padding) tokens of **training** forward passes only
    (module in training mode, outside a gradient-checkpoint recompute), in
    float64 with the Chan/Welford merge (:class:`neurodetox.core.moments.RunningMoments`).
    The moments are saved as ``neurodetox_activation_stats.safetensors`` in
    every checkpoint and restored on resume. A summary (tokens counted, mean
    per-neuron variance per site) is added to the training logs by
    :class:`neurodetox.send.SeNDTrainer`.

    Args:
        site: ``"mlp"`` (default) or ``"residual"``.
        layers: layer spec (see :func:`neurodetox.core.sites.parse_layers`), default ``"all"``.
        module_path: explicit module path for unknown architectures.

    Attributes:
        moments: ``{site_key: RunningMoments}`` once training has begun.
    """

    state_name = "neurodetox_activation_stats"

    def __init__(self, site: str = "mlp", layers: LayerSpec = "all", module_path: Optional[str] = None):
        super().__init__()
        self.site, self.layers, self.module_path = site, layers, module_path
        self.moments: dict[str, RunningMoments] = {}  # this rank's tokens
        self._merged: dict[str, RunningMoments] = {}
        self._handles: list = []
        self._tracker: Optional[AttentionMaskTracker] = None
        self._sites = []

    def attach(self, model) -> None:
        """Resolve sites and install observer hooks on ``model`` (idempotent)."""
        if self._handles:
            return
        from neurodetox.core.sites import register_site_hook

        self._sites = resolve_sites(model, self.site, self.layers, self.module_path)
        for s in self._sites:
            self.moments.setdefault(s.key, RunningMoments(s.width))
        self._tracker = AttentionMaskTracker(model)
        for s in self._sites:
            self._handles.append(register_site_hook(s, self._make_hook(s), observer=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._tracker is not None:
            self._tracker.remove()
            self._tracker = None

    def _make_hook(self, site):
        moments = self.moments[site.key]

        def hook(activation):
            if not site.module.training or in_backward_recompute():
                return None
            with torch.no_grad():
                moments.update(real_tokens(activation.detach(), self._tracker.mask_for(activation)))
            return None

        return hook

    # -- Trainer events ----------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)
        self._maybe_resume()

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def sync(self) -> None:
        """Chan-merge every site's moments across ranks (collective; identical result on every rank)."""
        self._merged = {k: merge_moments(m) for k, m in self.moments.items()}

    def merged_moments(self) -> dict[str, RunningMoments]:
        """Moments over the tokens of **all** ranks (a collective when distributed: call on every rank)."""
        self.sync()
        return self._merged

    def log_metrics(self) -> dict:
        """Summary for the training log: tokens counted and the mean per-neuron variance over all sites.

        Per-site moments are in :attr:`moments` and in every checkpoint.
        """
        counted = [m for m in self.merged_moments().values() if m.count]
        if not counted:
            return {}
        return {
            "stats/tokens": counted[0].count,
            "stats/mean_variance": float(torch.stack([m.variance.mean() for m in counted]).mean()),
        }

    # -- persistence -------------------------------------------------------
    def save_state(self, directory: str) -> None:
        tensors = {}
        source = self._merged if is_distributed() and self._merged else self.moments
        for key, m in source.items():
            for name, t in m.state_dict().items():
                tensors[f"{key}.{name}"] = t
        meta = {
            "site": self.site,
            "layers": json.dumps(self.layers if not isinstance(self.layers, tuple) else list(self.layers)),
        }
        atomic_save_safetensors(Path(directory) / f"{self.state_name}.safetensors", tensors, metadata=meta)

    def load_state(self, directory: str) -> None:
        tensors = load_file(str(Path(directory) / f"{self.state_name}.safetensors"))
        keys = sorted({k.rsplit(".", 1)[0] for k in tensors})
        for key in keys:
            st = {n: tensors[f"{key}.{n}"] for n in ("count", "mean", "m2")}
            m = self.moments.get(key) or RunningMoments(st["mean"].shape[0])
            if rank() == 0:  # the saved moments are merged over all ranks: keep them once
                m.load_state_dict(st)
            self.moments[key] = m
