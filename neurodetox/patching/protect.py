"""Reference protection: keep a value-vector change away from what other prompts predict.

A MINT patch (Gu et al., "Neuron Patching: Semantic-based Neuron-level Language
Model Repair for Code Generation", arXiv 2312.05356) changes the value vector
``w_j`` of neuron ``j`` by ``Δ``. Every prompt ``x`` where the neuron fires
then sees ``a_j(x) · Δ`` added to its residual stream, and through the direct
path (final norm, LM head) its logits move by ``coef(x) · W_U (g ⊙ Δ)``
(``coef`` = activation × the final norm's scale, see
:class:`~neurodetox.patching.locate.ReferenceStats`). A reference prompt
flips when that move closes the gap between its top token and a competitor.

This module replaces ``Δ`` by the nearest change (in the semantic metric
``G = W_Uᵀ W_U`` of :mod:`~neurodetox.patching.direction`) that leaves those
gaps where they are, in the spirit of null-space constrained editing (Fang et
al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models", arXiv 2410.02355), but soft and per neuron::

    x* = argmin_x  (x − Δ)ᵀ G (x − Δ)  +  λ Σ_{r,c} w_rc (c_rcᵀ x)²
       = Δ − G⁻¹ Cᵀ (D⁻¹ + C G⁻¹ Cᵀ)⁻¹ C Δ          (Woodbury)

with one row ``c_rc = g ⊙ (u_top(r) − u_c)`` per reference prompt ``r`` and
each of its ``k`` nearest competitors ``c``, and ``D = diag(λ w_rc)``,
``w_rc = (coef_j(r) / (coef_j(p) · m_rc))²``: the squared move of that gap,
relative to the gap ``m_rc`` itself (logits) and to the neuron's strength at
the failing prompt ``p`` (its activation there times the median final-norm
scale of the reference prompts, which stands in for the failing prompt's). Rows where the neuron is silent (``w`` below
``1e-12`` of the largest) are dropped, so a neuron that fires only for the
failing prompt keeps its change; one that fires for many references loses the
part of its change that would move their answers, and the plan (which
measures the real gain) then prefers another neuron. The change of the
failing prompt's own gap is whatever remains along directions no protected
gap uses.

``C G⁻¹ Cᵀ`` is computed once per call; each candidate costs one solve of the
size of its active rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from neurodetox.core.checks import check_int, check_number
from neurodetox.patching.direction import SemanticSpace
from neurodetox.patching.locate import Candidate, ReferenceStats

__all__ = ["ReferenceProtection"]


class ReferenceProtection:
    """Soft null-space projection of value-vector changes off the reference prompts' answer gaps.

    Args:
        ref: the reference statistics (last-token activations, logits and
            final-norm scales of ``N`` prompts).
        space: the semantic space (metric ``G`` and its Cholesky factor).
        unembedding: ``W_U`` ``[V, d]``.
        gain: the final norm's gain ``g`` (``[d]``) or ``None``.
        strength: ``λ`` (> 0). Larger protects more; ``λ → ∞`` is a hard
            constraint on every active row.
        competitors: ``k``, competitors protected per reference prompt
            (default 3: its 2nd to 4th tokens).

    Raises:
        UserError: ``strength`` ≤ 0 or ``competitors`` < 1.
    """

    def __init__(
        self,
        ref: ReferenceStats,
        space: SemanticSpace,
        unembedding: torch.Tensor,
        gain: Optional[torch.Tensor],
        strength: float,
        competitors: int = 3,
    ):
        check_number("protection strength", strength, minimum=0.0, min_inclusive=False)
        check_int("competitors", competitors, minimum=1)
        self.ref = ref
        self.strength = float(strength)
        k = min(int(competitors), ref.last_logits.shape[-1] - 1)
        top_v, top_i = ref.last_logits.topk(k + 1, dim=-1)  # [N, k+1]
        W = unembedding.detach()
        first = W[top_i[:, 0]].double().cpu()  # [N, d]
        rows = first[:, None, :] - W[top_i[:, 1:].reshape(-1)].double().cpu().view(top_i.shape[0], k, -1)
        if gain is not None:
            rows = rows * gain.double().cpu()
        self.C = rows.reshape(-1, rows.shape[-1])  # [N·k, d]
        self.margin = (top_v[:, :1] - top_v[:, 1:]).double().clamp_min(1e-3).reshape(-1)  # [N·k] logits
        self.prompt = torch.arange(top_i.shape[0]).repeat_interleave(k)  # row -> reference prompt
        self.GinvCt = torch.cholesky_solve(self.C.T.contiguous(), space.chol)  # [d, N·k]
        self.K = self.C @ self.GinvCt  # [N·k, N·k]
        self.scale_p = float(ref.norm_scale.median()) if ref.norm_scale.numel() else 1.0
        self._pos = {layer: i for i, layer in enumerate(ref.layers)}

    def weights(self, cand: Candidate) -> torch.Tensor:
        """``λ · w_rc`` per row (float64 ``[N·k]``), for ``cand``'s neuron."""
        a = self.ref.last_acts[:, self._pos[cand.layer], cand.index].double()  # [N]
        coef = a * self.ref.norm_scale.double()
        at_p = max(abs(float(cand.activation)) * self.scale_p, 1e-12)
        return self.strength * (coef[self.prompt] / (at_p * self.margin)) ** 2

    def project(self, cand: Candidate, delta: torch.Tensor) -> torch.Tensor:
        """The protected change for ``cand``'s value vector (same shape and dtype as ``delta``, ``[d]``)."""
        lam = self.weights(cand)
        keep = (lam > 1e-12 * float(lam.max())).nonzero()[:, 0] if float(lam.max()) > 0 else lam.new_zeros(0).long()
        if keep.numel() == 0:
            return delta
        d = delta.double().cpu()
        Ks = self.K[keep][:, keep] + torch.diag(1.0 / lam[keep])
        y = torch.linalg.solve(Ks, self.C[keep] @ d)
        out = d - self.GinvCt[:, keep] @ y
        return out.to(dtype=delta.dtype, device=delta.device)
