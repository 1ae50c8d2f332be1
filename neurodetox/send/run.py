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
from typing import Optional

from transformers import TrainerCallback

from neurodetox.core.io import atomic_write_json
from neurodetox.core.models import load_model
from neurodetox.data import load_facts
from neurodetox.data.lm import tokenize_texts
from neurodetox.metrics.callback import EigenScoreCallback, evaluate_probes_all_ranks
from neurodetox.reports.metrics_log import JsonlMetricsCallback
from neurodetox.send.callbacks import SensitiveNeuronDropoutCallback
from neurodetox.send.config import SeNDConfig
from neurodetox.send.recipes import DataArguments, ModelArguments, RunArguments
from neurodetox.send.trainer import SeNDTrainer, last_checkpoint

logger = logging.getLogger(__name__)


def _prepare_output_dir(args: SeNDConfig, run: RunArguments) -> None:
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        if run.overwrite_output_dir:
            shutil.rmtree(out)
        elif not args.resume_from_checkpoint and last_checkpoint(str(out)) is not None:
            raise FileExistsError(
                f"run folder {out} already holds checkpoints; pass --resume_from_checkpoint true to continue it "
                "or --overwrite_output_dir true to start over"
            )
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
        raise ValueError(
            f"send_window_steps={args.send_window_steps} is longer than the run ({steps} steps): "
            "no window would ever end; use a smaller window or 0 (one epoch)"
        )
    windows = steps // args.send_window_steps if args.send_window_steps else math.ceil(args.num_train_epochs)
    # recordings at step 0 and at every window end but the last: a selection needs C of them
    if windows < args.send_num_checkpoints:
        logger.warning(
            "only %d SeND windows fit in %d steps: with send_num_checkpoints=%d no neuron will ever "
            "be dropped; shorten send_window_steps or train longer",
            windows,
            steps,
            args.send_num_checkpoints,
        )


def load_run_data(data: DataArguments, seed_fallback: int = 0):
    """Build the DatasetDict (train/tracking/test) named by ``data``."""
    kwargs = dict(seed=data.facts_seed, tracking_fraction=data.tracking_fraction, test_fraction=data.test_fraction)
    if data.data == "facts":
        kwargs["relations"] = tuple(r.strip() for r in data.relations.split(",") if r.strip())
        kwargs["max_facts_per_relation"] = data.max_facts_per_relation
    return load_facts(data.data, **kwargs)


class _ProbesBeforeTraining(TrainerCallback):
    """Score the test probes once training has been set up, before the first step."""

    def __init__(self, tok, prompts, aliases, settings, path: Path, into: dict):
        self.tok, self.prompts, self.aliases, self.settings, self.path, self.into = (
            tok,
            prompts,
            aliases,
            settings,
            path,
            into,
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        logger.info("scoring %d test probes before training", len(self.prompts))
        result = evaluate_probes_all_ranks(
            model, self.tok, self.prompts, self.aliases, self.settings, show_progress=True
        )
        self.into.update({**result.metrics(), "records": result.records})
        if state.is_world_process_zero:
            atomic_write_json(self.path, self.into)
            _log_test_metrics(args.output_dir, state.global_step, result.metrics())


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


def deepspeed_config(args: SeNDConfig) -> Optional[dict]:
    """The DeepSpeed config in force: ``--deepspeed`` (file or dict), else the one ``accelerate launch`` passes
    (``ACCELERATE_DEEPSPEED_CONFIG_FILE``), else ``None``.

    Raises:
        FileNotFoundError: the named config file is missing.
    """
    cfg = args.deepspeed
    if not cfg and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        cfg = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    if isinstance(cfg, str):
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"DeepSpeed config not found: {cfg}")
        with open(cfg) as f:
            cfg = json.load(f)
    return cfg or None


def check_deepspeed_config(args: SeNDConfig) -> None:
    """Fail before training when a DeepSpeed config contradicts the Trainer's arguments.

    Raises:
        FileNotFoundError: the config file is missing.
        ValueError: a batch-size or accumulation value that differs from the
            Trainer's (use ``"auto"``), or a ``train_batch_size`` that is not
            micro-batch × accumulation × world size.
    """
    cfg = deepspeed_config(args)
    if not cfg:
        return
    world = max(args.world_size, 1)
    checks = [
        ("train_micro_batch_size_per_gpu", "per_device_train_batch_size", args.per_device_train_batch_size),
        ("gradient_accumulation_steps", "gradient_accumulation_steps", args.gradient_accumulation_steps),
    ]
    for ds_key, arg_name, value in checks:
        v = cfg.get(ds_key, "auto")
        if v != "auto" and int(v) != int(value):
            raise ValueError(
                f"DeepSpeed config {ds_key}={v} contradicts {arg_name}={value}; "
                f'set it to "auto" (recommended) or to {value}'
            )
    tbs = cfg.get("train_batch_size", "auto")
    expect = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    if tbs != "auto" and int(tbs) != expect:
        raise ValueError(
            f"DeepSpeed config train_batch_size={tbs} is not per_device_train_batch_size × "
            f"gradient_accumulation_steps × world size = {args.per_device_train_batch_size} × "
            f'{args.gradient_accumulation_steps} × {world} = {expect}; remove the key or set it to "auto"'
        )


