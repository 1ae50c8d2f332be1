"""Deterministic neuron dropout masks applied through site hooks, and the released code's weight drop.

The mask zeroes a fixed set of neurons in **training** forward passes only
(``module.training``); evaluation, generation and tracking forwards are never
masked. A mask is only changed between optimizer steps, so a gradient-
checkpoint recompute sees exactly the mask of its forward pass.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from neurodetox.core.errors import UserError
from neurodetox.core.sites import (
    NeuronSite,
    base_model,
    decoder_layers,
    register_site_hook,
    resolve_sites,
    value_vector_parameter,
)


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


def freeze_blocks(model: nn.Module, count: int) -> int:
    """Stop gradients to the parameters of the first ``count`` decoder blocks (``requires_grad=False``).

    The SeND authors' released training script freezes the first ``min(24, L)`` blocks
    (``docs/methods.md`` §1). ``count`` larger than ``L`` freezes all ``L``.

    Returns:
        The number of blocks frozen.
    """
    blocks = decoder_layers(model)
    n = min(max(int(count), 0), len(blocks))
    for block in list(blocks)[:n]:
        for p in block.parameters():
            p.requires_grad_(False)
    return n


class MLPWeightDrop:
    """The released code's "drop": zero FFN weights at the selected residual indices, in place.

    The SeND authors' released code (github EMZEDI/SEND; ``docs/methods.md`` §1) tracks the
    residual stream of a block but drops by zeroing that block's **FFN** weights at the same
    index numbers, once per epoch, with no mask afterwards, so the optimizer can regrow them.
    For a selected residual index ``i`` of block ``l``, FFN neuron ``i`` of block ``l`` is
    zeroed: its rows of every FFN input projection (``gate_proj``/``up_proj`` rows and biases,
    ``dense_h_to_4h``/``fc_in``/``c_fc``) and its value vector (column ``i`` of the output
    projection). For GPT-NeoX (the Pythia script) neuron ``i + d`` is zeroed too, as that
    script does; other families follow the authors' Llama script (neuron ``i`` only).
    The output projection's bias (in the residual space) is left alone.

    Args:
        model: the model (PEFT wrappers allowed: the base weights are zeroed).
        residual_sites: the ``residual`` sites whose indices are dropped.

    Raises:
        UserError: the FFN of a block is narrower than the residual indices need
            (``d_ff < d``, or ``d_ff < 2d`` for GPT-NeoX), or a block's FFN input projection
            cannot be found.
    """

    def __init__(self, model: nn.Module, residual_sites: Sequence[NeuronSite]):
        base = base_model(model)
        self.paired = getattr(getattr(base, "config", None), "model_type", None) == "gpt_neox"
        modules = dict(model.named_modules())
        self.targets: dict[str, tuple[NeuronSite, list]] = {}
        self.residual_width: dict[str, int] = {}
        for rs in residual_sites:
            if rs.kind != "residual":
                raise UserError(f"send_procedure=released reads residual sites, got site {rs.key}")
            (ms,) = resolve_sites(model, "mlp", [rs.layer])
            need = 2 * rs.width if self.paired else rs.width
            if ms.width < need:
                raise UserError(
                    f"send_procedure=released zeroes FFN neuron i{' and i + d' if self.paired else ''} of block "
                    f"{rs.layer} for each residual index i < d={rs.width}, but that FFN has d_ff={ms.width} < {need} "
                    "neurons: use send_procedure=paper on this architecture"
                )
            parent = modules.get(ms.module_name.rsplit(".", 1)[0]) if "." in ms.module_name else None
            inputs = []
            for child in parent.children() if parent is not None else ():
                w = getattr(child, "base_layer", child)
                if w is getattr(ms.module, "base_layer", ms.module) or not hasattr(w, "weight"):
                    continue
                if isinstance(w, nn.Linear) and w.out_features == ms.width:
                    inputs.append((w, 0))
                elif hasattr(w, "nf") and int(w.nf) == ms.width:  # transformers Conv1D: weight [d, d_ff]
                    inputs.append((w, 1))
            if not inputs:
                raise UserError(
                    f"send_procedure=released cannot find the FFN input projection of block {rs.layer} "
                    f"(next to {ms.module_name}): use send_procedure=paper on this architecture"
                )
            self.targets[rs.key] = (ms, inputs)
            self.residual_width[rs.key] = rs.width

    def neurons(self, key: str, residual_indices: Sequence[int]) -> list[int]:
        """The FFN neuron indices zeroed for ``residual_indices`` of residual site ``key``."""
        idx = sorted({int(i) for i in residual_indices})
        if not self.paired:
            return idx
        d = self.residual_width[key]
        return sorted(set(idx) | {i + d for i in idx})

    @torch.no_grad()
    def apply(self, selection: dict[str, Sequence[int]]) -> dict[str, list[int]]:
        """Zero the FFN weights of the selected residual indices; returns ``{mlp_key: neurons}``."""
        done = {}
        for key, indices in selection.items():
            ms, inputs = self.targets[key]
            neurons = self.neurons(key, indices)
            if not neurons:
                continue
            j = torch.as_tensor(neurons, dtype=torch.long)
            weight, axis = value_vector_parameter(ms)
            weight.index_fill_(axis, j.to(weight.device), 0)
            for w, axis in inputs:
                w.weight.index_fill_(axis, j.to(w.weight.device), 0)
                if getattr(w, "bias", None) is not None:
                    w.bias.index_fill_(0, j.to(w.bias.device), 0)
            done[ms.key] = neurons
        return done
