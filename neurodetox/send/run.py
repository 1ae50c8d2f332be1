"""The main job: SeND fine-tuning on facts with before/after hallucination metrics.

``neurodetox train --config recipes/smollm2-facts-send.yaml`` runs
:func:`run_training`. The run folder holds the Trainer checkpoints
(complete or absent), ``final/`` (a loadable HF checkpoint), ``metrics.jsonl``,
``training_curves.png``, ``summary.json``, ``run_config.json`` (the data split and
optimisation settings a resume is checked against) and the marker file
``.neurodetox-run`` (what ``--overwrite_output_dir`` looks for before deleting).

Method: Mohammadzadeh et al., "Sensitive Neuron Dropout (SeND)", arXiv 2410.15460.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from neurodetox.core.errors import UserError
from neurodetox.core.io import atomic_write_json, replace_folder
from neurodetox.core.models import load_model, resolve_model_path
from neurodetox.core.paths import PathNotFoundError, check_writable_destination, is_within
from neurodetox.data import load_facts
from neurodetox.data.lm import tokenize_texts
from neurodetox.metrics.callback import EigenScoreCallback, evaluate_probes_all_ranks
from neurodetox.reports.metrics_log import JsonlMetricsCallback
from neurodetox.reports.reporters import SeNDReporterCallback
from neurodetox.send.callbacks import SensitiveNeuronDropoutCallback
from neurodetox.send.config import SeNDConfig
from neurodetox.send.recipes import DataArguments, ModelArguments, RunArguments
from neurodetox.send.trainer import SeNDTrainer, last_checkpoint

logger = logging.getLogger(__name__)


#: Marker file written into a run folder at the start of every run.
RUN_MARKER = ".neurodetox-run"
#: What a resume is compared against.
RUN_CONFIG = "run_config.json"
#: Entries that make a folder recognisably a neurodetox run (with ``checkpoint-*`` folders).
RUN_FILES = (RUN_MARKER, RUN_CONFIG, "summary.json", "metrics.jsonl", "probes_before.json")

#: Optimisation settings (``SeNDConfig`` fields) a resume must not change without ``allow_resume_changes``.
#: The run length (``max_steps``, ``num_train_epochs``) is not among them: resuming to train longer is allowed.
RESUME_TRAINING_FIELDS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "optim",
    "seed",
    "send_mode",
    "send_site",
    "send_layers",
    "send_drop_fraction",
    "send_num_checkpoints",
    "send_drop_windows",
    "send_window_steps",
    "send_rescale",
    "send_module_path",
    "send_procedure",
    "send_score",
    "send_massive_factor",
    "send_freeze_blocks",
)
#: Data settings (``DataArguments`` fields) a resume must not change without ``allow_resume_changes``.
RESUME_DATA_FIELDS = (
    "data",
    "relations",
    "max_facts_per_relation",
    "split_seed",
    "tracking_fraction",
    "test_fraction",
    "max_length",
    "known_facts_file",
    "known_categories",
)


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is recognisably a neurodetox run (marker, run files or ``checkpoint-*`` folders)."""
    return any((folder / n).exists() for n in RUN_FILES) or any(folder.glob("checkpoint-*"))


def _local_inputs(model_args: ModelArguments, data_args: DataArguments) -> list[tuple[str, Path]]:
    out = []
    for label, value in (
        ("model", model_args.model_name_or_path),
        ("tokenizer", getattr(model_args, "tokenizer", None)),
        ("data file", data_args.data),
    ):
        if value and value != "facts" and Path(value).expanduser().exists():
            out.append((label, Path(value).expanduser()))
    return out


def check_output_dir(
    output_dir: str | os.PathLike,
    run: RunArguments,
    inputs: list[tuple[str, Path]] = (),
    resume: bool = False,
) -> Path:
    """Decide what may happen to the run folder; deletes nothing. Call after every other check.

    Rules: with ``overwrite_output_dir`` the folder must not be the working folder or one of its
    parents, must not hold an input (model, tokenizer or data file), and must be recognisably a
    neurodetox run (:func:`is_run_folder`) unless ``force_overwrite``. Without it, a folder that
    holds checkpoints needs ``resume``.

    Returns:
        The output folder as a :class:`Path`.

    Raises:
        UserError: any rule broken (one line naming the folder and what to do), or an output
            folder whose parent is not writable.
    """
    out = Path(output_dir).expanduser()
    check_writable_destination(out, overwrite=True, what="output_dir")
    nonempty = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; give a folder")
    if nonempty and run.overwrite_output_dir:
        if is_within(Path.cwd(), out):
            raise UserError(
                f"output_dir {out} is the working folder or one of its parents; --overwrite_output_dir would "
                "delete it: choose a dedicated run folder, e.g. --output_dir runs/NAME"
            )
        for label, path in inputs:
            if is_within(path, out):
                raise UserError(
                    f"output_dir {out} holds the {label} {path}; --overwrite_output_dir would delete it: "
                    "choose another output folder"
                )
        if not is_run_folder(out) and not getattr(run, "force_overwrite", False):
            raise UserError(
                f"output_dir {out} is not a neurodetox run folder (no {RUN_MARKER}, summary.json, metrics.jsonl or "
                "checkpoint-*); refusing to delete it: choose another folder or add --force_overwrite true"
            )
    elif nonempty and not resume and last_checkpoint(str(out)) is not None:
        raise UserError(
            f"run folder {out} already holds checkpoints; pass --resume_from_checkpoint true to continue it "
            "or --overwrite_output_dir true to start over"
        )
    return out


