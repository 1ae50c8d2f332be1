"""EigenScore and factual accuracy at every evaluation."""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import TrainerCallback

from ..evaluation import EigenScoreSettings, ProbeResult, evaluate_probes


class EigenScoreCallback(TrainerCallback):
    """Hallucination metrics on fact probes, logged as ``eval_*`` metrics.

    At each evaluation, samples ``K`` answers per probe prompt in one batched
    ``generate``, embeds each at the middle layer's last generated token and
    computes the exact EigenScore per prompt (Chen et al., "INSIDE",
    arXiv 2402.03744); also the factual accuracy of greedy answers.
    :class:`neurodetox.trainer.SeNDTrainer` merges :meth:`compute_metrics`
    into the evaluation metrics before they are logged, so they reach every
    reporter as ``eval_eigenscore`` and ``eval_factual_accuracy``.

    Args:
        tokenizer: the model's tokenizer.
        prompts: probe prompts ``P``.
        aliases: accepted answers per prompt.
        settings: :class:`neurodetox.evaluation.EigenScoreSettings`.

    Attributes:
        history: list of ``(global_step, ProbeResult)``.
    """

    def __init__(self, tokenizer, prompts: Sequence[str], aliases: Sequence[Sequence[str]],
                 settings: Optional[EigenScoreSettings] = None):
        if len(prompts) == 0:
            raise ValueError("EigenScoreCallback needs at least one probe prompt (empty probe set)")
        self.tokenizer = tokenizer
        self.prompts, self.aliases = list(prompts), [list(a) for a in aliases]
        self.settings = settings or EigenScoreSettings()
        self.history: list[tuple[int, ProbeResult]] = []

    def compute_metrics(self, model, step: int = 0) -> dict:
        """Run the probes now; returns ``{"eigenscore": …, "factual_accuracy": …}``."""
        result = evaluate_probes(model, self.tokenizer, self.prompts, self.aliases, self.settings)
        self.history.append((step, result))
        return result.metrics()
