"""EES: a correct kernel-polynomial (KPM) estimate of EigenScore from mat-vecs alone.

Source: Mohammadzadeh et al., "Hallucination Detox: Sensitive Neuron Dropout
(SeND) for Large Language Model Training", arXiv 2410.15460, Algorithm 1
("Efficient EigenScore"); EigenScore itself is from Chen et al., "INSIDE",
ICLR 2024, arXiv 2402.03744. See ``docs/methods.md`` §2–3.

What is estimated. For embeddings ``Z`` of shape ``[n, d]`` (rows = answers of
one prompt, or tracking-set items for the dataset-level score), ``Zc`` = each
row centred over its ``d`` features, ``Σ = Zc Zcᵀ / (d − 1)`` (``n × n``, as
``torch.cov(Z)``) and ``A = Σ + α I``::

    EigenScore = (1/n) tr ln A = mean_k ln(λ_k(Σ) + α)      (nats)

The released EES code does not converge to this (docs/methods.md §3). This module
builds the estimator from exact identities plus one stochastic step:

1. **Dimension reduction (exact).** ``Zc Zcᵀ`` and ``Zcᵀ Zc`` share their
   nonzero eigenvalues, so with ``m = min(n, d)``
   ``ln det A = ln det(G + α I_m) + (n − m) ln α`` where ``G`` is the
   ``m × m`` one of the two (Sylvester's determinant identity). When ``n > d``
   the all-ones feature vector is an exact null vector of ``Zcᵀ Zc`` (rows are
   centred), so it is deflated exactly as well. ``G`` is never formed: its
   mat-vec is ``Zcᵀ (Zc v) / (d − 1)`` or ``Zc (Zcᵀ v) / (d − 1)``, ``O(n d)``.
2. **Schur-complement deflation (exact for any basis).** A randomized
   block-Krylov range finder gives an orthonormal ``Q`` (``m × k``) close to the
   top eigenvectors. With ``C = Qᵀ A Q = L Lᵀ``,
   ``ln det A = ln det C + ln det S`` where ``S`` is the Schur complement on
   ``Q⊥``, applied stably as ``S v = P⊥ A P⊥ v − W Wᵀ v`` with
   ``W = P⊥ A Q L⁻ᵀ``. This holds for any ``Q``; a good ``Q`` only makes the
   spectrum of ``S`` narrower (LLM embeddings have a few huge outlier
   eigenvalues). ``S ⪰ α I`` still (its inverse is a compression of ``A⁻¹``).
3. **Spectral bounds.** 80 Lanczos steps (full re-orthogonalisation) on ``S``
   give Ritz values ``θ_min``, ``θ_max`` and the residual ``r`` of the top one;
   ``b = (θ_max + r)(1 + 0.01)`` and ``a = max(α, θ_min / 2)``. ``α`` is a
   certified lower bound but far too pessimistic for dataset-level matrices
   (there ``λ_min(S) ≫ α`` and ``M ∝ sqrt(b / a)``); the Lanczos one is not
   certified, hence the factor 2 (measured: 80 steps overestimate ``λ_min`` by
   less than 1.6× on real SmolLM2 embeddings and the benchmark spectra) and the
   guard in step 5.
4. **Chebyshev expansion with exact coefficients.** With
   ``λ = ((b − a) x + a + b) / 2`` and ``x₀ = −(a + b)/(b − a)``,
   ``ρ = |x₀| + sqrt(x₀² − 1)``, the series of ``ln λ`` is known in closed form:
   ``ln λ = ln((b − a) ρ / 4) − 2 Σ_{m≥1} (−1)^m ρ^{−m} T_m(x) / m``.
   Truncated after ``M`` terms its worst error on ``[a, b]`` is exactly
   ``τ(M) = 2 Σ_{m>M} ρ^{−m} / m`` (attained at ``λ = a``); ``M`` is the smallest
   even degree with ``m' τ(M)`` within the truncation share of the tolerance.
   Optional Jackson damping multiplies ``c_m`` by ``g_m``; its extra bias
   ``Σ_{m≤M} |c_m| (1 − g_m)`` is added to the bound. Default: no damping —
   ``ln`` is analytic on ``[a, b]``, so the plain series converges
   geometrically while damping (meant for densities with delta peaks) only
   slows it to ``O(1/M²)``; the bound above is then rigorous.
5. **Hutchinson trace.** Rademacher probes projected onto ``Q⊥`` (so
   ``E zzᵀ = P⊥``); ``zᵀ T_m(B) z`` for all ``m ≤ M`` from ``M/2`` block mat-vecs
   (three-term recurrence plus ``T_{2j} = 2T_j² − 1``,
   ``T_{2j+1} = 2 T_{j+1} T_j − T_1``). Every moment is one matmul over a block
   of probes. If ``‖T_j(B) z‖`` grows past ``‖z‖`` the spectrum left
   ``[a, b]``: the bounds are widened and the run repeated. Probes are added in
   blocks until the 95 % half-width ``t_{P−1} · SE`` is within the stochastic
   share of the tolerance; when that would need at least ``m'/2`` probes, the
   ``m`` columns of ``P⊥`` are used instead and the trace is exact
   (deterministic probing, at most twice the cost).

The reported ``error`` is ``m'/n · (τ(M) + damping bias) + t_{P−1} · SE / n``:
the half-width of an interval that holds the true value with probability ≥ 95 %
when the Lanczos lower bound is valid (``m'`` = dimension after deflation).

Cost. The exact routes cost ``O(n d m + m³)`` (``exact-direct`` forms the
``n × n`` matrix, the straightforward exact computation; ``exact-gram`` forms
the ``m × m`` one, ``m = min(n, d)``). KPM costs ``O(n d (P M / 2 + k))`` with
``M ≈ 2.5 sqrt(b / a)`` moments. Measured (``benchmarks/ees_vs_exact.py``):
KPM is several times faster than ``exact-direct`` for ``n ≥ 8192``, but slower
than ``exact-gram`` at every size that fits in memory, so
``method="auto"`` takes the exact Gram route unless the ``m × m`` matrix would
not fit (see :data:`AUTO_KPM_MIN_DIM`, :data:`AUTO_MAX_EXACT_BYTES`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch

from neurodetox.metrics.chebyshev import chebyshev_log_coefficients, chebyshev_log_tail, degree_for, jackson_damping
from neurodetox.metrics.eigenscore import check_embeddings

__all__ = [
    "EESResult",
    "log_det_mean",
    "efficient_eigenscore",
    "dataset_ees",
    "exact_log_det_mean",
    "chebyshev_log_coefficients",
    "chebyshev_log_tail",
    "AUTO_KPM_MIN_DIM",
    "METHODS",
]

ArrayLike = Union[torch.Tensor, np.ndarray]

METHODS = ("auto", "exact", "exact-direct", "exact-gram", "kpm")

# method="auto" picks KPM only when min(n, d) is at least this large, or when the m x m matrix of the
# exact route would not fit in AUTO_MAX_EXACT_BYTES; otherwise the exact route on the smaller Gram matrix.
# Measured on a shared 2-core CPU (benchmarks/ees_vs_exact.py and a separate 16384x8192 run): KPM at the
# default tolerance took 5.6x the exact-gram time at 8192x2048 and 3.1x at 16384x8192 on tracking-like
# spectra; extrapolating that trend (ratio ~ m^-0.43) puts the crossover near m ~ 1e5, beyond what the
# exact route can hold in memory, so in practice "auto" = exact until memory runs out.
AUTO_KPM_MIN_DIM = 65536
# Largest m x m float64 matrix (bytes) the exact route may form in "auto" (m = 32768 at 8 GiB).
AUTO_MAX_EXACT_BYTES = 8 * 2**30

_DEFAULT_TOL = 5e-3
_TRUNC_SHARE = 0.1  # share of the tolerance given to the series truncation
_PROBE_BLOCK = 16
_OVERSAMPLE = 16
_MIN_PROBES = 16


@dataclass(frozen=True)
class EESResult:
    """An EigenScore (mean log-eigenvalue) with its error estimate.

    Attributes:
        value: ``(1/n) tr ln(Σ + α I)`` in nats: a float for one matrix, a
            float64 numpy array ``[P]`` for a batch of ``P`` prompts.
        error: half-width of an interval that holds the true value with
            probability ≥ 95 % (0 for the exact methods; same shape as ``value``).
        method: the route taken: ``"exact-direct"``, ``"exact-gram"`` or ``"kpm"``.
        details: diagnostics (KPM: ``moments``, ``probes``, ``deterministic``,
            ``bounds``, ``deflated``, ``stderr``, ``truncation_bound``,
            ``matvecs``, ``retries``, ``seconds``; per prompt for batches).
    """

    value: Union[float, np.ndarray]
    error: Union[float, np.ndarray]
    method: str
    details: dict = field(default_factory=dict, repr=False, compare=False)

    def __float__(self) -> float:
        return float(self.value)


# ----------------------------------------------------------------------------- exact routes


def _center(z: torch.Tensor) -> torch.Tensor:
    z = z.to(torch.float64)
    return z - z.mean(dim=-1, keepdim=True)


def exact_log_det_mean(embeddings: ArrayLike, alpha: float = 1e-3, route: str = "exact") -> float:
    """Exact ``(1/n) tr ln(Σ + α I)`` for one ``[n, d]`` embedding matrix.

    Args:
        embeddings: ``[n, d]``.
        alpha: > 0.
        route: ``"exact-direct"`` (eigenvalues of the ``n × n`` ``Σ``, the
            straightforward computation), ``"exact-gram"`` (eigenvalues of the
            ``d × d`` ``Zcᵀ Zc/(d − 1)``; the other ``n − d`` eigenvalues of ``Σ``
            are 0) or ``"exact"`` (whichever matrix is smaller).

    Returns:
        The value in nats (float).
    """
    z = check_embeddings(embeddings, alpha)
    if z.ndim != 2:
        raise ValueError(f"exact_log_det_mean takes one [n, d] matrix, got shape {tuple(z.shape)}")
    return _exact(_center(z), float(alpha), route)[0]


def _exact(zc: torch.Tensor, alpha: float, route: str) -> tuple[float, str]:
    n, d = zc.shape
    if route == "exact":
        route = "exact-direct" if n <= d else "exact-gram"
    if route == "exact-direct":
        mat = zc @ zc.T
    elif route == "exact-gram":
        mat = zc.T @ zc
    else:  # pragma: no cover - guarded by callers
        raise ValueError(route)
    mat = mat / (d - 1)
    lam = torch.linalg.eigvalsh(mat).clamp_min(0.0)
    s = float(torch.log(lam + alpha).sum())
    size = mat.shape[0]
    # The other n - size eigenvalues of Sigma are exactly 0 (size < n), or the
    # d x d Gram has d - n extra zeros (size > n).
    s += (n - size) * math.log(alpha)
    return s / n, route


# ----------------------------------------------------------------------------- KPM core


def _orth(x: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(x, mode="reduced")
    return q


# Student-t 0.975 quantiles for 1..14 degrees of freedom (beyond: Cornish-Fisher expansion).
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
)


def _t_quantile(p: int) -> float:
    """0.975 quantile of Student's t with ``p − 1`` degrees of freedom (two-sided 95 %)."""
    df = max(int(p) - 1, 1)
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


