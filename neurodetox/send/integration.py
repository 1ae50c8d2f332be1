"""SeND, activation statistics and the hallucination metrics in any ``transformers.Trainer`` subclass.

TRL's ``SFTTrainer`` first: the host trainer keeps its own config (no dataclass inheritance,
so ``SFTConfig``'s defaults stay), its data collator and the labels it builds (completion-only
or assistant-only loss masks). Two ways, one implementation (:class:`SeNDMixin`)::

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, eval_dataset=ev)
    add_send(trainer, SeNDArguments(send_window_steps=50), tracking_dataset=texts,
             probe_prompts=prompts, probe_aliases=aliases)        # an existing trainer

    class MySFT(SeNDMixin, SFTTrainer): ...                       # or a class of your own
    trainer = MySFT(..., send_args=SeNDArguments(...), tracking_dataset=texts, ...)

Method: Mohammadzadeh et al., "Hallucination Detox: Sensitive Neuron Dropout (SeND) for Large
Language Model Training", arXiv 2410.15460 (the dropout and the stopping rule); Chen et al.,
"INSIDE: LLMs' Internal States Retain the Power of Hallucination Detection", arXiv 2402.03744
(EigenScore and the detectors scored at each evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import typing
import warnings
from typing import Optional, Sequence

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from neurodetox.core.checks import check_int, check_number, check_probability
from neurodetox.core.errors import UserError
from neurodetox.core.sites import SITE_KINDS, assert_sites_reached, resolve_sites
from neurodetox.data.lm import CausalLMCollator, tokenize_texts
from neurodetox.metrics.callback import EigenScoreCallback, evaluate_probes_all_ranks
from neurodetox.metrics.settings import EigenScoreSettings
from neurodetox.reports.reporters import SeNDReporterCallback
from neurodetox.send.callbacks.activation_stats import ActivationStatsCallback
from neurodetox.send.callbacks.base import CheckpointedCallback
from neurodetox.send.callbacks.sensitive_dropout import SensitiveNeuronDropoutCallback
from neurodetox.send.config import SeNDConfig
from neurodetox.send.sensitivity import SEND_MODES

__all__ = ["SeNDArguments", "SeNDMixin", "add_send", "eigenscore_settings", "tokenize_tracking", "with_send"]

logger = logging.getLogger(__name__)

#: The ``SeNDConfig`` fields a host trainer does not have (``TrainingArguments`` fields stay the host's).
FIELD_PREFIXES = ("send_", "activation_stats_", "eigenscore_")


def _send_fields() -> list[tuple]:
    hints = typing.get_type_hints(SeNDConfig)
    out = []
    for f in dataclasses.fields(SeNDConfig):
        if f.name.startswith(FIELD_PREFIXES):
            out.append((f.name, hints[f.name], dataclasses.field(default=f.default, metadata=dict(f.metadata))))
    return out


def _check_send_arguments(self) -> None:
    if self.send_mode not in SEND_MODES:
        raise UserError(f"send_mode must be one of {', '.join(SEND_MODES)}, got {self.send_mode!r}")
    for name in ("send_site", "activation_stats_site"):
        valid = SITE_KINDS + (("none",) if name == "activation_stats_site" else ())
        if getattr(self, name) not in valid:
            raise UserError(f"{name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
    check_probability("send_drop_fraction", self.send_drop_fraction, open_high=True)
    check_int("send_num_checkpoints", self.send_num_checkpoints, minimum=2)
    check_int("send_drop_windows", self.send_drop_windows, minimum=1)
    check_int("send_window_steps", self.send_window_steps, minimum=0)
    check_int("send_tracking_batch_size", self.send_tracking_batch_size, minimum=1)
    for name in ("send_stop_loss", "send_stop_ees"):
        if getattr(self, name) is not None:
            check_number(name, getattr(self, name))
    check_int("eigenscore_num_prompts", self.eigenscore_num_prompts, minimum=0)
    try:
        eigenscore_settings(self)
    except UserError as e:
        raise UserError(f"eigenscore_{e}") from None


#: The SeND, statistics and detector settings of :class:`~neurodetox.send.SeNDConfig` on their own
#: (its ``send_*``, ``activation_stats_*`` and ``eigenscore_*`` fields, with the same defaults and
#: help, read from ``SeNDConfig``), for a trainer that keeps its own ``TrainingArguments`` subclass
#: (TRL's ``SFTConfig``). ``HfArgumentParser`` / ``TrlParser`` accept it next to the host's config.
#: Raises ``UserError`` at construction for a value out of range, naming the field (the SeND
#: variant fields, ``send_score`` ..., are checked by the callback when :func:`add_send` builds it).
SeNDArguments = dataclasses.make_dataclass(
    "SeNDArguments",
    _send_fields(),
    namespace={"__post_init__": _check_send_arguments, "__module__": __name__},
)
SeNDArguments.__doc__ = (
    "SeND (arXiv 2410.15460), activation-statistics and detector (INSIDE, arXiv 2402.03744) settings "
    "for any Trainer: the send_*, activation_stats_* and eigenscore_* fields of SeNDConfig, same "
    "defaults. Raises UserError at construction for a value out of range, naming the field."
)


def eigenscore_settings(send_args, seed: int = 0) -> EigenScoreSettings:
    """The ``eigenscore_<name>`` fields of ``send_args`` that :class:`EigenScoreSettings` has, with ``seed``.

    Raises:
        UserError: a field out of range (named without its ``eigenscore_`` prefix).
    """
    names = [n for n in EigenScoreSettings.field_names() if n != "seed" and hasattr(send_args, f"eigenscore_{n}")]
    return EigenScoreSettings(seed=seed, **{n: getattr(send_args, f"eigenscore_{n}") for n in names})


def tokenize_tracking(tokenizer, items, max_length: int = 1024) -> list[dict]:
    """SeND tracking items as ``[{"input_ids", "attention_mask"}]`` whatever format they come in.

    Accepts strings; rows with ``input_ids`` (kept as they are); ``{"text"}`` rows;
    conversational rows (``{"messages": [...]}`` or ``{"prompt": [...], "completion": [...]}``,
    rendered with the tokenizer's chat template, as TRL trains them); and
    ``{"prompt", "completion"}`` strings (concatenated).

    Args:
        tokenizer: the model's tokenizer.
        items: a sequence or ``datasets.Dataset`` of the above, ``N ≥ 1`` rows.
        max_length: truncation length in tokens (≥ 2). Default 1024 (``SFTConfig.max_length``).

    Raises:
        UserError: an empty set, a row in none of these formats, or a conversational row with a
            tokenizer that has no chat template.
    """
    rows = list(items)
    if not rows:
        raise UserError("the SeND tracking set is empty: give at least 2 held-out items")
    if all("input_ids" in r for r in rows if isinstance(r, dict)) and all(isinstance(r, dict) for r in rows):
        return [
            {
                "input_ids": list(r["input_ids"]),
                "attention_mask": list(r.get("attention_mask") or [1] * len(r["input_ids"])),
            }
            for r in rows
        ]
    out = []
    for i, r in enumerate(rows):
        text, chat = _tracking_text(tokenizer, r, i)
        if chat:  # the template already holds the special tokens (BOS), as TRL tokenises it
            ids = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        else:
            out.extend(tokenize_texts(tokenizer, [text], max_length))
    return out


def _tracking_text(tokenizer, r, i: int) -> tuple[str, bool]:
    """(text, rendered through the chat template) of one tracking item."""
    if isinstance(r, str):
        return r, False
    if not isinstance(r, dict):
        raise UserError(f"tracking item {i} is a {type(r).__name__}; give strings or dataset rows")
    messages = r.get("messages")
    if messages is None and isinstance(r.get("prompt"), list):
        messages = list(r["prompt"]) + list(r.get("completion") or [])
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("conversational tracking items need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False), True
    if isinstance(r.get("text"), str):
        return r["text"], False
    if isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str):
        return r["prompt"] + r["completion"], False
    raise UserError(f"tracking item {i} has keys {sorted(r)}; valid: input_ids, text, messages, or prompt + completion")


class _TestProbeScores(TrainerCallback):
    """Scores the test probes before the first step and after the last; logs them through the trainer."""

    def __init__(self, trainer, tokenizer, prompts, aliases, settings):
        self.trainer, self.tokenizer, self.settings = trainer, tokenizer, settings
        self.prompts, self.aliases = list(prompts), list(aliases)
        self.before = self.after = None

    def _score(self, model, state):
        result = evaluate_probes_all_ranks(model, self.tokenizer, self.prompts, self.aliases, self.settings)
        self.trainer.log({f"test_{k}": v for k, v in result.metrics().items()})
        reporter = self.trainer.callback(SeNDReporterCallback)
        if reporter is not None:
            reporter.write_probes("test", result.records, state.global_step)
        return result

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.before is None:
            self.before = self._score(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = self._score(model, state)


class SeNDMixin:
    """Adds SeND dropout, activation statistics and the hallucination metrics to a Trainer subclass.

    ``class MySFT(SeNDMixin, SFTTrainer)`` (mixin first) or :func:`add_send` on an existing
    trainer. It adds, from ``send_args`` (:data:`SeNDArguments`, or a
    :class:`~neurodetox.send.SeNDConfig` used as the trainer's args):

    * :class:`~neurodetox.send.callbacks.ActivationStatsCallback` (unless
      ``activation_stats_site == "none"``): running per-neuron mean/variance of training tokens;
    * :class:`~neurodetox.send.callbacks.SensitiveNeuronDropoutCallback` (unless
      ``send_mode == "off"``), recording the tracking items at each window end (their own
      right-padding collator; the host's training collator and labels are not touched);
    * :class:`~neurodetox.metrics.callback.EigenScoreCallback` on the first
      ``eigenscore_num_prompts`` probes: scored at each evaluation (``eval_strategy``) and
      merged into the evaluation metrics (``eval_eigenscore``, ``eval_factual_accuracy``, ...);
    * with ``test_prompts``: the whole test split scored before the first and after the last
      step, logged as ``test_*``;
    * :class:`~neurodetox.reports.reporters.SeNDReporterCallback`: selections' neuron indices,
      activation statistics and per-prompt detector scores as histograms in the reporters.

    Scalars (``send/*``, ``stats/*``) join each training log, so they reach every reporter and
    ``state.log_history``. On ``train(resume_from_checkpoint=...)`` the callbacks' state is
    restored from the checkpoint (written there in ``on_save``).

    Args (keyword-only, besides the host trainer's):
        send_args: :data:`SeNDArguments`; ``None`` uses ``args`` if it is a ``SeNDConfig``,
            else adds nothing (call :meth:`attach_send` later).
        tracking_dataset, probe_prompts, probe_aliases, tracking_probe_prompts,
        tracking_probe_aliases, test_prompts, test_aliases, tracking_collator: see :meth:`attach_send`.
    """

    def __init__(
        self,
        *args,
        send_args=None,
        tracking_dataset=None,
        probe_prompts: Optional[Sequence[str]] = None,
        probe_aliases: Optional[Sequence[Sequence[str]]] = None,
        tracking_probe_prompts: Optional[Sequence[str]] = None,
        tracking_probe_aliases: Optional[Sequence[Sequence[str]]] = None,
        test_prompts: Optional[Sequence[str]] = None,
        test_aliases: Optional[Sequence[Sequence[str]]] = None,
        tracking_collator=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if send_args is None and isinstance(self.args, SeNDConfig):
            send_args = self.args
        if send_args is not None:
            self.attach_send(
                send_args,
                tracking_dataset=tracking_dataset,
                probe_prompts=probe_prompts,
                probe_aliases=probe_aliases,
                tracking_probe_prompts=tracking_probe_prompts,
                tracking_probe_aliases=tracking_probe_aliases,
                test_prompts=test_prompts,
                test_aliases=test_aliases,
                tracking_collator=tracking_collator,
            )

    def attach_send(
        self,
        send_args,
        *,
        tracking_dataset=None,
        probe_prompts: Optional[Sequence[str]] = None,
        probe_aliases: Optional[Sequence[Sequence[str]]] = None,
        tracking_probe_prompts: Optional[Sequence[str]] = None,
        tracking_probe_aliases: Optional[Sequence[Sequence[str]]] = None,
        test_prompts: Optional[Sequence[str]] = None,
        test_aliases: Optional[Sequence[Sequence[str]]] = None,
        tracking_collator=None,
    ) -> None:
        """Add the callbacks configured by ``send_args`` (call once, before ``train``).

        Args:
            send_args: :data:`SeNDArguments` or a ``SeNDConfig``; the seed of SeND's ``random``
                mode and of the probe sampling is the trainer's ``args.seed``.
            tracking_dataset: SeND's held-out tracking items, ``N ≥ 2``, in any format
                :func:`tokenize_tracking` takes (strings, chat rows, tokenised rows).
            probe_prompts, probe_aliases: fact probes scored at each evaluation (the first
                ``eigenscore_num_prompts``); shown in ``eigenscore_prompt_format`` (``"chat"``:
                through the tokenizer's chat template).
            tracking_probe_prompts, tracking_probe_aliases: labelled probes, disjoint from the
                probes, the hidden-state probe is refit on at each evaluation.
            test_prompts, test_aliases: the whole test split, scored before and after training
                (logged as ``test_factual_accuracy``, ``test_eigenscore``).
            tracking_collator: batches the tracking items for the recordings (it must return
                ``input_ids`` and ``attention_mask``); default a right-padding
                :class:`~neurodetox.data.lm.CausalLMCollator` (not the host's training collator,
                which may be padding-free).

        Raises:
            UserError: SeND on without tracking items (or fewer than 2), probes without aliases
                of the same length, a trainer without ``processing_class`` (tokenizer), or
                ``send_args`` out of range. ValueError: a site or layer the model lacks.
        """
        if any(
            isinstance(cb, (SensitiveNeuronDropoutCallback, SeNDReporterCallback))
            for cb in self.callback_handler.callbacks
        ):
            raise UserError("SeND is already attached to this trainer; call add_send / attach_send once")
        if not isinstance(send_args, SeNDConfig):
            send_args.__post_init__()  # fields may have been changed in place since construction
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)  # a processor wraps it
        if tok is None and (send_args.send_mode != "off" or probe_prompts or test_prompts):
            raise UserError("SeND tracking and the probes need the trainer's tokenizer: pass processing_class=")
        seed = self.args.seed
        stats = send = None
        if send_args.activation_stats_site != "none":
            stats = ActivationStatsCallback(send_args.activation_stats_site, send_args.activation_stats_layers, None)
            resolve_sites(self.model, stats.site, stats.layers)  # fail now on a bad site or layer
            self.add_callback(stats)
        if send_args.send_mode != "off":
            if tracking_dataset is None or len(tracking_dataset) == 0:
                raise UserError(
                    f"send_mode={send_args.send_mode!r} needs a non-empty tracking set (tracking_dataset=, got "
                    f"{'none' if tracking_dataset is None else 'an empty one'}); give at least 2 held-out items"
                )
            if len(tracking_dataset) < 2:
                raise UserError(
                    f"send_mode={send_args.send_mode!r} needs a tracking set of at least 2 held-out items "
                    f"(tracking_dataset=), got {len(tracking_dataset)}"
                )
            max_length = getattr(self.args, "max_length", None) or 1024
            tracking = tokenize_tracking(tok, tracking_dataset, max_length)
            collator = tracking_collator or CausalLMCollator(tok)
            send = SensitiveNeuronDropoutCallback(
                tracking,
                collator,
                mode=send_args.send_mode,
                site=send_args.send_site,
                layers=send_args.send_layers,
                drop_fraction=send_args.send_drop_fraction,
                num_checkpoints=send_args.send_num_checkpoints,
                drop_windows=send_args.send_drop_windows,
                window_steps=send_args.send_window_steps,
                rescale=send_args.send_rescale,
                batch_size=send_args.send_tracking_batch_size,
                seed=seed,
                module_path=send_args.send_module_path,
                show_progress=not self.args.disable_tqdm,
                stop_loss=send_args.send_stop_loss,
                stop_ees=send_args.send_stop_ees,
                ees_alpha=send_args.eigenscore_alpha,
                score=send_args.send_score,
                massive_factor=send_args.send_massive_factor,
                procedure=send_args.send_procedure,
                freeze_blocks=send_args.send_freeze_blocks,
            )
            send.prepare_model(self.model)  # released procedure: FFN width checked, blocks frozen
            sites = resolve_sites(self.model, send.site, send.layers, send.module_path)
            if not any(hasattr(p, "ds_id") for p in self.model.parameters()):
                example = collator([tracking[0]])
                assert_sites_reached(self.model, sites, example["input_ids"], example["attention_mask"])
            self.add_callback(send)
        settings = eigenscore_settings(send_args, seed)
        n = send_args.eigenscore_num_prompts
        if probe_prompts and n > 0:
            if probe_aliases is None or len(probe_aliases) != len(probe_prompts):
                raise UserError("probe_aliases must give the accepted answers of every probe prompt (same length)")
            if self.args.eval_strategy == "no":
                logger.warning(
                    "probes are scored at each evaluation, and eval_strategy is 'no': set eval_strategy "
                    "and an eval_dataset to see eval_eigenscore during training"
                )
            hidden = getattr(send_args, "eigenscore_hidden_probe", True) and tracking_probe_prompts
            if hidden and len(tracking_probe_prompts) < settings.probe_min_labelled:
                warnings.warn(
                    f"hidden-state probe off during training: it needs at least {settings.probe_min_labelled} "
                    f"labelled tracking probes (eigenscore_probe_min_labelled) and has {len(tracking_probe_prompts)}",
                    stacklevel=3,
                )
                hidden = False
            extra = {}
            if hidden:
                extra = {"train_prompts": tracking_probe_prompts, "train_aliases": tracking_probe_aliases}
            if hasattr(send_args, "eigenscore_bootstrap"):
                extra["n_boot"] = send_args.eigenscore_bootstrap
            self.add_callback(
                EigenScoreCallback(tok, list(probe_prompts)[:n], list(probe_aliases)[:n], settings, **extra)
            )
        self.add_callback(SeNDReporterCallback(self.callback_handler, send=send, stats=stats))
        if test_prompts:
            if test_aliases is None or len(test_aliases) != len(test_prompts):
                raise UserError("test_aliases must give the accepted answers of every test prompt (same length)")
            self.add_callback(_TestProbeScores(self, tok, test_prompts, test_aliases, settings))

    def callback(self, cls):
        """The first attached callback of type ``cls`` (or ``None``)."""
        return next((c for c in self.callback_handler.callbacks if isinstance(c, cls)), None)

    # -- training ----------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, EigenScoreCallback):
                cb.evaluated_by = type(self).__name__  # this trainer runs it at each evaluation
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CheckpointedCallback):
                cb.resume_from(path if isinstance(path, str) else None)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # -- metrics -----------------------------------------------------------------------
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        reporter = self.callback(SeNDReporterCallback)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, EigenScoreCallback):
                extra = cb.compute_metrics(self.model, self.state.global_step)
                output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
                if reporter is not None and cb.history:
                    reporter.write_probes(metric_key_prefix, cb.history[-1][1].records, self.state.global_step)
        return output

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, (CheckpointedCallback, SeNDReporterCallback)):
                    logs.update(cb.log_metrics())
            reporter, stats = self.callback(SeNDReporterCallback), self.callback(ActivationStatsCallback)
            if reporter is not None and stats is not None:
                reporter.write_stats(stats.merged_moments(), self.state.global_step)
        super().log(logs, start_time)


@functools.cache
def with_send(trainer_class: type) -> type:
    """``class SeND<Name>(SeNDMixin, trainer_class)`` (one class per host class)."""
    if issubclass(trainer_class, SeNDMixin):
        return trainer_class
    return type(f"SeND{trainer_class.__name__}", (SeNDMixin, trainer_class), {"__module__": __name__})


def add_send(trainer, send_args=None, **kwargs):
    """Add SeND, activation statistics and the hallucination metrics to an existing trainer.

    The trainer's class becomes :func:`with_send` of its class (``isinstance(trainer, SFTTrainer)``
    still holds); its config, data collator, datasets and labels are not touched.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass: TRL's ``SFTTrainer``, ...) not yet trained.
        send_args: :data:`SeNDArguments`; default ``SeNDArguments()`` (the paper's settings).
        **kwargs: :meth:`SeNDMixin.attach_send`'s keywords (``tracking_dataset``,
            ``probe_prompts``, ``probe_aliases``, ``test_prompts``, ...).

    Returns:
        The same trainer object.

    Raises:
        UserError: see :meth:`SeNDMixin.attach_send`.
    """
    trainer.__class__ = with_send(type(trainer))
    trainer.attach_send(send_args if send_args is not None else SeNDArguments(), **kwargs)
    return trainer
