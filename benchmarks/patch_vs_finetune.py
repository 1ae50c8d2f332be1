"""MINT neuron patching vs. LoRA fine-tuning on the same wrong facts, in one run.

MINT: Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model
Repair for Code Generation", arXiv 2312.05356 (``neurodetox.patching``).
Baseline: for each failure in turn, a fresh LoRA adapter (``peft``; rank 8 on
every ``mlp.down_proj`` by default) is trained with Adam on ``prompt + target``
(loss on the target tokens only) until every target token is the argmax under
teacher forcing (= the greedy answer starts with the target; the same success
criterion as MINT) or a step cap; it is then merged and the next failure is
fixed on the merged model, as MINT fixes failures in sequence.

Both methods see the same model, the same failures (test-split facts the model
answers wrong, then tracking-split ones if needed) and are scored on the same
prompts:

* success: the target is produced under teacher forcing after all fixes;
* generalisation: the paraphrase prompts of the fixed facts answered correctly;
* specificity: ``--unrelated`` other fact prompts (disjoint from the reference
  prompts MINT uses to judge neuron selectivity) whose predicted answer is
  unchanged (next-token and full-greedy variants reported too); known facts
  kept: of those answered correctly before, the fraction still correct, and
  the changed answers split by correctness before and after;
* perplexity drift on fact statements; parameters changed (values that differ
  from the original model); wall time per fix (MINT's one-off reference
  statistics are included, amortised over the fixes).

Two protocols: **all edits together** (every fact fixed in sequence on one
model, then scored: what a patch with many edits does) and **one edit at a
time** (``--single``, on by default: each fact fixed alone on the original
model, its next-token specificity measured on the same unrelated prompts, then
undone; the usual protocol of model-editing papers, where each edit is scored
on its own). Next-token specificity is used there because a greedy answer per
unrelated prompt and edit would cost ~25 s per edit on a CPU; on the
all-together run it differs from the answer-level specificity by about one
point.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/patch_vs_finetune.py \\
        --model runs/demo/final --n 20 --json docs/results/patch_vs_finetune.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from neurodetox.cli.patch import fact_pools, set_threads
from neurodetox.core.io import atomic_write_json
from neurodetox.core.models import load_model
from neurodetox.data import load_facts
from neurodetox.metrics.factual import is_correct
from neurodetox.metrics.sampling import greedy_answers
from neurodetox.patching import UPDATE_RULES, MintSettings, repair
from neurodetox.patching.edit_metrics import compare, measure_model, next_token_predictions, unrelated_prompts
from neurodetox.patching.failures import coerce_edits, encode_edit, find_failures, teacher_forced_argmax


def find_wrong_facts(model, tok, facts, n: int, max_new_tokens: int = 8) -> list[dict]:
    """The first ``n`` test (then tracking) facts whose greedy answer is wrong and that fail under teacher forcing."""
    out = []
    for split in ("test", "tracking"):
        rows = list(facts[split])
        for start in range(0, len(rows), 16):
            batch = rows[start : start + 16]
            answers = greedy_answers(model, tok, [r["prompt"] for r in batch], max_new_tokens=max_new_tokens)
            for r, a in zip(batch, answers):
                if not is_correct(a, r["aliases"]):
                    e = encode_edit(tok, coerce_edits([{**r, "target": r["answer"]}])[0])
                    if find_failures(model, e):
                        out.append(
                            {
                                "prompt": r["prompt"],
                                "target": r["answer"],
                                "fact_id": r["fact_id"],
                                "aliases": r["aliases"],
                                "paraphrases": r["paraphrases"],
                            }
                        )
            if len(out) >= n:
                return out[:n]
    return out


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
    """MINT's defaults, with the benchmark's ``--update``, ``--layers`` and ``--protect``."""
    s = MintSettings(update=a.update, layers=a.layers, protect=a.protect)
    s.validate()
    return s


def one_at_a_time(model, tok, edits, wrong, unrelated, ref, a, original) -> dict:
    """Each fact fixed alone on the original model: success, next-token specificity and seconds per edit."""
    from tqdm.auto import tqdm

    prompts = unrelated_prompts(unrelated)
    base = next_token_predictions(model, tok, prompts)

    def spec(m) -> float:
        now = next_token_predictions(m, tok, prompts)
        return sum(x == y for x, y in zip(base, now)) / len(prompts)

    targets = [x.strip() for x in a.lora_targets.split(",") if x.strip()]
    out = {"mint": [], "lora": []}
    for e, w in zip(tqdm(edits, desc="one edit at a time", unit="edit"), wrong):
        t0 = time.perf_counter()
        patch, report = repair(model, tok, [w], mint_settings(a), show_progress=False, reference_prompts=ref)
        seconds = time.perf_counter() - t0
        fixed = bool(report.fixed)
        patch.apply(model)
        out["mint"].append(
            {
                "fact_id": e.fact_id,
                "fixed": fixed,
                "seconds": seconds,
                "neurons": report.neurons_per_fix[0] if report.neurons_per_fix else 0,
                "specificity_next_token": spec(model) if fixed else None,
            }
        )
        patch.revert(model)
        for prm in model.parameters():
            prm.requires_grad_(True)
        t0 = time.perf_counter()
        lmodel, records = lora_fix(model, [e], a.lora_rank, a.lora_lr, a.lora_steps, targets)
        seconds = time.perf_counter() - t0
        lmodel.eval()
        fixed = records[0]["fixed"]
        out["lora"].append(
            {
                "fact_id": e.fact_id,
                "fixed": fixed,
                "seconds": seconds,
                "steps": records[0]["steps"],
                "specificity_next_token": spec(lmodel) if fixed else None,
            }
        )
        lmodel.load_state_dict(original)
        model = lmodel
        assert changed_values(model, original) == 0, "the original model was not restored after an edit"
    summary = {}
    for name, rows in out.items():
        specs = [r["specificity_next_token"] for r in rows if r["fixed"]]
        summary[name] = {
            "success": sum(r["fixed"] for r in rows) / len(rows),
            "seconds_per_fix": sum(r["seconds"] for r in rows) / len(rows),
            "specificity_next_token": sum(specs) / len(specs) if specs else float("nan"),
            "specificity_min": min(specs) if specs else float("nan"),
            "edits_at_least_98": sum(x >= 0.98 for x in specs),
            "edits_fixed": len(specs),
            "per_edit": rows,
        }
    return summary


def changed_values(model, original: dict[str, torch.Tensor]) -> int:
    sd = model.state_dict()
    return int(sum(int((sd[k] != v).sum()) for k, v in original.items() if k in sd))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="runs/demo/final",
        help="Checkpoint (default runs/demo/final; falls back to smollm2-135m-instruct if missing).",
    )
    p.add_argument("--n", type=int, default=20, help="Wrong facts to fix (default 20).")
    p.add_argument("--unrelated", type=int, default=250, help="Specificity prompts (default 250).")
    p.add_argument("--reference-prompts", type=int, default=128, help="MINT reference prompts (default 128).")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--lora-steps", type=int, default=60, help="Step cap per failure (default 60).")
    p.add_argument("--lora-targets", default="down_proj", help="Comma list of module names (default down_proj).")
    p.add_argument(
        "--single",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also fix each fact alone on the original model and score it (default on).",
    )
    p.add_argument(
        "--update",
        default=MintSettings.update,
        choices=UPDATE_RULES,
        help=f"MINT's value-vector update (default {MintSettings.update}).",
    )
    p.add_argument(
        "--layers",
        default=MintSettings.layers,
        help=f"MINT: blocks searched (default {MintSettings.layers}; 'second_half' as in methods.md).",
    )
    p.add_argument(
        "--protect",
        type=float,
        default=MintSettings.protect,
        help="MINT: reference protection strength λ (default 0 = off; e.g. 1e4).",
    )
    p.add_argument("--threads", default="auto")
    p.add_argument("--json", help="Write the full results here (atomically).")
    a = p.parse_args(argv)

    threads = set_threads(a.threads)
    model_name = a.model if Path(a.model).exists() or not a.model.startswith("runs/") else "smollm2-135m-instruct"
    model, tok = load_model(model_name)
    model.eval()
    facts = load_facts("facts", seed=0)
    t = time.perf_counter()
    wrong = find_wrong_facts(model, tok, facts, a.n, a.max_new_tokens)
    print(f"{len(wrong)} wrong facts found in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    if not wrong:
        print("the model gets every test/tracking fact right: nothing to compare", file=sys.stderr)
        return 1
    ref, unrelated, texts = fact_pools(
        "facts", 0, [w["prompt"] for w in wrong], [w["fact_id"] for w in wrong], a.unrelated, a.reference_prompts, 64
    )
    edits = [encode_edit(tok, e) for e in coerce_edits(wrong)]
    before = measure_model(model, tok, edits, unrelated, texts, max_new_tokens=a.max_new_tokens)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # --- MINT
    t0 = time.perf_counter()
    patch, report = repair(model, tok, wrong, mint_settings(a), show_progress=True, reference_prompts=ref)
    mint_seconds = time.perf_counter() - t0
    patch.apply(model)
    mint_after = measure_model(model, tok, edits, unrelated, texts, max_new_tokens=a.max_new_tokens)
    mint_changed = changed_values(model, original)
    patch.revert(model)
    assert changed_values(model, original) == 0, "MINT revert was not bit-exact"
    mint = compare(before, mint_after, edits, unrelated)
    mint.update(
        {
            "seconds": mint_seconds,
            "seconds_per_fix": mint_seconds / len(edits),
            "parameters_changed": mint_changed,
            "neurons_per_fix": report.neurons_per_fix,
            "median_neurons_per_fix": report.median_neurons_per_fix,
            "neurons_per_failure": report.neurons_per_failure,
            "median_neurons_per_failure": report.summary()["median_neurons_per_failure"],
            "failure_success_rate": report.summary()["failure_success_rate"],
            "repair": report.to_json(),
        }
    )

    # --- LoRA
    for prm in model.parameters():
        prm.requires_grad_(True)
    t0 = time.perf_counter()
    lmodel, records = lora_fix(
        model, edits, a.lora_rank, a.lora_lr, a.lora_steps, [x.strip() for x in a.lora_targets.split(",") if x.strip()]
    )
    lora_seconds = time.perf_counter() - t0
    lmodel.eval()
    lora_after = measure_model(lmodel, tok, edits, unrelated, texts, max_new_tokens=a.max_new_tokens)
    lora = compare(before, lora_after, edits, unrelated)
    lora.update(
        {
            "seconds": lora_seconds,
            "seconds_per_fix": lora_seconds / len(edits),
            "parameters_changed": changed_values(lmodel, original),
            "records": records,
            "trainable_per_fix": records[0]["trainable"] if records else 0,
            "median_steps": sorted(r["steps"] for r in records)[len(records) // 2],
        }
    )

    rows = [("MINT (neurodetox)", mint), (f"LoRA r={a.lora_rank} {a.lora_targets}", lora)]
    header = (
        "method",
        "s/fix",
        "success",
        "generalisation",
        "specificity",
        "spec. next-token",
        "spec. exact 8 tok",
        "known facts kept",
        "changed: right→wrong / wrong→right / wrong→wrong",
        "ppl drift",
        "params changed",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f"{r['seconds_per_fix']:.2f}",
                    f"{100 * r['success']:.0f}%",
                    f"{100 * r['generalisation']:.0f}% (before {100 * r['generalisation_before']:.0f}%)",
                    f"{100 * r['specificity']:.1f}%",
                    f"{100 * r['specificity_next_token']:.1f}%",
                    f"{100 * r['specificity_exact']:.1f}%",
                    f"{100 * r['known_facts_kept']:.1f}% of {r['known_facts']}",
                    " / ".join(str(r["changes"][k]) for k in ("right_to_wrong", "wrong_to_right", "wrong_to_wrong")),
                    f"{100 * r['perplexity_drift']:+.2f}%",
                    f"{r['parameters_changed']:,}",
                ]
            )
            + " |"
        )
    table = "\n".join(lines)
    print(table)
    print(
        f"\n{len(edits)} failures of {model_name}; specificity on {mint['unrelated_prompts']} unrelated fact "
        f"prompts; generalisation on {mint['paraphrases']} paraphrases; MINT neurons per fixed fact "
        f"{mint['neurons_per_fix']} (median {mint['median_neurons_per_fix']}), per fixed token-level failure "
        f"median {mint['median_neurons_per_failure']}; LoRA median steps {lora['median_steps']}; torch threads "
        f"{threads}"
    )
    single, single_table = None, ""
    if a.single:
        lmodel.load_state_dict(original)
        single = one_at_a_time(lmodel, tok, edits, wrong, unrelated, ref, a, original)
        head = (
            "method",
            "s/fix",
            "success",
            "next-token specificity (mean over fixed edits)",
            "worst edit",
            "edits ≥ 98%",
        )
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (name, _), key in zip(rows, ("mint", "lora")):
            r = single[key]
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        f"{r['seconds_per_fix']:.2f}",
                        f"{100 * r['success']:.0f}%",
                        f"{100 * r['specificity_next_token']:.1f}%",
                        f"{100 * r['specificity_min']:.1f}%",
                        f"{r['edits_at_least_98']} of {r['edits_fixed']}",
                    ]
                )
                + " |"
            )
        single_table = "\n".join(lines)
        print("\nOne edit at a time (each fact fixed alone on the original model):\n" + single_table)
    if a.json:
        atomic_write_json(
            a.json,
            {
                "model": model_name,
                "n": len(edits),
                "threads": threads,
                "table": table,
                "mint": mint,
                "lora": lora,
                "single": single,
                "single_table": single_table,
                "args": vars(a),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
