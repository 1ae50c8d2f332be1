"""The study's results page (markdown) and its training-curve figures (one PNG per metric, arms overlaid)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from neurodetox.core.io import atomic_write
from neurodetox.experiment.stats import METRICS, arm_table, fmt, fmt_interval, paired_difference, verdict

__all__ = ["CURVES", "plot_curves", "render_markdown"]

#: Curves drawn, as (key in a run's ``curves``, title, file stem).
CURVES = (
    ("loss", "training loss", "loss"),
    ("eigenscore", "mean EigenScore during training (nats), eval subset of the test split", "eigenscore"),
    ("accuracy", "factual accuracy during training, eval subset of the test split", "accuracy"),
)


def _arms(results: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["arm"] not in seen:
            seen.append(r["arm"])
    return seen


def plot_curves(results: Sequence[dict], out_dir) -> dict[str, Path]:
    """One PNG per curve: each arm's mean over seeds (thick) and each seed (thin), against optimizer step.

    Returns:
        ``{curve key: png path}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for key, title, stem in CURVES:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for i, arm in enumerate(_arms(results)):
            c = colors[i % len(colors)]
            per_step = defaultdict(list)
            for r in (r for r in results if r["arm"] == arm):
                pts = r["curves"].get(key, [])
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
                for x, y in pts:
                    per_step[x].append(y)
            if per_step:
                xs = sorted(per_step)
                ax.plot(
                    xs,
                    [sum(per_step[x]) / len(per_step[x]) for x in xs],
                    color=c,
                    linewidth=2,
                    marker="o" if len(xs) < 12 else None,
                    label=f"{arm} (n={len(set(r['seed'] for r in results if r['arm'] == arm))})",
                )
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{stem}.png"
        atomic_write(p, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        paths[key] = p
    return paths


def _settings_lines(results: Sequence[dict], plan_info: dict) -> list[str]:
    r0 = results[0]
    f = {k: v for k, v in r0["fields"].items() if k not in ("send_mode", "seed", "output_dir", "overwrite_output_dir")}
    lines = [
        f"- recipe: `{plan_info['recipe']}`; overrides on every run: "
        + (", ".join(f"`{k}={v}`" for k, v in f.items()) or "none"),
        f"- seeds: {', '.join(str(s) for s in plan_info['seeds'])}; arms: {', '.join(_arms(results))}",
        f"- optimizer steps per run: {sorted({r['global_steps'] for r in results})}",
        f"- probe sets: test split n={r0['details']['test']['n']}; first paraphrase of "
        f"n={r0['details']['paraphrase']['n']} training facts (seeded sample); EigenScore K="
        f"{r0['details']['settings']['k']}, temperature {r0['details']['settings']['temperature']}, "
        f"sampling seed {r0['details']['settings']['seed']} for every run",
        "- dataset-level EES: SeND sentence embeddings (½(mean + last token)) at the run's SeND site of each "
        f"set's statements, shape {r0['details']['test']['embedding_shape']} for test "
        f'(route `{r0["details"]["test"]["ees_method"]}` chosen by `method="auto"`)',
        "- perplexity: `neurodetox.data.reference.REFERENCE_TEXTS` (40 general English sentences, no facts)",
    ]
    sites = {r["fields"].get("send_site", "the recipe's") for r in results}
    if len(sites) > 1:
        lines.append(
            "- **caution:** arms use different SeND sites (" + ", ".join(sorted(sites)) + "); the "
            "dataset-level EES is measured at each run's own site, so it is comparable only between arms "
            "with the same site (an `mlp` site has 1536 neurons per layer against 576 for `residual`)"
        )
    for arm in _arms(results):
        drops = [d for r in results if r["arm"] == arm for d in r["sensitive_neurons"]]
        if drops:
            steps = sorted({d["step"] for d in drops})
            sizes = sorted({n for d in drops for n in d["dropped"].values()})
            lines.append(f"- `{arm}`: neurons dropped at steps {steps} ({', '.join(map(str, sizes))} per site)")
    return lines


def _statement(results: Sequence[dict], comparisons: list[tuple[str, str]]) -> list[str]:
    out = []
    key_metrics = [
        m
        for m in METRICS
        if m.key
        in ("test_accuracy", "paraphrase_accuracy", "test_eigenscore", "test_token_entropy", "reference_perplexity")
    ]
    for a, b in comparisons:
        parts = []
        for m in key_metrics:
            d = paired_difference(results, a, b, m.key)
            if d["n"] == 0:
                continue
            parts.append(f"{m.label}: {fmt_interval(d, m.percent, True)} → **{verdict(d, m.better)}**")
        if parts:
            out.append(f"- **{a} − {b}** (paired by seed): " + "; ".join(parts) + ".")
    return out


def render_markdown(
    results: Sequence[dict], plan_info: dict, figures: dict[str, Path], page: Path, base: Optional[dict] = None
) -> str:
    """The results page: settings, per-arm table (with the untrained base model), paired differences, curves,
    and the data-driven statement."""
    arms = _arms(results)
    table = arm_table(results, arms)
    L = [
        f"# Does SeND reduce hallucination here? ({plan_info['model']})",
        "",
        f"Regenerate: `{plan_info['command']}`",
        "",
        f"{len(results)} runs, {plan_info['wall_minutes']:.0f} min of wall time for this study "
        f"on {plan_info['machine']}. Every number below was computed by that command; "
        "intervals are Student-t 95 % over seeds (paired by seed for differences).",
        "",
    ]
    L += ["## What the data support", ""]
    L += plan_info.get("statement_lines") or []
    L += _statement(results, plan_info["comparisons"])
    L += ["", "## Settings", ""] + _settings_lines(results, plan_info)
    bm = (base or {}).get("metrics", {})
    L += [
        "",
        "## Per arm: mean [95 % interval]",
        "",
        "| metric | base (untrained) | " + " | ".join(arms) + " |",
        "|---|---|" + "---|" * len(arms),
    ]
    for m in METRICS:
        L.append(
            f"| {m.label} | {fmt(bm.get(m.key, math.nan), m.percent)} | "
            + " | ".join(fmt_interval(table[a][m.key], m.percent) for a in arms)
            + " |"
        )
    L += [
        "",
        "## Paired differences: mean [95 % interval], verdict",
        "",
        "| metric | " + " | ".join(f"{a} − {b}" for a, b in plan_info["comparisons"]) + " |",
        "|---|" + "---|" * len(plan_info["comparisons"]),
    ]
    for m in METRICS:
        cells = []
        for a, b in plan_info["comparisons"]:
            d = paired_difference(results, a, b, m.key)
            cells.append(f"{fmt_interval(d, m.percent, True)} ({verdict(d, m.better)})" if d["n"] else "n/a")
        L.append(f"| {m.label} | " + " | ".join(cells) + " |")
    L += [
        "",
        "## Training curves (mean over seeds, thin lines: single seeds)",
        "",
        "Scored by the Trainer's evaluation every `eval_steps` on the first `eigenscore_num_prompts` test "
        "probes (the recipe's fields), so their level differs from the whole-split numbers above; "
        "compare arms, not levels.",
        "",
    ]
    for key, title, _ in CURVES:
        if key in figures:
            rel = os.path.relpath(figures[key], page.parent)
            L += [f"![{title}]({rel})", ""]
    L += [
        "## Per run",
        "",
        "| arm | seed | test acc | paraphrase acc | test EigenScore | test AUROC | perplexity | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (arms.index(r["arm"]), r["seed"])):
        m = r["metrics"]
        L.append(
            f"| {r['arm']} | {r['seed']} | {fmt(m['test_accuracy'], True)} | "
            f"{fmt(m['paraphrase_accuracy'], True)} | {fmt(m['test_eigenscore'])} | "
            f"{fmt(m['test_eigenscore_auroc'])} | {fmt(m['reference_perplexity'])} | "
            f"{m['train_seconds']:.0f} |"
        )
    return "\n".join(L) + "\n"


def nan_to_none(x):
    """JSON-safe copy (NaN → None)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return x
