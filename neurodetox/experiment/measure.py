"""Measurements of one trained run of the SeND study.

On two probe sets — the test split (facts never trained on) and the first
paraphrase prompt of a seeded sample of training facts — one call of
:func:`neurodetox.metrics.probes.score_probes` per set gives, on the same samples:

* factual accuracy of the greedy answers;
* mean EigenScore (INSIDE, arXiv 2402.03744) and its detection AUROC against
  correctness (95 % bootstrap interval);
* token entropy: the length-normalised entropy of the ``K`` sampled answers
  (mean ``−ln p`` per generated token, nats/token — a Monte-Carlo estimate of
  the mean next-token entropy along sampled answers).

Also, per set, the dataset-level EigenScore by EES
(:func:`neurodetox.metrics.dataset_ees`) over SeND's sentence embeddings
(``½(mean + last token)`` at the run's SeND site and layers) of the set's
statements, and the perplexity of the held-out general text
:data:`neurodetox.data.reference.REFERENCE_TEXTS` (damage to general ability).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["measure_run", "statement_embeddings"]


def statement_embeddings(
    model, tokenizer, texts: Sequence[str], site: str, layers: str, module_path=None, batch_size: int = 32
) -> torch.Tensor:
    """SeND sentence embeddings of ``texts`` at the given sites, concatenated over sites.

    Returns:
        ``[N, n_sites · n]`` float32 (``n`` neurons per site), in text order.
    """
    from neurodetox.core.pooling import AttentionMaskTracker, sentence_embedding
    from neurodetox.core.sites import register_site_hook, resolve_sites

    sites = resolve_sites(model, site, layers, module_path)
    out: dict[str, list] = {s.key: [] for s in sites}
    tracker = AttentionMaskTracker(model)
    handles = [
        register_site_hook(
            s,
            lambda act, key=s.key: out[key].append(sentence_embedding(act, tracker.mask_for(act)).cpu()),
            observer=True,
        )
        for s in sites
    ]
    was, side = model.training, tokenizer.padding_side
    model.eval()
    device = next(model.parameters()).device
    try:
        tokenizer.padding_side = "right"
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
        tracker.remove()
        tokenizer.padding_side = side
        model.train(was)
    return torch.cat([torch.cat(out[s.key]) for s in sites], dim=1)


def _probe_sets(
    ds, paraphrase_probes: int, max_test_probes=None, seed: int = 0, split: str = "test"
) -> dict[str, dict]:
    test = [r for r in ds[split] if r["prompt"] and r["aliases"]][:max_test_probes]
    train = [r for r in ds["train"] if r["paraphrases"] and r["aliases"]]
    random.Random(seed).shuffle(train)  # fixed sample, identical for every run of a study
    train = train[:paraphrase_probes]
    return {
        "test": {
            "prompts": [r["prompt"] for r in test],
            "aliases": [list(r["aliases"]) for r in test],
            "relations": [r["relation"] for r in test],
            "statements": [r["statement"] for r in test],
        },
        "paraphrase": {
            "prompts": [r["paraphrases"][0] for r in train],
            "aliases": [list(r["aliases"]) for r in train],
            "relations": [r["relation"] for r in train],
            "statements": [f"{r['paraphrases'][0]} {r['answer']}." for r in train],
        },
    }


def _mean(xs) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def _curves(metrics_jsonl: Path) -> dict[str, list]:
    from neurodetox.reports.training import read_jsonl

    rows = read_jsonl(metrics_jsonl)
    pick = {
        "loss": "loss",
        "eigenscore": "eval_eigenscore",
        "accuracy": "eval_factual_accuracy",
        "test_eigenscore": "test_eigenscore",
        "test_accuracy": "test_factual_accuracy",
    }
    return {name: [[r["step"], r[key]] for r in rows if key in r and r[key] is not None] for name, key in pick.items()}


def measure_run(
    recipe: str,
    fields: dict[str, str],
    model_dir,
    *,
    paraphrase_probes: int = 75,
    n_boot: int = 500,
    probe_split: str = "test",
) -> dict:
    """Every metric of one trained run (module docstring).

    Args:
        recipe, fields: the run's recipe and overrides (data, EigenScore settings, SeND site are read from them).
        model_dir: the run's ``final/`` checkpoint (or any name :func:`neurodetox.core.models.load_model` takes).
        paraphrase_probes: training facts sampled (seed 0) for the paraphrase set.
        n_boot: bootstrap resamples of the AUROC interval.
        probe_split: the split scored as the held-out set ``test``: ``"test"`` (default) or
            ``"tracking"`` (the study's selection step; the metric keys keep the ``test_`` prefix and
            ``details["probe_split"]`` records the split).

    Returns:
        ``{"metrics": {name: float}, "curves": {...}, "details": {...}}`` with metric names
        ``<set>_accuracy``, ``<set>_eigenscore``, ``<set>_eigenscore_auroc`` (``_low``/``_high``),
        ``<set>_token_entropy``, ``<set>_ees`` for ``set`` in ``test``, ``paraphrase``, and
        ``reference_perplexity``.
    """
    from neurodetox.core.models import load_model
    from neurodetox.data.reference import REFERENCE_TEXTS
    from neurodetox.metrics.ees import dataset_ees
    from neurodetox.metrics.probes import score_probes
    from neurodetox.patching.edit_metrics import perplexity
    from neurodetox.send.recipes import parse_recipe
    from neurodetox.send.run import load_run_data

    argv = [x for k, v in fields.items() for x in (f"--{k}", v)]
    _, data_args, _, args, _ = parse_recipe(recipe, argv)
    settings = args.eigenscore_settings()
    settings.seed = 1234  # the same sampling seed for every run, so arms differ only by their weights
    model, tok = load_model(str(model_dir))
    ds = load_run_data(data_args)
    metrics: dict[str, float] = {}
    details: dict = {"settings": settings.__dict__, "probe_split": probe_split}
    for name, s in _probe_sets(ds, paraphrase_probes, data_args.max_test_probes, split=probe_split).items():
        res = score_probes(
            model,
            tok,
            s["prompts"],
            s["aliases"],
            settings,
            relations=s["relations"],
            clipped=False,
            ees=False,
            n_boot=n_boot,
        )
        auc = res.summary["eigenscore"]
        metrics[f"{name}_accuracy"] = res.factual_accuracy
        metrics[f"{name}_eigenscore"] = _mean(r["eigenscore"] for r in res.records)
        metrics[f"{name}_eigenscore_auroc"] = auc["auroc"]
        metrics[f"{name}_eigenscore_auroc_low"] = auc["ci_low"]
        metrics[f"{name}_eigenscore_auroc_high"] = auc["ci_high"]
        metrics[f"{name}_token_entropy"] = _mean(r["ln_entropy"] for r in res.records)
        emb = statement_embeddings(model, tok, s["statements"], args.send_site, args.send_layers, args.send_module_path)
        ees = dataset_ees(emb, alpha=settings.alpha, method="auto")
        metrics[f"{name}_ees"] = float(ees.value)
        details[name] = {
            "n": len(s["prompts"]),
            "ees_method": ees.method,
            "ees_error": float(ees.error),
            "embedding_shape": list(emb.shape),
            "records": [
                {k: r[k] for k in ("prompt", "greedy", "correct", "eigenscore", "ln_entropy")} for r in res.records
            ],
        }
    metrics["reference_perplexity"] = perplexity(model, tok, REFERENCE_TEXTS)
    curves = _curves(Path(fields["output_dir"]) / "metrics.jsonl") if "output_dir" in fields else {}
    return {"metrics": metrics, "curves": curves, "details": details}