def _prepare_output_dir(out: Path, run: RunArguments) -> None:
    """Delete (when asked, and already checked by :func:`check_output_dir`), create and mark the run folder."""
    if out.is_dir() and any(out.iterdir()) and run.overwrite_output_dir:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("neurodetox run folder\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write the run folder {out}: {e.strerror}") from None


def run_config(model_args: ModelArguments, data_args: DataArguments, args: SeNDConfig, peft_config=None) -> dict:
    """What a run records in ``run_config.json``: data split, model and optimisation settings (JSON types)."""
    data = {k: getattr(data_args, k) for k in RESUME_DATA_FIELDS if hasattr(data_args, k)}
    training = {k: getattr(args, k) for k in RESUME_TRAINING_FIELDS if hasattr(args, k)}
    training = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in training.items()}
    training = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in training.items()}
    training["world_size"] = args.world_size
    return {
        "model": {"model_name_or_path": model_args.model_name_or_path, "model_dtype": model_args.model_dtype},
        "data": data,
        "training": training,
        "peft": peft_config,
    }


def check_resume_config(recorded: dict, current: dict, allow_changes: bool = False) -> list[str]:
    """Compare a run's recorded ``run_config.json`` with the settings of a resume.

    Returns:
        ``"section.field: recorded -> now"`` for every difference (empty: identical).

    Raises:
        UserError: differences and not ``allow_changes``; the message names each field.
    """
    diffs = []
    for section in ("model", "data", "training", "peft"):
        old, new = recorded.get(section), current.get(section)
        if section == "peft" or not isinstance(old, dict) or not isinstance(new, dict):
            if old != new and section in recorded:
                diffs.append(f"{section}: {old!r} -> {new!r}")
            continue
        for k in sorted(set(old) | set(new)):
            if k in old and old.get(k) != new.get(k):
                diffs.append(f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}")
    if diffs and not allow_changes:
        raise UserError(
            f"resume changes the run's recorded settings: {'; '.join(diffs)}. Resume with the recorded values, "
            "start a new run, or pass --allow_resume_changes true"
        )
    return diffs


def rebuild_split(summary: dict):
    """The exact train / tracking / test split of a finished run, from its ``summary.json``.

    Args:
        summary: the parsed ``summary.json`` of a run (its ``split`` entry, which records
            :data:`neurodetox.data.settings.SPLIT_FIELDS`).

    Returns:
        ``datasets.DatasetDict`` with ``train``, ``tracking``, ``test``.

    Raises:
        UserError: the summary does not record the split (written by an older version), or records
            invalid values; the message names the missing fields.
    """
    from neurodetox.data.settings import SPLIT_FIELDS, FactDataArguments

    split = summary.get("split") if isinstance(summary, dict) else None
    missing = [k for k in SPLIT_FIELDS if not isinstance(split, dict) or k not in split]
    if missing:
        raise UserError(
            f"the run's summary.json does not record its data split (missing: {', '.join(missing)}); "
            "it was written by an older neurodetox: give the data and split settings explicitly"
        )
    try:
        return FactDataArguments(**{k: split[k] for k in SPLIT_FIELDS}).load()
    except TypeError as e:
        raise UserError(f"the run's summary.json records an invalid data split {split!r}: {e}") from None


def planned_steps(args: SeNDConfig, n_train: int) -> int:
    """Optimizer steps the run will take (``max_steps`` or epochs × steps per epoch)."""
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    return math.ceil(n_train / per_step) * math.ceil(args.num_train_epochs)


