"""Tests for ``neurodetox.patching.protect``: the reference protection against the dense minimiser."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from patching_helpers import last_layer_reference, one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def _protection_setup(strength: float, competitors: int = 2):
    from neurodetox.patching.direction import semantic_space
    from neurodetox.patching.protect import ReferenceProtection

    tok, model, site, stats, head, gain = last_layer_reference(torch.float64)
    space = semantic_space(model, fold_norm=True)
    prot = ReferenceProtection(stats, space, head, gain, strength, competitors)
    return model, site, stats, head, gain, space, prot


def test_protection_equals_the_dense_minimiser():
    """``project`` (Woodbury, active rows only) equals the closed-form minimiser
    ``(G + Cᵀ diag(λw) C)⁻¹ G Δ`` built densely from the LM head, row by row."""
    from neurodetox.patching.locate import Candidate

    model, site, stats, head, gain, space, prot = _protection_setup(50.0, competitors=2)
    j = int(stats.last_acts[:, 0].abs().mean(dim=0).argmax())
    cand = Candidate(layer=site.layer, index=j, score=0.0, activation=0.7)
    delta = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W = head.detach().double() * gain.double()[None, :]
    G = W.T @ W
    rows, weights = [], []
    scale_p = float(stats.norm_scale.median())
    for r in range(stats.last_logits.shape[0]):
        order = stats.last_logits[r].double().argsort(descending=True)
        coef = float(stats.last_acts[r, 0, j]) * float(stats.norm_scale[r])
        for c in order[1:3].tolist():
            gap = max(float(stats.last_logits[r, order[0]] - stats.last_logits[r, c]), 1e-3)
            rows.append(W[order[0]] - W[c])
            weights.append(50.0 * (coef / (0.7 * scale_p * gap)) ** 2)
    C = torch.stack(rows)
    dense = torch.linalg.solve(G + C.T @ torch.diag(torch.tensor(weights, dtype=torch.float64)) @ C, G @ delta)
    got = prot.project(cand, delta)
    assert torch.allclose(got, dense, rtol=1e-6, atol=1e-9 * float(dense.abs().max()))
    assert not torch.allclose(got, delta)  # it did change something


def test_strong_protection_keeps_reference_gaps_and_a_silent_neuron_is_untouched():
    """With a very large ``λ`` the protected change no longer moves any protected
    gap of a prompt where the neuron fires; a neuron silent on every reference
    prompt keeps its change exactly."""
    from neurodetox.patching.locate import Candidate

    model, site, stats, head, gain, space, prot = _protection_setup(1e12, competitors=2)
    j = int(stats.last_acts[:, 0].abs().mean(dim=0).argmax())
    cand = Candidate(layer=site.layer, index=j, score=0.0, activation=1.0)
    delta = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = (prot.C @ delta).abs()
    after = (prot.C @ prot.project(cand, delta)).abs()
    assert float(before.max()) > 0.1
    assert float(after.max()) < 1e-5 * float(before.max())
    stats.last_acts[:, 0, j] = 0.0  # silent everywhere
    assert torch.equal(prot.project(cand, delta), delta)
