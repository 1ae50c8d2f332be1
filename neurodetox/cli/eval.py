"""``neurodetox eval``: every hallucination detector and its AUROC on fact probes.

    neurodetox eval [--model smollm2-135m-instruct] [--data facts|FILE] [--split test|tracking|train|all]
                    [--max_probes N] [--stop inside|none|'S1|S2'] [--prompt_format raw|qa1shot|chat]
                    [--k 10] [--output_dir runs/eval] [--report docs/results/detection.md]

For every probe prompt: the greedy answer and whether it is correct (gold answer or an alias,
after normalisation), and, on the same ``K`` samples, every detector of
:func:`neurodetox.metrics.probes.score_probes`: EigenScore (exact, by EES, feature-clipped),
perplexity, LN-entropy, lexical similarity, answer length, discrete semantic entropy, distinct
answers, maximum sequence probability, and the hidden-state probe trained on labelled probes
disjoint from the scored ones (the data's other probes: the train and tracking splits for
``--split test``, the probes not selected for ``--split all --max_probes N``). Every answer ends
at the answer boundary (``--stop``, INSIDE's by default). Writes ``eval.json`` (per-prompt
records and the summary, atomically), ``roc.png`` and prints a table; with ``--report`` also a
Markdown results page (``--compare`` adds other runs' ``eval.json`` to it).

The flags are the fields of :class:`~neurodetox.core.settings.ModelArguments`,
:class:`~neurodetox.data.settings.FactDataArguments`, :class:`EvalArguments` and
:class:`~neurodetox.metrics.settings.EigenScoreSettings` (``neurodetox eval --help``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shlex
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from neurodetox.core.args import command_parser, parse_command, user_errors_exit_2
from neurodetox.core.checks import check_int
from neurodetox.core.errors import UserError
from neurodetox.core.settings import ModelArguments
from neurodetox.data.settings import FactDataArguments
from neurodetox.metrics.settings import EigenScoreSettings

__all__ = ["EvalArguments", "cmd_eval", "select_probes", "build_parser", "write_roc_png", "render_report"]

SPLITS = ("test", "tracking", "train", "all")

LABELS = {
    "eigenscore": "EigenScore (exact)",
    "eigenscore_ees": "EigenScore (EES, KPM)",
    "eigenscore_clipped": "EigenScore, feature-clipped",
    "perplexity": "Perplexity (greedy answer)",
    "ln_entropy": "LN-entropy (K samples)",
    "lexical_similarity": "Lexical similarity (ROUGE-L)",
    "length": "Answer length (tokens)",
    "semantic_entropy": "Semantic entropy (discrete)",
    "distinct_answers": "Distinct answers",
    "sequence_nll": "Max. sequence probability (−log P)",
    "hidden_probe": "Hidden-state probe (logistic)",
}
POSITIONS = {
    "prompt": "the last prompt token",
    "answer": "the last answer token",
    "both": "the last prompt token and the last answer token (concatenated)",
}
BASELINES = ("perplexity", "ln_entropy", "lexical_similarity", "length")
#: What each detector needs generated, and which timing entries are its own computation.
NEEDS = {
    "eigenscore": ("sampled", ("eigenscore",)),
    "eigenscore_ees": ("sampled", ("eigenscore_ees",)),
    "eigenscore_clipped": ("sampled (a second, clipped generation)", ("clipped_sampling",)),
    "perplexity": ("greedy", ("perplexity",)),
    "ln_entropy": ("sampled", ("ln_entropy",)),
    "lexical_similarity": ("sampled", ("lexical_similarity",)),
    "length": ("greedy", ("length",)),
    "semantic_entropy": ("sampled", ("semantic_entropy",)),
    "distinct_answers": ("sampled", ("distinct_answers",)),
    "sequence_nll": ("greedy", ("sequence_nll",)),
    "hidden_probe": (
        "greedy + one forward, and the labelled probes' greedy answers",
        ("hidden_probe_forward", "hidden_probe_features", "hidden_probe_fit", "hidden_probe_score"),
    ),
}


@dataclass
class EvalArguments:
    """What ``neurodetox eval`` scores and where it writes.

    Attributes:
        split: ``test`` (default), ``tracking``, ``train`` or ``all`` (train + tracking + test,
            for a base model).
        max_probes: keep at most N scored probes, stratified across relations (seeded).
        output_dir: output folder for ``eval.json`` and ``roc.png`` (alias ``--out``).
        overwrite: replace an existing ``eval.json`` there.
        report: also write a Markdown results page here.
        compare: other runs' ``eval.json`` files shown in the report beside this run.
        report_from: only render ``report`` from this ``eval.json`` (no model, no scoring).
        report_prelude: commands listed first in the report's regenerate block.
        bootstrap: bootstrap resamples of each AUROC interval.
        clip: also compute the feature-clipped EigenScore (one more sampled generation).
        ees: also compute EigenScore by EES.
        hidden_probe: train and score the hidden-state probe.
        probe_max_train: cap on the labelled probes the hidden-state probe is trained on.
        progress: progress bars.

    Raises:
        UserError: an unknown split or a count below 1.
    """

    split: str = field(default="test", metadata={"help": "Scored probes: test, tracking, train or all."})
    max_probes: Optional[int] = field(
        default=None, metadata={"help": "Keep at most N scored probes, stratified across relations (seeded)."}
    )
    output_dir: str = field(
        default="runs/eval", metadata={"help": "Output folder (eval.json, roc.png).", "aliases": ["--out"]}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing eval.json in --output_dir."})
    report: Optional[str] = field(default=None, metadata={"help": "Also write a Markdown results page here."})
    compare: list[str] = field(
        default_factory=list,
        metadata={"help": "Other runs' eval.json files, shown in the report beside this run (e.g. --stop none)."},
    )
    report_from: Optional[str] = field(
        default=None,
        metadata={
            "help": "Only write --report from this eval.json (and --compare files): no model, no scoring, "
            "no --output_dir."
        },
    )
    report_prelude: list[str] = field(
        default_factory=list,
        metadata={"help": "Commands listed first in the report's regenerate block (e.g. how a fact file was built)."},
    )
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples of each AUROC interval."})
    clip: bool = field(default=True, metadata={"help": "Feature-clipped EigenScore (one more sampled generate)."})
    ees: bool = field(default=True, metadata={"help": "EigenScore by EES (KPM) too."})
    hidden_probe: bool = field(
        default=True, metadata={"help": "Hidden-state probe, trained on the data's probes not scored here."}
    )
    probe_max_train: Optional[int] = field(
        default=None, metadata={"help": "Cap on the labelled probes the hidden-state probe is trained on."}
    )
    progress: bool = field(default=True, metadata={"help": "Progress bars."})

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.max_probes is not None:
            check_int("max_probes", self.max_probes, minimum=1)
        check_int("bootstrap", self.bootstrap, minimum=1)
        if self.probe_max_train is not None:
            check_int("probe_max_train", self.probe_max_train, minimum=1)


def build_parser():
    """The ``neurodetox eval`` parser: one flag per field of its four settings dataclasses."""
    return command_parser(
        "neurodetox eval",
        "Score every hallucination detector (EigenScore exact/EES/feature-clipped, perplexity, LN-entropy, lexical "
        "similarity, length, semantic entropy, distinct answers, maximum sequence probability, hidden-state probe) "
        "on fact probes; AUROC against correctness of the greedy answer with 95%% bootstrap intervals.",
        (ModelArguments, FactDataArguments, EvalArguments, EigenScoreSettings),
    )


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
    from neurodetox.reports.tables import fitted_table

    rows = []
    for name, e in sorted(summary.items(), key=lambda kv: -(kv[1]["auroc"] if math.isfinite(kv[1]["auroc"]) else -1)):
        ci = f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}]" if math.isfinite(e["auroc"]) else e.get("note", "")
        rows.append(
            (
                LABELS.get(name, name),
                "halluc." if e["direction"] > 0 else "correct",
                f"{e['auroc']:.3f}" if math.isfinite(e["auroc"]) else "n/a",
                ci,
                str(e["n"]),
            )
        )
    return fitted_table(
        title,
        ("score", "higher =", "AUROC", "95% CI", "n"),
        rows,
        wide=("score", "95% CI"),
        justify={"higher =": "center", "AUROC": "right", "95% CI": "right", "n": "right"},
    )


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


def _describe(result: dict) -> str:
    s = result["settings"]
    return (
        f"`{result['model']}` on `{result['data']}` split `{result['split']}`, {result['n_probes']} probes, "
        f"stop `{s.get('stop', 'none')}`, prompt format `{s.get('prompt_format', 'raw')}`, K = {s['k']}: "
        f"greedy accuracy {result['factual_accuracy']:.1%}"
    )


def _ranked(summ: dict) -> list[str]:
    ok = {k: v for k, v in summ.items() if math.isfinite(v["auroc"])}
    return sorted(ok, key=lambda k: -ok[k]["auroc"]) + [k for k in summ if k not in ok]


def _summary_rows(summ: dict) -> list[str]:
    lines = ["| detector | higher means | AUROC | 95% CI | n |", "|---|---|---|---|---|"]
    for name in _ranked(summ):
        e = summ[name]
        if math.isfinite(e["auroc"]):
            lines.append(
                f"| {LABELS.get(name, name)} | {'hallucination' if e['direction'] > 0 else 'correct'} | "
                f"{e['auroc']:.3f} | [{e['ci_low']:.3f}, {e['ci_high']:.3f}] | {e['n']} |"
            )
        else:
            lines.append(f"| {LABELS.get(name, name)} | | n/a | {e.get('note', '')} | {e['n']} |")
    return lines


def _relation_rows(recs: Sequence[dict], names: Sequence[str]) -> list[str]:
    rows = _per_relation(recs, names)
    lines = ["| relation | n | accuracy | " + " | ".join(LABELS.get(k, k) for k in names) + " |"]
    lines.append("|---|---|---|" + "---|" * len(names))
    for r in rows:
        lines.append(
            f"| {r['relation']} | {r['n']} | {r['accuracy']:.1%} | "
            + " | ".join("n/a" if not math.isfinite(r[k]) else f"{r[k]:.3f}" for k in names)
            + " |"
        )
    return lines


def _targets_line(result: dict) -> str:
    """Issue 16's targets (EigenScore ≥ 0.75, best detector ≥ 0.85) checked on one run."""
    ok = {k: v for k, v in result["summary"].items() if math.isfinite(v["auroc"])}
    if "eigenscore" not in ok:
        return "Targets: EigenScore AUROC undefined on this run."
    best = max(ok, key=lambda k: ok[k]["auroc"])
    es, b = ok["eigenscore"], ok[best]
    return (
        f"Targets (issue 16, base model; {result['n_probes']} probes of split `{result['split']}`): EigenScore AUROC "
        f"≥ 0.75 — {'met' if es['auroc'] >= 0.75 else 'not met'} ({es['auroc']:.3f} [{es['ci_low']:.3f}, "
        f"{es['ci_high']:.3f}]); best detector ≥ 0.85 — {'met' if b['auroc'] >= 0.85 else 'not met'} "
        f"({LABELS.get(best, best)} {b['auroc']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}])."
    )


