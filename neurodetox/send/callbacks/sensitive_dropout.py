"""Sensitive Neuron Dropout (SeND) as a ``TrainerCallback``.

Mohammadzadeh et al., "Hallucination Detox: Sensitive Neuron Dropout (SeND)
for Large Language Model Training", arXiv 2410.15460, Algorithm 2, as decided
in ``docs/methods.md`` §1.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from neurodetox.core.distributed import (
    all_gather_objects,
    broadcast_object,
    is_distributed,
    rank,
    shard,
    unshard,
    zero3_enabled,
)
from neurodetox.core.errors import UserError
from neurodetox.core.io import atomic_save_safetensors, atomic_write_json
from neurodetox.core.pooling import AttentionMaskTracker, sentence_embedding
from neurodetox.core.sites import LayerSpec, register_site_hook, resolve_sites
from neurodetox.send.callbacks.base import CheckpointedCallback
from neurodetox.send.masks import MLPWeightDrop, NeuronDropout, freeze_blocks
from neurodetox.send.sensitivity import (
    PROCEDURES,
    SCORES,
    SEND_MODES,
    check_candidates,
    massive_indices,
    mean_abs_activation,
    random_fraction,
    released_sensitivity,
    sensitivity_scores,
    top_fraction,
)

logger = logging.getLogger(__name__)


class _TrackingForwardDone(Exception):
    """Raised by the deepest site's hook to end a tracking forward early."""


