"""EigenScore (INSIDE, arXiv 2402.03744) and factual-accuracy metrics."""

import math

import numpy as np
import pytest
import torch

from neurodetox.metrics import (
    answer_covariance,
    eigenscore,
    factual_accuracy,
    is_correct,
    normalize_answer,
)


def numpy_eigenscore(z: np.ndarray, alpha: float = 1e-3) -> float:
    """Independent evaluation: np.cov (rows = answers) and numpy eigenvalues."""
    cov = np.cov(z.astype(np.float64))  # [K, K], centred over features, / (d - 1)
    lam = np.linalg.eigvals(cov).real
    return float(np.mean(np.log(lam + alpha)))


def slogdet_eigenscore(z: np.ndarray, alpha: float = 1e-3) -> float:
    cov = np.cov(z.astype(np.float64))
    sign, logdet = np.linalg.slogdet(cov + alpha * np.eye(cov.shape[0]))
    assert sign > 0
    return float(logdet / cov.shape[0])


@pytest.mark.parametrize("k,d", [(2, 5), (5, 64), (10, 300), (12, 8)])
@pytest.mark.parametrize("alpha", [1e-3, 0.5])
def test_matches_independent_numpy(k, d, alpha):
    rng = np.random.default_rng(k * 1000 + d)
    z = rng.normal(size=(k, d)) * rng.uniform(0.1, 3.0, size=(k, 1)) + rng.normal(size=(k, 1))
    got = eigenscore(torch.tensor(z, dtype=torch.float32), alpha=alpha)
    assert got.ndim == 0 and got.dtype == torch.float64
    z32 = torch.tensor(z, dtype=torch.float32).double().numpy()
    assert float(got) == pytest.approx(numpy_eigenscore(z32, alpha), rel=1e-9, abs=1e-9)
    assert float(got) == pytest.approx(slogdet_eigenscore(z32, alpha), rel=1e-9, abs=1e-9)


def test_covariance_is_torch_cov():
    z = torch.randn(7, 40, dtype=torch.float64)
    torch.testing.assert_close(answer_covariance(z), torch.cov(z))
    zb = torch.randn(3, 7, 40, dtype=torch.float64)
    for p in range(3):
        torch.testing.assert_close(answer_covariance(zb)[p], torch.cov(zb[p]))


def test_numpy_input_accepted():
    z = np.random.default_rng(0).normal(size=(4, 16))
    assert float(eigenscore(z)) == pytest.approx(numpy_eigenscore(z), rel=1e-10)


def test_zero_covariance_gives_ln_alpha():
    # Each embedding constant over its features -> centred rows are 0 -> Sigma = 0.
    z = torch.arange(6, dtype=torch.float32)[:, None].expand(6, 20).clone()
    for alpha in (1e-3, 0.25, 2.0):
        assert float(eigenscore(z, alpha=alpha)) == pytest.approx(math.log(alpha), abs=1e-12)


def test_identical_answers_closed_form():
    # K copies of one embedding: Sigma = var(z) * 1 1^T, eigenvalues K*var, 0, ..., 0.
    k, d, alpha = 8, 30, 1e-3
    z1 = torch.randn(d, dtype=torch.float64)
    var = float(z1.var(unbiased=True))
    expected = (math.log(k * var + alpha) + (k - 1) * math.log(alpha)) / k
    assert float(eigenscore(z1.expand(k, d).clone(), alpha)) == pytest.approx(expected, rel=1e-10)


def test_orthonormal_answers_closed_form():
    # Centred, mutually orthogonal rows of squared norm s -> Sigma = s/(d-1) I.
    k, d, s = 4, 16, 5.0
    h = torch.tensor([[1.0]])
    for _ in range(4):  # 16x16 Hadamard; rows 1..4 are centred and orthogonal
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    z = h[1 : k + 1].double() * math.sqrt(s / d)
    expected = math.log(s / (d - 1) + 1e-3)
    assert float(eigenscore(z)) == pytest.approx(expected, rel=1e-12)


