"""Chebyshev series of ``ln λ`` on ``[a, b]``: the building block of the KPM log-determinant in
:mod:`neurodetox.metrics.ees` (Efficient EigenScore; Mohammadzadeh et al., arXiv 2410.15460; kernel
polynomial method, Weiße et al., Rev. Mod. Phys. 78, 275 (2006); ``docs/methods.md`` §3).

Closed-form coefficients and tail bound, the degree that meets a uniform tolerance, and Jackson damping.
``numpy.polynomial.chebyshev`` evaluates such series; the coefficients of ``ln`` are written here in closed
form because they are exact and O(M), where fitting them numerically would not be.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["chebyshev_log_coefficients", "chebyshev_log_tail", "degree_for", "ellipse_rho", "jackson_damping"]


def ellipse_rho(a: float, b: float) -> float:
    """Bernstein-ellipse parameter of ln on [a, b]: the singularity λ = 0 sits at
    x₀ = −(a + b)/(b − a); ρ = |x₀| + sqrt(x₀² − 1) = (sqrt b + sqrt a)/(sqrt b − sqrt a)."""
    sa, sb = math.sqrt(a), math.sqrt(b)
    return (sb + sa) / (sb - sa)


def chebyshev_log_coefficients(a: float, b: float, degree: int) -> np.ndarray:
    """Chebyshev coefficients ``c_0..c_degree`` of ``ln λ`` on ``λ ∈ [a, b]``.

    ``ln(((b − a) x + a + b)/2) = Σ_m c_m T_m(x)`` for ``x ∈ [−1, 1]``, from the
    closed form ``c_0 = ln((b − a) ρ / 4)``, ``c_m = −2 (−1)^m ρ^{−m} / m``,
    ``ρ = (√b + √a)/(√b − √a)`` (the generating function
    ``ln(1 − 2 t x + t²) = −2 Σ t^m T_m(x)/m`` at ``t = −1/ρ``).

    Args:
        a, b: ``0 < a < b``.
        degree: highest degree ``M ≥ 0``.

    Returns:
        float64 array ``[degree + 1]``.

    Raises:
        ValueError: bad bounds or degree.
    """
    if not (0 < a < b) or not math.isfinite(b):
        raise ValueError(f"need finite bounds 0 < a < b, got a={a!r}, b={b!r}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    rho = ellipse_rho(a, b)
    m = np.arange(1, degree + 1, dtype=np.float64)
    c = np.empty(degree + 1)
    c[0] = math.log((b - a) * rho / 4.0)
    # (-1)^m rho^-m computed as exp(-m ln rho) to avoid overflow of rho^m
    c[1:] = -2.0 * np.where(m % 2 == 0, 1.0, -1.0) * np.exp(-m * math.log(rho)) / m
    return c


def chebyshev_log_tail(a: float, b: float, degree: int) -> float:
    """Worst error on ``[a, b]`` of the degree-``degree`` truncated series of ``ln``.

    Exactly ``τ(M) = 2 Σ_{m>M} ρ^{−m}/m`` (every term has the same sign at
    ``λ = a``, where the sup is attained).
    """
    rho = ellipse_rho(a, b)
    lr = math.log(rho)
    # Sum the tail directly: terms decay like exp(-m ln rho)/m.
    total = 0.0
    start = degree + 1
    chunk = 4096
    while True:
        m = np.arange(start, start + chunk, dtype=np.float64)
        terms = 2.0 * np.exp(-m * lr) / m
        total += float(terms.sum())
        if terms[-1] < 1e-17 * max(total, 1e-300) or terms[-1] < 1e-300:
            break
        if m[-1] * lr > 50:  # remaining terms < e^-50
            break
        start += chunk
        chunk *= 2
    return total


def degree_for(a: float, b: float, tol_uniform: float, max_degree: int) -> int:
    """Smallest even M with τ(M) ≤ tol_uniform (capped at max_degree)."""
    lo, hi = 2, 2
    while hi < max_degree and chebyshev_log_tail(a, b, hi) > tol_uniform:
        lo, hi = hi, min(2 * hi, max_degree)
    if chebyshev_log_tail(a, b, hi) > tol_uniform:
        return max_degree + (max_degree % 2)
    while hi - lo > 2:
        mid = (lo + hi) // 2
        mid += mid % 2
        if mid >= hi:
            break
        if chebyshev_log_tail(a, b, mid) <= tol_uniform:
            hi = mid
        else:
            lo = mid
    return hi + (hi % 2)


def jackson_damping(degree: int) -> np.ndarray:
    """Jackson damping factors g_0..g_M (Weiße et al., Rev. Mod. Phys. 78, 275 (2006))."""
    n = degree + 1
    m = np.arange(n, dtype=np.float64)
    q = math.pi / (n + 1)
    return ((n - m + 1) * np.cos(q * m) + np.sin(q * m) / math.tan(q)) / (n + 1)
