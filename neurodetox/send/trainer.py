"""SeNDTrainer: a ``transformers.Trainer`` with SeND, statistics and EigenScore wired in."""

from __future__ import annotations

import os
import re
import shutil
from typing import Optional, Sequence

from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from neurodetox.core.io import replace_folder
from neurodetox.core.runtime import PREFIX_CHECKPOINT_DIR
from neurodetox.data.lm import CausalLMCollator
from neurodetox.send.callbacks.base import CheckpointedCallback
from neurodetox.send.config import SeNDConfig
from neurodetox.send.integration import SeNDMixin

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


class SeNDTrainer(SeNDMixin, Trainer):
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

    The wiring, the evaluation hook and the log merging are :class:`~neurodetox.send.integration.SeNDMixin`'s
    (the same code that adds SeND to TRL's ``SFTTrainer``); it also reports selections, activation
    statistics and per-prompt scores to the reporters (:mod:`neurodetox.reports.reporters`).
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
        super().__init__(
            model=model,
            args=args,
            tracking_dataset=tracking_dataset,
            probe_prompts=probe_prompts,
            probe_aliases=probe_aliases,
            tracking_probe_prompts=tracking_probe_prompts,
            tracking_probe_aliases=tracking_probe_aliases,
            tracking_collator=kwargs.get("data_collator"),
            **kwargs,
        )

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
            replace_folder(os.path.join(staging, name), final)
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