class _Deflated:
    """The Schur-complement operator S on range(P⊥), extended by c·QQᵀ on range(Q).

    ``S̃ v = P⊥ A P⊥ v − W Wᵀ P⊥ v + c Q Qᵀ v`` with ``W = P⊥ A Q L⁻ᵀ``,
    ``C = Qᵀ A Q = L Lᵀ``. On range(P⊥) it is the Schur complement of ``C`` in
    ``A`` (so ``ln det A = ln det C + ln det S``); the ``c`` block (``c = a``,
    the lower spectral bound) only keeps round-off components inside ``[a, b]``.
    """

    def __init__(self, matvec, m, q, aq, dtype):
        self.matvec, self.m, self.dtype = matvec, m, dtype
        self.q = q  # [m, k] orthonormal (k may be 0)
        self.c = 0.0
        self.logdet_c = 0.0
        self.w = None
        self.qw = None
        if q is not None and q.shape[1] > 0:
            cmat = q.T @ aq
            cmat = 0.5 * (cmat + cmat.T)
            chol = torch.linalg.cholesky(cmat)
            self.logdet_c = float(2.0 * torch.log(torch.diagonal(chol)).sum())
            r = aq - q @ (q.T @ aq)  # P⊥ A Q
            # W = R L^{-T}  (solve L Wᵀ = Rᵀ)
            self.w = torch.linalg.solve_triangular(chol, r.T, upper=False).T.contiguous()
            self.qw = torch.cat([q, self.w], dim=1).contiguous()
            self.qt = q.T.contiguous()
            self.wt = self.w.T.contiguous()

    @property
    def k(self) -> int:
        return 0 if self.q is None else int(self.q.shape[1])

    def project(self, v: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return v
        return v - self.q @ (self.qt @ v)

    def perp(self, v: torch.Tensor) -> torch.Tensor:
        """S applied to vectors of range(P⊥) (result in range(P⊥))."""
        if self.k == 0:
            return self.matvec(v)
        u = self.matvec(v)
        coef = torch.cat([self.qt @ u, self.wt @ v], dim=0)
        return u - self.qw @ coef

    def full(self, v: torch.Tensor) -> torch.Tensor:
        """S̃ v for any v (5 thin matmuls besides the mat-vec of A)."""
        if self.k == 0:
            return self.matvec(v)
        qv = self.qt @ v
        vp = v - self.q @ qv
        u = self.matvec(vp)
        coef = torch.cat([self.qt @ u - self.c * qv, self.wt @ vp], dim=0)
        return u - self.qw @ coef


def _range_finder(matvec, m, basis, k, oversample, power_iters, gen, dtype):
    """Top-k Ritz vectors (orthogonal to ``basis``) by randomized subspace iteration."""
    p = k + oversample
    omega = torch.randn(m, p, generator=gen, dtype=dtype)

    def proj(x):
        return x if basis is None else x - basis @ (basis.T @ x)

    y = _orth(proj(omega))
    nmv = 0
    for _ in range(power_iters):
        y = _orth(proj(matvec(y)))
        nmv += p
    ay = matvec(y)
    nmv += p
    h = y.T @ ay
    h = 0.5 * (h + h.T)
    evals, evecs = torch.linalg.eigh(h)
    top = evecs[:, -k:]
    return y @ top, ay @ top, nmv


def _lanczos_bounds(op: _Deflated, m_eff: int, steps: int, gen, dtype):
    """Extreme Ritz values of S on range(P⊥) (full re-orthogonalisation)."""
    steps = max(1, min(steps, m_eff))
    v = op.project(torch.randn(op.m, 1, generator=gen, dtype=dtype))
    v = v / torch.linalg.norm(v)
    vs = [v]
    alphas, betas = [], []
    w_prev = None
    beta = 0.0
    nmv = 0
    for j in range(steps):
        w = op.perp(vs[-1])
        nmv += 1
        a_j = float((vs[-1].T @ w).item())
        w = w - a_j * vs[-1]
        if w_prev is not None:
            w = w - beta * w_prev
        basis = torch.cat(vs, dim=1)
        w = w - basis @ (basis.T @ w)  # full re-orthogonalisation (twice is enough)
        w = w - basis @ (basis.T @ w)
        w = op.project(w)
        alphas.append(a_j)
        beta = float(torch.linalg.norm(w))
        if j == steps - 1 or beta <= 1e-12 * max(abs(a_j), 1e-300):
            break
        betas.append(beta)
        w_prev = vs[-1]
        vs.append(w / beta)
    t = np.diag(alphas)
    for i, bt in enumerate(betas[: len(alphas) - 1]):
        t[i, i + 1] = t[i + 1, i] = bt
    theta, s = np.linalg.eigh(t)
    # Residual norm of Ritz pair i: beta_last * |last component of its eigenvector|.
    res = beta * np.abs(s[-1, :])
    return float(theta[0]), float(theta[-1]), float(res[0]), float(res[-1]), nmv


def _moments_block(op: _Deflated, v0: torch.Tensor, a: float, b: float, half: int):
    """Chebyshev moments zᵀ T_m(B) z, m = 0..2·half, for every column z of ``v0``.

    ``B = (2 S̃ − (a + b) I)/(b − a)``; ``half`` mat-vecs give ``2·half + 1``
    moments through ``T_{2j} = 2 T_j² − T_0`` and ``T_{2j+1} = 2 T_{j+1} T_j − T_1``.

    Returns ``(mu [2·half + 1, P] float64 numpy, max_j ‖T_j z‖² / ‖z‖²)``.
    """
    scale = 2.0 / (b - a)
    shift = (a + b) / (b - a)
    p = v0.shape[1]
    mu = torch.zeros(2 * half + 1, p, dtype=torch.float64)
    n0 = (v0 * v0).sum(0)
    mu[0] = n0
    v_prev = v0
    v = scale * op.full(v0) - shift * v0
    mu1 = (v0 * v).sum(0)
    mu[1] = mu1
    norms = torch.empty(half, p, dtype=torch.float64)
    for j in range(1, half + 1):
        nj = (v * v).sum(0)
        norms[j - 1] = nj
        mu[2 * j] = 2.0 * nj - n0
        if j == half:
            break
        # v_next = 2 B v - v_prev = 2 scale S̃ v - 2 shift v - v_prev
        v_next = op.full(v).mul_(2.0 * scale).sub_(v, alpha=2.0 * shift).sub_(v_prev)
        mu[2 * j + 1] = 2.0 * (v_next * v).sum(0) - mu1
        v_prev, v = v, v_next
    growth = float((norms / n0.clamp_min(1e-300)).max()) if half > 0 else 1.0
    return mu.numpy(), max(growth, 1.0)


_GROWTH_LIMIT = 1.05
_DETERMINISTIC_FRACTION = 0.5
_MAX_BLOCK = 256


def _run_probes(op, m, m_eff, a, b, half, coef, probes, tol_stoch, max_probes, gen, dtype):
    """Per-probe estimates of tr p(S) (random), or the exact trace (deterministic)."""
    nmv = 0
    growth = 1.0

    def deterministic():
        nonlocal nmv, growth
        out = []
        eye = torch.eye(m, dtype=dtype)
        for s0 in range(0, m, 256):
            blk = op.project(eye[:, s0 : s0 + 256].contiguous())
            mu, gr = _moments_block(op, blk, a, b, half)
            growth = max(growth, gr)
            nmv += blk.shape[1] * half
            out.append(coef @ mu)
        return [np.array([float(np.concatenate(out).sum())])], True, growth, nmv

    target = _MIN_PROBES if probes is None else int(probes)
    if target >= m_eff:
        return deterministic()
    ests: list = []
    count = 0
    while True:
        while count < target:
            nb = min(_MAX_BLOCK, target - count)
            z = torch.randint(0, 2, (m, nb), generator=gen, dtype=torch.int8).to(dtype) * 2 - 1
            z = op.project(z)
            mu, gr = _moments_block(op, z, a, b, half)
            growth = max(growth, gr)
            nmv += nb * half
            ests.append(coef @ mu)
            count += nb
            if growth > _GROWTH_LIMIT:
                return ests, False, growth, nmv
        if probes is not None or count >= max_probes:
            return ests, False, growth, nmv
        y = np.concatenate(ests)
        t_q = _t_quantile(count)
        sd = float(np.std(y, ddof=1))
        if t_q * sd / math.sqrt(count) <= tol_stoch:
            return ests, False, growth, nmv
        need = int(math.ceil((t_q * sd / tol_stoch) ** 2 * 1.05))
        if need >= _DETERMINISTIC_FRACTION * m_eff:
            # random probes would cost at least half of the exact (deterministic) trace: take the exact one
            return deterministic()
        target = min(max(need, count + _PROBE_BLOCK), max_probes)


def kpm_logdet(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    m: int,
    lower: float,
    *,
    tol_sum: float,
    exact_basis: Optional[torch.Tensor] = None,
    moments: Optional[int] = None,
    probes: Optional[int] = None,
    deflate: int = 256,
    seed: Optional[int] = 0,
    damping: str = "none",
    max_moments: int = 20000,
    max_probes: int = 1024,
    lanczos_steps: int = 80,
    power_iters: int = 2,
    lower_safety: float = 0.5,
    upper_margin: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float, dict]:
    """KPM estimate of ``ln det A`` (a sum) for an SPD ``A ⪰ lower·I`` given by ``matvec``.

    Returns ``(logdet, error_95, details)``."""
    t0 = time.perf_counter()
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    matvecs = 0
    # --- deflation basis
    basis = exact_basis
    k_basis = 0 if basis is None else int(basis.shape[1])
    free = m - k_basis
    # Small matrices: deflate up to half of the space; large ones: up to 1/8 (the range finder costs
    # (k + oversampling) mat-vecs per power iteration).
    k_defl = max(0, min(int(deflate), free // 2 if free <= 128 else free // 8))
    oversample = max(0, min(_OVERSAMPLE, free - k_defl))
    q_parts, aq_parts = [], []
    if basis is not None:
        q_parts.append(basis)
        aq_parts.append(matvec(basis))
        matvecs += k_basis
    if k_defl > 0:
        qv, aqv, nmv = _range_finder(matvec, m, basis, k_defl, oversample, power_iters, gen, dtype)
        matvecs += nmv
        q_parts.append(qv)
        aq_parts.append(aqv)
    if q_parts:
        q = torch.cat(q_parts, dim=1)
        aq = torch.cat(aq_parts, dim=1)
        # re-orthonormalise (the range-finder vectors are already orthogonal to the basis)
        qq, rr = torch.linalg.qr(q)
        # A Q' = A Q R^{-1}
        aq = torch.linalg.solve_triangular(rr, aq, upper=True, left=False)
        q = qq
    else:
        q = aq = None
    op = _Deflated(matvec, m, q, aq, dtype)
    m_eff = m - op.k
    details = {"deflated": op.k, "dim": m, "dim_stochastic": m_eff}
    if m_eff <= 0:
        details.update(
            moments=0,
            probes=0,
            deterministic=True,
            bounds=None,
            stderr=0.0,
            truncation_bound=0.0,
            matvecs=matvecs,
            retries=0,
            seconds=time.perf_counter() - t0,
        )
        return op.logdet_c, 0.0, details

    # --- spectral bounds
    th_min, th_max, r_min, r_max, nmv = _lanczos_bounds(op, m_eff, lanczos_steps, gen, dtype)
    matvecs += nmv
    b = (max(th_max, lower) + r_max) * (1.0 + upper_margin) + 1e-12 * max(abs(th_max), 1.0)
    # Ritz values are upper bounds of the smallest eigenvalue; 80 steps came within a factor 1.6 of it on
    # real SmolLM2 embeddings and on the benchmark spectra (the growth guard below catches the rest).
    a = max(lower, th_min * lower_safety)
    if not a < b:
        b = a * (1.0 + 1e-6) + 1e-300
    tol_trunc = _TRUNC_SHARE * tol_sum
    tol_stoch = (1.0 - _TRUNC_SHARE) * tol_sum
    retries = 0
    while True:
        op.c = a
        if moments is None:
            degree = degree_for(a, b, tol_trunc / m_eff, max_moments)
        else:
            degree = int(moments) + int(moments) % 2
        half = degree // 2
        coef = chebyshev_log_coefficients(a, b, degree)
        bias = chebyshev_log_tail(a, b, degree)
        if damping == "jackson":
            g = jackson_damping(degree)
            bias += float(np.sum(np.abs(coef) * (1.0 - g)))
            coef = coef * g
        # --- probes
        ests, deterministic, growth, nmv = _run_probes(
            op, m, m_eff, a, b, half, coef, probes, tol_stoch, max_probes, gen, dtype
        )
        matvecs += nmv
        if growth > _GROWTH_LIMIT and retries < 4:
            # The spectrum of S left [a, b]: widen both ends and start again.
            retries += 1
            b = b * 1.5
            a = max(lower, a / 8.0)
            continue
        break
    y = np.concatenate(ests)
    if deterministic:
        value = float(y.sum())
        stderr = 0.0
        half_width = 0.0
        n_probes = m
    else:
        value = float(y.mean())
        n_probes = len(y)
        stderr = float(np.std(y, ddof=1) / math.sqrt(n_probes)) if n_probes > 1 else float("inf")
        half_width = _t_quantile(n_probes) * stderr if n_probes > 1 else float("inf")
    err = m_eff * bias + half_width
    if growth > _GROWTH_LIMIT:  # bounds still violated after the retries: no valid error bar
        err = float("inf")
    details.update(
        moments=degree,
        probes=n_probes,
        deterministic=deterministic,
        bounds=(a, b),
        lanczos=(th_min, th_max, r_min, r_max),
        stderr=stderr,
        truncation_bound=m_eff * bias,
        matvecs=matvecs,
        retries=retries,
        growth=growth,
        seconds=time.perf_counter() - t0,
    )
    return op.logdet_c + value, err, details


def log_det_mean(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    lower: float,
    tol: float = _DEFAULT_TOL,
    moments: Optional[int] = None,
    probes: Optional[int] = None,
    deflate: int = 256,
    seed: Optional[int] = 0,
    damping: str = "none",
    max_moments: int = 20000,
    max_probes: int = 1024,
    dtype: torch.dtype = torch.float64,
) -> EESResult:
    """KPM estimate of ``(1/n) tr ln A`` for a symmetric ``A ⪰ lower · I`` known by mat-vecs.

    The generic estimator behind :func:`efficient_eigenscore` (module docstring:
    Schur-complement deflation, Lanczos bounds, closed-form Chebyshev
    coefficients of ``ln``, Hutchinson with Rademacher probes).

    Args:
        matvec: ``V [n, p] ↦ A V [n, p]`` (float64 tensors); ``A`` symmetric
            positive definite.
        n: the dimension.
        lower: a certified lower bound of ``A``'s spectrum, > 0 (``α`` for
            ``Σ + α I``).
        tol: target half-width (nats, on the mean) of the reported 95 % error.
            Default ``5e-3``.
        moments: fixed series degree ``M`` (rounded up to even); ``None``
            (default) picks the smallest degree whose truncation bound fits
            10 % of ``tol``. (The SeND paper's ``M = 20`` is far too small for
            ``α = 1e-3``.)
        probes: fixed number of Rademacher probes; ``None`` (default) adds
            probes until the 95 % half-width fits 90 % of ``tol``, or uses
            deterministic probing when that is cheaper.
        deflate: Ritz vectors deflated exactly through the Schur complement
            (``0`` = none). Default 256 (at most ``n/8``; ``n/2`` when ``n ≤ 128``).
        seed: seed of the probes and the random starts (``None``: fresh
            randomness). Default 0.
        damping: ``"none"`` (default) or ``"jackson"``.
        max_moments, max_probes: caps; when hit, the error estimate grows
            instead.
        dtype: working precision. Default float64.

    Returns:
        :class:`EESResult` with ``method="kpm"``.

    Raises:
        ValueError: ``n < 1``; ``lower`` not > 0; bad ``tol``/``damping``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check_alpha(lower, "lower")
    _check_kpm_args(tol, moments, probes, damping, deflate)
    s, err, det = kpm_logdet(
        matvec,
        n,
        float(lower),
        tol_sum=tol * n,
        moments=moments,
        probes=probes,
        deflate=deflate,
        seed=seed,
        damping=damping,
        max_moments=max_moments,
        max_probes=max_probes,
        dtype=dtype,
    )
    return EESResult(value=s / n, error=err / n, method="kpm", details=det)


def _check_alpha(alpha, name: str = "alpha") -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {alpha!r}")


def _check_kpm_args(tol, moments, probes, damping, deflate) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if moments is not None and (isinstance(moments, bool) or not isinstance(moments, int) or moments < 2):
        raise ValueError(f"moments must be an integer >= 2 or None, got {moments!r}")
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 2):
        raise ValueError(f"probes must be an integer >= 2 or None, got {probes!r}")
    if damping not in ("none", "jackson"):
        raise ValueError(f"damping must be 'none' or 'jackson', got {damping!r}")
    if isinstance(deflate, bool) or not isinstance(deflate, int) or deflate < 0:
        raise ValueError(f"deflate must be an integer >= 0, got {deflate!r}")


def _auto_route(n: int, d: int) -> str:
    m = min(n, d)
    if m >= AUTO_KPM_MIN_DIM or 8 * m * m > AUTO_MAX_EXACT_BYTES:
        return "kpm"
    return "exact"


def _one(zc: torch.Tensor, alpha: float, method: str, kw: dict) -> tuple[float, float, str, dict]:
    n, d = zc.shape
    if method == "auto":
        method = _auto_route(n, d)
    if method in ("exact", "exact-direct", "exact-gram"):
        t0 = time.perf_counter()
        v, route = _exact(zc, alpha, method)
        return v, 0.0, route, {"seconds": time.perf_counter() - t0}
    scale = 1.0 / (d - 1)
    zt = zc.T.contiguous()
    if n > d:
        m = d

        def matvec(v):
            return torch.addmm(v, zt, zc @ v, beta=alpha, alpha=scale)

        ones = torch.full((d, 1), 1.0 / math.sqrt(d), dtype=zc.dtype)
        basis = ones
    else:
        m = n

        def matvec(v):
            return torch.addmm(v, zc, zt @ v, beta=alpha, alpha=scale)

        basis = None
    tol = kw.pop("tol", _DEFAULT_TOL)
    s, err, det = kpm_logdet(matvec, m, alpha, tol_sum=tol * n, exact_basis=basis, **kw)
    s += (n - m) * math.log(alpha)
    det["reduced_from"] = n
    return s / n, err / n, "kpm", det


def efficient_eigenscore(
    embeddings: ArrayLike,
    alpha: float = 1e-3,
    method: str = "auto",
    *,
    tol: float = _DEFAULT_TOL,
    moments: Optional[int] = None,
    probes: Optional[int] = None,
    deflate: int = 256,
    seed: Optional[int] = 0,
    damping: str = "none",
    max_moments: int = 20000,
    max_probes: int = 1024,
) -> EESResult:
    """EigenScore ``(1/n) Σ ln(λ_k(Σ) + α)`` by an exact route or by EES (KPM).

    Same quantity as :func:`neurodetox.metrics.eigenscore` (``Σ = torch.cov(Z)``,
    rows = answers or items): the per-prompt ``K × K`` score for ``[K, d]``
    input, or the dataset-level score over ``N`` tracking-set embeddings for
    ``[N, d]`` input (SeND's stopping rule, arXiv 2410.15460).

    Args:
        embeddings: ``[n, d]`` or ``[P, n, d]`` (tensor or numpy; any real dtype,
            computed in float64). ``n ≥ 2``, ``d ≥ 2``.
        alpha: regulariser, > 0. Default ``1e-3`` (INSIDE).
        method: ``"exact-direct"`` (eigenvalues of the ``n × n`` ``Σ``),
            ``"exact-gram"`` (of the ``d × d`` ``Zcᵀ Zc/(d − 1)``, plus
            ``(n − d) ln α``), ``"exact"`` (the smaller of the two), ``"kpm"``
            (EES, the module docstring) or ``"auto"`` (default: KPM when
            ``min(n, d) ≥`` :data:`AUTO_KPM_MIN_DIM` or the exact ``m × m``
            matrix would not fit in 8 GiB, else ``"exact"`` — from the
            crossover measured by ``benchmarks/ees_vs_exact.py``).
        tol, moments, probes, deflate, seed, damping, max_moments, max_probes:
            KPM settings, see :func:`log_det_mean`. Default ``tol = 5e-3``: the
            reported 95 % error is at most ``5e-3`` nats unless a cap is hit.

    Returns:
        :class:`EESResult`. For ``[P, n, d]`` input ``value`` and ``error`` are
        float64 arrays ``[P]`` and ``details["per_prompt"]`` lists each
        prompt's details.

    Raises:
        ValueError: bad shape, ``n < 2`` (``K < 2``), ``d < 2``, ``alpha`` not a
            finite number > 0, NaN/inf in the embeddings (naming the rows or
            prompts), unknown ``method``, bad KPM settings.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    _check_alpha(alpha)
    _check_kpm_args(tol, moments, probes, damping, deflate)
    z = check_embeddings(embeddings, alpha)
    kw = dict(
        tol=tol,
        moments=moments,
        probes=probes,
        deflate=deflate,
        seed=seed,
        damping=damping,
        max_moments=max_moments,
        max_probes=max_probes,
    )
    zc = _center(z)
    if zc.ndim == 2:
        v, e, route, det = _one(zc, float(alpha), method, dict(kw))
        return EESResult(value=v, error=e, method=route, details=det)
    if method in ("exact", "exact-direct", "exact-gram") or (
        method == "auto" and _auto_route(*zc.shape[1:]) == "exact"
    ):
        # batched exact: one eigvalsh over [P, m, m]
        from neurodetox.metrics.eigenscore import eigenscore

        t0 = time.perf_counter()
        n, d = zc.shape[1:]
        route = method if method != "auto" else "exact"
        if route == "exact":
            route = "exact-direct" if n <= d else "exact-gram"
        if route == "exact-direct":
            vals = eigenscore(z, alpha=float(alpha)).cpu().numpy()
        else:
            vals = np.array([_exact(zc[p], float(alpha), route)[0] for p in range(zc.shape[0])])
        return EESResult(
            value=vals, error=np.zeros_like(vals), method=route, details={"seconds": time.perf_counter() - t0}
        )
    vals, errs, dets = [], [], []
    route = "kpm"
    for p in range(zc.shape[0]):
        v, e, route, det = _one(zc[p], float(alpha), method, dict(kw))
        vals.append(v)
        errs.append(e)
        dets.append(det)
    return EESResult(value=np.array(vals), error=np.array(errs), method=route, details={"per_prompt": dets})


def dataset_ees(embeddings: ArrayLike, alpha: float = 1e-3, method: str = "auto", **kwargs) -> EESResult:
    """Dataset-level EigenScore over ``N`` tracking-set embeddings ``[N, d]``.

    The quantity SeND's stopping rule compares with ``δ`` (stop when the loss is
    below ``ε`` and this is below ``δ``; Mohammadzadeh et al., arXiv
    2410.15460): ``(1/N) Σ ln(λ_i(Σ_N) + α)`` with ``Σ_N = torch.cov(E)``
    (``N × N``, each embedding centred over its features, ``/(d − 1)``).
    ``method="auto"`` takes the fastest correct route for the size (exact on
    the ``min(N, d)``-sized Gram matrix for any realistic ``d``; KPM beyond the
    measured crossover).

    Args:
        embeddings: ``[N, d]`` tensor or array, ``N ≥ 2``.
        alpha: > 0. Default ``1e-3``.
        method, **kwargs: as :func:`efficient_eigenscore`.

    Returns:
        :class:`EESResult` (``value`` a float).

    Raises:
        ValueError: as :func:`efficient_eigenscore`; also a ``[P, K, d]`` input.
    """
    z = embeddings if isinstance(embeddings, torch.Tensor) else torch.as_tensor(np.asarray(embeddings))
    if z.ndim != 2:
        raise ValueError(f"dataset_ees takes one [N, d] matrix of tracking-set embeddings, got shape {tuple(z.shape)}")
    return efficient_eigenscore(z, alpha, method, **kwargs)
