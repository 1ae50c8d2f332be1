"""Tests for ``neurodetox.patching.mint.reference``: the reference-statistics cache and the weights fingerprint."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import make_tokenizer
from patching_helpers import REFERENCE, make_model, one_thread

from neurodetox.core.sites import resolve_sites, value_vector_parameter


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def test_reference_statistics_cache_follows_the_weights(monkeypatch):
    """The selectivity statistics are computed once per weights: reused while the
    weights are untouched or written back to the same values, recomputed after a change."""
    from neurodetox.patching.mint import reference

    calls = []
    real = reference.reference_stats
    monkeypatch.setattr(reference, "reference_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = make_tokenizer()
    model = make_model()
    sites = resolve_sites(model, "mlp", "second_half")
    first = reference.cached_reference(model, tok, sites, REFERENCE)
    assert reference.cached_reference(model, tok, sites, REFERENCE) is first and len(calls) == 1
    weight, axis = value_vector_parameter(sites[0])
    col = weight.detach().select(axis, 3)
    orig = col.clone()
    with torch.no_grad():
        col.add_(0.5)
    changed = reference.cached_reference(model, tok, sites, REFERENCE)
    assert len(calls) == 2 and changed is not first
    with torch.no_grad():
        col.copy_(orig)  # written back: same values, so the fingerprint matches the first one again
    assert reference.fingerprint(model) == reference.fingerprint(model)
    reference.cached_reference(model, tok, sites, REFERENCE)
    assert len(calls) == 3  # the single-entry cache held the changed weights' statistics
    with torch.no_grad():
        col.add_(0.0)  # an in-place write that keeps every value: recomputed fingerprint, cache hit
    reference.cached_reference(model, tok, sites, REFERENCE)
    assert len(calls) == 3


def test_weights_fingerprint_recomputes_written_tensors_only(monkeypatch):
    """After an in-place write the fingerprint equals one computed from scratch,
    and only the written tensor is summed again."""
    from neurodetox.patching.mint import reference

    model = make_model()
    first = reference.fingerprint(model)
    weight, axis = value_vector_parameter(resolve_sites(model, "mlp", "last")[0])
    with torch.no_grad():
        weight.select(axis, 2).add_(0.25)
    summed = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: summed.append(self.shape) or real_sum(self, *a, **k))
    after = reference.fingerprint(model)
    monkeypatch.setattr(torch.Tensor, "sum", real_sum)
    assert summed == [weight.shape, weight.shape]  # its sum and abs-sum only
    reference.FINGERPRINTS.pop(model)
    assert after == reference.fingerprint(model) != first
