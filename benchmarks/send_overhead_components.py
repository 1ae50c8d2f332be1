"""SeND and activation-statistics overhead from their parts, measured side by side in ONE process.

``send_overhead.py`` times whole training runs in fresh subprocesses; on a
shared machine the step time of one process differs from the next by up to
±15 %, which hides 5 % effects. This script removes that noise: in one
process per setup (plain full fine-tuning, LoRA) it interleaves blocks of
optimizer steps (forward, backward, AdamW) on the same batch with

* ``off``   — no hooks (the reference),
* ``stats`` — :class:`~neurodetox.send.callbacks.ActivationStatsCallback` on every
  FFN neuron of every layer,
* ``mask``  — SeND's deterministic dropout of 20 % of the penultimate
  residual site (what every SeND training step pays),

and times SeND's window-end work (tracking forwards over the demo's 75
tracking items, the dataset-level EES, the selection) the same number of
times. Each round runs the three arms back to back, in alternating order, and
gives paired ratios ``t_stats / t_off`` and ``t_mask / t_off``; the medians
over ``--rounds`` are reported (robust to the machine's drift). The SeND
ratio per step amortised over a window of ``W`` steps is
``mask/off + t_window_end / (W · t_off)``.

    python benchmarks/send_overhead_components.py [--window 25] [--rounds 12] [--steps 3] [--json out.json]

Targets (issue #5): SeND ≤ 1.10, statistics ≤ 1.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch


def measure(setup: str, window: int, rounds: int, steps: int) -> dict:
    from neurodetox.core.models import load_model
    from neurodetox.data import load_facts
    from neurodetox.data.lm import CausalLMCollator, tokenize_texts
    from neurodetox.send.callbacks import ActivationStatsCallback, SensitiveNeuronDropoutCallback

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m-instruct")
    if setup == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        )
    facts = load_facts("facts", seed=0)
    collate = CausalLMCollator(tok)
    batch = collate(tokenize_texts(tok, facts["train"]["statement"][:8], 32))
    tracking = tokenize_texts(tok, facts["tracking"]["statement"], 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    send = SensitiveNeuronDropoutCallback(tracking, collate, window_steps=window, batch_size=16)
    send.attach(model)
    stats = ActivationStatsCallback(site="mlp", layers="all")

    def block() -> float:
        model.train()
        t = time.perf_counter()
        for _ in range(steps):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) / steps

    def window_end() -> float:  # what SensitiveNeuronDropoutCallback._window_end does, timed
        t = time.perf_counter()
        send._record(model, 0)
        if len(send.history) >= send.num_checkpoints:
            send._select()
        return time.perf_counter() - t

    for _ in range(send.num_checkpoints):  # fill the history so that every timed window end also selects
        send._record(model, 0)
    block()  # warm-up
    t = {"off": [], "stats": [], "mask": [], "window_end": []}
    ratios = {"stats": [], "mask": []}
    selection, _, _ = send._select()  # (chosen, massive, mean_abs)
    for r in range(rounds):
        got = {}
        # alternate the order (off, stats, mask / mask, stats, off) so a slow drift of the machine favours no arm
        for arm in ("off", "stats", "mask") if r % 2 == 0 else ("mask", "stats", "off"):
            if arm == "stats":
                stats.attach(model)
            elif arm == "mask":
                send._dropout.set(selection)
            got[arm] = block()
            stats.detach()
            send._dropout.clear()
        for arm, v in got.items():
            t[arm].append(v)
        ratios["stats"].append(got["stats"] / got["off"])
        ratios["mask"].append(got["mask"] / got["off"])
        t["window_end"].append(window_end())
    send.detach()
    med = {k: statistics.median(v) for k, v in t.items()}
    stats_ratio, mask_ratio = statistics.median(ratios["stats"]), statistics.median(ratios["mask"])
    return {
        "setup": setup,
        "window": window,
        "rounds": rounds,
        "steps_per_block": steps,
        **{f"{k}_s": v for k, v in med.items()},
        "stats_over_off": stats_ratio,
        "mask_over_off": mask_ratio,
        "send_over_off": mask_ratio + med["window_end"] / (window * med["off"]),
        "runs": t,
        "paired_ratios": ratios,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", default="plain,lora", help="comma list of plain, lora (default both)")
    p.add_argument("--window", type=int, default=25, help="SeND window in steps (the demo's 25)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed block")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    setups = [s for s in a.setups.split(",") if s]
    bad = [s for s in setups if s not in ("plain", "lora")]
    if bad:
        p.error(f"unknown setup(s) {', '.join(bad)}; valid: plain, lora")
    if a.window < 1 or a.rounds < 1 or a.steps < 1:
        p.error("--window, --rounds and --steps must be at least 1")
    rows = []
    for s in setups:
        r = measure(s, a.window, a.rounds, a.steps)
        rows.append(r)
        print(
            f"  {s}: off {r['off_s']:.3f} s/step, stats {r['stats_s']:.3f}, mask {r['mask_s']:.3f}, "
            f"window end {r['window_end_s']:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"\nSeND parts, real SmolLM2-135M, batch 8, one process per setup, {a.rounds} rounds of {a.steps}-step "
        f"blocks (arm order alternating), window {a.window} steps, 75 tracking items"
    )
    print(
        f"{'setup':6s} {'off s/step':>10s} {'stats/off':>9s} {'mask/off':>9s} {'window end s':>12s} "
        f"{'SeND/off amortised':>19s}"
    )
    for r in rows:
        print(
            f"{r['setup']:6s} {r['off_s']:10.3f} {r['stats_over_off']:9.3f} {r['mask_over_off']:9.3f} "
            f"{r['window_end_s']:12.2f} {r['send_over_off']:19.3f}"
        )
    print(
        "targets: SeND/off <= 1.10, stats/off <= 1.05; stats/off and mask/off: medians of per-round paired "
        "ratios; SeND/off = mask/off + window end / (window * off step)"
    )
    if a.json:
        from neurodetox.core.io import atomic_write_json

        atomic_write_json(a.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
