"""EES (KPM) against the exact EigenScore: accuracy, error-bar coverage and time, side by side.

    python benchmarks/ees_vs_exact.py [--json out.json] [--sizes K10,K100,...] [--trials N]

For each size, on synthetic embeddings shaped like SmolLM2's (below), the exact
value ``(1/n) Σ ln(λ_i(Σ) + α)`` (``numpy``-independent: ``torch.linalg.eigvalsh``
in float64) is computed by

* ``exact-direct``: eigenvalues of the ``n × n`` matrix ``Σ`` — the
  straightforward exact computation the issue means;
* ``exact-gram``: eigenvalues of the smaller ``m × m`` Gram matrix,
  ``m = min(n, d)`` (the same nonzero spectrum; for ``n ≤ d`` it *is* the
  direct route);

and EES (``method="kpm"``, defaults: ``tol = 5e-3``) runs ``--trials`` times
with different seeds. Reported: the largest absolute error over the trials, the
mean reported 95 % error, coverage (trials whose reported error covers the
true error), moments ``M``, probes ``P`` (``det`` = deterministic probing), and
the time ratios EES / exact-direct and EES / exact-gram (median EES time), plus
what ``method="auto"`` chose and its time relative to the faster of EES and
exact-direct. All times are wall-clock on this machine in one run (the machine
may be shared: the load average is printed).

Data (seeded):

* ``K×K`` per-prompt sizes (``K`` answers, ``d = 576``): ``K`` sampled answers
  drawn with replacement from ``K`` distinct answer embeddings, so,
  as in real samples (500 real SmolLM2 samples of one prompt: 168 zero eigenvalues; here ~184),
  exact duplicates give eigenvalues exactly 0 (``λ + α = α``).
* ``N×d`` dataset-level sizes: tracking-set-like embeddings: a shared mean with
  three "massive activation" features, a power-law feature spectrum and 20
  topic clusters, rotated by a random block-orthogonal matrix; calibrated so
  that 1200×576 matches the spectrum quantiles of SmolLM2's penultimate-layer
  tracking embeddings (½(mean + last token)) on the fact prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from neurodetox.metrics import ees

ALPHA = 1e-3
D_ANSWERS = 576
SIZES = {
    "K10": ("answers", 10, D_ANSWERS),
    "K100": ("answers", 100, D_ANSWERS),
    "K1000": ("answers", 1000, D_ANSWERS),
    "1000x576": ("tracking", 1000, 576),
    "4096x1024": ("tracking", 4096, 1024),
    "8192x2048": ("tracking", 8192, 2048),
    "16384x2048": ("tracking", 16384, 2048),
    "16384x8192": ("tracking", 16384, 8192),  # optional crossover probe (not in the default list: ~25 min)
}
DEFAULT_SIZES = ["K10", "K100", "K1000", "1000x576", "4096x1024", "8192x2048", "16384x2048"]
# Sizes whose n×n direct eigensolve is not run (O(n³) at n = 16384 is already timed in 16384x2048,
# and forming the n×n matrix from d = 8192 features would add ~4.4e12 flops): crossover probes only.
NO_DIRECT = {"16384x8192"}


def _rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``x`` times a random orthogonal matrix: block-diagonal QR blocks (≤ 512) between random permutations
    of the features (applied block by block: O(n d · 512) instead of O(n d²))."""
    n, d = x.shape
    p_in = torch.randperm(d, generator=g)
    p_out = torch.randperm(d, generator=g)
    out = torch.empty_like(x)
    start = 0
    while start < d:
        b = min(512, d - start)
        blk, _ = torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float64))
        out[:, p_out[start : start + b]] = x[:, p_in[start : start + b]] @ blk.T
        start += b
    return out


