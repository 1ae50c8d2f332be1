"""Neuron analysis for locating and guarding patches (``docs/methods.md`` §5).

* **LM-head decoding** (Davies et al., arXiv 2501.02688): label an FFN neuron by
  the tokens its value vector ``w_j`` promotes, the top entries of
  ``W_U · (g ⊙ w_j)`` (``g`` the final norm's gain, folded in by default). Used
  by ``neurodetox patch show`` to compare a neuron before and after a patch.
* **Entropy neurons** (Stolfo et al., "Confidence Regulation Neurons",
  arXiv 2406.16254): last-layer neurons that write mostly into the bottom
  singular directions of ``W_U``, score ``ρ_j = ‖U_kᵀ w_j‖ / ‖w_j‖`` with
  ``U_k`` the bottom ``k ≈ 1%`` of ``d`` right singular vectors. They change
  the model's confidence, not facts; MINT (Gu et al., arXiv 2312.05356) patches
  are kept off them when the guard is on.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from neurodetox.core.errors import UserError
from neurodetox.core.sites import resolve_sites, value_vector_parameter
from neurodetox.patching.direction import final_norm_gain, semantic_space

__all__ = ["entropy_neuron_scores", "entropy_neurons", "decode_vector", "decode_neuron", "value_vector"]


def value_vector(model: nn.Module, layer: int, index: int) -> torch.Tensor:
    """The value vector ``w_j`` (float32 ``[d]``) of FFN neuron ``index`` of block ``layer``.

    Raises:
        UserError: ``index`` outside ``[0, d_ff)``.
    """
    site = resolve_sites(model, "mlp", [layer])[0]
    if not 0 <= index < site.width:
        raise UserError(f"neuron index {index} is out of range for layer {layer}: valid 0..{site.width - 1}")
    weight, axis = value_vector_parameter(site)
    return weight.detach().select(axis, index).float().cpu()


def entropy_neuron_scores(model: nn.Module, layer: int = -1, bottom_fraction: float = 0.01) -> torch.Tensor:
    """``ρ_j = ‖U_kᵀ w_j‖ / ‖w_j‖`` for every neuron of block ``layer`` (float32 ``[d_ff]``).

    ``U_k``: the ``k = max(1, round(bottom_fraction · d))`` eigenvectors of
    ``G = W_Uᵀ W_U`` with the smallest eigenvalues (= bottom right singular
    vectors of ``W_U``). A random direction scores about ``sqrt(k / d)``.
    """
    space = semantic_space(model, fold_norm=False)
    d = space.hidden_size
    k = max(1, round(bottom_fraction * d))
    U = space.bottom_eigenvectors(k).float()  # [d, k]
    site = resolve_sites(model, "mlp", [layer])[0]
    weight, axis = value_vector_parameter(site)
    W = weight.detach().float().cpu()
    W = W if axis == 1 else W.T  # [d, d_ff]
    return (U.T @ W).norm(dim=0) / W.norm(dim=0).clamp_min(1e-12)


def entropy_neurons(
    model: nn.Module, layer: int = -1, bottom_fraction: float = 0.01, threshold: float = 0.5
) -> list[tuple[int, int]]:
    """``(layer, index)`` of the neurons of block ``layer`` (default the last)
    with ``ρ_j >= threshold`` (default 0.5, i.e. at least half the value
    vector's norm lies in the bottom 1% of ``W_U``'s singular directions)."""
    site = resolve_sites(model, "mlp", [layer])[0]
    rho = entropy_neuron_scores(model, layer, bottom_fraction)
    return [(site.layer, int(i)) for i in torch.nonzero(rho >= threshold).flatten().tolist()]


@torch.no_grad()
def decode_vector(
    vector: torch.Tensor,
    unembedding: torch.Tensor,
    tokenizer=None,
    k: int = 10,
    gain: Optional[torch.Tensor] = None,
) -> list[tuple[str, float]]:
    """Top-``k`` tokens promoted by a residual-stream vector (LM-head decoding).

    Args:
        vector: ``[d]`` (e.g. a value vector).
        unembedding: ``W_U`` ``[V, d]``.
        tokenizer: decodes token ids; without one, ids are shown as ``"#id"``.
        k: how many tokens. Default 10.
        gain: optional final-norm gain ``[d]`` applied to ``vector`` first.

    Returns:
        ``k`` pairs ``(token text, logit contribution)``, largest first.
    """
    v = vector.detach().float().cpu()
    if gain is not None:
        v = v * gain.float().cpu()
    scores = unembedding.detach().float().cpu() @ v
    top = torch.topk(scores, min(k, scores.numel()))
    out = []
    for s, i in zip(top.values.tolist(), top.indices.tolist()):
        text = tokenizer.decode([i]) if tokenizer is not None else f"#{i}"
        out.append((text, float(s)))
    return out


def decode_neuron(
    model: nn.Module,
    tokenizer,
    layer: int,
    index: int,
    k: int = 10,
    vector: Optional[torch.Tensor] = None,
    fold_norm: bool = True,
) -> list[tuple[str, float]]:
    """LM-head decoding of FFN neuron ``index`` of block ``layer`` (or of ``vector``
    given in its place, e.g. the patched value vector)."""
    w = value_vector(model, layer, index) if vector is None else vector
    head = model.get_output_embeddings().weight
    return decode_vector(w, head, tokenizer, k, final_norm_gain(model) if fold_norm else None)