def _cost_rows(result: dict) -> list[str]:
    t = result["timings"]
    n = max(1, result["n_probes"])
    gen = {"greedy": t.get("greedy_generate", 0.0), "sampled": t.get("sampled_generate", 0.0)}
    lines = [
        f"Shared generation on this run: greedy answers {gen['greedy']:.1f} s, the K sampled answers "
        f"{gen['sampled']:.1f} s (one batched `generate` per batch of prompts, with the embedding hook).",
        "",
        "| detector | needs | own computation (s) | total with the generation it needs (s) | per probe (ms) |",
        "|---|---|---|---|---|",
    ]
    for name in _ranked(result["summary"]):
        needs, keys = NEEDS.get(name, ("sampled", (name,)))
        own = sum(t.get(k, 0.0) for k in keys)
        base = gen["greedy"] + (gen["sampled"] if needs.startswith("sampled") else 0.0)
        if name == "eigenscore_clipped":
            base = gen["greedy"]
        lines.append(
            f"| {LABELS.get(name, name)} | {needs} | {own:.2f} | {own + base:.1f} | {1000 * (own + base) / n:.0f} |"
        )
    return lines


def render_report(
    result: dict,
    roc_png: Optional[str] = None,
    others: Sequence[dict] = (),
    report_command: Optional[str] = None,
    prelude: Sequence[str] = (),
) -> str:
    """The Markdown results page for an ``eval.json`` dict (see :func:`cmd_eval`), with ``others``
    (more ``eval.json`` dicts, e.g. the same probes with ``--stop none`` or another fact source)
    summarised beside it; ``report_command`` (the ``--report_from`` command) is listed last."""
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
    ranked = [k for k in _ranked(summ) if k in ok]
    wall = result["wall_seconds"] + sum(o["wall_seconds"] for o in others)
    probe = result.get("info", {}).get("hidden_probe")
    lines = [
        f"# Hallucination detection on fact probes: {result['model']}",
        "",
        f"Regenerate this page ({len(prelude) + len(others) + 1 + bool(report_command)} commands, "
        f"~{max(1, round(wall / 60))} min of scoring on this machine):",
        "",
        "```bash",
        *prelude,
        *[o["command"] for o in others],
        result["command"],
        *([report_command] if report_command else []),
        "```",
        "",
        "## Setup",
        "",
        f"* Model: `{result['model']}` (the base model, never fine-tuned on these facts).",
        f"* Probes: {n} fact prompts from `{result['data']}`, split `{result['split']}`, stratified across "
        "relations: " + ", ".join(f"{k} {v}" for k, v in sorted(rel_counts.items())) + ".",
        f"* Answer boundary: `stop = {s.get('stop')}`"
        + (
            " — every answer, greedy and sampled, ends before the first token whose text starts with a line break, "
            "or the `.` / `,` token (INSIDE's generation, alibaba/eigenscore `dataeval/*.py` `_generate_config`); "
            "the embedded token is the last one before the stop."
            if s.get("stop") == "inside"
            else "."
        )
        + f" Prompt format `{s.get('prompt_format', 'raw')}`.",
        f"* Label: the greedy answer (max {s['max_new_tokens']} new tokens) is *correct* when its first line contains "
        "the gold answer or an alias after normalisation (lowercase, accents, punctuation and articles removed). "
        f"Greedy accuracy {result['factual_accuracy']:.1%}: {n_h} hallucinated, {n - n_h} correct.",
        f"* Samples: K = {s['k']} per prompt in one batched `generate` per batch of prompts, temperature "
        f"{s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']} (INSIDE's settings); embeddings from the "
        f"`{s['layer']}` block at the last answer token (pooling `{s['pooling']}`), α = {s['alpha']} "
        "(INSIDE's convention: the K × K matrix divided by d − 1).",
        f'* EigenScore (EES): the KPM estimator of `neurodetox.metrics.ees` (`method="kpm"`, tol {s["ees_tol"]}). '
        f"Feature-clipped EigenScore: a second sampled generation with INSIDE's feature clipping (penultimate "
        f"block, [{s['clip_percentile']}%, {100 - s['clip_percentile']}%] percentiles over a {s['clip_bank_size']}-"
        "token memory bank).",
        "* Other detectors on the same samples: perplexity and maximum sequence probability (−log P) of the greedy "
        "answer, length-normalised entropy, lexical similarity (mean pairwise ROUGE-L), discrete semantic entropy "
        "and the number of distinct answers of the K samples (clusters: equal after answer normalisation, the "
        "fact's aliases merged), greedy answer length.",
    ]
    if probe:
        lines.append(
            f"* Hidden-state probe: scikit-learn `LogisticRegressionCV` (standardised inputs, C chosen by cross-validated AUROC "
            f"on the training probes: {probe['C']:g}) on block `{probe['layer']}`'s output at "
            f"{POSITIONS[probe['position']]}, "
            f"trained on {probe['n_train']} labelled probes ({probe['n_train_hallucinated']} hallucinated) from "
            f"{result.get('probe_source', 'other probes')}, disjoint from the scored ones."
        )
    lines += [
        "* AUROC: `sklearn.metrics.roc_auc_score` for detecting a hallucinated (wrong) greedy answer, every score "
        "oriented in advance (higher = hallucination, except lexical similarity: higher = correct); 95% intervals "
        f"from {result['n_boot']} bootstrap resamples of the prompts.",
        "",
        "## Results",
        "",
        *_summary_rows(summ),
    ]
    if roc_png:
        lines += ["", f"ROC curves: `{roc_png}` (written by the same command; not committed)."]
    lines += ["", "## Finding", ""]

    def col(name):
        return np.array([np.nan if r.get(name) is None else r[name] for r in recs], dtype=float)

    y = np.array([not r["correct"] for r in recs])
    if ranked and "eigenscore" in ok:
        best, es = ranked[0], ok["eigenscore"]
        lines.append(
            f"**Best: {LABELS.get(best, best)}**, AUROC {ok[best]['auroc']:.3f} "
            f"[{ok[best]['ci_low']:.3f}, {ok[best]['ci_high']:.3f}]; EigenScore {es['auroc']:.3f} "
            f"[{es['ci_low']:.3f}, {es['ci_high']:.3f}]."
        )
        lines.append("")
        lines.append(_targets_line(result))
        if best != "eigenscore":
            a, b = col("eigenscore"), col(best)
            keep = np.isfinite(a) & np.isfinite(b)
            d, lo, hi = paired_auroc_difference(
                a[keep],
                b[keep],
                y[keep],
                HALLUCINATION_DIRECTION["eigenscore"],
                HALLUCINATION_DIRECTION.get(best, 1),
                n_boot=result["n_boot"],
                seed=s["seed"],
            )
            verdict = "the interval excludes 0" if lo > 0 or hi < 0 else "the interval includes 0"
            lines += [
                "",
                f"EigenScore minus {LABELS.get(best, best)}: ΔAUROC = {d:+.3f}, paired bootstrap 95% CI "
                f"[{lo:+.3f}, {hi:+.3f}]; {verdict}.",
            ]
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
                lines += [
                    "",
                    f"{LABELS[other]} minus exact EigenScore: ΔAUROC = {d:+.3f} [{lo:+.3f}, {hi:+.3f}].{extra}",
                ]
    lines += ["", "### Per relation (AUROC, no intervals: small groups)", "", *_relation_rows(recs, ranked)]
    lines += ["", "## Cost of each detector", "", *_cost_rows(result)]
    if others:
        lines += ["", "## The same detectors on other runs", ""]
        order = " > ".join(LABELS.get(k, k) for k in ranked[:5])
        lines.append(f"Ranking on this run (top 5): {order}.")
        for o in others:
            o_ranked = [k for k in _ranked(o["summary"]) if math.isfinite(o["summary"][k]["auroc"])]
            lines += [
                "",
                f"### {_describe(o)}",
                "",
                f"Command: `{o['command']}`",
                "",
                *_summary_rows(o["summary"]),
                "",
                f"Ranking (top 5): {' > '.join(LABELS.get(k, k) for k in o_ranked[:5])}.",
                "",
                _targets_line(o),
                "",
                *_relation_rows(o["records"], o_ranked),
            ]
    lines += [
        "",
        "## Caveats",
        "",
        "* One small model (135M parameters) and short factual answers; INSIDE's reported gains are for 7B+ "
        'models on open QA. The labels are lenient (substring match), and "The Illusion of Progress" '
        "(EMNLP 2025) shows such AUROCs move under stricter labels; length is reported as the baseline it "
        "recommends.",
        "* Pooled AUROC mixes relations whose accuracy differs a lot; a score that only recognises the relation "
        "can look good pooled (the hidden-state probe in particular sees the prompt). The per-relation tables show "
        "what remains within a relation.",
        f"* Wall time of this run {result['wall_seconds']:.0f} s ({result.get('machine', '')}).",
        "",
    ]
    return "\n".join(lines)


