"""Locators: which FFN neurons to patch for one failure (MINT step 2).

Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model Repair
for Code Generation" (arXiv 2312.05356) and ``shared/docs/methods.md`` §4.
Neuron ``j`` of layer ``l`` is the ``j``-th input feature ``a_j`` of the FFN
output projection (site ``mlp``); its value vector ``w_j`` is column ``j`` of
that projection's weight. Locators score the neurons of the given sites
(default: the last half of the layers) on the teacher-forced sequence cut at
the failure position ``p`` (the position whose logits should predict ``t``):

``grad_x_act`` (default)
    ``s_j = ‖ a_j(·) · ∂P(t)/∂a_j(·) ‖₂`` over positions ``0..p``: gradient ×
    activation for the probability of ``t`` (one forward, one backward).
``contrastive``
    the direct score ``a_j(p) · (u_t − u_a) · w_j`` (``u`` rows of the LM head,
    gain-folded when ``fold_norm``): the neuron's direct contribution to
    ``logit_t − logit_a``. One forward, no backward. Ranked by magnitude.
``activation``
    ``‖ a_j(·) ‖₂`` over positions ``0..p`` (activation only).

The candidate pool is the global top ``k`` (default 10) over all sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional, Sequence

import torch
from torch import nn

from ..sites import NeuronSite, register_site_hook, value_vector_parameter
from .direction import SemanticSpace

__all__ = ["LOCATORS", "Candidate", "neuron_scores", "locate"]

LOCATORS = ("grad_x_act", "contrastive", "activation")


@dataclass(frozen=True)
class Candidate:
    """A neuron proposed for patching.

    Attributes:
        layer: decoder block index.
        index: neuron index in ``[0, d_ff)``.
        score: the locator's score (higher ranks first).
        activation: ``a_j`` at the failure position (its sign orients the patch).
    """

    layer: int
    index: int
    score: float
    activation: float


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def neuron_scores(
    model: nn.Module,
    sites: Sequence[NeuronSite],
    input_ids: Sequence[int],
    target_id: int,
    argmax_id: int,
    method: str = "grad_x_act",
    space: Optional[SemanticSpace] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every neuron of ``sites`` for one failure.

    Args:
        input_ids: the teacher-forced ids up to and including the failure
            position ``p`` (length ``p + 1``); the logits at the last position
            should predict ``target_id``.
        target_id, argmax_id: ``t`` and the wrong argmax ``a``.
        method: one of :data:`LOCATORS`.
        space: the :class:`~neurodetox.patching.direction.SemanticSpace`
            (needed by ``contrastive``).

    Returns:
        ``(scores, activations)``, both float32 ``[len(sites), d_ff]`` on CPU:
        the scores and the activations at the failure position.

    Raises:
        ValueError: unknown ``method``; ``contrastive`` without ``space``.
    """
    if method not in LOCATORS:
        raise ValueError(f"unknown locator {method!r}; valid locators are {', '.join(LOCATORS)}")
    if method == "contrastive" and space is None:
        raise ValueError("the contrastive locator needs the semantic space (space=semantic_space(model))")
    device = _device(model)
    ids = torch.tensor([list(input_ids)], device=device)
    acts: list[Optional[torch.Tensor]] = [None] * len(sites)

    def make_hook(i):
        def hook(x):
            acts[i] = x
            return None

        return hook

    handles = [register_site_hook(s, make_hook(i), observer=True) for i, s in enumerate(sites)]
    was = model.training
    model.eval()
    try:
        if method == "grad_x_act":
            with torch.enable_grad():
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits[0, -1].float()
                p_t = torch.softmax(logits, dim=-1)[int(target_id)]
                grads = torch.autograd.grad(p_t, acts, allow_unused=True)
            scores = torch.stack([
                (a[0].detach().float() * (g[0].float() if g is not None else 0.0)).norm(dim=0)
                for a, g in zip(acts, grads)
            ])
        else:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            if method == "activation":
                scores = torch.stack([a[0].float().norm(dim=0) for a in acts])
            else:
                du = (space.row(target_id) - space.row(argmax_id)).float().to(device)  # [d]
                rows = []
                for site, a in zip(sites, acts):
                    weight, axis = value_vector_parameter(site)
                    w = weight.detach().float()
                    proj = du @ w if axis == 1 else w @ du  # [d_ff]: (u_t - u_a) . w_j
                    rows.append((a[0, -1].float() * proj).abs())
                scores = torch.stack(rows)
        last = torch.stack([a[0, -1].detach().float() for a in acts])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return scores.detach().cpu(), last.cpu()


def locate(
    model: nn.Module,
    sites: Sequence[NeuronSite],
    input_ids: Sequence[int],
    target_id: int,
    argmax_id: int,
    method: str = "grad_x_act",
    top_k: int = 10,
    space: Optional[SemanticSpace] = None,
    exclude: Collection[tuple[int, int]] = (),
) -> list[Candidate]:
    """The global top-``top_k`` neurons for one failure, best first.

    Neurons in ``exclude`` (``(layer, index)`` pairs, e.g. entropy neurons)
    and neurons with zero activation at the failure position (a patch of
    them cannot change this prediction) are skipped.

    Returns:
        Up to ``top_k`` :class:`Candidate` objects, sorted by score descending
        (ties broken by layer, then index).

    Raises:
        ValueError: ``top_k < 1``, no sites, or see :func:`neuron_scores`.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not sites:
        raise ValueError("no neuron sites to search: check the layers setting")
    scores, last = neuron_scores(model, sites, input_ids, target_id, argmax_id, method, space)
    scores = scores.clone()
    scores[last == 0] = float("-inf")
    layer_pos = {s.layer: i for i, s in enumerate(sites)}
    for layer, idx in exclude:
        if layer in layer_pos and 0 <= idx < scores.shape[1]:
            scores[layer_pos[layer], idx] = float("-inf")
    flat = scores.flatten()
    k = min(top_k, int(torch.isfinite(flat).sum()))
    if k == 0:
        return []
    order = torch.sort(flat, descending=True, stable=True).indices[:k].tolist()
    width = scores.shape[1]
    return [
        Candidate(layer=sites[i // width].layer, index=i % width, score=float(flat[i]),
                  activation=float(last[i // width, i % width]))
        for i in order
    ]