def wrap_peft(model, peft_config: dict, args: SeNDConfig):
    """Wrap ``model`` with a LoRA adapter from the recipe's ``peft`` section (``peft.LoraConfig`` fields).

    With gradient checkpointing, inputs are made to require grads (needed by
    reentrant checkpointing) and, under DeepSpeed ZeRO-3, ``use_reentrant``
    is forced to ``True``: PEFT + ZeRO-3 + non-reentrant checkpointing
    crashes (``CheckpointError … shape [0]``, platform-notes.md).

    Raises:
        ValueError: an unknown LoRA field (the message lists the valid ones).
    """
    import dataclasses

    from peft import LoraConfig, get_peft_model

    valid = {f.name for f in dataclasses.fields(LoraConfig)}
    bad = sorted(set(peft_config) - valid)
    if bad:
        raise ValueError(
            f"unknown peft field(s) {bad} in the recipe; valid LoraConfig fields include "
            f"r, lora_alpha, lora_dropout, target_modules, bias, modules_to_save"
        )
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **peft_config))
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
        ds = deepspeed_config(args)
        if ds and ds.get("zero_optimization", {}).get("stage") == 3:
            kwargs = dict(args.gradient_checkpointing_kwargs or {})
            if kwargs.get("use_reentrant") is False:
                logger.warning("PEFT + ZeRO-3 + non-reentrant checkpointing crashes: forcing use_reentrant=True")
            kwargs["use_reentrant"] = True
            args.gradient_checkpointing_kwargs = kwargs
    return model


def save_final_model(trainer, tok, output_dir: Path, merge_adapter: bool) -> Path:
    """Write ``output_dir/final`` (a full HF checkpoint) atomically; call on every rank.

    ``save_model`` runs on every rank (ZeRO-3 gathers weights collectively);
    rank 0 then renames the folder into place. A LoRA run also keeps its
    adapter in ``final-adapter/`` and merges it into ``final/``.
    """
    final_dir = output_dir / "final"
    tmp = output_dir / (".final-adapter.partial" if merge_adapter else ".final.partial")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        if merge_adapter:
            from peft import AutoPeftModelForCausalLM

            adapter_dir = output_dir / "final-adapter"
            shutil.rmtree(adapter_dir, ignore_errors=True)
            os.replace(tmp, adapter_dir)
            merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).merge_and_unload()
            tmp = output_dir / ".final.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    run_args: RunArguments,
    args: SeNDConfig,
    peft_config: Optional[dict] = None,
) -> dict:
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
    check_deepspeed_config(args)
    with args.main_process_first(desc="prepare the run folder"):
        if args.process_index == 0:
            _prepare_output_dir(args, run_args)

    model, tok = load_model(model_args.model_name_or_path, dtype=model_args.model_dtype)
    if peft_config:
        model = wrap_peft(model, peft_config, args)
    train_set = tokenize_texts(tok, ds["train"]["statement"], data_args.max_length)
    tracking_set = tokenize_texts(tok, ds["tracking"]["statement"], data_args.max_length)
    test_prompts, test_aliases = _probes(ds["test"], data_args.max_test_probes)
    if not test_prompts:
        raise ValueError("the test split has no probe (prompt + answer) rows: nothing to measure")
    settings = args.eigenscore_settings()

    trainer = SeNDTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=tracking_set,
        tracking_dataset=tracking_set,
        probe_prompts=test_prompts,
        probe_aliases=test_aliases,
        processing_class=tok,
        callbacks=[JsonlMetricsCallback(os.path.join(args.output_dir, "metrics.jsonl"))],
    )

    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "1", "yes"):
        resume = True
    before_file = Path(args.output_dir) / "probes_before.json"
    before: dict = {}
    if not run_args.score_test_probes:
        before.update(factual_accuracy=None, eigenscore=None)
    elif resume and before_file.is_file():
        before.update(json.loads(before_file.read_text()))
    else:
        # scored from on_train_begin: after DeepSpeed has wrapped the model (ZeRO-3 weights are partitioned
        # until then), before the first optimizer step
        trainer.add_callback(_ProbesBeforeTraining(tok, test_prompts, test_aliases, settings, before_file, before))

    t_train = time.time()
    trainer.train(resume_from_checkpoint=resume or None)
    train_seconds = time.time() - t_train

    final_dir = save_final_model(trainer, tok, Path(args.output_dir), merge_adapter=bool(peft_config))

    after = None
    if run_args.score_test_probes:
        after = evaluate_probes_all_ranks(trainer.model, tok, test_prompts, test_aliases, settings, show_progress=True)
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
        "peft": peft_config,
        "world_size": args.world_size,
        "splits": {k: len(v) for k, v in ds.items()},
        "test_probes": len(test_prompts),
        "factual_accuracy_before": before["factual_accuracy"],
        "factual_accuracy_after": after.factual_accuracy if after else None,
        "eigenscore_before": before["eigenscore"],
        "eigenscore_after": after.eigenscore if after else None,
        "sensitive_neurons": send_cb.selections if send_cb else [],
        "eval_history": [{"step": s, **r.metrics()} for s, r in es_cb.history] if es_cb else [],
        "global_steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "final_checkpoint": str(final_dir),
        "eigenscore_settings": settings.__dict__,
    }
    if trainer.is_world_process_zero():
        if after is not None:
            atomic_write_json(
                Path(args.output_dir) / "probes_after.json", {**after.metrics(), "records": after.records}
            )
        from neurodetox.reports.training import plot_training_curves

        plot_training_curves(Path(args.output_dir) / "metrics.jsonl", Path(args.output_dir) / "training_curves.png")
        atomic_write_json(Path(args.output_dir) / "summary.json", summary)
    return summary
