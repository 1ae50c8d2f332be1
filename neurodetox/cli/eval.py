"""``neurodetox eval``: hallucination-detection scores and their AUROC on fact probes.

    neurodetox eval --model smollm2-135m-instruct --data facts [--split test|all] [--max-probes N]
                    [--k 10] [--out runs/eval] [--report docs/results/detection.md]

For every probe prompt: the greedy answer and whether it is correct (gold
answer or an alias, after normalisation), and, on the same ``K`` samples,
EigenScore (exact and by EES), the feature-clipped EigenScore, perplexity,
length-normalised entropy, lexical similarity and answer length
(:func:`neurodetox.metrics.probes.score_probes`). Writes ``eval.json`` (per-prompt
records and the summary, atomically), ``roc.png`` and prints a table; with
``--report`` also a Markdown results page.
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import shlex
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["cmd_eval", "select_probes", "build_parser", "write_roc_png", "render_report"]

LABELS = {
    "eigenscore": "EigenScore (exact)",
    "eigenscore_ees": "EigenScore (EES, KPM)",
    "eigenscore_clipped": "EigenScore, feature-clipped",
    "perplexity": "Perplexity (greedy answer)",
    "ln_entropy": "LN-entropy (K samples)",
    "lexical_similarity": "Lexical similarity (ROUGE-L)",
    "length": "Answer length (tokens)",
}
BASELINES = ("perplexity", "ln_entropy", "lexical_similarity", "length")


def _fail(message: str) -> int:
    print(f"neurodetox eval: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neurodetox eval",
        description="Score hallucination detectors (EigenScore exact/EES/feature-clipped, perplexity, "
        "LN-entropy, lexical similarity, length) on fact probes; AUROC against correctness "
        "of the greedy answer with 95%% bootstrap intervals.",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="Model name, HF folder, PEFT adapter folder or .gguf (default: smollm2-135m-instruct).",
    )
    p.add_argument("--data", default="facts", help="'facts' (built-in GeoNames facts) or a fact file/folder.")
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "tracking", "train", "all"),
        help="Which probes (default test; 'all' = train+tracking+test, for a base model).",
    )
    p.add_argument(
        "--max-probes", type=int, default=None, help="Keep at most N probes, stratified across relations (seeded)."
    )
    p.add_argument("--data-seed", type=int, default=0, help="Split seed of the fact data (default 0).")
    p.add_argument("--k", type=int, default=10, help="Samples per prompt (INSIDE: 10).")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top-p", type=float, default=0.99)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--layer", default="middle", help="Embedding block (default: middle, as INSIDE).")
    p.add_argument("--pooling", default="last", choices=("last", "mean"))
    p.add_argument("--alpha", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-clip", action="store_true", help="Skip the feature-clipped EigenScore (one generate less).")
    p.add_argument("--no-ees", action="store_true", help="Skip EigenScore by EES.")
    p.add_argument("--clip-percentile", type=float, default=0.2)
    p.add_argument("--clip-bank-size", type=int, default=3000)
    p.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the intervals.")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default="runs/eval", help="Output folder (default runs/eval).")
    p.add_argument("--report", default=None, help="Also write a Markdown results page to this path.")
    p.add_argument("--no-progress", action="store_true")
    return p


def select_probes(records: Sequence[dict], max_probes: Optional[int], seed: int = 0) -> list[dict]:
    """At most ``max_probes`` records, stratified across relations (round-robin over
    seeded shuffles of each relation), in a deterministic order."""
    records = list(records)
    if max_probes is None or max_probes >= len(records):
        return records
    by_rel: dict = defaultdict(list)
    for r in records:
        by_rel[r.get("relation", "")].append(r)
    rng = random.Random(seed)
    for rel in sorted(by_rel):
        rng.shuffle(by_rel[rel])
    out: list = []
    rels = sorted(by_rel)
    i = 0
    while len(out) < max_probes:
        progressed = False
        for rel in rels:
            if i < len(by_rel[rel]) and len(out) < max_probes:
                out.append(by_rel[rel][i])
                progressed = True
        if not progressed:
            break
        i += 1
    return out


def write_roc_png(records: Sequence[dict], summary: dict, path: Path, title: str) -> Path:
    """ROC curve of every score (oriented by its direction) in one PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from neurodetox.core.io import atomic_write
    from neurodetox.metrics.auroc import roc_points

    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    y = np.array([not r["correct"] for r in records])
    for name, entry in summary.items():
        if not math.isfinite(entry.get("auroc", math.nan)):
            continue
        vals = np.array([np.nan if r.get(name) is None else r[name] for r in records], dtype=float)
        keep = np.isfinite(vals)
        fpr, tpr = roc_points(vals[keep], y[keep], entry["direction"])
        ax.plot(fpr, tpr, label=f"{LABELS.get(name, name)}: {entry['auroc']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (correct answers flagged)")
    ax.set_ylabel("true positive rate (hallucinations flagged)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()

    def w(tmp):
        fig.savefig(tmp, format="png", dpi=110)

    try:
        atomic_write(path, w)
    finally:
        plt.close(fig)
    return path


def _table(summary: dict, title: str):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("score")
    t.add_column("higher =", justify="center")
    t.add_column("AUROC", justify="right")
    t.add_column("95% CI", justify="right")
    t.add_column("n", justify="right")
    for name, e in sorted(summary.items(), key=lambda kv: -(kv[1]["auroc"] if math.isfinite(kv[1]["auroc"]) else -1)):
        ci = f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}]" if math.isfinite(e["auroc"]) else e.get("note", "")
        t.add_row(
            LABELS.get(name, name),
            "halluc." if e["direction"] > 0 else "correct",
            f"{e['auroc']:.3f}" if math.isfinite(e["auroc"]) else "n/a",
            ci,
            str(e["n"]),
        )
    return t