def _probe_training_set(data_args, eval_args, scored: list, everything: dict, seed: int) -> tuple[list, str]:
    """Labelled probes disjoint from ``scored`` for the hidden-state probe, and where they come from."""
    scored_ids = {r.get("fact_id") or r["prompt"] for r in scored}
    if eval_args.split == "all":
        pool = [r for sp in ("train", "tracking", "test") for r in everything[sp]]
        what = "the probes of splits train+tracking+test not selected for scoring"
    elif eval_args.split == "test":
        pool = [r for sp in ("train", "tracking") for r in everything[sp]]
        what = "the train and tracking splits"
    else:
        other = [sp for sp in ("train", "tracking", "test") if sp != eval_args.split and sp != "test"]
        pool = [r for sp in other for r in everything[sp]]
        what = f"the {'+'.join(other)} split"
    pool = [r for r in pool if (r.get("fact_id") or r["prompt"]) not in scored_ids and r.get("prompt")]
    pool = select_probes(pool, eval_args.probe_max_train, seed=seed)
    return pool, f"{what} of `{data_args.data}` ({len(pool)} probes)"


def _read_eval_json(path: str, flag: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path}: not found (give an eval.json written by neurodetox eval)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path} is not an eval.json: {e}") from None
    if not isinstance(data, dict) or "summary" not in data or "records" not in data:
        raise UserError(f"{flag} {path} is not an eval.json written by neurodetox eval (no summary/records)")
    return data


