"""What each SeND selection picks, and what the drop does to the training loss (the study's mechanism figures).

The SeND study (``docs/results/send.md``) found that the paper's sensitivity ``V_i`` at the
penultimate residual site picks the model's massive-activation dimensions (Sun et al.,
"Massive Activations in Large Language Models", arXiv 2402.17762) and that zeroing them
makes the training loss jump. These functions show that per arm, from the runs' ``result.json``
(its ``selections``: the indices, the massive indices and every index's mean ``|activation|`` on
the tracking set at the selection's newest recording; and its ``curves["loss"]``):

* :func:`selection_points` / the ``selection`` figure: every index's mean ``|activation|``
  against its index, the picked ones highlighted and the massive ones marked;
* :func:`loss_around_drops` / the ``drop_loss`` figure: the training loss aligned at each drop;
* :func:`mechanism_table`: per arm, the share of picked indices that are massive, the picked
  indices' median ``|activation|`` relative to the site's median, and the loss jump at the drops.

Method: Mohammadzadeh et al., "Hallucination Detox: Sensitive Neuron Dropout (SeND) for Large
Language Model Training", arXiv 2410.15460.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["loss_around_drops", "mechanism_markdown", "mechanism_table", "plot_mechanism", "selection_points"]


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return math.nan
    return s[(n - 1) // 2]  # the lower median, as torch.median and massive_indices use


def selection_points(result: dict, which: int = 0, site: Optional[str] = None) -> Optional[dict]:
    """The data of one selection of one run, for the scatter.

    Args:
        result: a run's ``result.json`` content.
        which: which selection (0 = the first).
        site: which site key (default: the first recorded, sorted).

    Returns:
        ``{"site", "step", "mean_abs" [n], "picked" [indices], "massive" [indices]}``, or ``None`` when the
        run made no selection or recorded no activations (older results).
    """
    sels = [s for s in result.get("selections") or [] if s.get("mean_abs")]
    if len(sels) <= which:
        return None
    sel = sels[which]
    key = site or sorted(sel["mean_abs"])[0]
    return {
        "site": key,
        "step": sel["step"],
        "mean_abs": list(sel["mean_abs"][key]),
        "picked": sorted(sel["neurons"].get(key, [])),
        "massive": sorted((sel.get("massive") or {}).get(key, [])),
    }


def loss_around_drops(result: dict, before: int = 10, after: int = 30) -> list[tuple[int, float]]:
    """Training loss aligned at each drop: ``(steps since the drop, loss)`` for every logged loss within
    ``[drop − before, drop + after]`` of a drop step (a loss logged at step ``s`` is the mean over the
    logging interval ending at ``s``). Empty without drops.
    """
    loss = result.get("curves", {}).get("loss") or []
    drops = [s["step"] for s in result.get("sensitive_neurons") or []]
    return sorted(
        (int(step - d), float(v)) for d in drops for step, v in loss if -before <= step - d <= after and v is not None
    )


def _jump(result: dict, after: int = 10) -> float:
    """Mean over drops of (largest loss within ``after`` steps after the drop) − (last loss at or before it)."""
    loss = result.get("curves", {}).get("loss") or []
    out = []
    for s in result.get("sensitive_neurons") or []:
        d = s["step"]
        pre = [v for step, v in loss if step <= d]
        post = [v for step, v in loss if d < step <= d + after]
        if pre and post:
            out.append(max(post) - pre[-1])
    return sum(out) / len(out) if out else math.nan


def mechanism_table(results: Sequence[dict], massive_factor: float = 10.0) -> list[dict]:
    """Per arm (in first-seen order), over its runs and every selection and site:

    * ``massive_share``: fraction of picked indices that are massive by the rule of
      :func:`neurodetox.send.sensitivity.massive_indices` with ``massive_factor`` (mean ``|activation|``
      above ``massive_factor ×`` the site's lower median), whether or not the run excluded them;
    * ``picked_scale``: median over selections of (median mean ``|activation|`` of the picked indices) /
      (median over all indices of the site);
    * ``loss_jump``: mean over runs of :func:`_jump` (nats);
    * ``runs``: runs with at least one selection.
    """
    arms: list[str] = []
    for r in results:
        if r["arm"] not in arms:
            arms.append(r["arm"])
    rows = []
    for arm in arms:
        picked = massive_hits = 0
        scales, jumps, runs = [], [], 0
        for r in (r for r in results if r["arm"] == arm):
            sels = [s for s in r.get("selections") or [] if s.get("mean_abs")]
            runs += bool(sels)
            for sel in sels:
                for key, idx in sel["neurons"].items():
                    m = sel["mean_abs"].get(key)
                    if not m or not idx:
                        continue
                    med = _median(m)
                    picked += len(idx)
                    massive_hits += sum(m[i] > massive_factor * med for i in idx)
                    if med > 0:
                        scales.append(_median([m[i] for i in idx]) / med)
            j = _jump(r)
            if not math.isnan(j):
                jumps.append(j)
        rows.append(
            {
                "arm": arm,
                "runs": runs,
                "massive_share": massive_hits / picked if picked else math.nan,
                "picked_scale": _median(scales) if scales else math.nan,
                "loss_jump": sum(jumps) / len(jumps) if jumps else math.nan,
            }
        )
    return rows


def plot_mechanism(results: Sequence[dict], out_dir, massive_factor: float = 10.0) -> dict[str, Path]:
    """Write ``selection.png`` (first selection of each arm's first run) and ``drop_loss.png`` into ``out_dir``.

    In ``selection.png`` every index of the first site is a grey dot (index, mean ``|activation|``, log
    scale); picked indices are coloured; indices above ``massive_factor ×`` the median (the rule of
    :func:`neurodetox.send.sensitivity.massive_indices`) are circled in red, whether or not the run
    excluded them.

    Returns:
        ``{"selection": path, "drop_loss": path}`` for the figures that had data (possibly empty).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    arms: list[str] = []
    for r in results:
        if r["arm"] not in arms:
            arms.append(r["arm"])
    panels = []
    for arm in arms:
        first = next((p for r in results if r["arm"] == arm for p in [selection_points(r)] if p), None)
        if first:
            panels.append((arm, first))
    if panels:
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True, squeeze=False)
        for ax, (arm, p) in zip(axes[:, 0], panels):
            m = p["mean_abs"]
            med = _median(m)
            ax.scatter(range(len(m)), m, s=4, c="0.75", label="all indices")
            ax.scatter(p["picked"], [m[i] for i in p["picked"]], s=8, c="tab:blue", label="picked")
            big = [i for i, v in enumerate(m) if v > massive_factor * med]
            ax.scatter(big, [m[i] for i in big], s=60, facecolors="none", edgecolors="tab:red", label="massive")
            ax.set_yscale("log")
            ax.set_ylabel("mean |act|")
            ax.set_title(f"{arm}: {p['site']}, selection at step {p['step']}", fontsize=9)
        axes[0, 0].legend(fontsize=7, loc="upper right")
        axes[-1, 0].set_xlabel("index")
        fig.tight_layout()
        figures["selection"] = out_dir / "selection.png"
        fig.savefig(figures["selection"], dpi=110)
        plt.close(fig)
    curves = {arm: [pt for r in results if r["arm"] == arm for pt in loss_around_drops(r)] for arm in arms}
    curves = {a: c for a, c in curves.items() if c}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, pts in curves.items():
            by: dict[int, list[float]] = {}
            for x, y in pts:
                by.setdefault(x, []).append(y)
            xs = sorted(by)
            ax.plot(xs, [sum(by[x]) / len(by[x]) for x in xs], marker=".", label=arm)
        ax.axvline(0, color="0.5", ls="--", lw=1)
        ax.set_xlabel("optimizer steps since a drop")
        ax.set_ylabel("training loss (mean over drops and seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures["drop_loss"] = out_dir / "drop_loss.png"
        fig.savefig(figures["drop_loss"], dpi=110)
        plt.close(fig)
    return figures


def mechanism_markdown(
    results: Sequence[dict], figures: dict[str, Path], page: Path, massive_factor: float = 10.0
) -> str:
    """The study page's "Mechanism" section: :func:`mechanism_table` and the figures (links relative to ``page``)."""
    rows = [r for r in mechanism_table(results, massive_factor) if r["runs"]]
    if not rows:
        return ""

    def f(x, pct=False):
        return (
            "n/a"
            if x is None or (isinstance(x, float) and math.isnan(x))
            else (f"{100 * x:.0f}%" if pct else f"{x:.2f}")
        )

    L = [
        "",
        "## Mechanism: what the selections pick and what the drop does",
        "",
        "Per arm, over its runs, selections and sites: the share of picked indices that are massive "
        f"(mean |activation| on the tracking set above {massive_factor:g} × the site's median), the picked indices' median "
        "mean |activation| on the tracking set relative to the site's median, and the mean jump of the "
        "training loss at a drop (largest logged loss in the 10 steps after it minus the last one before).",
        "",
        "| arm | runs | picked massive | picked scale (× median) | loss jump at a drop (nats) |",
        "|---|---|---|---|---|",
    ]
    L += [
        f"| {r['arm']} | {r['runs']} | {f(r['massive_share'], True)} | {f(r['picked_scale'])} | {f(r['loss_jump'])} |"
        for r in rows
    ]
    for key, title in (
        ("selection", "indices picked vs mean |activation| (massive circled)"),
        ("drop_loss", "training loss around drops"),
    ):
        if key in figures:
            L += ["", f"![{title}]({os.path.relpath(figures[key], page.parent)})"]
    return "\n".join(L) + "\n"
