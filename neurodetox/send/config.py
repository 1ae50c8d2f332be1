"""SeNDConfig: ``TrainingArguments`` plus the SeND, statistics and EigenScore options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from neurodetox.core.sites import SITE_KINDS
from neurodetox.send.sensitivity import SEND_MODES


@dataclass
class SeNDConfig(TrainingArguments):
    """Training arguments for :class:`neurodetox.send.SeNDTrainer`.

    Defaults of the ``send_*`` fields are the paper's (Mohammadzadeh et al.,
    arXiv 2410.15460): K = 0.2, C = 3, T = 3, site = residual output of the
    penultimate block. ``eigenscore_*`` defaults are INSIDE's (Chen et al.,
    arXiv 2402.03744). ``learning_rate`` defaults to the paper's 1e-4.

    Raises:
        ValueError: (at construction) any field outside its valid range; the
            message names the field, the value and what is valid.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (SeND paper: 1e-4)."})

    send_mode: str = field(
        default="send",
        metadata={
            "help": "'send': drop the sensitive neurons (paper); 'random': drop the same fraction of random neurons "
            "(the paper's control); 'off': plain fine-tuning."
        },
    )
    send_site: str = field(
        default="residual",
        metadata={
            "help": "Where SeND neurons live: 'residual' (index of a block's output hidden state, as in the paper) "
            "or 'mlp' (FFN neurons, input of the FFN output projection)."
        },
    )
    send_layers: str = field(
        default="penultimate",
        metadata={
            "help": "Blocks to track and drop: 'penultimate' (paper), 'last', 'middle', 'all', 'second_half', "
            "an index (-2), a list '10,20' or a range '10-20'."
        },
    )
    send_drop_fraction: float = field(
        default=0.2,
        metadata={"help": "K: fraction of neurons per layer dropped, in (0, 1). Paper: 0.2 (0.3 for Llama-3.1-8B)."},
    )
    send_num_checkpoints: int = field(
        default=3,
        metadata={
            "help": "C: number of most recent window-end recordings the sensitivity is computed over (≥ 2). Paper: 3."
        },
    )
    send_drop_windows: int = field(
        default=3, metadata={"help": "T: windows a selection stays dropped before it is recomputed (≥ 1). Paper: 3."}
    )
    send_window_steps: int = field(
        default=0, metadata={"help": "Optimizer steps per SeND window; 0 = one epoch per window (the paper)."}
    )
    send_rescale: bool = field(
        default=False,
        metadata={"help": "Scale kept neurons by 1/(1-K) while dropping (inverted dropout). The paper does not."},
    )
    send_tracking_batch_size: int = field(
        default=16, metadata={"help": "Batch size of the tracking-set forward passes at each window end."}
    )
    send_module_path: str = field(
        default=None,
        metadata={
            "help": "Explicit site module path with '{layer}' for architectures neurodetox does not know, "
            "e.g. 'model.layers.{layer}.mlp.down_proj'."
        },
    )

    send_stop_loss: Optional[float] = field(
        default=None,
        metadata={
            "help": "Stopping rule (SeND paper): stop at a window end once the training loss is below this ε "
            "(and the tracking-set EES below send_stop_ees, if set). Default: off."
        },
    )
    send_stop_ees: Optional[float] = field(
        default=None,
        metadata={
            "help": "Stopping rule: stop at a window end once the dataset-level EES (mean log-eigenvalue, nats) of "
            "the tracking-set embeddings is below this δ (and the loss below send_stop_loss, if set)."
        },
    )

    activation_stats_site: str = field(
        default="mlp",
        metadata={"help": "Site of the per-neuron activation statistics: 'mlp', 'residual' or 'none' (off)."},
    )
    activation_stats_layers: str = field(
        default="all", metadata={"help": "Layers of the activation statistics (same syntax as send_layers)."}
    )

    eigenscore_k: int = field(
        default=10, metadata={"help": "EigenScore: sampled answers per probe prompt (≥ 2). INSIDE: 10."}
    )
    eigenscore_temperature: float = field(
        default=0.5, metadata={"help": "EigenScore sampling temperature (INSIDE: 0.5)."}
    )
    eigenscore_top_p: float = field(
        default=0.99, metadata={"help": "EigenScore nucleus sampling top-p (INSIDE: 0.99)."}
    )
    eigenscore_top_k: int = field(
        default=10, metadata={"help": "EigenScore top-k sampling (INSIDE code: 10; paper: 5)."}
    )
    eigenscore_max_new_tokens: int = field(
        default=10, metadata={"help": "EigenScore: maximum answer length in tokens."}
    )
    eigenscore_layer: str = field(
        default="middle",
        metadata={"help": "EigenScore embedding layer: 'middle' (INSIDE: hidden_states[L//2]) or a block index."},
    )
    eigenscore_alpha: float = field(
        default=1e-3, metadata={"help": "EigenScore regulariser α in (1/K) Σ ln(λ_k + α); must be > 0. INSIDE: 1e-3."}
    )
    eigenscore_num_prompts: int = field(
        default=32,
        metadata={
            "help": "Probe prompts scored at each evaluation during training (0 = EigenScore off during training)."
        },
    )
    eigenscore_batch_size: int = field(
        default=8, metadata={"help": "Probe prompts per batched generate (each expands to K sampled rows)."}
    )

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.send_mode in SEND_MODES, "send_mode", self.send_mode, f"one of {', '.join(SEND_MODES)}"),
            (self.send_site in SITE_KINDS, "send_site", self.send_site, f"one of {', '.join(SITE_KINDS)}"),
            (0.0 < self.send_drop_fraction < 1.0, "send_drop_fraction", self.send_drop_fraction, "in (0, 1)"),
            (self.send_num_checkpoints >= 2, "send_num_checkpoints", self.send_num_checkpoints, "≥ 2"),
            (self.send_drop_windows >= 1, "send_drop_windows", self.send_drop_windows, "≥ 1"),
            (self.send_window_steps >= 0, "send_window_steps", self.send_window_steps, "≥ 0 (0 = one epoch)"),
            (self.send_tracking_batch_size >= 1, "send_tracking_batch_size", self.send_tracking_batch_size, "≥ 1"),
            (
                self.activation_stats_site in SITE_KINDS + ("none",),
                "activation_stats_site",
                self.activation_stats_site,
                f"one of {', '.join(SITE_KINDS + ('none',))}",
            ),
            (self.eigenscore_k >= 2, "eigenscore_k", self.eigenscore_k, "≥ 2"),
            (self.eigenscore_alpha > 0, "eigenscore_alpha", self.eigenscore_alpha, "> 0"),
            (self.eigenscore_temperature > 0, "eigenscore_temperature", self.eigenscore_temperature, "> 0"),
            (0 < self.eigenscore_top_p <= 1, "eigenscore_top_p", self.eigenscore_top_p, "in (0, 1]"),
            (self.eigenscore_max_new_tokens >= 1, "eigenscore_max_new_tokens", self.eigenscore_max_new_tokens, "≥ 1"),
            (self.eigenscore_num_prompts >= 0, "eigenscore_num_prompts", self.eigenscore_num_prompts, "≥ 0"),
            (self.eigenscore_batch_size >= 1, "eigenscore_batch_size", self.eigenscore_batch_size, "≥ 1"),
        ]
        for ok, name, value, valid in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid: must be {valid}")

    def eigenscore_settings(self):
        """The ``eigenscore_*`` fields as :class:`neurodetox.metrics.probes.EigenScoreSettings`."""
        from neurodetox.metrics.probes import EigenScoreSettings

        return EigenScoreSettings(
            k=self.eigenscore_k,
            temperature=self.eigenscore_temperature,
            top_p=self.eigenscore_top_p,
            top_k=self.eigenscore_top_k,
            max_new_tokens=self.eigenscore_max_new_tokens,
            layer=self.eigenscore_layer,
            alpha=self.eigenscore_alpha,
            batch_size=self.eigenscore_batch_size,
            seed=self.seed,
        )
