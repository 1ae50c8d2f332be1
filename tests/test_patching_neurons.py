"""Tests for ``neurodetox.patching.neurons``: entropy-neuron scores against an independent SVD."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from patching_helpers import make_model, one_thread

from neurodetox.core.sites import resolve_sites, value_vector_parameter


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def test_entropy_neuron_scores_equal_an_svd_of_the_head():
    """ρ_j = ‖U_kᵀ w_j‖ / ‖w_j‖ with U_k the bottom right singular vectors of W_U
    (an independent SVD in float64)."""
    from neurodetox.core.sites import base_model
    from neurodetox.patching.neurons import entropy_neuron_scores

    model = make_model()
    W_U = base_model(model).get_output_embeddings().weight.detach().double()
    _, _, Vh = torch.linalg.svd(W_U, full_matrices=False)
    k = max(1, round(0.25 * W_U.shape[1]))
    U = Vh[-k:].T  # [d, k], smallest singular values
    weight, axis = value_vector_parameter(resolve_sites(model, "mlp", "last")[0])
    W = weight.detach().double()
    W = W if axis == 1 else W.T
    expect = (U.T @ W).norm(dim=0) / W.norm(dim=0)
    got = entropy_neuron_scores(model, -1, bottom_fraction=0.25)
    assert torch.allclose(got.double(), expect, atol=1e-5)
    assert torch.equal(entropy_neuron_scores(model, -1, bottom_fraction=0.25), got)  # cached eigenvectors
