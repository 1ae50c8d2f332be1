"""The value vectors one :func:`~neurodetox.patching.mint.repair` call touches: originals, writes, undo.

MINT (Gu et al., arXiv 2312.05356) patches value vectors ``w_j`` (column ``j``
of an FFN output projection) in place while it plans; :class:`Tracker` keeps
the original of every touched column (float32, CPU), snapshots and restores
them, and turns the kept changes into
:class:`~neurodetox.patching.patchfile.ParamPatch` objects.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
from torch import nn

from neurodetox.core.errors import UserError
from neurodetox.core.sites import NeuronSite, value_vector_parameter
from neurodetox.patching.patchfile import ParamPatch

__all__ = ["Tracker"]


class Tracker:
    """Touched value vectors: originals, writes, snapshots and undo."""

    def __init__(self, model: nn.Module, sites: Sequence[NeuronSite], storage: Optional[torch.dtype]):
        names = {id(p): n for n, p in model.named_parameters()}
        self.entries: dict[int, tuple[str, torch.Tensor, int]] = {}
        for s in sites:
            weight, axis = value_vector_parameter(s)
            if id(weight) not in names:
                raise UserError(f"the value-vector weight of layer {s.layer} is not a named parameter of the model")
            self.entries[s.layer] = (names[id(weight)], weight, axis)
        self.storage = storage
        self.originals: dict[tuple[int, int], torch.Tensor] = {}

    def column(self, layer: int, index: int) -> torch.Tensor:
        _, w, axis = self.entries[layer]
        return w.detach().select(axis, index).float().cpu().clone()

    def round(self, col: torch.Tensor, layer: int) -> torch.Tensor:
        _, w, _ = self.entries[layer]
        dtype = self.storage or w.dtype
        return col.to(dtype).float()

    def write(self, layer: int, index: int, col: torch.Tensor) -> None:
        key = (layer, index)
        if key not in self.originals:
            self.originals[key] = self.column(layer, index)
        _, w, axis = self.entries[layer]
        with torch.no_grad():
            w.select(axis, index).copy_(col.to(w.device, w.dtype))

    def snapshot(self) -> dict[tuple[int, int], torch.Tensor]:
        return {k: self.column(*k) for k in self.originals}

    def restore(self, snap: dict[tuple[int, int], torch.Tensor]) -> None:
        for key in list(self.originals):
            _, w, axis = self.entries[key[0]]
            value = snap.get(key, self.originals[key])
            with torch.no_grad():
                w.select(axis, key[1]).copy_(value.to(w.device, w.dtype))
            if key not in snap:
                del self.originals[key]

    def to_params(self) -> list[ParamPatch]:
        by_layer: dict[int, list[int]] = defaultdict(list)
        for (layer, index), orig in self.originals.items():
            if not torch.equal(self.column(layer, index), orig):
                by_layer[layer].append(index)
        out = []
        for layer, idx in sorted(by_layer.items()):
            name, w, axis = self.entries[layer]
            idx = sorted(idx)
            t = torch.tensor(idx, dtype=torch.long)
            orig = torch.stack([self.originals[(layer, i)] for i in idx], dim=axis)
            new = w.detach().index_select(axis, t.to(w.device)).float().cpu()
            out.append(ParamPatch(name=name, axis=axis, indices=t, original=orig, new=new, layer=layer))
        return out

    def full_originals(self, params: Sequence[ParamPatch]) -> dict[str, torch.Tensor]:
        """Full original tensors (in the storage dtype) of the touched parameters."""
        out = {}
        for p in params:
            _, w, _ = self.entries[p.layer]
            full = w.detach().cpu().clone()
            p.write(full, p.original)
            out[p.name] = full.to(self.storage) if self.storage is not None else full
        return out