@user_errors_exit_2("neurodetox eval")
def cmd_eval(argv: Sequence[str]) -> int:
    """Entry point of ``neurodetox eval``; returns the exit status (0 ok, 2 user error)."""
    argv = list(argv)
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    model_args, data_args, eval_args, settings = parse_command(parser, argv)
    t_start = time.perf_counter()
    from rich.console import Console

    from neurodetox.core.io import atomic_write_json, atomic_write_text
    from neurodetox.core.paths import check_writable_destination

    console = Console()
    out = Path(eval_args.output_dir)
    if eval_args.report:
        check_writable_destination(eval_args.report, overwrite=True, what="--report")
    elif eval_args.report_from:
        raise UserError("--report_from needs --report (the page to write)")
    if not eval_args.report_from:
        check_writable_destination(out / "eval.json", overwrite=eval_args.overwrite, what="--output_dir")
    others = []
    for path in eval_args.compare:
        others.append(_read_eval_json(path, "--compare"))
    if eval_args.report_from:
        result = _read_eval_json(eval_args.report_from, "--report_from")
        shown = "neurodetox eval " + " ".join(shlex.quote(a) for a in argv)
        page = render_report(result, others=others, report_command=shown, prelude=eval_args.report_prelude)
        atomic_write_text(Path(eval_args.report), page)
        console.print(f"report: {eval_args.report}")
        return 0
    try:
        ds = data_args.load()
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    splits = ("train", "tracking", "test") if eval_args.split == "all" else (eval_args.split,)
    records = [r for sp in splits for r in ds[sp]]
    records = select_probes(records, eval_args.max_probes, seed=settings.seed)
    if not records:
        raise UserError(f"no probes in split {eval_args.split!r} of {data_args.data!r} (empty probe set)")
    probe_train, probe_source = None, None
    if eval_args.hidden_probe:
        pool, probe_source = _probe_training_set(data_args, eval_args, records, ds, settings.seed)
        if len(pool) < settings.probe_min_labelled:
            raise UserError(
                f"the hidden-state probe needs at least {settings.probe_min_labelled} labelled probes disjoint from "
                f"the scored ones and has {len(pool)} ({probe_source}); score fewer probes (--max_probes), lower "
                "--probe_min_labelled, or pass --no_hidden_probe"
            )
        probe_train = ([r["prompt"] for r in pool], [list(r["aliases"]) or [r["answer"]] for r in pool])

    from neurodetox.core.models import load_model
    from neurodetox.metrics.probes import score_probes

    try:
        model, tok = load_model(
            model_args.model_name_or_path, dtype=model_args.model_dtype, tokenizer=model_args.tokenizer
        )
    except (ValueError, OSError, ModuleNotFoundError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot load model {model_args.model_name_or_path!r}: {e}") from None
    prompts = [r["prompt"] for r in records]
    aliases = [list(r["aliases"]) or [r["answer"]] for r in records]
    relations = [r.get("relation", "") for r in records]
    console.print(
        f"[bold]neurodetox eval[/]: {len(prompts)} probes, K={settings.k}, stop {settings.stop!r}, "
        f"model {model_args.model_name_or_path}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            res = score_probes(
                model,
                tok,
                prompts,
                aliases,
                settings,
                relations=relations,
                clipped=eval_args.clip,
                ees=eval_args.ees,
                probe_train=probe_train,
                n_boot=eval_args.bootstrap,
                show_progress=eval_args.progress,
            )
        except ValueError as e:
            raise UserError(str(e)) from None
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    wall = time.perf_counter() - t_start
    argv_shown = " ".join(shlex.quote(a) for a in argv)
    import torch

    result = {
        "command": f"neurodetox eval {argv_shown}".strip(),
        "model": model_args.model_name_or_path,
        "data": data_args.data,
        "split": eval_args.split,
        "n_probes": len(prompts),
        "factual_accuracy": res.factual_accuracy,
        "settings": res.settings,
        "eval_arguments": asdict(eval_args),
        "data_arguments": asdict(data_args),
        "probe_source": probe_source,
        "n_boot": eval_args.bootstrap,
        "summary": res.summary,
        "timings": res.timings,
        "info": res.info,
        "wall_seconds": wall,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "records": res.records,
    }
    atomic_write_json(out / "eval.json", result)
    title = f"{model_args.model_name_or_path}: {len(prompts)} probes, accuracy {res.factual_accuracy:.1%}"
    try:
        write_roc_png(res.records, res.summary, out / "roc.png", title)
    except ValueError as e:  # e.g. a single class: nothing to plot
        console.print(f"[yellow]no ROC plot:[/] {e}")
    console.print(_table(res.summary, title))
    if eval_args.report:
        rep = Path(eval_args.report)
        page = render_report(result, roc_png=str(out / "roc.png"), others=others, prelude=eval_args.report_prelude)
        atomic_write_text(rep, page)
        console.print(f"report: {rep}")
    console.print(f"wrote {out / 'eval.json'}, {out / 'roc.png'}  ({wall:.0f} s)")
    return 0
