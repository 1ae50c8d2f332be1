"""EigenScore evaluation time ÷ the bare batched generation it needs (same prompts, one run).

    python benchmarks/eval_overhead.py [--probes 16] [--k 10] [--repeats 3] [--json out.json]

On the real SmolLM2-135M-Instruct and the built-in fact prompts, per repeat
and in alternating order (so machine drift hits both alike):

* **bare**: for each batch of prompts, ``torch.manual_seed(seed)`` then
  ``model.generate(do_sample=True, num_return_sequences=K, ...)`` with INSIDE's
  sampling settings — nothing else;
* **EigenScore**: ``sample_answers(..., greedy=False, seed=seed)`` (the same
  sampled ``generate`` with the embedding hook, the extra cached step for
  full-length answers, decoding) followed by ``eigenscore`` on the embeddings;
* **EigenScore + log-probs**: the same with ``return_logprobs=True`` (what the
  perplexity / LN-entropy baselines need, from the same generate call).

The ratio is the median over repeats of each variant divided by the median of
bare. Target (issue #3): EigenScore ≤ 1.15 × bare.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from neurodetox.core.models import load_model
    from neurodetox.data import load_facts
    from neurodetox.metrics import eigenscore
    from neurodetox.metrics.sampling import eos_token_ids, generation_mode, sample_answers

    model, tok = load_model(a.model)
    ds = load_facts("facts", seed=0)
    prompts = [r["prompt"] for r in ds["test"]][: a.probes]
    eos = eos_token_ids(model, tok)
    gen_kw = dict(
        do_sample=True,
        num_return_sequences=a.k,
        temperature=0.5,
        top_p=0.99,
        top_k=10,
        max_new_tokens=a.max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos,
    )

    def bare():
        with generation_mode(model, tok):
            torch.manual_seed(a.seed)
            for s in range(0, len(prompts), a.batch_size):
                enc = tok(prompts[s : s + a.batch_size], return_tensors="pt", padding=True)
                model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **gen_kw)

    def eig(logprobs=False):
        out = sample_answers(
            model,
            tok,
            prompts,
            k=a.k,
            batch_size=a.batch_size,
            max_new_tokens=a.max_new_tokens,
            seed=a.seed,
            greedy=False,
            return_logprobs=logprobs,
        )
        eigenscore(out.embeddings)
        return out

    variants = {"bare generate": bare, "EigenScore": eig, "EigenScore + log-probs": lambda: eig(True)}
    bare()  # warm-up
    times = {k: [] for k in variants}
    for r in range(a.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(list(variants)))
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    out = eig()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"# eval overhead — {a.model}, {len(prompts)} prompts, K={a.k}, batch {a.batch_size}, "
        f"max_new_tokens {a.max_new_tokens}, {a.repeats} repeats; {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; embedding paths "
        f"{out._extra['embedding_paths']}"
    )
    print()
    print("| variant | median s | all runs s | ratio to bare |")
    print("|---|---|---|---|")
    for k in variants:
        print(
            f"| {k} | {med[k]:.2f} | {', '.join(f'{t:.2f}' for t in times[k])} | {med[k] / med['bare generate']:.3f} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"median": med, "times": times, "ratio": {k: med[k] / med["bare generate"] for k in med}}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