def test_shift_invariance_and_diversity_order():
    torch.manual_seed(0)
    base = torch.randn(1, 50, dtype=torch.float64)
    close = base + 0.01 * torch.randn(6, 50, dtype=torch.float64)
    far = base + 1.0 * torch.randn(6, 50, dtype=torch.float64)
    assert float(eigenscore(far)) > float(eigenscore(close))
    # Adding a per-answer constant does not change the centred covariance.
    shifted = close + torch.randn(6, 1, dtype=torch.float64) * 10
    assert float(eigenscore(shifted)) == pytest.approx(float(eigenscore(close)), rel=1e-9)


def test_batched_equals_per_prompt():
    torch.manual_seed(1)
    z = torch.randn(5, 10, 24) * torch.rand(5, 1, 1) * 3
    batched = eigenscore(z)
    assert batched.shape == (5,)
    for p in range(5):
        assert float(batched[p]) == pytest.approx(float(eigenscore(z[p])), rel=1e-12)
        assert float(batched[p]) == pytest.approx(numpy_eigenscore(z[p].double().numpy()), rel=1e-9)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 8), "K=1"),
        ((3, 1, 8), "K=1"),
        ((8,), "shape"),
        ((2, 3, 4, 5), "shape"),
        ((4, 1), "d=1"),
        ((0, 3, 4), "no prompts"),
    ],
)
def test_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        eigenscore(torch.randn(*shape))


@pytest.mark.parametrize("alpha", [0.0, -1e-3, float("nan"), float("inf"), "0.1", True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        eigenscore(torch.randn(3, 8), alpha=alpha)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(bad):
    z = torch.randn(3, 8)
    z[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        eigenscore(z)
    zb = torch.randn(4, 3, 8)
    zb[2, 0, 5] = bad
    with pytest.raises(ValueError, match=r"prompt index\(es\) \[2\]"):
        eigenscore(zb)


def test_large_d_small_k_no_dxd():
    # d = 20000 would need a 3.2 GB float64 d x d matrix; the K x K route is instant.
    z = torch.randn(10, 20000)
    val = float(eigenscore(z))
    assert val == pytest.approx(numpy_eigenscore(z.double().numpy()), rel=1e-9)


# ----------------------------------------------------------------------------- factual


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  Zürich,   Switzerland ", "zurich switzerland"),
        ("an apple a day", "apple day"),
        ("U.S.A.", "usa"),
        ("Théâtre «Là-bas»", "theatre labas"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "answer,aliases,expected",
    [
        (" Paris. It is known", ["Paris"], True),
        ("Parisian", ["Paris"], False),
        ("It is Paris", "Paris", True),
        ("\n\nParis\nBerlin", ["Berlin"], False),
        ("\n\nParis\nBerlin", ["Paris"], True),
        ("Berlin\nParis", ["Paris"], False),
        ("the city of new york", ["New York City", "New York"], True),
        ("São Paulo", ["Sao Paulo"], True),
        ("Paris", ["", "the", "!"], False),
        ("", ["Paris"], False),
        ("Mount Everest", ["everest"], True),
        ("Everestine", ["everest"], False),
    ],
)
def test_is_correct(answer, aliases, expected):
    assert is_correct(answer, aliases) is expected


def test_factual_accuracy():
    answers = ["Paris", "Rome is the capital", "no idea", "Berlin."]
    aliases = [["Paris"], ["Rome"], ["Madrid"], ["Bonn", "Berlin"]]
    assert factual_accuracy(answers, aliases) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="empty"):
        factual_accuracy([], [])
    with pytest.raises(ValueError, match="same length"):
        factual_accuracy(["Paris"], [["Paris"], ["Rome"]])


# ----------------------------------------------------------------------------- all exact routes vs numpy


@pytest.mark.parametrize("k,d", [(10, 576), (40, 16), (5, 5)])
def test_every_exact_route_matches_independent_numpy(k, d):
    from neurodetox.metrics import efficient_eigenscore, exact_log_det_mean

    z = np.random.default_rng(k + d).normal(size=(3, k, d)) * np.linspace(0.1, 5, d)
    per_prompt = [numpy_eigenscore(z[p]) for p in range(3)]
    for method in ("exact", "exact-direct", "exact-gram", "auto"):
        res = efficient_eigenscore(z, method=method)
        np.testing.assert_allclose(res.value, per_prompt, rtol=1e-8, atol=1e-9)
        assert exact_log_det_mean(z[0], route=method if method != "auto" else "exact") == pytest.approx(
            per_prompt[0], rel=1e-8, abs=1e-9
        )