def _per_relation(records: Sequence[dict], names: Sequence[str]) -> list[dict]:
    import numpy as np

    from neurodetox.metrics.auroc import auroc
    from neurodetox.metrics.baselines import HALLUCINATION_DIRECTION

    rows = []
    by_rel: dict = defaultdict(list)
    for r in records:
        by_rel[r.get("relation", "")].append(r)
    for rel in sorted(by_rel):
        rs = by_rel[rel]
        row = {"relation": rel, "n": len(rs), "accuracy": sum(r["correct"] for r in rs) / len(rs)}
        y = np.array([not r["correct"] for r in rs])
        for name in names:
            v = np.array([np.nan if r.get(name) is None else r[name] for r in rs], dtype=float)
            keep = np.isfinite(v)
            try:
                row[name] = auroc(v[keep], y[keep], HALLUCINATION_DIRECTION.get(name, 1))
            except ValueError:
                row[name] = math.nan
        rows.append(row)
    return rows


def render_report(result: dict, roc_png: Optional[str] = None) -> str:
    """The Markdown results page for an ``eval.json`` dict (see :func:`cmd_eval`)."""
    import numpy as np

    from neurodetox.metrics.auroc import paired_auroc_difference
    from neurodetox.metrics.baselines import HALLUCINATION_DIRECTION

    summ = result["summary"]
    recs = result["records"]
    s = result["settings"]
    n = len(recs)
    n_h = sum(not r["correct"] for r in recs)
    rel_counts = Counter(r.get("relation", "") for r in recs)
    ok = {k: v for k, v in summ.items() if math.isfinite(v["auroc"])}
    ranked = sorted(ok, key=lambda k: -ok[k]["auroc"])
    lines = [
        f"# Hallucination detection on fact probes: {result['model']}",
        "",
        "Regenerate this page (one command, ~" + f"{max(1, round(result['wall_seconds'] / 60))} min on this machine):",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        "## Setup",
        "",
        f"* Model: `{result['model']}` (the base model, never fine-tuned on these facts).",
        f"* Probes: {n} fact prompts from the built-in GeoNames facts, split `{result['split']}`, stratified across "
        "relations: " + ", ".join(f"{k} {v}" for k, v in sorted(rel_counts.items())) + ".",
        f"* Label: the greedy answer (max {s['max_new_tokens']} new tokens) is *correct* when its first line contains "
        "the gold answer or an alias after normalisation (lowercase, accents, punctuation and articles removed) — "
        "the lenient label common in this literature. "
        f"Greedy accuracy {result['factual_accuracy']:.1%}: {n_h} hallucinated, {n - n_h} correct.",
        f"* Samples: K = {s['k']} per prompt in one batched `generate` per batch of prompts, temperature "
        f"{s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']} (INSIDE's settings); embeddings from the "
        f"`{s['layer']}` block at the last generated token (pooling `{s['pooling']}`), α = {s['alpha']}.",
        f'* EigenScore (EES): the KPM estimator of `neurodetox.metrics.ees` (`method="kpm"`, tol {s["ees_tol"]}) '
        "on the same embeddings. Feature-clipped EigenScore: a second sampled generation with INSIDE's feature "
        f"clipping (penultimate block, [{s['clip_percentile']}%, {100 - s['clip_percentile']}%] percentiles over a "
        f"{s['clip_bank_size']}-token memory bank).",
        "* Baselines on the same samples: perplexity of the greedy answer, length-normalised entropy of the K "
        "samples, mean pairwise ROUGE-L between samples (`rouge-score`), greedy answer length in tokens.",
        "* AUROC: `sklearn.metrics.roc_auc_score` for detecting a hallucinated (wrong) greedy answer, every score "
        "oriented in advance (higher = hallucination, except lexical similarity: higher = correct); 95% intervals "
        f"from {result['n_boot']} bootstrap resamples of the prompts.",
        "",
        "## Results",
        "",
        "| score | higher means | AUROC | 95% CI | n |",
        "|---|---|---|---|---|",
    ]
    for name in ranked + [k for k in summ if k not in ok]:
        e = summ[name]
        if name in ok:
            lines.append(
                f"| {LABELS.get(name, name)} | {'hallucination' if e['direction'] > 0 else 'correct'} | "
                f"{e['auroc']:.3f} | [{e['ci_low']:.3f}, {e['ci_high']:.3f}] | {e['n']} |"
            )
        else:
            lines.append(f"| {LABELS.get(name, name)} | | n/a | {e.get('note', '')} | {e['n']} |")
    if roc_png:
        lines += ["", f"ROC curves: `{roc_png}` (written by the same command; not committed)."]
    lines += ["", "## Finding", ""]

    def col(name):
        return np.array([np.nan if r.get(name) is None else r[name] for r in recs], dtype=float)

    y = np.array([not r["correct"] for r in recs])
    if ranked and "eigenscore" in ok:
        best = ranked[0]
        es = ok["eigenscore"]
        best_base = max((b for b in BASELINES if b in ok), key=lambda b: ok[b]["auroc"], default=None)
        if best == "eigenscore" or best.startswith("eigenscore"):
            lines.append(
                f"**{LABELS[best]} wins** with AUROC {ok[best]['auroc']:.3f} "
                f"[{ok[best]['ci_low']:.3f}, {ok[best]['ci_high']:.3f}]."
            )
        else:
            lines.append(
                f"**A baseline wins: {LABELS[best]}**, AUROC {ok[best]['auroc']:.3f} "
                f"[{ok[best]['ci_low']:.3f}, {ok[best]['ci_high']:.3f}], against EigenScore's "
                f"{es['auroc']:.3f} [{es['ci_low']:.3f}, {es['ci_high']:.3f}]."
            )
        if best_base is not None:
            a, b = col("eigenscore"), col(best_base)
            keep = np.isfinite(a) & np.isfinite(b)
            d, lo, hi = paired_auroc_difference(
                a[keep],
                b[keep],
                y[keep],
                HALLUCINATION_DIRECTION["eigenscore"],
                HALLUCINATION_DIRECTION[best_base],
                n_boot=result["n_boot"],
                seed=s["seed"],
            )
            verdict = (
                "the interval excludes 0"
                if lo > 0 or hi < 0
                else "the interval includes 0, so this sample cannot tell them apart"
            )
            lines.append("")
            lines.append(
                f"EigenScore minus the best baseline ({LABELS[best_base]}): ΔAUROC = {d:+.3f}, paired "
                f"bootstrap 95% CI [{lo:+.3f}, {hi:+.3f}]; {verdict}."
            )
        for other in ("eigenscore_ees", "eigenscore_clipped"):
            if other in ok:
                a, b = col(other), col("eigenscore")
                keep = np.isfinite(a) & np.isfinite(b)
                d, lo, hi = paired_auroc_difference(
                    a[keep], b[keep], y[keep], 1, 1, n_boot=result["n_boot"], seed=s["seed"]
                )
                extra = ""
                if other == "eigenscore_ees":
                    extra = f" Largest per-prompt |EES − exact| = {np.nanmax(np.abs(a - b)):.2e} nats."
                if other == "eigenscore_clipped" and result.get("info", {}).get("clipping"):
                    c = result["info"]["clipping"]
                    extra = (
                        f" Clipping clamped {c['clamped_calls']} forward calls; with the same sampling seed, "
                        f"{c['prompts_with_different_samples']} of {n} prompts got different samples. (The "
                        "embedding block sits before the clipped penultimate block, so clipping changes the "
                        "score only through the tokens it makes the model sample.)"
                    )
                lines.append("")
                lines.append(
                    f"{LABELS[other]} minus exact EigenScore: ΔAUROC = {d:+.3f} [{lo:+.3f}, {hi:+.3f}].{extra}"
                )
    lines += ["", "### Per relation (AUROC, no intervals: small groups)", ""]
    names = ranked
    rows = _per_relation(recs, names)
    lines.append("| relation | n | accuracy | " + " | ".join(LABELS.get(k, k) for k in names) + " |")
    lines.append("|---|---|---|" + "---|" * len(names))
    for r in rows:
        lines.append(
            f"| {r['relation']} | {r['n']} | {r['accuracy']:.1%} | "
            + " | ".join("n/a" if not math.isfinite(r[k]) else f"{r[k]:.3f}" for k in names)
            + " |"
        )
    lines += [
        "",
        "## Caveats",
        "",
        "* One small model (135M parameters) and short factual answers; INSIDE's reported gains are for 7B+ "
        'models on open QA. The labels are lenient (substring match), and "The Illusion of Progress" '
        "(EMNLP 2025) shows such AUROCs move under stricter labels; length is reported as the baseline it "
        "recommends.",
        "* Pooled AUROC mixes relations whose accuracy differs a lot; a score that only recognises the relation "
        "can look good pooled. The per-relation table shows what remains within a relation.",
        f"* Timings on this run: sampling {result['timings'].get('sampling', 0):.0f} s, clipped sampling "
        f"{result['timings'].get('clipped_sampling', 0):.0f} s, scores {result['timings'].get('scores', 0):.0f} s, "
        f"bootstrap {result['timings'].get('bootstrap', 0):.0f} s; wall {result['wall_seconds']:.0f} s "
        f"({result.get('machine', '')}).",
        "",
    ]
    return "\n".join(lines)