def check_schedule(args: SeNDConfig, n_train: int) -> None:
    """Fail before training if the SeND window does not fit the run; warn if no selection can happen.

    Raises:
        UserError: ``send_window_steps`` longer than the run.
    """
    if args.send_mode == "off":
        return
    steps = planned_steps(args, n_train)
    if args.send_window_steps > steps:
        raise UserError(
            f"send_window_steps={args.send_window_steps} is longer than the run ({steps} steps): "
            "no window would ever end; use a smaller window or 0 (one epoch)"
        )
    # recordings at step 0 and at every window end before the last step: a selection needs C of them
    if args.send_window_steps:
        recordings = 1 + (steps - 1) // args.send_window_steps
    else:
        recordings = math.ceil(args.num_train_epochs)
    if recordings < args.send_num_checkpoints:
        logger.warning(
            "only %d SeND recordings fit in %d steps: with send_num_checkpoints=%d no neuron will ever "
            "be dropped; shorten send_window_steps or train longer",
            recordings,
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

    def __init__(self, trainer, tok, prompts, aliases, settings, path: Path, into: dict):
        self.trainer, self.tok, self.prompts, self.aliases, self.settings, self.path, self.into = (
            trainer,
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
        log_test_metrics(self.trainer, result)


def log_test_metrics(trainer, result) -> None:
    """The full-test-split probe scores through the trainer's log (keys ``test_*``: every reporter and
    ``metrics.jsonl``) and their per-prompt histograms (:class:`~neurodetox.reports.reporters.SeNDReporterCallback`).
    Call on every rank."""
    trainer.log({f"test_{k}": v for k, v in result.metrics().items()})
    reporter = trainer.callback(SeNDReporterCallback)
    if reporter is not None:
        reporter.write_probes("test", result.records, trainer.state.global_step)


def _probes(split, cap=None):
    rows = [r for r in split if r["prompt"] and r["aliases"]]
    if cap is not None:
        rows = rows[:cap]
    return [r["prompt"] for r in rows], [r["aliases"] for r in rows]


def deepspeed_config(args: SeNDConfig) -> Optional[dict]:
    """The DeepSpeed config in force: ``--deepspeed`` (file or dict), else the one ``accelerate launch`` passes
    (``ACCELERATE_DEEPSPEED_CONFIG_FILE``), else ``None``.

    Raises:
        PathNotFoundError: the named config file is missing (a ``UserError`` and ``FileNotFoundError``).
    """
    cfg = args.deepspeed
    if not cfg and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        cfg = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    if isinstance(cfg, str):
        if not os.path.isfile(cfg):
            raise PathNotFoundError(f"DeepSpeed config not found: {cfg}")
        with open(cfg) as f:
            cfg = json.load(f)
    return cfg or None


def check_deepspeed_config(args: SeNDConfig) -> None:
    """Fail before training when a DeepSpeed config contradicts the Trainer's arguments.

    Raises:
        PathNotFoundError: the config file is missing.
        UserError: a batch-size or accumulation value that differs from the
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
            raise UserError(
                f"DeepSpeed config {ds_key}={v} contradicts {arg_name}={value}; "
                f'set it to "auto" (recommended) or to {value}'
            )
    tbs = cfg.get("train_batch_size", "auto")
    expect = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    if tbs != "auto" and int(tbs) != expect:
        raise UserError(
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
        UserError: an unknown LoRA field (the message lists the valid ones).
    """
    import dataclasses

    from peft import LoraConfig, get_peft_model

    valid = {f.name for f in dataclasses.fields(LoraConfig)}
    bad = sorted(set(peft_config) - valid)
    if bad:
        raise UserError(
            f"unknown peft field(s) {bad} in the recipe; valid LoraConfig fields include "
            f"r, lora_alpha, lora_dropout, target_modules, bias, modules_to_save"
        )
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **peft_config))
    # transformers 5 reads activation_checkpointing(_kwargs); gradient_checkpointing* are deprecated aliases
    # copied at construction only, so a later change must go to the new name
    ckpt = "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    if getattr(args, ckpt):
        model.enable_input_require_grads()
        ds = deepspeed_config(args)
        if ds and ds.get("zero_optimization", {}).get("stage") == 3:
            kwargs = dict(getattr(args, f"{ckpt}_kwargs") or {})
            if kwargs.get("use_reentrant") is False:
                logger.warning("PEFT + ZeRO-3 + non-reentrant checkpointing crashes: forcing use_reentrant=True")
            kwargs["use_reentrant"] = True
            setattr(args, f"{ckpt}_kwargs", kwargs)
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
            replace_folder(tmp, adapter_dir)
            merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).merge_and_unload()
            tmp = output_dir / ".final.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        replace_folder(tmp, final_dir)
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

    Every input is validated (model path, data, split sizes, window, DeepSpeed config, output
    folder, and on resume the recorded settings) before the run folder is touched, so a
    mistake deletes nothing. ``--overwrite_output_dir`` then deletes only a folder that
    :func:`check_output_dir` accepts.

    Raises:
        UserError: any invalid input (one line naming it), including a resume whose data split or
            optimisation settings differ from ``run_config.json`` (see :func:`check_resume_config`).
    """
    t_start = time.time()
    resolve_model_path(model_args.model_name_or_path)  # a missing model path fails here, before any deletion
    ds = load_run_data(data_args)
    for split in ("train", "tracking", "test"):
        if split not in ds or len(ds[split]) == 0:
            raise UserError(
                f"the {split!r} split of {data_args.data} is empty; adjust tracking_fraction/test_fraction or the data"
            )
    if args.send_mode != "off" and len(ds["tracking"]) < 2:
        raise UserError(
            f"the tracking set (split 'tracking' of {data_args.data}) has {len(ds['tracking'])} row; SeND's "
            "sensitivity and EES need at least 2: raise tracking_fraction or give more facts"
        )
    if getattr(data_args, "known_facts_file", None):  # train on the facts the base model knows (Gekhman et al.)
        from neurodetox.data.triage import filter_known

        ds["train"] = filter_known(
            ds["train"], data_args.known_facts_file, data_args.known_categories, data_args.split_record()
        )
        logger.info("training on %d known facts (%s)", len(ds["train"]), data_args.known_facts_file)
    check_schedule(args, len(ds["train"]))
    check_deepspeed_config(args)
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "1", "yes"):
        resume = True
    if isinstance(resume, str) and resume.lower() in ("false", "0", "no", ""):
        resume = None
    out = check_output_dir(args.output_dir, run_args, _local_inputs(model_args, data_args), bool(resume))
    config = run_config(model_args, data_args, args, peft_config)
    resume_changes: list[str] = []
    recorded_file = out / RUN_CONFIG
    if resume and not run_args.overwrite_output_dir:
        if recorded_file.is_file():
            recorded = json.loads(recorded_file.read_text(encoding="utf-8"))
            resume_changes = check_resume_config(recorded, config, run_args.allow_resume_changes)
            if resume_changes:
                logger.warning("resuming with changed settings: %s", "; ".join(resume_changes))
        else:
            logger.warning("%s has no %s: the resumed settings cannot be compared", out, RUN_CONFIG)
    with args.main_process_first(desc="prepare the run folder"):
        if args.process_index == 0:
            _prepare_output_dir(out, run_args)
            atomic_write_json(recorded_file, {**config, "resume_changes": resume_changes})

    model, tok = load_model(
        model_args.model_name_or_path, dtype=model_args.model_dtype, tokenizer=getattr(model_args, "tokenizer", None)
    )
    if peft_config:
        model = wrap_peft(model, peft_config, args)
    train_set = tokenize_texts(tok, ds["train"]["statement"], data_args.max_length)
    tracking_set = tokenize_texts(tok, ds["tracking"]["statement"], data_args.max_length)
    test_prompts, test_aliases = _probes(ds["test"], data_args.max_test_probes)
    if not test_prompts:
        raise UserError("the test split has no probe (prompt + answer) rows: nothing to measure")
    settings = args.eigenscore_settings()

    trainer = SeNDTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=tracking_set,
        tracking_dataset=tracking_set,
        probe_prompts=test_prompts,
        probe_aliases=test_aliases,
        tracking_probe_prompts=_probes(ds["tracking"])[0],
        tracking_probe_aliases=_probes(ds["tracking"])[1],
        processing_class=tok,
        callbacks=[JsonlMetricsCallback(os.path.join(args.output_dir, "metrics.jsonl"))],
    )

    before_file = Path(args.output_dir) / "probes_before.json"
    before: dict = {}
    if not run_args.score_test_probes:
        before.update(factual_accuracy=None, eigenscore=None)
    elif resume and before_file.is_file():
        before.update(json.loads(before_file.read_text()))
    else:
        # scored from on_train_begin: after DeepSpeed has wrapped the model (ZeRO-3 weights are partitioned
        # until then), before the first optimizer step
        trainer.add_callback(
            _ProbesBeforeTraining(trainer, tok, test_prompts, test_aliases, settings, before_file, before)
        )

    t_train = time.time()
    trainer.train(resume_from_checkpoint=resume or None)
    train_seconds = time.time() - t_train

    final_dir = save_final_model(trainer, tok, Path(args.output_dir), merge_adapter=bool(peft_config))

    after = None
    if run_args.score_test_probes:
        after = evaluate_probes_all_ranks(trainer.model, tok, test_prompts, test_aliases, settings, show_progress=True)
        log_test_metrics(trainer, after)
    send_cb = trainer.callback(SensitiveNeuronDropoutCallback)
    es_cb = trainer.callback(EigenScoreCallback)
    summary = {
        "model": model_args.model_name_or_path,
        "data": data_args.data,
        "split": data_args.split_record(),
        "facts_seed": data_args.split_seed,
        "run_config": config,
        "resume_changes": resume_changes,
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
