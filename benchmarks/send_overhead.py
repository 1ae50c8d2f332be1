"""SeND and activation-statistics overhead per optimizer step, measured side by side.

For each setup (plain full fine-tuning, LoRA, DeepSpeed ZeRO-2 on one process)
it times the same training run (real SmolLM2-135M, real facts, the demo's
window and tracking set) with

* ``off``   — ``send_mode: off``, statistics off (the reference),
* ``stats`` — activation statistics on every FFN neuron, SeND off,
* ``send``  — ``send_mode: send``, statistics off (tracking forwards at every
  window end and the selection included, amortised over the run),

and prints wall time per step and the ratios ``send/off`` and ``stats/off``.
Arms run in fresh subprocesses, interleaved (off, stats, send, off, stats,
send, ...) over ``--repeats`` rounds; the median per arm is reported.

    python benchmarks/send_overhead.py [--window 25] [--repeats 2] [--json out.json]

Targets (issue #5): send/off ≤ 1.10, stats/off ≤ 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

SETUPS = ("plain", "lora", "zero2")
ARMS = ("off", "stats", "send")


def one(setup: str, arm: str, steps: int, window: int) -> dict:
    """Train ``2·window + 1`` steps in this process.

    Timed from the end of step 1 (after warm-up) to the end of the last step:
    ``2·window`` steps containing two window ends (tracking forwards and
    selection), i.e. SeND's cost amortised over its windows.

    Returns:
        ``{"s_per_step": mean seconds per timed step, "intervals": [seconds of
        each timed step], "window_end_steps": [positions in intervals of the
        steps that ended a window]}``.
    """
    import time

    from transformers import TrainerCallback

    from neurodetox.core.models import load_model
    from neurodetox.data import load_facts
    from neurodetox.data.lm import tokenize_texts
    from neurodetox.send import SeNDConfig, SeNDTrainer

    model, tok = load_model("smollm2-135m-instruct")
    ds = load_facts("facts", seed=0)
    if setup == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        )
    ds_cfg = None
    if setup == "zero2":
        for k, v in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(29600 + os.getpid() % 300),
        }.items():
            os.environ.setdefault(k, v)
        ds_cfg = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "deepspeed", "zero2.json")
    with tempfile.TemporaryDirectory() as out:
        args = SeNDConfig(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=2 * window + 1,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            save_strategy="no",
            eval_strategy="no",
            logging_steps=1000,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
            eigenscore_num_prompts=0,
            send_mode="send" if arm == "send" else "off",
            send_window_steps=window,
            send_tracking_batch_size=16,
            activation_stats_site="mlp" if arm == "stats" else "none",
            deepspeed=ds_cfg,
        )
        tracking = tokenize_texts(tok, ds["tracking"]["statement"], 32)
        trainer = SeNDTrainer(
            model=model,
            args=args,
            processing_class=tok,
            train_dataset=tokenize_texts(tok, ds["train"]["statement"], 32),
            tracking_dataset=tracking if arm == "send" else None,
        )

        class StepClock(TrainerCallback):
            def __init__(self):
                self.ends = []

            def on_step_end(self, args, state, control, **kw):
                self.ends.append(time.perf_counter())

        clock = StepClock()
        trainer.add_callback(clock)  # after the SeND callback: window-end work lands inside the step it ends
        trainer.train()
    intervals = [b - a for a, b in zip(clock.ends, clock.ends[1:])]  # interval i = step i + 2
    return {
        "s_per_step": sum(intervals) / len(intervals),
        "intervals": intervals,
        "window_end_steps": [i for i in range(len(intervals)) if (i + 2) % window == 0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=25, help="SeND window in steps (the demo's 25)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        print(json.dumps(one(a._one[0], a._one[1], 2 * a.window + 1, a.window)))
        return
    setups = [s for s in a.setups.split(",") if s]
    times = {s: {arm: [] for arm in ARMS} for s in setups}  # mean s/step per round
    robust = {s: {arm: [] for arm in ARMS} for s in setups}  # median step + amortised window-end excess, per round
    extra = {s: [] for s in setups}  # seconds a window-end send step costs above a regular send step
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for r in range(a.repeats):
        for s in setups:
            for arm in ARMS:
                cmd = [sys.executable, __file__, "--window", str(a.window), "--_one", s, arm]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    sys.exit(f"{s}/{arm} failed:\n{res.stderr[-4000:]}")
                got = json.loads(res.stdout.strip().splitlines()[-1])
                t = got["s_per_step"]
                times[s][arm].append(t)
                ends = set(got["window_end_steps"])
                steps = got["intervals"]
                regular = statistics.median(x for i, x in enumerate(steps) if i not in ends)
                excess = [steps[i] - regular for i in ends]
                robust[s][arm].append(regular + sum(excess) / len(steps))
                if arm == "send":
                    extra[s].extend(excess)
                print(
                    f"  round {r + 1}: {s:6s} {arm:5s} {t:.3f} s/step (median step {regular:.3f} s, "
                    f"window-end excess {' '.join(f'{x:+.2f}' for x in excess)} s)",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    for s in setups:
        med = {arm: statistics.median(times[s][arm]) for arm in ARMS}
        rob = {arm: statistics.median(robust[s][arm]) for arm in ARMS}
        rows.append(
            {
                "setup": s,
                **{f"{arm}_s_per_step": med[arm] for arm in ARMS},
                "send_over_off": med["send"] / med["off"],
                "stats_over_off": med["stats"] / med["off"],
                **{f"{arm}_robust_s_per_step": rob[arm] for arm in ARMS},
                "send_over_off_robust": rob["send"] / rob["off"],
                "stats_over_off_robust": rob["stats"] / rob["off"],
                "window_end_extra_s": statistics.median(extra[s]),
                "window_end_over_window_off": statistics.median(extra[s]) / (a.window * rob["off"]),
                "runs": times[s],
                "runs_robust": robust[s],
            }
        )
    print(
        f"\nSeND overhead, real SmolLM2-135M, batch 8, steps 2..{2 * a.window + 1} timed, window {a.window} steps, "
        f"75 tracking items, median of {a.repeats} interleaved rounds"
    )
    print(
        f"{'setup':8s} {'off s/step':>11s} {'stats s/step':>13s} {'send s/step':>12s} {'send/off':>9s} "
        f"{'stats/off':>10s} {'send/off robust':>16s} {'stats/off robust':>17s} {'window-end extra s':>19s} "
        f"{'extra/(window*off)':>19s}"
    )
    for r in rows:
        print(
            f"{r['setup']:8s} {r['off_s_per_step']:11.3f} {r['stats_s_per_step']:13.3f} {r['send_s_per_step']:12.3f} "
            f"{r['send_over_off']:9.3f} {r['stats_over_off']:10.3f} {r['send_over_off_robust']:16.3f} "
            f"{r['stats_over_off_robust']:17.3f} {r['window_end_extra_s']:19.2f} {r['window_end_over_window_off']:19.3f}"
        )
    print("targets: send/off <= 1.10, stats/off <= 1.05")
    print(
        "s/step: mean over the timed steps. robust: median step time plus every window-end step's excess over it, "
        "amortised over the timed steps (scheduler spikes on a shared machine move the mean, not the median). "
        "window-end extra: median excess of a window-end send step (tracking forwards, dataset EES, selection); "
        "extra/(window*off) is that cost amortised over one window of plain steps"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"timed_steps": 2 * a.window, "window": a.window, "repeats": a.repeats, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
