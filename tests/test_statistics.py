"""RunningMoments (Chan/Welford) against a brute-force mean and variance."""

import numpy as np
import pytest
import torch

from neurodetox.core.moments import RunningMoments


def test_batches_match_brute_force():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(loc=3.0, scale=s, size=(n, 7)) for n, s in [(1, 1.0), (13, 2.0), (50, 0.1), (4, 9.0)]]
    rm = RunningMoments(7)
    for c in chunks:
        rm.update(torch.tensor(c, dtype=torch.float32))
    allx = np.concatenate([c.astype(np.float32).astype(np.float64) for c in chunks])
    assert rm.count == len(allx)
    np.testing.assert_allclose(rm.mean.numpy(), allx.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm.variance.numpy(), allx.var(0), rtol=1e-10)
    np.testing.assert_allclose(rm.sample_variance.numpy(), allx.var(0, ddof=1), rtol=1e-10)


def test_merge_equals_single_pass_and_large_offset_is_stable():
    rng = np.random.default_rng(1)
    x = 1e6 + rng.normal(size=(300, 5))  # catastrophic cancellation for the naive E[x²]−E[x]² formula
    a, b, whole = RunningMoments(5), RunningMoments(5), RunningMoments(5)
    a.update(torch.tensor(x[:120], dtype=torch.float64))
    b.update(torch.tensor(x[120:], dtype=torch.float64))
    whole.update(torch.tensor(x, dtype=torch.float64))
    a.merge(b)
    np.testing.assert_allclose(a.variance.numpy(), x.var(0), rtol=1e-8)
    np.testing.assert_allclose(a.mean.numpy(), whole.mean.numpy(), rtol=1e-14)


def test_state_roundtrip_and_shape_errors():
    rm = RunningMoments(3)
    rm.update(torch.randn(10, 3))
    other = RunningMoments(3)
    other.load_state_dict(rm.state_dict())
    assert other.count == 10 and torch.equal(other.mean, rm.mean) and torch.equal(other.m2, rm.m2)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        rm.update(torch.randn(4, 2))
    with pytest.raises(ValueError, match="width"):
        RunningMoments(4).load_state_dict(rm.state_dict())