class SensitiveNeuronDropoutCallback(CheckpointedCallback):
    """Find sensitive neurons on a tracking set and drop them deterministically.

    Training runs in **windows** (``window_steps`` optimizer steps, or one
    epoch when ``window_steps == 0``). At the start of training (checkpoint 0)
    and at the end of every window, each tracking item's sentence embedding
    ``½(mean over real tokens + last real token)`` is recorded at the site,
    in eval mode and with no mask. Once ``num_checkpoints`` (``C``) recordings
    exist, the sensitivity ``V_i`` (:func:`neurodetox.send.sensitivity.sensitivity_scores`)
    over the last ``C`` picks the top ``drop_fraction`` (``K``) of neurons per
    layer, which are zeroed in every training forward pass for the next
    ``drop_windows`` (``T``) windows; then the selection is recomputed from
    the newest ``C`` recordings.

    Modes: ``"send"`` (the paper), ``"random"`` (same K, same schedule,
    uniformly random neurons: the paper's control), ``"off"`` (nothing is
    recorded or dropped: plain fine-tuning).

    Variants (``docs/methods.md`` §1; none is in the paper):

    * ``score``: ``"raw"`` (the paper's ``V_i``) or a scale-free ``"normalized"`` /
      ``"standardized"`` ``V_i`` (:func:`~neurodetox.send.sensitivity.sensitivity_scores`).
    * ``massive_factor``: exclude from selection (in both ``send`` and ``random`` modes) the
      indices whose mean ``|activation|`` over the tracking set, at the newest recording, is
      above ``massive_factor ×`` the median over indices
      (:func:`~neurodetox.send.sensitivity.massive_indices`); ``0`` = no exclusion.
    * ``freeze_blocks``: freeze the first blocks (any procedure).
    * ``procedure="released"``: what the authors' released code runs: sensitivity across
      tracking items of the checkpoint-averaged embeddings
      (:func:`~neurodetox.send.sensitivity.released_sensitivity`), and instead of a mask, the
      selected residual indices' FFN weights of the same block are zeroed in place once per
      window while the selection is active (:class:`~neurodetox.send.masks.MLPWeightDrop`),
      so the optimizer can regrow them; the first ``freeze_blocks`` blocks are frozen
      (default ``min(24, L)``, as that code does). Needs ``site="residual"``.

    Everything needed to resume exactly (recorded embeddings, selections,
    current mask, windows left) is saved with each checkpoint, so a resumed
    run selects the same neurons as an uninterrupted one.

    Args:
        tracking_dataset: tokenised tracking items (sequence of dicts with
            ``input_ids`` and optionally ``attention_mask``). Must be non-empty
            unless ``mode == "off"``.
        collator: turns a list of items into a batch dict of tensors.
        mode: ``"send"`` (default), ``"random"`` or ``"off"``.
        site: ``"residual"`` (default, as the paper) or ``"mlp"``.
        layers: layer spec; default ``"penultimate"`` (the paper).
        drop_fraction: ``K`` in (0, 1); default 0.2.
        num_checkpoints: ``C ≥ 2``; default 3.
        drop_windows: ``T ≥ 1``; default 3.
        window_steps: steps per window; 0 (default) = one epoch.
        rescale: scale kept neurons by ``1/(1−K)``; default ``False`` (paper).
        stop_loss, stop_ees: the paper's stopping rule: stop training at a
            window end when the last logged training loss < ``stop_loss`` and
            the dataset-level EES of the tracking embeddings < ``stop_ees``
            (either may be ``None`` = not required; both ``None`` = never stop).
        ees_alpha: α of the dataset-level EES (default 1e-3).
        batch_size: tracking forward batch size; default 16.
        seed: seeds the ``random`` mode's draws (per window).
        module_path: explicit module path for unknown architectures.
        score: one of :data:`~neurodetox.send.sensitivity.SCORES`; default ``"raw"``.
        massive_factor: massive-dimension exclusion factor (``> 1``), or 0 (default: off).
        procedure: ``"paper"`` (default) or ``"released"``.
        freeze_blocks: blocks frozen from the bottom; ``None`` (default) = 0 for the paper
            procedure, ``min(24, L)`` for the released one.

    Attributes:
        selections: list of ``{"step", "window", "neurons": {site_key: [indices]}}``.

    Raises:
        ValueError: bad mode, fraction, C, T, window, score, procedure or empty tracking set.
        UserError: (at :meth:`prepare_model` / training start) the released procedure on a model
            whose FFN does not cover the residual indices; a massive-dimension exclusion that
            leaves fewer indices than the drop fraction needs.
    """

    state_name = "neurodetox_send_state"

    def __init__(
        self,
        tracking_dataset: Sequence[dict],
        collator: Callable[[list], dict],
        *,
        mode: str = "send",
        site: str = "residual",
        layers: LayerSpec = "penultimate",
        drop_fraction: float = 0.2,
        num_checkpoints: int = 3,
        drop_windows: int = 3,
        window_steps: int = 0,
        rescale: bool = False,
        batch_size: int = 16,
        seed: int = 0,
        module_path: Optional[str] = None,
        show_progress: bool = False,
        stop_loss: Optional[float] = None,
        stop_ees: Optional[float] = None,
        ees_alpha: float = 1e-3,
        score: str = "raw",
        massive_factor: float = 0.0,
        procedure: str = "paper",
        freeze_blocks: Optional[int] = None,
    ):
        super().__init__()
        if score not in SCORES:
            raise UserError(f"send score {score!r} is not one of {', '.join(SCORES)}")
        if procedure not in PROCEDURES:
            raise UserError(f"send procedure {procedure!r} is not one of {', '.join(PROCEDURES)}")
        if procedure == "released" and site != "residual":
            raise UserError(
                f"send_procedure=released tracks the residual stream (as the released code does); got send_site={site!r}"
            )
        if massive_factor and not massive_factor > 1:
            raise UserError(f"send_massive_factor must be 0 (off) or > 1, got {massive_factor}")
        if freeze_blocks is not None and freeze_blocks < 0:
            raise UserError(f"send_freeze_blocks must be ≥ 0, got {freeze_blocks}")
        if mode not in SEND_MODES:
            raise ValueError(f"send mode {mode!r} is not one of {', '.join(SEND_MODES)}")
        if not 0.0 < drop_fraction < 1.0:
            raise ValueError(f"drop fraction must be in (0, 1), got {drop_fraction}")
        if num_checkpoints < 2:
            raise ValueError(f"num_checkpoints (C) must be at least 2, got {num_checkpoints}")
        if drop_windows < 1:
            raise ValueError(f"drop_windows (T) must be at least 1, got {drop_windows}")
        if window_steps < 0:
            raise ValueError(f"window_steps must be ≥ 0 (0 = one epoch), got {window_steps}")
        if mode != "off" and len(tracking_dataset) == 0:
            raise ValueError("the SeND tracking set is empty: SeND needs held-out tracking items")
        if batch_size < 1:
            raise ValueError(f"tracking batch size must be ≥ 1, got {batch_size}")
        self.tracking_dataset = tracking_dataset
        self.collator = collator
        self.mode, self.site, self.layers, self.module_path = mode, site, layers, module_path
        self.drop_fraction, self.num_checkpoints, self.drop_windows = drop_fraction, num_checkpoints, drop_windows
        self.window_steps, self.rescale, self.batch_size, self.seed = window_steps, rescale, batch_size, seed
        self.show_progress = show_progress
        self.stop_loss, self.stop_ees, self.ees_alpha = stop_loss, stop_ees, ees_alpha
        self.ees_history: list[dict] = []  # {"step", "ees", "error"} at every recording
        self.score, self.massive_factor, self.procedure = score, float(massive_factor), procedure
        self.freeze_blocks = freeze_blocks
        self.frozen_blocks = 0
        self._weight_drop: Optional[MLPWeightDrop] = None
        self._attached = self._prepared = False
        # state
        self.history: deque = deque(maxlen=num_checkpoints)  # of {site_key: [N, n] float32}
        self.history_steps: deque = deque(maxlen=num_checkpoints)
        self.windows_done = 0
        self.windows_left = 0
        self.selections: list[dict] = []
        self.current: dict[str, list[int]] = {}
        self._sites: list = []
        self._dropout: Optional[NeuronDropout] = None
        self._model = None

    # -- setup ---------------------------------------------------------------
    def prepare_model(self, model) -> None:
        """Check the model fits the procedure and apply its one-off changes (idempotent).

        Freezes the first ``freeze_blocks`` blocks (default: none for the paper procedure,
        ``min(24, L)`` for the released one); for ``procedure="released"`` also builds the FFN
        weight drop (fails on a model whose FFN is narrower than the residual indices need).
        Call before the optimizer is built (:class:`~neurodetox.send.SeNDTrainer` does, at
        construction); :meth:`attach` calls it too.

        Raises:
            UserError: the released procedure's FFN-width requirement is not met.
        """
        if self.mode == "off" or self._prepared:
            return
        from neurodetox.core.sites import num_layers

        if self.procedure == "released":
            sites = resolve_sites(model, self.site, self.layers, self.module_path)
            self._weight_drop = MLPWeightDrop(model, sites)
        default = min(24, num_layers(model)) if self.procedure == "released" else 0
        self.frozen_blocks = freeze_blocks(model, default if self.freeze_blocks is None else self.freeze_blocks)
        if self.frozen_blocks:
            logger.info("SeND (%s procedure): froze the first %d decoder blocks", self.procedure, self.frozen_blocks)
        self._prepared = True

    def attach(self, model) -> None:
        """Resolve sites and install the mask hooks (idempotent)."""
        if self.mode == "off" or self._attached:
            return
        self._model = model
        self._sites = resolve_sites(model, self.site, self.layers, self.module_path)
        self.prepare_model(model)
        if self.procedure == "paper":
            self._dropout = NeuronDropout(self._sites, rescale=self.rescale)
            if self.current:
                self._dropout.set(self.current)
        self._attached = True

    def detach(self) -> None:
        if self._dropout is not None:
            self._dropout.remove()
            self._dropout = None
        self._attached = False

    # -- recording -------------------------------------------------------------
    @torch.no_grad()
    def record_embeddings(self, model) -> dict[str, torch.Tensor]:
        """Sentence embeddings of every tracking item at each site.

        Cost: one forward pass per tracking item, in eval mode. Three things
        keep it cheap without changing what is recorded: items are batched in
        order of length (less padding; results are put back in tracking-set
        order), no KV cache is built, and the forward stops once the deepest
        site has been seen (the layers above it and the LM head do not run;
        skipped under DeepSpeed ZeRO-3, whose parameter gathering expects
        every module's forward to complete).

        Returns:
            ``{site_key: [N, n] float32}`` in tracking-set order.

        Raises:
            ValueError: the forward never reached a site (a wrapper hides it).
        """
        sites = self._sites or resolve_sites(model, self.site, self.layers, self.module_path)
        was_training = model.training
        model.eval()
        device = next(p for p in model.parameters()).device
        out: dict[str, list] = {s.key: [] for s in sites}
        tracker = AttentionMaskTracker(model)
        deepest = max(sites, key=lambda s: s.layer).key
        stop_early = not zero3_enabled()
        handles = []
        for s in sites:

            def grab(act, key=s.key):
                out[key].append(sentence_embedding(act, tracker.mask_for(act)).cpu())
                if stop_early and key == deepest:
                    raise _TrackingForwardDone

            handles.append(register_site_hook(s, grab, observer=True))
        extra = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
        try:
            n = len(self.tracking_dataset)
            indices, n_real = shard(n)  # every rank runs the same number of forwards (ZeRO-3)
            lengths = [len(self.tracking_dataset[j]["input_ids"]) for j in indices]
            order = sorted(range(len(indices)), key=lambda i: lengths[i])  # stable: ties keep shard order
            starts = range(0, len(order), self.batch_size)
            for i in tqdm(starts, desc="SeND tracking", leave=False, disable=not self.show_progress or rank() != 0):
                items = [self.tracking_dataset[indices[j]] for j in order[i : i + self.batch_size]]
                batch = self.collator(items)
                try:
                    model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        **extra,
                    )
                except _TrackingForwardDone:
                    pass
        finally:
            for h in handles:
                h.remove()
            tracker.remove()
            model.train(was_training)
        missed = [k for k, v in out.items() if not v]
        if missed:
            raise ValueError(
                f"the tracking forward passes never reached site(s) {', '.join(missed)}: a wrapper "
                "(e.g. a PEFT method) hides them; name the module that runs with send_module_path"
            )
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        local = {k: torch.cat(v)[inverse][:n_real] for k, v in out.items()}
        if not is_distributed():
            return local
        gathered = all_gather_objects(local)
        return {k: torch.stack(unshard([list(g[k]) for g in gathered], n)) for k in local}

    # -- selection -------------------------------------------------------------
    def massive(self, embeddings: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """Indices excluded as massive per site, from one recording ``{site_key: [N, n]}``.

        Raises:
            UserError: the exclusion leaves fewer indices than the drop fraction needs.
        """
        if not self.massive_factor:
            return {}
        out = {}
        for key, e in embeddings.items():
            idx = massive_indices(mean_abs_activation(e), self.massive_factor)
            check_candidates(e.shape[1], self.drop_fraction, len(idx), where=f"site {key}")
            out[key] = idx.tolist()
        return out

    def _select(self) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, list[float]]]:
        chosen = {}
        newest = self.history[-1]
        massive = self.massive(newest)
        mean_abs = {k: [float(f"{x:.4g}") for x in mean_abs_activation(e).tolist()] for k, e in newest.items()}
        for s in self._sites:
            exclude = massive.get(s.key)
            if self.mode == "send":
                hist = torch.stack([h[s.key] for h in self.history])
                scores = (
                    released_sensitivity(hist) if self.procedure == "released" else sensitivity_scores(hist, self.score)
                )
                chosen[s.key] = top_fraction(scores, self.drop_fraction, exclude).tolist()
            else:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.windows_done * 7919 + s.layer)
                chosen[s.key] = random_fraction(s.width, self.drop_fraction, g, exclude).tolist()
        return chosen, massive, mean_abs

    def _apply_current(self) -> None:
        """Put the current selection into force: masks (paper) or one in-place FFN zeroing (released)."""
        if self._dropout is not None:
            self._dropout.set(self.current)
        if self._weight_drop is not None and self.current:
            zeroed = self._weight_drop.apply(self.current)
            logger.info("SeND (released procedure): zeroed FFN neurons %s", {k: len(v) for k, v in zeroed.items()})

    def _record(self, model, step: int) -> None:
        emb = self.record_embeddings(model)
        self.history.append(emb)
        self.history_steps.append(step)
        from neurodetox.metrics.ees import dataset_ees

        res = dataset_ees(torch.cat([emb[k] for k in sorted(emb)], dim=1), alpha=self.ees_alpha)
        self.ees_history.append({"step": step, "ees": float(res.value), "error": float(res.error)})

    def _should_stop(self, state) -> bool:
        if self.stop_loss is None and self.stop_ees is None or not self.ees_history:
            return False
        losses = [r["loss"] for r in state.log_history if "loss" in r]
        if self.stop_loss is not None and not (losses and losses[-1] < self.stop_loss):
            return False
        if self.stop_ees is not None and not self.ees_history[-1]["ees"] < self.stop_ees:
            return False
        logger.info(
            "SeND stopping rule met at step %d: loss %s < %s and EES %.4f < %s",
            state.global_step,
            losses[-1] if losses else None,
            self.stop_loss,
            self.ees_history[-1]["ees"],
            self.stop_ees,
        )
        return True

    def _window_end(self, model, step: int, final: bool) -> None:
        if self.mode == "off":
            return
        self.windows_done += 1
        if final:
            return  # nothing left to train: skip the recording cost
        self._record(model, step)
        if self.windows_left > 0:
            self.windows_left -= 1
        if self.windows_left == 0 and len(self.history) >= self.num_checkpoints:
            chosen, massive, mean_abs = broadcast_object(self._select())  # identical by construction; rank 0 decides
            self.current = chosen
            self._apply_current()
            self.windows_left = self.drop_windows
            self.selections.append(
                {
                    "step": step,
                    "window": self.windows_done,
                    "neurons": self.current,
                    "massive": massive,
                    "mean_abs": mean_abs,
                }
            )
            logger.info(
                "SeND (%s) at step %d: dropping %s", self.mode, step, {k: len(v) for k, v in self.current.items()}
            )
        elif self.windows_left == 0 and self.current:
            self.current = {}
            self._apply_current()
        elif self.current and self.procedure == "released":
            self._apply_current()  # the released code zeroes again at the start of every window of the selection

    # -- Trainer events ----------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)
        resumed = self._maybe_resume()
        if self.mode != "off" and not resumed and not self.history:
            self._record(model, state.global_step)
            self.massive(self.history[-1])  # a too-greedy exclusion fails here, before the first step
        if self.window_steps and state.max_steps and self.window_steps > state.max_steps:
            raise ValueError(
                f"send_window_steps={self.window_steps} is longer than the run ({state.max_steps} steps): "
                "no window would ever end; use a smaller window or 0 (one epoch)"
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.window_steps and state.global_step % self.window_steps == 0:
            self._window_end(model, state.global_step, final=state.global_step >= state.max_steps)
            if self._should_stop(state):
                control.should_training_stop = True

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if not self.window_steps:
            self._window_end(model, state.global_step, final=state.global_step >= state.max_steps)
            if self._should_stop(state):
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def log_metrics(self) -> dict:
        """For the training log: neurons currently dropped and windows left."""
        if self.mode == "off":
            return {}
        out = {"send/dropped": sum(len(v) for v in self.current.values()), "send/windows_left": self.windows_left}
        if self.ees_history:
            out["send/tracking_ees"] = self.ees_history[-1]["ees"]
        return out

    # -- persistence ---------------------------------------------------------------
    def save_state(self, directory: str) -> None:
        d = Path(directory)
        tensors = {}
        for t, h in enumerate(self.history):
            for key, e in h.items():
                tensors[f"history.{t}.{key}"] = e
        meta = {
            "mode": self.mode,
            "site": self.site,
            "layers": self.layers if isinstance(self.layers, (str, int)) else list(self.layers),
            "drop_fraction": self.drop_fraction,
            "num_checkpoints": self.num_checkpoints,
            "drop_windows": self.drop_windows,
            "window_steps": self.window_steps,
            "procedure": self.procedure,
            "score": self.score,
            "massive_factor": self.massive_factor,
            "frozen_blocks": self.frozen_blocks,
            "history_steps": list(self.history_steps),
            "windows_done": self.windows_done,
            "windows_left": self.windows_left,
            "current": self.current,
            "selections": self.selections,
            "ees_history": self.ees_history,
        }
        if tensors:
            atomic_save_safetensors(d / f"{self.state_name}.safetensors", tensors)
        atomic_write_json(d / f"{self.state_name}.json", meta)

    def load_state(self, directory: str) -> None:
        d = Path(directory)
        meta = json.loads((d / f"{self.state_name}.json").read_text())
        defaults = {"procedure": "paper", "score": "raw", "massive_factor": 0.0}
        for k in ("mode", "site", "drop_fraction", "num_checkpoints", *defaults):
            if meta.get(k, defaults.get(k)) != getattr(self, k):
                raise ValueError(
                    f"cannot resume from {d}: it was saved with {k}={meta[k]!r}, this run has {k}={getattr(self, k)!r}"
                )
        tensors = (
            load_file(str(d / f"{self.state_name}.safetensors"))
            if (d / f"{self.state_name}.safetensors").exists()
            else {}
        )
        self.history.clear()
        self.history_steps.clear()
        for t, step in enumerate(meta["history_steps"]):
            prefix = f"history.{t}."
            self.history.append({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            self.history_steps.append(step)
        self.windows_done, self.windows_left = meta["windows_done"], meta["windows_left"]
        self.current, self.selections = meta["current"], meta["selections"]
        self.ees_history = meta.get("ees_history", [])
        if self._dropout is not None:
            self._dropout.set(self.current)  # (released: the zeroed weights are in the checkpoint already)