def cmd_eval(argv: Sequence[str]) -> int:
    """Entry point of ``neurodetox eval``; returns the exit status (0 ok, 2 error)."""
    args = build_parser().parse_args(list(argv))
    t_start = time.perf_counter()
    import warnings

    from rich.console import Console

    from neurodetox.core.io import atomic_write_json, atomic_write_text
    from neurodetox.data import load_facts
    from neurodetox.metrics.probes import EigenScoreSettings, score_probes

    console = Console()
    if args.max_probes is not None and args.max_probes < 1:
        return _fail(f"--max-probes must be >= 1, got {args.max_probes} (empty probe set)")
    settings = EigenScoreSettings(
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        layer=args.layer,
        alpha=args.alpha,
        batch_size=args.batch_size,
        seed=args.seed,
        pooling=args.pooling,
        clip_percentile=args.clip_percentile,
        clip_bank_size=args.clip_bank_size,
    )
    try:
        settings.validate()
        ds = load_facts(args.data, seed=args.data_seed)
    except (ValueError, FileNotFoundError, TypeError) as e:
        return _fail(str(e))
    splits = ("train", "tracking", "test") if args.split == "all" else (args.split,)
    records = [r for sp in splits for r in ds[sp]]
    records = select_probes(records, args.max_probes, seed=args.seed)
    if not records:
        return _fail(f"no probes in split {args.split!r} of {args.data!r} (empty probe set)")
    try:
        from neurodetox.core.models import load_model

        model, tok = load_model(args.model, dtype=args.dtype)
    except (ValueError, FileNotFoundError, OSError, ModuleNotFoundError) as e:
        return _fail(f"cannot load model {args.model!r}: {e}")
    prompts = [r["prompt"] for r in records]
    aliases = [list(r["aliases"]) or [r["answer"]] for r in records]
    relations = [r.get("relation", "") for r in records]
    console.print(f"[bold]neurodetox eval[/]: {len(prompts)} probes, K={args.k}, model {args.model}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            res = score_probes(
                model,
                tok,
                prompts,
                aliases,
                settings,
                relations=relations,
                clipped=not args.no_clip,
                ees=not args.no_ees,
                n_boot=args.bootstrap,
                show_progress=not args.no_progress,
            )
        for w in caught:
            console.print(f"[yellow]warning:[/] {w.message}")
    except ValueError as e:
        return _fail(str(e))
    wall = time.perf_counter() - t_start
    out = Path(args.out)
    argv_shown = " ".join(shlex.quote(a) for a in argv)
    result = {
        "command": f"neurodetox eval {argv_shown}".strip(),
        "model": args.model,
        "data": args.data,
        "split": args.split,
        "n_probes": len(prompts),
        "factual_accuracy": res.factual_accuracy,
        "settings": res.settings,
        "n_boot": args.bootstrap,
        "summary": res.summary,
        "timings": res.timings,
        "info": res.info,
        "wall_seconds": wall,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, torch threads "
        f"{__import__('torch').get_num_threads()}",
        "records": res.records,
    }
    atomic_write_json(out / "eval.json", result)
    title = f"{args.model}: {len(prompts)} probes, accuracy {res.factual_accuracy:.1%}"
    try:
        write_roc_png(res.records, res.summary, out / "roc.png", title)
    except ValueError as e:  # e.g. a single class: nothing to plot
        console.print(f"[yellow]no ROC plot:[/] {e}")
    console.print(_table(res.summary, title))
    if args.report:
        rep = Path(args.report)
        atomic_write_text(rep, render_report(result, roc_png=str(out / "roc.png")))
        console.print(f"report: {rep}")
    console.print(f"wrote {out / 'eval.json'}, {out / 'roc.png'}  ({wall:.0f} s)")
    return 0
