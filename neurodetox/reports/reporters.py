"""Every neurodetox metric through the Trainer's reporters (TensorBoard, Weights & Biases, Trackio).

Scalars reach the reporters through ``Trainer.log`` (the SeND trainers merge them in).
What a scalar cannot carry goes straight to each reporter's own writer, found among the
trainer's callbacks (``report_to``):

* each SeND selection's neuron indices (SeND: Mohammadzadeh et al., "Hallucination Detox:
  Sensitive Neuron Dropout (SeND) for Large Language Model Training", arXiv 2410.15460):
  a histogram over the neuron axis, ``send/neurons/<site>``, and the index list as text;
* the activation statistics: histograms of every neuron's mean and variance per site,
  ``stats/mean/<site>`` and ``stats/variance/<site>``, at each training log;
* the detectors: histograms of the per-prompt scores (EigenScore, Chen et al., "INSIDE",
  arXiv 2402.03744, and any other numeric per-prompt field), ``<prefix>/<field>_per_prompt``,
  at each evaluation and for the before/after test-split scores.

TensorBoard gets ``add_histogram`` and ``add_text``; Weights & Biases gets ``wandb.Histogram``
and a ``wandb.Table`` of the indices; Trackio gets ``trackio.Histogram`` and ``trackio.Table`` where
its version has them, logged like transformers' ``TrackioCallback`` logs scalars (no explicit step,
the optimizer step in ``train/global_step``). Reporters without histograms (MLflow, Comet, ...) get the scalars only.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from transformers import TrainerCallback

__all__ = ["SeNDReporterCallback", "reporter_writers"]


def reporter_writers(callbacks: Iterable) -> dict:
    """The reporter back ends among ``callbacks`` that accept histograms.

    Returns:
        ``{"tensorboard": SummaryWriter, "wandb": module, "trackio": module}``, only the ones
        present and open (TensorBoard's writer exists between ``on_train_begin`` and
        ``on_train_end``, and again after any later log).
    """
    out = {}
    for cb in callbacks:
        name = type(cb).__name__
        if name == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
            out["tensorboard"] = cb.tb_writer
        elif name == "WandbCallback" and getattr(cb, "_wandb", None) is not None:
            if getattr(cb._wandb, "run", None) is not None:
                out["wandb"] = cb._wandb
        elif name == "TrackioCallback" and getattr(cb, "_trackio", None) is not None:
            out["trackio"] = cb._trackio
    return out


def _index_text(indices: list[int], step: int, window: Optional[int]) -> str:
    head = f"step {step}" + (f", window {window}" if window is not None else "")
    return f"{head}: {len(indices)} neurons: " + ", ".join(map(str, indices))


class SeNDReporterCallback(TrainerCallback):
    """Sends the non-scalar neurodetox metrics to the trainer's reporters.

    Attached by :class:`neurodetox.send.SeNDMixin` / :func:`neurodetox.send.add_send`; it
    finds the reporters among ``handler.callbacks`` at each write and writes on the main
    process only.

    Args:
        handler: the trainer's ``callback_handler`` (its callbacks hold the reporters).
        send: the :class:`~neurodetox.send.callbacks.SensitiveNeuronDropoutCallback` or ``None``.
        stats: the :class:`~neurodetox.send.callbacks.ActivationStatsCallback` or ``None``.

    Attributes:
        reported_selections: how many of ``send.selections`` were written so far.
    """

    def __init__(self, handler, send=None, stats=None):
        self.handler, self.send, self.stats = handler, send, stats
        self.reported_selections = 0
        self._main = True

    # -- writers -------------------------------------------------------------------
    def _writers(self) -> dict:
        return reporter_writers(self.handler.callbacks) if self._main else {}

    def write_histograms(self, values: dict[str, torch.Tensor], step: int) -> list[str]:
        """Write ``{tag: 1-D values}`` as histograms to every reporter that takes them; returns the tags written."""
        writers = self._writers()
        values = {k: v.detach().double().flatten().cpu() for k, v in values.items()}
        values = {k: v[torch.isfinite(v)] for k, v in values.items()}
        values = {k: v for k, v in values.items() if v.numel()}
        if not values or not writers:
            return []
        if "tensorboard" in writers:
            tb = writers["tensorboard"]
            for tag, v in values.items():
                tb.add_histogram(tag, v.numpy(), step)
            tb.flush()
        if "wandb" in writers:
            wb = writers["wandb"]
            wb.log({tag: wb.Histogram(v.numpy()) for tag, v in values.items()}, step=step, commit=False)
        if "trackio" in writers and hasattr(writers["trackio"], "Histogram"):
            tr = writers["trackio"]
            # transformers' TrackioCallback logs without a step (Trackio numbers its log calls) and puts the
            # optimizer step in "train/global_step"; the histograms follow the same convention, so every
            # neurodetox value is plotted against the same train/global_step axis
            tr.log({**{tag: tr.Histogram(v.numpy()) for tag, v in values.items()}, "train/global_step": step})
        return list(values)

    def write_selection(self, selection: dict) -> None:
        """One SeND selection (``{"step", "window", "neurons": {site: [indices]}}``) to the reporters."""
        step, window = int(selection["step"]), selection.get("window")
        neurons = selection["neurons"]
        self.write_histograms(
            {f"send/neurons/{site}": torch.tensor(ix, dtype=torch.float64) for site, ix in neurons.items()}, step
        )
        writers = self._writers()
        if "tensorboard" in writers:
            for site, ix in neurons.items():
                writers["tensorboard"].add_text(f"send/neurons/{site}", _index_text(ix, step, window), step)
            writers["tensorboard"].flush()
        rows = [[step, window, site, i] for site, ix in neurons.items() for i in ix]
        columns = ["step", "window", "site", "neuron"]
        if "wandb" in writers:
            wb = writers["wandb"]
            wb.log({"send/neurons": wb.Table(columns=columns, data=rows)}, commit=False)
        if "trackio" in writers and hasattr(writers["trackio"], "Table"):
            tr = writers["trackio"]
            tr.log({"send/neurons": tr.Table(columns=columns, data=rows), "train/global_step": step})

    def write_stats(self, moments: dict, step: int) -> None:
        """Per-neuron mean and variance histograms of each site (``{site: RunningMoments}``)."""
        vals = {}
        for site, m in moments.items():
            if m.count:
                vals[f"stats/mean/{site}"] = m.mean
                vals[f"stats/variance/{site}"] = m.variance
        self.write_histograms(vals, step)

    def write_probes(self, prefix: str, records: list[dict], step: int) -> None:
        """Histograms of every numeric per-prompt field of a probe evaluation (``<prefix>/<field>_per_prompt``)."""
        if not records:
            return
        fields = [k for k, v in records[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        vals = {}
        for k in fields:
            xs = [float(r[k]) for r in records if isinstance(r.get(k), (int, float)) and not math.isnan(float(r[k]))]
            if xs:
                vals[f"{prefix}/{k}_per_prompt"] = torch.tensor(xs, dtype=torch.float64)
        self.write_histograms(vals, step)

    def write_pending_selections(self) -> None:
        """Write the SeND selections made since the last call."""
        if self.send is None:
            return
        new = self.send.selections[self.reported_selections :]
        for sel in new:
            self.write_selection(sel)
        self.reported_selections = len(self.send.selections)

    def log_metrics(self) -> dict:
        """Scalars for the training log: SeND selections made so far."""
        return {"send/selections": len(self.send.selections)} if self.send is not None else {}

    # -- Trainer events -----------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._main = state.is_world_process_zero
        if self.send is not None:  # selections restored from a checkpoint were reported by the earlier run
            self.reported_selections = len(self.send.selections)

    def on_step_end(self, args, state, control, **kwargs):
        self.write_pending_selections()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.write_pending_selections()
