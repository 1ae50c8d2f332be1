"""EigenScore evaluation time ÷ the bare batched generation it needs (same prompts, one run).

    python benchmarks/eval_overhead.py [--probes 16] [--k 10] [--stop inside] [--repeats 3] [--json out.json]

On the real SmolLM2-135M-Instruct and the built-in fact prompts, per repeat
and in alternating order (so machine drift hits both alike):

* **bare**: for each batch of prompts, ``torch.manual_seed(seed)`` then
  ``model.generate(do_sample=True, num_return_sequences=K, ...)`` with INSIDE's
  sampling settings and the same stop tokens (the answer boundary, added to
  ``eos_token_id``) — nothing else;
* **EigenScore**: ``sample_answers(..., greedy=False, seed=seed)`` (the same
  sampled ``generate`` with the embedding hook, the extra cached step for
  full-length answers, decoding) followed by ``eigenscore`` on the embeddings;
* **EigenScore + log-probs**: the same with ``return_logprobs=True`` (what the
  perplexity / LN-entropy baselines need, from the same generate call);
* **every detector** (what the trainer's callback runs at each evaluation, without the
  hidden-state probe): ``collect_probe_scores(clipped=False, ees=False)`` — the greedy
  answers too, so its ratio includes one greedy ``generate`` that bare does not run.

The ratio is the median over repeats of each variant divided by the median of
bare. Target (issues #3, #16): EigenScore ≤ 1.15 × bare with the same stops.
Then, once: the hidden-state probe's cost — the greedy answers and features of
``--probe-train`` labelled train-split probes, the fit, and scoring the prompts.
Defaults of K, the sampling, the length cap and the boundary are those of
:class:`neurodetox.metrics.settings.EigenScoreSettings`.
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
    from neurodetox.metrics.settings import DEFAULTS

    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--k", type=int, default=DEFAULTS.k)
    ap.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    ap.add_argument("--stop", default=DEFAULTS.stop, help="Answer boundary: inside (default), none, or 'S1|S2'.")
    ap.add_argument("--probe-train", type=int, default=200, help="Labelled probes for the probe-cost measurement.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from neurodetox.core.models import load_model
    from neurodetox.data import load_facts
    from neurodetox.metrics import eigenscore
    from neurodetox.metrics.boundary import stop_token_ids
    from neurodetox.metrics.probes import collect_probe_scores, labelled_features
    from neurodetox.metrics.sampling import eos_token_ids, generation_mode, sample_answers
    from neurodetox.metrics.settings import EigenScoreSettings

    model, tok = load_model(a.model)
    ds = load_facts("facts", seed=0)
    prompts = [r["prompt"] for r in ds["test"]][: a.probes]
    aliases = [list(r["aliases"]) for r in ds["test"]][: a.probes]
    settings = EigenScoreSettings(
        k=a.k, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, stop=a.stop, seed=a.seed
    )
    ends = sorted(set(eos_token_ids(model, tok)) | set(stop_token_ids(tok, a.stop)))
    gen_kw = settings.sampling_config(pad_token_id=tok.pad_token_id, eos_token_id=ends).to_diff_dict()
    gen_kw.pop("transformers_version", None)

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
            stop=a.stop,
        )
        eigenscore(out.embeddings)
        return out

    def every_detector():
        collect_probe_scores(model, tok, prompts, aliases, settings, clipped=False, ees=False)

    variants = {
        "bare generate": bare,
        "EigenScore": eig,
        "EigenScore + log-probs": lambda: eig(True),
        "every detector (+ greedy)": every_detector,
    }
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
    # the hidden-state probe: labelled probes' greedy answers + features, fit, score
    from neurodetox.metrics.hidden_probe import HiddenStateProbe

    train = [r for r in ds["train"]][: a.probe_train]
    t0 = time.perf_counter()
    x, y = labelled_features(model, tok, [r["prompt"] for r in train], [list(r["aliases"]) for r in train], settings)
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = HiddenStateProbe(settings.probe_position, settings.probe_min_labelled).fit(x, y)
    t_fit = time.perf_counter() - t0
    xs, _ = labelled_features(model, tok, prompts, aliases, settings)
    t0 = time.perf_counter()
    probe.score(xs)
    t_score = time.perf_counter() - t0
    print()
    print(
        f"hidden-state probe: features of {len(train)} labelled probes {t_feat:.2f} s "
        f"({1000 * t_feat / len(train):.0f} ms each), fit {t_fit:.2f} s (C = {probe.C:g}, {int(sum(y))} hallucinated), "
        f"scoring {len(prompts)} probes {1000 * t_score:.1f} ms"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "median": med,
                    "times": times,
                    "ratio": {k: med[k] / med["bare generate"] for k in med},
                    "probe": {"n_train": len(train), "features_s": t_feat, "fit_s": t_fit, "score_s": t_score},
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
