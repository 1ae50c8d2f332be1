"""EigenScore and factual accuracy at every evaluation."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from transformers import TrainerCallback

from neurodetox.core.distributed import all_gather_objects, is_distributed, rank, shard, unshard
from neurodetox.metrics.probes import EigenScoreSettings, ProbeResult, evaluate_probes


def evaluate_probes_all_ranks(
    model, tokenizer, prompts, aliases, settings: Optional[EigenScoreSettings] = None, show_progress: bool = False
) -> ProbeResult:
    """:func:`neurodetox.metrics.probes.evaluate_probes` that also works on several processes.

    Single process: a plain call. Distributed: prompts are dealt to ranks
    (padded so every rank makes the same number of ``generate`` calls, which
    ZeRO-3 needs) and the per-prompt records gathered back in order; every
    rank returns the same result, so call it on every rank.
    """
    if not is_distributed():
        return evaluate_probes(model, tokenizer, prompts, aliases, settings, show_progress=show_progress)
    if len(prompts) == 0:
        raise ValueError("no probe prompts to evaluate (empty probe set)")
    idx, n_real = shard(len(prompts))
    part = evaluate_probes(
        model,
        tokenizer,
        [prompts[i] for i in idx],
        [aliases[i] for i in idx],
        settings,
        show_progress=show_progress and rank() == 0,
    )
    records = unshard(all_gather_objects(part.records[:n_real]), len(prompts))
    scores = [r["eigenscore"] for r in records if not math.isnan(r["eigenscore"])]
    return ProbeResult(
        factual_accuracy=sum(r["correct"] for r in records) / len(records),
        eigenscore=sum(scores) / len(scores) if scores else float("nan"),
        records=records,
    )


class EigenScoreCallback(TrainerCallback):
    """Hallucination metrics on fact probes, logged as ``eval_*`` metrics.

    At each evaluation, samples ``K`` answers per probe prompt in one batched
    ``generate``, embeds each at the middle layer's last generated token and
    computes the exact EigenScore per prompt (Chen et al., "INSIDE",
    arXiv 2402.03744); also the factual accuracy of greedy answers.
    :class:`neurodetox.send.SeNDTrainer` merges :meth:`compute_metrics`
    into the evaluation metrics before they are logged, so they reach every
    reporter as ``eval_eigenscore`` and ``eval_factual_accuracy``.

    Args:
        tokenizer: the model's tokenizer.
        prompts: probe prompts ``P``.
        aliases: accepted answers per prompt.
        settings: :class:`neurodetox.metrics.probes.EigenScoreSettings`.

    Attributes:
        history: list of ``(global_step, ProbeResult)``.
    """

    def __init__(
        self,
        tokenizer,
        prompts: Sequence[str],
        aliases: Sequence[Sequence[str]],
        settings: Optional[EigenScoreSettings] = None,
    ):
        if len(prompts) == 0:
            raise ValueError("EigenScoreCallback needs at least one probe prompt (empty probe set)")
        self.tokenizer = tokenizer
        self.prompts, self.aliases = list(prompts), [list(a) for a in aliases]
        self.settings = settings or EigenScoreSettings()
        self.history: list[tuple[int, ProbeResult]] = []

    def compute_metrics(self, model, step: int = 0) -> dict:
        """Run the probes now; returns ``{"eigenscore": …, "factual_accuracy": …}``.

        With several processes, prompts are dealt to ranks (padded so every
        rank makes the same number of ``generate`` calls, which ZeRO-3 needs)
        and the per-prompt records gathered back in order: call it on every rank.
        """
        result = evaluate_probes_all_ranks(model, self.tokenizer, self.prompts, self.aliases, self.settings)
        self.history.append((step, result))
        return result.metrics()
