"""The semantic-delta direction of MINT (step 1 of ``docs/methods.md`` §4).

Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model Repair
for Code Generation" (arXiv 2312.05356): for a failure where the model predicts
token ``a`` instead of ``t``, the direction to write into the residual stream is
the smallest change ``δ`` of the final hidden state ``h`` that raises logit
``t`` over logit ``a``. With the LM head ``W_U`` (``[V, d]``, rows ``u_v``) and
``G = W_Uᵀ W_U`` (``[d, d]``), that is::

    δ = G⁻¹ (u_t − u_a)        (then  Δ(logit_t − logit_a) = δᵀ G δ > 0 along δ)

computed with one Cholesky factorisation of ``G`` per model (cached; a tiny
diagonal jitter is added when ``G`` is not numerically positive definite).
The patch direction is ``τ = δ / (max δ − min δ)`` (range-normalised).

Options:

* ``fold_norm`` (ASTRA, the successor method): fold the final norm's gain
  ``g`` into the head, ``W_U' = W_U diag(g)``, so that ``δ`` lives in the
  residual stream that FFN value vectors write to (up to the norm's scale),
  not after the norm.
* orthogonalisation: project ``τ`` off directions already used in the same
  layer by earlier repairs, so that later repairs do not undo earlier ones.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import nn

from neurodetox.core.errors import UserError
from neurodetox.core.sites import base_model

__all__ = ["SemanticSpace", "semantic_space", "final_norm", "final_norm_gain", "range_normalise"]


def final_norm(model: nn.Module) -> Optional[nn.Module]:
    """The final norm applied before the LM head, or ``None`` if not found."""
    base = base_model(model)
    roots = []
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        try:
            roots.append(get_decoder())
        except (AttributeError, NotImplementedError, TypeError):
            pass
    for attr in ("model", "transformer", "gpt_neox"):
        if hasattr(base, attr):
            roots.append(getattr(base, attr))
    decoder = getattr(getattr(base, "model", None), "decoder", None)
    if decoder is not None:
        roots.append(decoder)
    for root in roots:
        for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
            m = getattr(root, name, None)
            if isinstance(m, nn.Module):
                return m
    return None


def final_norm_gain(model: nn.Module) -> Optional[torch.Tensor]:
    """The final norm's per-feature gain ``g`` (``[d]``, float32), or ``None``.

    Gemma-style norms that scale by ``1 + weight`` are recognised by class name.
    """
    norm = final_norm(model)
    w = getattr(norm, "weight", None) if norm is not None else None
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    g = w.detach().float()
    if "gemma" in type(norm).__name__.lower():
        g = 1.0 + g
    return g


def range_normalise(v: torch.Tensor) -> torch.Tensor:
    """``v / (max v − min v)``; a constant vector is returned unchanged."""
    span = v.max() - v.min()
    return v / span if float(span) > 0 else v


class SemanticSpace:
    """``W_U``, ``G = W_Uᵀ W_U`` and its Cholesky factor, for one model.

    Args:
        unembedding: the LM head ``W_U`` ``[V, d]`` (tied models: the input
            embedding). Not copied.
        gain: optional ``[d]`` final-norm gain folded into the head
            (``W_U' = W_U diag(gain)``).
        jitter: relative diagonal jitter tried first when the Cholesky
            factorisation fails (default ``1e-10`` × mean diagonal, multiplied
            by 100 per retry, at most 6 retries).

    Attributes:
        G: float64 ``[d, d]``; ``chol``: its lower Cholesky factor;
        jitter_used: the absolute jitter added to ``G``'s diagonal (0 if none).
    """

    def __init__(self, unembedding: torch.Tensor, gain: Optional[torch.Tensor] = None, jitter: float = 1e-10):
        W = unembedding.detach()
        self.W = W
        self.gain = None if gain is None else gain.detach().to(torch.float64).cpu()
        Wc = W if W.dtype == torch.float64 else W.float()  # float32 products for speed, float64 kept as is
        G = (Wc.T @ Wc).to(torch.float64).cpu()  # [d, d]
        if self.gain is not None:
            G = self.gain[:, None] * G * self.gain[None, :]
        self.G = G
        self.jitter_used = 0.0
        scale = float(G.diagonal().mean())
        eye = torch.eye(G.shape[0], dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(G)
        rel = jitter
        tries = 0
        while int(info) != 0:
            if tries >= 6:
                raise RuntimeError(
                    "G = W_U^T W_U is not positive definite even with jitter; is the LM head degenerate?"
                )
            self.jitter_used = rel * scale
            chol, info = torch.linalg.cholesky_ex(G + self.jitter_used * eye)
            rel *= 100.0
            tries += 1
        self.chol = chol

    @property
    def hidden_size(self) -> int:
        return int(self.G.shape[0])

    def row(self, token: int) -> torch.Tensor:
        """``u_token`` (gain-folded if configured), float64 ``[d]``."""
        u = self.W[int(token)].detach().to(torch.float64).cpu()
        return u * self.gain if self.gain is not None else u

    def bottom_eigenvectors(self, k: int) -> torch.Tensor:
        """The ``k`` eigenvectors of ``G`` with the smallest eigenvalues, float64 ``[d, k]`` (one ``eigh``, cached)."""
        vecs = getattr(self, "_eigvecs", None)
        if vecs is None:
            _, vecs = torch.linalg.eigh(self.G)  # ascending eigenvalues
            self._eigvecs = vecs
        return vecs[:, :k]

    def delta(self, target: int, argmax: int) -> torch.Tensor:
        """``δ = G⁻¹ (u_t − u_a)``, float64 ``[d]`` (solved with the cached Cholesky factor)."""
        rhs = (self.row(target) - self.row(argmax))[:, None]
        return torch.cholesky_solve(rhs, self.chol)[:, 0]

    def tau(self, target: int, argmax: int, used: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The patch direction ``τ`` (float32 ``[d]``).

        ``τ = δ / (max δ − min δ)``; when ``used`` holds earlier directions of
        the same layer, ``δ`` is first projected off their span.
        """
        d = self.delta(target, argmax)
        if used:
            basis = torch.stack([u.to(torch.float64).cpu() for u in used], dim=1)  # [d, m]
            q, _ = torch.linalg.qr(basis)
            d = d - q @ (q.T @ d)
        return range_normalise(d).float()


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def semantic_space(model: nn.Module, fold_norm: bool = False) -> SemanticSpace:
    """The cached :class:`SemanticSpace` of ``model`` (Cholesky once per model).

    The cache is keyed by the model object and invalidated when the LM head or
    the final norm's weight changes (storage or in-place version counter).

    Raises:
        UserError: the model has no output embeddings.
    """
    head = base_model(model).get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise UserError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
    W = head.weight
    gain = final_norm_gain(model) if fold_norm else None
    norm = final_norm(model)
    nw = getattr(norm, "weight", None) if fold_norm and norm is not None else None
    key = (
        bool(fold_norm),
        W.data_ptr(),
        W._version,
        tuple(W.shape),
        None if nw is None else (nw.data_ptr(), nw._version),
    )
    per_model = _CACHE.setdefault(model, {})
    space = per_model.get(key)
    if space is None:
        if len(per_model) >= 4:  # old head versions
            per_model.clear()
        space = SemanticSpace(W, gain)
        per_model[key] = space
    return space
