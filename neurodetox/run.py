"""The main job: SeND fine-tuning on facts with before/after hallucination metrics.

``neurodetox train --config recipes/smollm2-facts-send.yaml`` runs
:func:`run_training`. The run folder holds the Trainer checkpoints
(complete or absent), ``final/`` (a loadable HF checkpoint), ``metrics.jsonl``,
``training_curves.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from .callbacks import EigenScoreCallback, JsonlMetricsCallback, SensitiveNeuronDropoutCallback
from .data import load_facts
from .data.lm import tokenize_texts
from .evaluation import evaluate_probes
from .io import atomic_write_json
from .models import load_model
from .recipes import DataArguments, ModelArguments, RunArguments
from .trainer import SeNDConfig, SeNDTrainer, last_checkpoint

logger = logging.getLogger(__name__)


def _prepare_output_dir(args: SeNDConfig, run: RunArguments) -> None:
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        if run.overwrite_output_dir:
            shutil.rmtree(out)
        elif not args.resume_from_checkpoint and last_checkpoint(str(out)) is not None:
            raise FileExistsError(
                f"run folder {out} already holds checkpoints; pass --resume_from_checkpoint true to continue it "
                "or --overwrite_output_dir true to start over")
    out.mkdir(parents=True, exist_ok=True)


def planned_steps(args: SeNDConfig, n_train: int) -> int:
    """Optimizer steps the run will take (``max_steps`` or epochs × steps per epoch)."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    return math.ceil(n_train / per_step) * math.ceil(args.num_train_epochs)


def check_schedule(args: SeNDConfig, n_train: int) -> None:
    """Fail before training if the SeND window does not fit the run; warn if no selection can happen.

    Raises:
        ValueError: ``send_window_steps`` longer than the run.
    """
    if args.send_mode == "off":
        return
    steps = planned_steps(args, n_train)
    if args.send_window_steps > steps:
        raise ValueError(f"send_window_steps={args.send_window_steps} is longer than the run ({steps} steps): "
                         "no window would ever end; use a smaller window or 0 (one epoch)")
    windows = steps // args.send_window_steps if args.send_window_steps else math.ceil(args.num_train_epochs)
    # recordings at step 0 and at every window end but the last: a selection needs C of them
    if windows < args.send_num_checkpoints:
        logger.warning("only %d SeND windows fit in %d steps: with send_num_checkpoints=%d no neuron will ever "
                       "be dropped; shorten send_window_steps or train longer", windows, steps,
                       args.send_num_checkpoints)


def load_run_data(data: DataArguments, seed_fallback: int = 0):
    """Build the DatasetDict (train/tracking/test) named by ``data``."""
    kwargs = dict(seed=data.facts_seed, tracking_fraction=data.tracking_fraction, test_fraction=data.test_fraction)
    if data.data == "facts":
        kwargs["relations"] = tuple(r.strip() for r in data.relations.split(",") if r.strip())
        kwargs["max_facts_per_relation"] = data.max_facts_per_relation
    return load_facts(data.data, **kwargs)


def _log_test_metrics(output_dir: str, step: int, metrics: dict) -> None:
    """Append the full-test-split probe metrics to metrics.jsonl (keys ``test_*``)."""
    line = {"step": step, "time": time.time(), **{f"test_{k}": v for k, v in metrics.items()}}
    with open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _probes(split, cap=None):
    rows = [r for r in split if r["prompt"] and r["aliases"]]
    if cap is not None:
        rows = rows[:cap]
    return [r["prompt"] for r in rows], [r["aliases"] for r in rows]


def run_training(model_args: ModelArguments, data_args: DataArguments, run_args: RunArguments,
                 args: SeNDConfig) -> dict:
    """Fine-tune with SeND and write the run folder; returns the summary dict.

    Every input is validated (data, sites, layers, window, tracking set)
    before the first optimizer step.
    """
    t_start = time.time()
    ds = load_run_data(data_args)
    for split in ("train", "tracking", "test"):
        if split not in ds or len(ds[split]) == 0:
            raise ValueError(f"the {split!r} split is empty; adjust tracking_fraction/test_fraction or the data")
    check_schedule(args, len(ds["train"]))
    _prepare_output_dir(args, run_args)

    model, tok = load_model(model_args.model_name_or_path, dtype=model_args.model_dtype)
    train_set = tokenize_texts(tok, ds["train"]["statement"], data_args.max_length)
    tracking_set = tokenize_texts(tok, ds["tracking"]["statement"], data_args.max_length)
    test_prompts, test_aliases = _probes(ds["test"], data_args.max_test_probes)
    if not test_prompts:
        raise ValueError("the test split has no probe (prompt + answer) rows: nothing to measure")
    settings = args.eigenscore_settings()

    trainer = SeNDTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=tracking_set,
        tracking_dataset=tracking_set, probe_prompts=test_prompts, probe_aliases=test_aliases,
        processing_class=tok, callbacks=[JsonlMetricsCallback(os.path.join(args.output_dir, "metrics.jsonl"))],
    )

    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "1", "yes"):
        resume = True
    before_file = Path(args.output_dir) / "probes_before.json"
    if resume and before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        logger.info("scoring %d test probes before training", len(test_prompts))
        result = evaluate_probes(model, tok, test_prompts, test_aliases, settings, show_progress=True)
        before = {**result.metrics(), "records": result.records}
        if trainer.is_world_process_zero():
            atomic_write_json(before_file, before)
            _log_test_metrics(args.output_dir, 0, result.metrics())

    t_train = time.time()
    trainer.train(resume_from_checkpoint=resume or None)
    train_seconds = time.time() - t_train

    final_dir = Path(args.output_dir) / "final"
    if trainer.is_world_process_zero():
        tmp = Path(args.output_dir) / ".final.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)

    after = evaluate_probes(trainer.model, tok, test_prompts, test_aliases, settings, show_progress=True)
    if trainer.is_world_process_zero():
        _log_test_metrics(args.output_dir, trainer.state.global_step, after.metrics())
    send_cb = trainer.callback(SensitiveNeuronDropoutCallback)
    es_cb = trainer.callback(EigenScoreCallback)
    summary = {
        "model": model_args.model_name_or_path,
        "data": data_args.data,
        "send_mode": args.send_mode,
        "send_site": args.send_site,
        "send_layers": args.send_layers,
        "splits": {k: len(v) for k, v in ds.items()},
        "test_probes": len(test_prompts),
        "factual_accuracy_before": before["factual_accuracy"],
        "factual_accuracy_after": after.factual_accuracy,
        "eigenscore_before": before["eigenscore"],
        "eigenscore_after": after.eigenscore,
        "sensitive_neurons": send_cb.selections if send_cb else [],
        "eval_history": [{"step": s, **r.metrics()} for s, r in es_cb.history] if es_cb else [],
        "global_steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "final_checkpoint": str(final_dir),
        "eigenscore_settings": settings.__dict__,
    }
    if trainer.is_world_process_zero():
        atomic_write_json(Path(args.output_dir) / "probes_after.json", {**after.metrics(), "records": after.records})
        from .report import plot_training_curves

        plot_training_curves(Path(args.output_dir) / "metrics.jsonl", Path(args.output_dir) / "training_curves.png")
        atomic_write_json(Path(args.output_dir) / "summary.json", summary)
    return summary