def tracking_like(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.arange(1, d + 1, dtype=torch.float64)
    var = (j * 576.0 / d + 8.0) ** -2.0
    var = var / var[d // 2 - 1] * (6.6 * 575 / 1200)
    mu = torch.randn(d, generator=g, dtype=torch.float64) * 3
    mu[:3] = torch.tensor([400.0, -300.0, 150.0])
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * var.sqrt()
    topics = torch.randn(20, d, generator=g, dtype=torch.float64) * var.sqrt() * 1.5
    x = x + topics[torch.randint(0, 20, (n,), generator=g)]
    return (mu + _rotate(x, g)).float()


def answers_like(k: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    distinct = k
    base = tracking_like(distinct, d, seed + 1).double()
    pick = torch.randint(0, distinct, (k,), generator=g)
    pick[:2] = torch.tensor([0, 1])  # at least two distinct answers
    return base[pick].float()


def make(kind: str, n: int, d: int, seed: int = 0) -> torch.Tensor:
    return answers_like(n, d, seed) if kind == "answers" else tracking_like(n, d, seed)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_size(name: str, trials: int, skip_direct_above: int) -> dict:
    kind, n, d = SIZES[name]
    z = make(kind, n, d)
    rep = 7 if n * d <= 1_000_000 else 1
    t_direct = None
    v_direct = None
    if n <= skip_direct_above and name not in NO_DIRECT:
        times = []
        for _ in range(rep):
            v_direct, t = timed(lambda: ees.exact_log_det_mean(z, ALPHA, "exact-direct"))
            times.append(t)
        t_direct = statistics.median(times)
    times = []
    for _ in range(rep):
        v_gram, t = timed(lambda: ees.exact_log_det_mean(z, ALPHA, "exact-gram" if n > d else "exact-direct"))
        times.append(t)
    t_gram = statistics.median(times)
    truth = v_direct if v_direct is not None else v_gram
    errs, bars, tk, det = [], [], [], None
    seed = 0
    while seed < trials:
        res, t = timed(lambda: ees.efficient_eigenscore(z, ALPHA, "kpm", seed=seed))
        errs.append(abs(res.value - truth))
        bars.append(res.error)
        tk.append(t)
        det = res.details
        seed += 1
    ta = []
    for _ in range(rep):
        auto, t = timed(lambda: ees.efficient_eigenscore(z, ALPHA, "auto"))
        ta.append(t)
    t_auto = statistics.median(ta)
    t_kpm = statistics.median(tk)
    exact_ref = t_direct if t_direct is not None else t_gram
    return {
        "size": name,
        "kind": kind,
        "n": n,
        "d": d,
        "exact_value": truth,
        "direct_minus_gram": None if v_direct is None else v_direct - v_gram,
        "t_direct": t_direct,
        "t_gram": t_gram,
        "t_kpm_median": t_kpm,
        "t_kpm_all": tk,
        "ratio_kpm_direct": None if t_direct is None else t_kpm / t_direct,
        "ratio_kpm_gram": t_kpm / t_gram,
        "max_abs_error": max(errs),
        "mean_reported_error": sum(bars) / len(bars),
        "covered": sum(e <= b for e, b in zip(errs, bars)),
        "trials": trials,
        "moments": det["moments"],
        "probes": det["probes"],
        "deterministic": det["deterministic"],
        "deflated": det["deflated"],
        "auto_method": auto.method,
        "t_auto": t_auto,
        "auto_vs_faster": t_auto / min(t_kpm, exact_ref),
    }


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = (
        "| size | n×d | exact-direct s | exact-gram s | EES s | EES/direct | EES/gram | max abs err | "
        "mean err bar | covered | M | P | auto → | auto/faster |"
    )
    out = [head, "|" + "---|" * 14]
    for r in rows:
        p = f"{r['probes']}{' det' if r['deterministic'] else ''}"
        out.append(
            f"| {r['size']} | {r['n']}×{r['d']} | {fmt(r['t_direct'])} | {fmt(r['t_gram'])} | {r['t_kpm_median']:.2f} | "
            f"{fmt(r['ratio_kpm_direct'], '.3f')} | {r['ratio_kpm_gram']:.2f} | {r['max_abs_error']:.1e} | "
            f"{r['mean_reported_error']:.1e} | {r['covered']}/{r['trials']} | {r['moments']} | {p} | "
            f"{r['auto_method']} | {r['auto_vs_faster']:.2f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes",
        default=",".join(DEFAULT_SIZES),
        help=f"comma list of {', '.join(SIZES)} (default: all but 16384x8192)",
    )
    ap.add_argument(
        "--trials", type=int, default=None, help="EES runs per size (default: 20 for n·d ≤ 1e6, 5 up to 1e7, 3 beyond)"
    )
    ap.add_argument(
        "--skip-direct-above",
        type=int,
        default=10**9,
        help="skip the n×n direct eigensolve for n above this (it is O(n³))",
    )
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = [s.strip() for s in a.sizes.split(",") if s.strip()]
    for s in names:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}")
    print(
        f"# EES vs exact — {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.1f}; "
        f"alpha={ALPHA}, EES defaults (tol 5e-3); auto crossover min(n, d) ≥ {ees.AUTO_KPM_MIN_DIM}",
        flush=True,
    )
    ees.efficient_eigenscore(torch.randn(64, 32), method="kpm")  # warm-up (imports, thread pools)
    rows = []
    t0 = time.perf_counter()
    for s in names:
        kind, n, d = SIZES[s]
        trials = a.trials or (20 if n * d <= 1_000_000 else 5 if n * d <= 10_000_000 else 3)
        r = run_size(s, trials, a.skip_direct_above)
        rows.append(r)
        print(f"{s}: done ({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    print()
    print(table(rows))
    cover = sum(r["covered"] for r in rows), sum(r["trials"] for r in rows)
    print(
        f"\ncoverage over all trials: {cover[0]}/{cover[1]}; largest abs error "
        f"{max(r['max_abs_error'] for r in rows):.1e}; total {time.perf_counter() - t0:.0f} s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "rows": rows,
                    "coverage": cover,
                    "auto_kpm_min_dim": ees.AUTO_KPM_MIN_DIM,
                    "threads": torch.get_num_threads(),
                    "machine": platform.machine(),
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
