"""SeND sensitivity V_i and selection against hand-computed values."""

import numpy as np
import pytest
import torch

from neurodetox.core.pooling import sentence_embedding
from neurodetox.send.sensitivity import num_to_drop, random_fraction, sensitivity_scores, top_fraction


def test_hand_computed_toy_history():
    # C = 3 checkpoints, N = 2 tracking items, n = 3 neurons.
    h = torch.tensor(
        [
            [[0.0, 1.0, 5.0], [0.0, 2.0, 5.0]],
            [[1.0, 1.0, 5.0], [2.0, 2.0, 4.0]],
            [[0.0, 1.0, 5.0], [4.0, 2.0, 3.0]],
        ]
    )
    # neuron 0: item0 values 0,1,0 -> Δ=2, var=2/9 -> V=4/9; item1 0,2,4 -> Δ=4, var=8/3 -> V=32/3
    # neuron 1: constant -> 0; neuron 2: item0 constant -> 0; item1 5,4,3 -> Δ=2, var=2/3 -> V=4/3
    expected = [(4 / 9 + 32 / 3) / 2, 0.0, (0 + 4 / 3) / 2]
    v = sensitivity_scores(h)
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-12)
    assert top_fraction(v, 0.34).tolist() == [0]
    assert top_fraction(v, 0.67).tolist() == [0, 2]


def test_matches_numpy_on_random_history():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 9, 11))
    ref = (np.abs(np.diff(h, axis=0)).sum(0) * h.var(0)).mean(0)
    np.testing.assert_allclose(sensitivity_scores(torch.tensor(h)).numpy(), ref, rtol=1e-12)


def test_ties_break_to_lower_index_and_random_is_seeded():
    v = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0])
    assert top_fraction(v, 0.4).tolist() == [1, 2]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = random_fraction(100, 0.2, g1), random_fraction(100, 0.2, g2)
    assert torch.equal(a, b) and len(a) == 20 and len(set(a.tolist())) == 20


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        sensitivity_scores(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="non-empty tracking set"):
        sensitivity_scores(torch.zeros(3, 0, 4))
    with pytest.raises(ValueError, match="NaN"):
        sensitivity_scores(torch.tensor([[[float("nan")]], [[0.0]]]))
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            num_to_drop(10, bad)


def test_sentence_embedding_excludes_padding_left_and_right():
    a = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    e = sentence_embedding(a, right)
    np.testing.assert_allclose(e[0].numpy(), 0.5 * (a[0, :3].mean(0) + a[0, 2]).numpy())
    np.testing.assert_allclose(e[1].numpy(), 0.5 * (a[1, :2].mean(0) + a[1, 1]).numpy())
    e = sentence_embedding(a, left)
    np.testing.assert_allclose(e[1].numpy(), 0.5 * (a[1, 2:].mean(0) + a[1, 3]).numpy())
