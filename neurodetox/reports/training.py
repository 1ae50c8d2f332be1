"""Run reports: training-curve plot and the closing table."""

from __future__ import annotations

import json
from pathlib import Path

from neurodetox.core.io import atomic_write


def read_jsonl(path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
    return out


def plot_training_curves(metrics_jsonl, out_png) -> Path:
    """PNG with training loss, eval EigenScore and eval factual accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_jsonl)
    panels = [
        ("loss", "training loss", None),
        ("eval_loss", "eval loss (tracking set)", None),
        ("eval_eigenscore", "EigenScore (test probes)", "test_eigenscore"),
        ("eval_factual_accuracy", "factual accuracy (test probes)", "test_factual_accuracy"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title, full_key) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        full = [(r["step"], r[full_key]) for r in rows if full_key and full_key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label="during training (probe subset)")
        if full:
            xs, ys = zip(*full)
            ax.plot(xs, ys, "r*", markersize=12, label="before / after (full test split)")
            ax.legend(fontsize=7)
        if not pts and not full:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out_png


def summary_table(summary: dict):
    """A ``rich`` table of the run summary: accuracy and EigenScore before → after, neurons dropped."""
    from neurodetox.reports.tables import fitted_table

    def fmt(v, pct=False):
        if v is None:
            return "n/a"
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"

    rows = [
        (
            "factual accuracy (test)",
            fmt(summary.get("factual_accuracy_before"), True),
            fmt(summary.get("factual_accuracy_after"), True),
        ),
        ("EigenScore (test, mean)", fmt(summary.get("eigenscore_before")), fmt(summary.get("eigenscore_after"))),
    ]
    for sel in summary.get("sensitive_neurons", []):
        counts = ", ".join(f"{k}: {len(v)}" for k, v in sel["neurons"].items())
        rows.append((f"neurons dropped from step {sel['step']}", counts, ""))
    rows.append(("optimizer steps / train time", str(summary.get("global_steps")), f"{summary.get('train_seconds')} s"))
    return fitted_table(
        f"neurodetox run: send_mode={summary.get('send_mode')}, {summary.get('test_probes')} test probes",
        ("metric", "before", "after"),
        rows,
        wide=("metric", "before"),
        caption="full values in summary.json",
    )
