"""SeND sensitivity V_i and selection against hand-computed values."""

import numpy as np
import pytest
import torch

from neurodetox.core.errors import UserError
from neurodetox.core.pooling import sentence_embedding
from neurodetox.send.sensitivity import (
    check_candidates,
    massive_indices,
    mean_abs_activation,
    num_to_drop,
    random_fraction,
    released_sensitivity,
    sensitivity_scores,
    top_fraction,
)


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


# --- scale-free scores, the released code's sensitivity, massive-dimension exclusion -------------------------


def _v_numpy(h):
    return (np.abs(np.diff(h, axis=0)).sum(0) * h.var(0)).mean(0)


def test_normalized_and_standardized_scores_match_brute_force():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(3, 7, 6)) + rng.normal(size=6) * 3
    rms = np.sqrt((h**2).mean((0, 1)))
    np.testing.assert_allclose(sensitivity_scores(torch.tensor(h), "normalized").numpy(), _v_numpy(h / rms), rtol=1e-10)
    flat = h.reshape(-1, 6)
    z = (h - flat.mean(0)) / flat.std(0)
    np.testing.assert_allclose(sensitivity_scores(torch.tensor(h), "standardized").numpy(), _v_numpy(z), rtol=1e-10)


def test_raw_score_ranks_by_magnitude_and_scale_free_scores_do_not():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3, 5, 4))
    scale = np.array([1000.0, -0.01, 3.0, 1.0])  # a per-index rescaling, one index massive
    h = base * scale
    raw = sensitivity_scores(torch.tensor(h)).numpy()
    np.testing.assert_allclose(raw, _v_numpy(base) * np.abs(scale) ** 3, rtol=1e-10)
    assert top_fraction(torch.tensor(raw), 0.25).tolist() == [0]  # the massive index wins on magnitude alone
    for score in ("normalized", "standardized"):
        np.testing.assert_allclose(
            sensitivity_scores(torch.tensor(h), score).numpy(),
            sensitivity_scores(torch.tensor(base), score).numpy(),
            rtol=1e-9,
        )


def test_scale_free_scores_give_zero_for_constant_or_dead_indices():
    h = torch.zeros(3, 4, 2, dtype=torch.float64)
    h[:, :, 1] = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 0.0], [0.0, 1.0, 1.0, 5.0]])
    for score in ("normalized", "standardized"):
        v = sensitivity_scores(h, score)
        assert v[0] == 0 and v[1] > 0
    with pytest.raises(ValueError, match="raw, normalized, standardized"):
        sensitivity_scores(h, "zscore")


def test_released_sensitivity_matches_the_released_codes_arithmetic():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(3, 8, 5))
    avg = h.mean(0)  # checkpoint average first, then change and variance across tracking items
    ref = np.abs(np.diff(avg, axis=0)).sum(0) * avg.var(0)
    np.testing.assert_allclose(released_sensitivity(torch.tensor(h)).numpy(), ref, rtol=1e-12)
    # hand-computed: 2 checkpoints, 3 items, 1 index
    h2 = torch.tensor([[[0.0], [2.0], [4.0]], [[2.0], [2.0], [0.0]]])  # averages 1, 2, 2
    assert released_sensitivity(h2).item() == pytest.approx((1 + 0) * (2 / 9))
    with pytest.raises(ValueError, match="at least 2 tracking items"):
        released_sensitivity(torch.zeros(3, 1, 4))


def test_massive_indices_rule_by_hand():
    m = torch.tensor([1.0, 1.2, 0.8, 50.0, 2.0, 11.0])  # sorted 0.8 1.0 1.2 2.0 11 50: lower median 1.2
    assert massive_indices(m, 9.0).tolist() == [3, 5]  # threshold 10.8
    assert massive_indices(m, 10.0).tolist() == [3]  # threshold 12
    assert massive_indices(m, 0.0).tolist() == []
    e = torch.tensor([[1.0, -4.0], [-3.0, 2.0]])
    assert mean_abs_activation(e).tolist() == [2.0, 3.0]


def test_exclusion_matches_brute_force_and_fails_when_too_few_are_left():
    rng = np.random.default_rng(4)
    scores = torch.tensor(rng.normal(size=20))
    exclude = [int(i) for i in torch.argsort(scores, descending=True)[:3]]  # the three best are excluded
    got = top_fraction(scores, 0.2, exclude).tolist()
    allowed = [i for i in range(20) if i not in exclude]
    ref = sorted(sorted(allowed, key=lambda i: -float(scores[i]))[:4])
    assert got == ref
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        r = random_fraction(20, 0.2, g, exclude).tolist()
        assert len(r) == 4 and not set(r) & set(exclude)
    # without exclusion the draws are unchanged (torch.randperm), so old studies reproduce
    a = random_fraction(50, 0.2, torch.Generator().manual_seed(9))
    b = torch.randperm(50, generator=torch.Generator().manual_seed(9))[:10].sort().values
    assert torch.equal(a, b)
    with pytest.raises(UserError, match="leaves 3 of 20 indices, fewer than the 4"):
        top_fraction(scores, 0.2, list(range(17)))
    with pytest.raises(UserError, match="send_massive_factor"):
        random_fraction(20, 0.2, g, list(range(17)))
    assert check_candidates(20, 0.2, 16) == 4
