"""Probe evaluation: sampled answers → embeddings → EigenScore and factual accuracy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from .metrics.eigenscore import eigenscore
from .metrics.factual import is_correct
from .sampling import sample_answers


@dataclass
class EigenScoreSettings:
    """Sampling and scoring settings (INSIDE defaults, arXiv 2402.03744).

    Attributes:
        k: sampled answers per prompt (paper 10).
        temperature, top_p, top_k: sampling (paper 0.5, 0.99, 10 as in its code).
        max_new_tokens: answer length cap in tokens.
        layer: block whose output is embedded (``"middle"`` = INSIDE's middle layer).
        alpha: regulariser added to the eigenvalues (1e-3).
        batch_size: prompts per ``generate`` call (each expands to ``k`` rows).
        seed: sampling seed.
    """

    k: int = 10
    temperature: float = 0.5
    top_p: float = 0.99
    top_k: int = 10
    max_new_tokens: int = 10
    layer: str = "middle"
    alpha: float = 1e-3
    batch_size: int = 8
    seed: int = 0


@dataclass
class ProbeResult:
    """Outcome of :func:`evaluate_probes`.

    Attributes:
        factual_accuracy: fraction of greedy answers that contain the gold answer or an alias.
        eigenscore: mean EigenScore over prompts (nats).
        records: per prompt ``{prompt, greedy, correct, eigenscore}``.
    """

    factual_accuracy: float
    eigenscore: float
    records: list = field(default_factory=list)

    def metrics(self) -> dict:
        return {"factual_accuracy": self.factual_accuracy, "eigenscore": self.eigenscore}


def evaluate_probes(model, tokenizer, prompts: Sequence[str], aliases: Sequence[Sequence[str]],
                    settings: Optional[EigenScoreSettings] = None, show_progress: bool = False) -> ProbeResult:
    """Greedy factual accuracy and mean EigenScore on fact probes.

    Args:
        prompts: ``P`` completion prompts.
        aliases: for each prompt, the accepted answers.
        settings: :class:`EigenScoreSettings` (defaults if ``None``).

    Raises:
        ValueError: no prompts, or ``len(prompts) != len(aliases)``.
    """
    s = settings or EigenScoreSettings()
    if len(prompts) == 0:
        raise ValueError("no probe prompts to evaluate (empty probe set)")
    if len(prompts) != len(aliases):
        raise ValueError(f"{len(prompts)} prompts but {len(aliases)} alias lists")
    out = sample_answers(model, tokenizer, list(prompts), k=s.k, temperature=s.temperature, top_p=s.top_p,
                         top_k=s.top_k, max_new_tokens=s.max_new_tokens, layer=s.layer,
                         batch_size=s.batch_size, seed=s.seed, greedy=True, show_progress=show_progress)
    finite = torch.isfinite(out.embeddings).flatten(1).all(1)
    scores = torch.full((len(prompts),), float("nan"), dtype=torch.float64)
    if finite.any():
        scores[finite] = eigenscore(out.embeddings[finite], alpha=s.alpha).double().cpu()
    correct = [is_correct(a, al) for a, al in zip(out.greedy, aliases)]
    records = [
        {"prompt": p, "greedy": g, "correct": c, "eigenscore": float(e), "samples": smp}
        for p, g, c, e, smp in zip(prompts, out.greedy, correct, scores.tolist(), out.samples)
    ]
    valid = [e for e in scores.tolist() if not math.isnan(e)]
    return ProbeResult(
        factual_accuracy=sum(correct) / len(correct),
        eigenscore=sum(valid) / len(valid) if valid else float("nan"),
        records=records,
    )


def settings_dict(s: EigenScoreSettings) -> dict:
    return asdict(s)
