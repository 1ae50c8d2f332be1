"""EES (KPM EigenScore, SeND arXiv 2410.15460) against numpy's exact eigensolver."""

import math

import numpy as np
import pytest
import torch

import neurodetox.metrics.ees as ees
from neurodetox.metrics import EESResult, dataset_ees, efficient_eigenscore, eigenscore, log_det_mean


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exact_numpy(z: np.ndarray, alpha: float) -> float:
    """Independent reference: np.cov (rows = items) and numpy.linalg.eigvalsh of the n x n matrix."""
    cov = np.cov(np.asarray(z, dtype=np.float64))
    lam = np.linalg.eigvalsh(cov)
    return float(np.mean(np.log(np.clip(lam, 0, None) + alpha)))


def make(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "isotropic":
        return rng.normal(size=(n, d))
    if kind == "llm_like":  # shared mean with massive features + power-law feature spectrum: ill-conditioned
        mu = rng.normal(size=d) * 3
        mu[:2] = [300.0, -200.0]
        s = (np.arange(1, d + 1) + 4.0) ** -1.0 * 20
        h, _ = np.linalg.qr(rng.normal(size=(d, d)))
        return mu + (rng.normal(size=(n, d)) * s) @ h.T
    if kind == "duplicates":  # sampled answers: many exact repeats -> exact zero eigenvalues
        base = rng.normal(size=(max(2, n // 3), d)) * rng.uniform(0.5, 5, size=d)
        return base[rng.integers(0, base.shape[0], size=n)]
    if kind == "low_rank":
        return rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) * 10 + rng.normal(size=d)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind,n,d",
    [
        ("isotropic", 10, 64),
        ("llm_like", 10, 96),
        ("duplicates", 12, 48),
        ("isotropic", 120, 40),  # n > d: Gram route + all-ones null vector
        ("llm_like", 150, 300),
        ("llm_like", 400, 120),
        ("duplicates", 200, 64),
        ("low_rank", 80, 50),
    ],
)
@pytest.mark.parametrize("alpha", [1e-3, 0.3])
def test_kpm_matches_eigvalsh_and_error_covers(kind, n, d, alpha):
    z = make(kind, n, d, seed=n + d)
    ref = exact_numpy(z, alpha)
    res = efficient_eigenscore(torch.tensor(z), alpha, "kpm", seed=1)
    assert isinstance(res, EESResult) and res.method == "kpm"
    err = abs(res.value - ref)
    assert err <= 0.01
    assert err <= res.error + 1e-12, (err, res.error, res.details)
    assert 0 < res.error <= 5e-3 + 1e-12  # default tolerance honoured (no cap hit at these sizes)


@pytest.mark.parametrize("n,d", [(7, 30), (30, 7), (16, 16), (2, 2)])
def test_exact_routes_match_numpy(n, d):
    z = make("llm_like", n, d, seed=3) if d > 2 else np.random.default_rng(0).normal(size=(n, d))
    ref = exact_numpy(z, 1e-3)
    for method in ("exact", "exact-direct", "exact-gram", "auto"):
        res = efficient_eigenscore(z, 1e-3, method)
        assert res.error == 0.0 and res.method in ("exact-direct", "exact-gram")
        assert res.value == pytest.approx(ref, abs=1e-8, rel=1e-9), method
    assert efficient_eigenscore(z, 1e-3, "exact").method == ("exact-direct" if n <= d else "exact-gram")


def test_random_probe_coverage():
    """Where the Hutchinson probes are random (not deterministic), the 95% error bar covers the true
    error in at least 90% of 30 fixed seeds (expected 95%)."""
    z = make("llm_like", 900, 300, seed=7)
    ref = exact_numpy(z, 1e-3)
    covered, errs = 0, []
    for seed in range(30):
        res = efficient_eigenscore(z, 1e-3, "kpm", tol=0.03, seed=seed)
        assert not res.details["deterministic"] and res.details["probes"] < 300
        e = abs(res.value - ref)
        errs.append(e)
        covered += e <= res.error
    assert covered >= 27, (covered, max(errs))
    assert max(errs) <= 0.03 * 2


def test_closed_form_coefficients_match_chebinterpolate():
    cheb = np.polynomial.chebyshev
    for a, b in [(1e-3, 5.0), (0.2, 3e3), (1.0, 1.5)]:
        f = lambda x: np.log(((b - a) * x + a + b) / 2)
        deg = 60
        ours = ees.chebyshev_log_coefficients(a, b, deg)
        ref = cheb.chebinterpolate(f, 3000)[: deg + 1]  # interpolant of high degree ~ series
        np.testing.assert_allclose(ours, ref, atol=1e-9 * max(1, abs(ref[0])))
        # the tail bound is the sup of the truncation error, attained at x = -1 (lambda = a)
        x = np.cos(np.linspace(0, np.pi, 4001))
        for m in (4, 20, 60):
            c = ees.chebyshev_log_coefficients(a, b, m)
            worst = np.max(np.abs(cheb.chebval(x, c) - f(x)))
            tail = ees.chebyshev_log_tail(a, b, m)
            assert worst <= tail * (1 + 1e-6) + 1e-12
            assert abs(cheb.chebval(-1.0, c) - f(-1.0)) == pytest.approx(tail, rel=1e-6, abs=1e-12)


def test_log_det_mean_generic_operator():
    rng = np.random.default_rng(0)
    n = 300
    lam = np.concatenate([np.full(40, 1e-3), np.geomspace(1e-2, 1e3, n - 40)])
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = torch.tensor((q * lam) @ q.T)
    res = log_det_mean(lambda v: a @ v, n, lower=1e-3, seed=0)
    true = float(np.mean(np.log(lam)))
    assert abs(res.value - true) <= res.error and abs(res.value - true) <= 0.01


def test_jackson_damping_and_fixed_settings_stay_honest():
    z = make("llm_like", 60, 200, seed=1)
    ref = exact_numpy(z, 1e-3)
    jack = efficient_eigenscore(z, 1e-3, "kpm", damping="jackson")
    assert abs(jack.value - ref) <= jack.error
    # The SeND paper's M = 20, P = 20: the error bar grows to say so, and still covers.
    paper = efficient_eigenscore(z, 1e-3, "kpm", moments=20, probes=20, seed=3)
    assert paper.details["moments"] == 20
    assert abs(paper.value - ref) <= paper.error
    assert paper.error > 0.01


def test_wrong_lower_bound_is_caught_by_the_growth_guard():
    z = make("isotropic", 200, 80, seed=2)
    zc = torch.tensor(z - z.mean(1, keepdims=True))
    d = z.shape[1]

    def mv(v):
        return zc.T @ (zc @ v) / (d - 1) + 1e-3 * v

    ones = torch.full((d, 1), 1 / math.sqrt(d), dtype=torch.float64)
    # lower_safety = 3 puts a above the true smallest eigenvalue
    s, err, det = ees.kpm_logdet(mv, d, 1e-3, tol_sum=5e-3 * 200, exact_basis=ones, lower_safety=3.0, seed=0)
    assert det["retries"] >= 1
    value = (s + (200 - d) * math.log(1e-3)) / 200
    assert abs(value - exact_numpy(z, 1e-3)) <= err / 200


def test_dataset_ees_and_batches():
    z = make("llm_like", 300, 64, seed=5)
    ref = exact_numpy(z, 1e-3)
    assert dataset_ees(z).value == pytest.approx(ref, abs=1e-7)
    assert dataset_ees(torch.tensor(z), method="kpm").value == pytest.approx(ref, abs=0.01)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        dataset_ees(np.zeros((2, 3, 4)))
    zb = torch.randn(4, 6, 32)
    batched = efficient_eigenscore(zb)
    np.testing.assert_allclose(batched.value, eigenscore(zb).numpy(), rtol=1e-10)
    assert batched.value.shape == (4,) and np.all(batched.error == 0)
    kb = efficient_eigenscore(zb, method="kpm")
    np.testing.assert_allclose(kb.value, eigenscore(zb).numpy(), atol=0.01)
    assert np.all(np.abs(kb.value - eigenscore(zb).numpy()) <= kb.error)
    assert len(kb.details["per_prompt"]) == 4


def test_auto_picks_by_measured_crossover(monkeypatch):
    z = make("isotropic", 100, 40, seed=0)
    assert efficient_eigenscore(z).method == "exact-gram"
    monkeypatch.setattr(ees, "AUTO_KPM_MIN_DIM", 32)
    assert efficient_eigenscore(z).method == "kpm"


def test_seed_reproducible_and_none_random():
    z = make("llm_like", 500, 200, seed=0)
    a = efficient_eigenscore(z, method="kpm", tol=0.05, seed=4)
    b = efficient_eigenscore(z, method="kpm", tol=0.05, seed=4)
    assert a.value == b.value
    assert efficient_eigenscore(z, method="kpm", tol=0.05, seed=None).details["probes"] >= 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(embeddings=np.zeros((1, 8))), "K=1"),
        (dict(embeddings=np.zeros((3, 4, 8))[:, :1]), "K=1"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-1e-3), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(method="fast"), "method"),
        (dict(tol=0), "tol"),
        (dict(moments=1), "moments"),
        (dict(probes=1), "probes"),
        (dict(damping="lorentz"), "damping"),
        (dict(deflate=-1), "deflate"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(embeddings=np.random.default_rng(0).normal(size=(5, 8)), alpha=1e-3, method="kpm")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        efficient_eigenscore(args.pop("embeddings"), **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rejected(bad):
    z = np.random.default_rng(0).normal(size=(5, 8))
    z[3, 1] = bad
    with pytest.raises(ValueError, match=r"NaN or inf \(answer rows \[3\]\)"):
        efficient_eigenscore(z, method="kpm")
    with pytest.raises(ValueError, match="NaN or inf"):
        dataset_ees(z)
    with pytest.raises(ValueError, match="lower"):
        log_det_mean(lambda v: v, 4, lower=0.0)
