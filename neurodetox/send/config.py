"""SeNDConfig: ``TrainingArguments`` plus the SeND, statistics and EigenScore options."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from transformers import TrainingArguments

from neurodetox.core.errors import UserError
from neurodetox.core.sites import SITE_KINDS
from neurodetox.metrics.settings import EigenScoreSettings
from neurodetox.send.sensitivity import PROCEDURES, SCORES, SEND_MODES

#: The EigenScoreSettings fields SeNDConfig exposes as ``eigenscore_<name>`` (``seed`` is the run's seed;
#: EES and feature clipping do not run during training).
_TRAINING_SETTINGS = (
    "k",
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "layer",
    "alpha",
    "batch_size",
    "pooling",
    "stop",
    "prompt_format",
    "probe_layer",
    "probe_position",
    "probe_min_labelled",
)
_SETTINGS_FIELDS = {f.name: f for f in fields(EigenScoreSettings)}


def _from_settings(name: str):
    """A dataclass field with the default and help of ``EigenScoreSettings.<name>`` (declared once there)."""
    f = _SETTINGS_FIELDS[name]
    return field(default=f.default, metadata={"help": "Detectors during training: " + f.metadata["help"]})


@dataclass
class SeNDConfig(TrainingArguments):
    """Training arguments for :class:`neurodetox.send.SeNDTrainer`.

    Defaults of the ``send_*`` fields are the paper's (Mohammadzadeh et al.,
    arXiv 2410.15460): K = 0.2, C = 3, T = 3, site = residual output of the
    penultimate block. ``eigenscore_*`` fields are those of
    :class:`neurodetox.metrics.settings.EigenScoreSettings` (INSIDE's defaults, Chen et al.,
    arXiv 2402.03744; the answer boundary, prompt format and hidden-state probe), with their
    defaults and range checks declared there. ``learning_rate`` defaults to the paper's 1e-4.

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

    send_procedure: str = field(
        default="paper",
        metadata={
            "help": "'paper': the paper's Algorithm 2 (variability across checkpoints, a mask in every training "
            "forward). 'released': what the authors' released code runs (variability across tracking items of the "
            "checkpoint-averaged embeddings; the selected residual indices' FFN weights of the same block zeroed in "
            "place once per window, regrowable; the first send_freeze_blocks blocks frozen). See docs/methods.md §1."
        },
    )
    send_score: str = field(
        default="raw",
        metadata={
            "help": "Sensitivity scaling: 'raw' (the paper's V_i = Var·Δ, cubic in an index's scale, so it ranks "
            "massive-activation dimensions first), 'normalized' (V_i / r_i³, r_i² = mean squared activation on the "
            "tracking set) or 'standardized' (V_i of activations standardised per index). Paper procedure only."
        },
    )
    send_massive_factor: float = field(
        default=0.0,
        metadata={
            "help": "Exclude massive-activation dimensions from selection (send and random modes): indices whose mean "
            "|activation| on the tracking set exceeds this factor × the median over indices. 0 = off; else > 1."
        },
    )
    send_freeze_blocks: Optional[int] = field(
        default=None,
        metadata={
            "help": "Freeze the first N decoder blocks while SeND is on. Default: 0 for send_procedure=paper, "
            "min(24, L) for send_procedure=released (as the released code does)."
        },
    )

    activation_stats_site: str = field(
        default="mlp",
        metadata={"help": "Site of the per-neuron activation statistics: 'mlp', 'residual' or 'none' (off)."},
    )
    activation_stats_layers: str = field(
        default="all", metadata={"help": "Layers of the activation statistics (same syntax as send_layers)."}
    )

    eigenscore_k: int = _from_settings("k")
    eigenscore_temperature: float = _from_settings("temperature")
    eigenscore_top_p: float = _from_settings("top_p")
    eigenscore_top_k: int = _from_settings("top_k")
    eigenscore_max_new_tokens: int = _from_settings("max_new_tokens")
    eigenscore_layer: str = _from_settings("layer")
    eigenscore_alpha: float = _from_settings("alpha")
    eigenscore_batch_size: int = _from_settings("batch_size")
    eigenscore_pooling: str = _from_settings("pooling")
    eigenscore_stop: str = _from_settings("stop")
    eigenscore_prompt_format: str = _from_settings("prompt_format")
    eigenscore_probe_layer: str = _from_settings("probe_layer")
    eigenscore_probe_position: str = _from_settings("probe_position")
    eigenscore_probe_min_labelled: int = _from_settings("probe_min_labelled")
    eigenscore_num_prompts: int = field(
        default=32,
        metadata={
            "help": "Probe prompts scored at each evaluation during training (0 = EigenScore off during training)."
        },
    )
    eigenscore_hidden_probe: bool = field(
        default=True,
        metadata={
            "help": "Refit the hidden-state probe on the tracking probes at each evaluation and score the "
            "evaluation probes with it (needs the trainer's tracking probes)."
        },
    )
    eigenscore_bootstrap: int = field(
        default=200, metadata={"help": "Bootstrap resamples of each detector's AUROC interval at each evaluation."}
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
                self.send_procedure in PROCEDURES,
                "send_procedure",
                self.send_procedure,
                f"one of {', '.join(PROCEDURES)}",
            ),
            (self.send_score in SCORES, "send_score", self.send_score, f"one of {', '.join(SCORES)}"),
            (
                self.send_massive_factor == 0 or self.send_massive_factor > 1,
                "send_massive_factor",
                self.send_massive_factor,
                "0 (off) or > 1",
            ),
            (
                self.send_freeze_blocks is None or self.send_freeze_blocks >= 0,
                "send_freeze_blocks",
                self.send_freeze_blocks,
                "≥ 0 (or unset)",
            ),
            (
                self.send_procedure != "released" or self.send_site == "residual",
                "send_site",
                self.send_site,
                "'residual' with send_procedure=released (the released code tracks the residual stream)",
            ),
            (
                self.send_procedure != "released" or self.send_score == "raw",
                "send_score",
                self.send_score,
                "'raw' with send_procedure=released (the released code has its own sensitivity)",
            ),
            (
                self.activation_stats_site in SITE_KINDS + ("none",),
                "activation_stats_site",
                self.activation_stats_site,
                f"one of {', '.join(SITE_KINDS + ('none',))}",
            ),
            (self.eigenscore_num_prompts >= 0, "eigenscore_num_prompts", self.eigenscore_num_prompts, "≥ 0"),
            (self.eigenscore_bootstrap >= 1, "eigenscore_bootstrap", self.eigenscore_bootstrap, "≥ 1"),
        ]
        for ok, name, value, valid in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid: must be {valid}")
        try:
            self.eigenscore_settings()  # the range checks of EigenScoreSettings, declared once there
        except UserError as e:
            name = str(e).split()[0]
            value = getattr(self, f"eigenscore_{name}", None)
            raise UserError(f"eigenscore_{name}={value!r} is invalid: {e}") from None

    def eigenscore_settings(self) -> EigenScoreSettings:
        """The ``eigenscore_*`` fields (and ``seed``) as :class:`neurodetox.metrics.settings.EigenScoreSettings`.

        Raises:
            UserError: a field out of range (named without its ``eigenscore_`` prefix).
        """
        return EigenScoreSettings(
            seed=self.seed,
            **{name: getattr(self, f"eigenscore_{name}") for name in _TRAINING_SETTINGS},
        )
