"""Tests for ``neurodetox.patching.direction``: MINT's semantic direction (Gu et al., arXiv 2312.05356).

Checked against ``G δ = u_t − u_a`` solved independently, and against the logits that δ moves.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import make_tokenizer
from patching_helpers import make_model, one_thread

from neurodetox.patching import semantic_space
from neurodetox.patching.direction import SemanticSpace, final_norm_gain


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.mark.parametrize("fold", [False, True])
def test_direction_solves_G_delta(fold):
    model = make_model().double()
    space = SemanticSpace(model.get_output_embeddings().weight, final_norm_gain(model) if fold else None)
    W = model.get_output_embeddings().weight.detach().double()
    g = final_norm_gain(model).double() if fold else torch.ones(W.shape[1], dtype=torch.float64)
    Wf = W * g  # W_U diag(g)
    t, a = 7, 11
    delta = space.delta(t, a)
    torch.testing.assert_close(Wf.T @ Wf @ delta, Wf[t] - Wf[a], rtol=1e-6, atol=1e-8)
    tau = space.tau(t, a)
    assert float(tau.max() - tau.min()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(tau.double() / (tau.double().norm()), delta / delta.norm(), atol=1e-5)


def test_moving_final_hidden_along_delta_raises_target_logit():
    model = make_model()
    tok = make_tokenizer()
    ids = torch.tensor([tok("the capital of france is")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1][0, -1].double()  # after the final norm, what the head reads
    W = model.get_output_embeddings().weight.detach().double()
    logits = W @ h
    a = int(logits.argmax())
    t = int(torch.argsort(logits)[0])  # the least likely token
    delta = semantic_space(model).delta(t, a)
    for eps in (0.01, 0.1, 1.0):
        new = W @ (h + eps * delta)
        gain = float((new[t] - new[a]) - (logits[t] - logits[a]))
        # Δ(logit_t − logit_a) = ε δᵀ G δ = ε (u_t − u_a)·δ > 0
        assert gain == pytest.approx(eps * float((W[t] - W[a]) @ delta), rel=1e-6)
        assert gain > 0
    # δ is the smallest such change: any other d with the same gain is longer (min-norm in the G metric)
    G = W.T @ W
    other = delta + 0.1 * torch.randn_like(delta)
    other = other * (float((W[t] - W[a]) @ delta) / float((W[t] - W[a]) @ other))
    assert float(other @ G @ other) > float(delta @ G @ delta)


def test_orthogonalised_direction_is_orthogonal_to_used():
    space = semantic_space(make_model())
    used = [space.tau(3, 4), space.tau(5, 6)]
    tau = space.tau(7, 8, used)
    for u in used:
        assert abs(float(tau @ u)) / (float(tau.norm()) * float(u.norm())) < 1e-5


def test_semantic_space_is_cached_per_model():
    model = make_model()
    assert semantic_space(model) is semantic_space(model)
    assert semantic_space(model, fold_norm=True) is not semantic_space(model)
