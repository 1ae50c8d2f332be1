"""SeNDTrainer: a ``transformers.Trainer`` with SeND, statistics and EigenScore wired in."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import Optional, Sequence

from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from neurodetox.core.runtime import PREFIX_CHECKPOINT_DIR
from neurodetox.data.lm import CausalLMCollator
from neurodetox.metrics.callback import EigenScoreCallback
from neurodetox.send.callbacks.activation_stats import ActivationStatsCallback
from neurodetox.send.callbacks.base import CheckpointedCallback
from neurodetox.send.callbacks.sensitive_dropout import SensitiveNeuronDropoutCallback
from neurodetox.send.config import SeNDConfig

_STAGING = ".partial-checkpoints"
_CKPT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def last_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (``None`` if none).

    SeNDTrainer renames a checkpoint into place only once it is complete, so
    any ``checkpoint-N`` folder it wrote is whole.
    """
    if not os.path.isdir(output_dir):
        return None
    found = [
        (int(m.group(1)), n)
        for n in os.listdir(output_dir)
        if (m := _CKPT_RE.match(n)) and os.path.isfile(os.path.join(output_dir, n, "trainer_state.json"))
    ]
    return os.path.join(output_dir, max(found)[1]) if found else None


class SeNDTrainer(Trainer):
    """``Trainer`` for Sensitive Neuron Dropout fine-tuning.

    Implements the training procedure of Mohammadzadeh et al., "Hallucination
    Detox: Sensitive Neuron Dropout (SeND) for Large Language Model
    Training", arXiv 2410.15460. With a :class:`SeNDConfig` it adds, from the
    config's fields:

    * :class:`~neurodetox.send.callbacks.ActivationStatsCallback` (unless
      ``activation_stats_site == "none"``),
    * :class:`~neurodetox.send.callbacks.SensitiveNeuronDropoutCallback` (unless
      ``send_mode == "off"``), fed by ``tracking_dataset``,
    * :class:`~neurodetox.metrics.callback.EigenScoreCallback` on the first
      ``eigenscore_num_prompts`` probes, if probes are given: every detector's mean score
      and AUROC (with a bootstrap interval) at each evaluation, logged through ``log``.

    Beyond ``Trainer`` it (1) writes each checkpoint into a staging folder
    and renames it into place once complete, with every callback's state
    inside, so a killed run leaves complete checkpoints or none;
    (2) restores callback state on ``train(resume_from_checkpoint=...)``;
    (3) merges callbacks' ``compute_metrics`` into evaluation metrics and
    ``log_metrics`` into training logs before they reach the reporters.
    Labels of padding positions are ``-100`` (default collator
    :class:`~neurodetox.data.lm.CausalLMCollator`).

    Args:
        tracking_dataset: tokenised held-out tracking items for SeND.
        probe_prompts, probe_aliases: fact probes for the detectors and accuracy at each evaluation.
        tracking_probe_prompts, tracking_probe_aliases: labelled probes disjoint from those
            (the tracking facts' prompts): the hidden-state probe is refit on them at each
            evaluation (``eigenscore_hidden_probe``).
        All other arguments are ``Trainer``'s.

    Raises:
        ValueError: before training, for an empty tracking set with SeND on,
            or a site/layer that does not exist in the model.
    """

    def __init__(
        self,
        model=None,
        args: Optional[SeNDConfig] = None,
        *,
        tracking_dataset=None,
        probe_prompts: Optional[Sequence[str]] = None,
        probe_aliases: Optional[Sequence[Sequence[str]]] = None,
        tracking_probe_prompts: Optional[Sequence[str]] = None,
        tracking_probe_aliases: Optional[Sequence[Sequence[str]]] = None,
        **kwargs,
    ):
        tok = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tok is not None:
            kwargs["data_collator"] = CausalLMCollator(tok)
        super().__init__(model=model, args=args, **kwargs)
        if isinstance(args, SeNDConfig):
            tracking_probes = (tracking_probe_prompts, tracking_probe_aliases) if tracking_probe_prompts else None
            self._add_configured_callbacks(args, tracking_dataset, probe_prompts, probe_aliases, tok, tracking_probes)

    def _add_configured_callbacks(
        self, args, tracking_dataset, probe_prompts, probe_aliases, tok, tracking_probes=None
    ):
        if args.activation_stats_site != "none":
            cb = ActivationStatsCallback(args.activation_stats_site, args.activation_stats_layers, None)
            from neurodetox.core.sites import resolve_sites

            resolve_sites(self.model, cb.site, cb.layers)  # fail now on a bad site or layer
            self.add_callback(cb)
        if args.send_mode != "off":
            if tracking_dataset is None or len(tracking_dataset) == 0:
                raise ValueError(
                    f"send_mode={args.send_mode!r} needs a non-empty tracking set (got "
                    f"{'none' if tracking_dataset is None else 'an empty one'})"
                )
            cb = SensitiveNeuronDropoutCallback(
                tracking_dataset,
                self.data_collator,
                mode=args.send_mode,
                site=args.send_site,
                layers=args.send_layers,
                drop_fraction=args.send_drop_fraction,
                num_checkpoints=args.send_num_checkpoints,
                drop_windows=args.send_drop_windows,
                window_steps=args.send_window_steps,
                rescale=args.send_rescale,
                batch_size=args.send_tracking_batch_size,
                seed=args.seed,
                module_path=args.send_module_path,
                show_progress=not args.disable_tqdm,
                stop_loss=args.send_stop_loss,
                stop_ees=args.send_stop_ees,
                ees_alpha=args.eigenscore_alpha,
                score=args.send_score,
                massive_factor=args.send_massive_factor,
                procedure=args.send_procedure,
                freeze_blocks=args.send_freeze_blocks,
            )
            cb.prepare_model(self.model)  # released procedure: FFN width checked, blocks frozen, before the optimizer
            from neurodetox.core.sites import assert_sites_reached, resolve_sites

            sites = resolve_sites(self.model, args.send_site, args.send_layers, args.send_module_path)
            if not any(hasattr(p, "ds_id") for p in self.model.parameters()):
                # (ZeRO-3 partitioned weights cannot run outside the engine; the first tracking
                # recording, before the first step, checks the sites there instead)
                example = self.data_collator([tracking_dataset[0]])
                assert_sites_reached(self.model, sites, example["input_ids"], example["attention_mask"])
            self.add_callback(cb)
        if probe_prompts and args.eigenscore_num_prompts > 0:
            n = args.eigenscore_num_prompts
            need = args.eigenscore_probe_min_labelled
            if tracking_probes and args.eigenscore_hidden_probe and len(tracking_probes[0]) < need:
                warnings.warn(
                    f"hidden-state probe off during training: it needs at least {need} labelled tracking probes "
                    f"(eigenscore_probe_min_labelled) and has {len(tracking_probes[0])}",
                    stacklevel=3,
                )
                tracking_probes = None
            self.add_callback(
                EigenScoreCallback(
                    tok,
                    list(probe_prompts)[:n],
                    list(probe_aliases)[:n],
                    args.eigenscore_settings(),
                    train_prompts=tracking_probes[0] if tracking_probes and args.eigenscore_hidden_probe else None,
                    train_aliases=tracking_probes[1] if tracking_probes and args.eigenscore_hidden_probe else None,
                    n_boot=args.eigenscore_bootstrap,
                )
            )

    def callback(self, cls):
        """The first attached callback of type ``cls`` (or ``None``)."""
        return next((c for c in self.callback_handler.callbacks if isinstance(c, cls)), None)

    # -- resume ------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir}")
        if isinstance(resume_from_checkpoint, str) and not os.path.isdir(resume_from_checkpoint):
            raise FileNotFoundError(f"checkpoint folder not found: {resume_from_checkpoint}")
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CheckpointedCallback):
                cb.resume_from(resume_from_checkpoint or None)
            if isinstance(cb, EigenScoreCallback):
                cb.evaluated_by = type(self).__name__  # evaluation_loop runs it
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    # -- atomic checkpoints ----------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, _STAGING)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and os.path.isdir(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # leftover of a killed save
        self._get_output_dir = lambda trial=None: staging  # instance override: super() saves into staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CheckpointedCallback):
                cb.sync()  # collectives on every rank
                cb.save_into_checkpoint(
                    os.path.join(staging, name), self.state.global_step, write=self.args.should_save
                )
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            try:
                os.rmdir(staging)
            except OSError:
                pass
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(
                    run_dir, os.path.basename(self.state.best_model_checkpoint)
                )
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    # -- metrics ---------------------------------------------------------------------
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, EigenScoreCallback):
                extra = cb.compute_metrics(self.model, self.state.global_step)
                output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
        return output

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:
            for cb in self.callback_handler.callbacks:
                if hasattr(cb, "log_metrics"):
                    logs.update(cb.log_metrics())
        super().log(logs, start_time)
