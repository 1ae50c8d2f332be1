"""What :func:`~neurodetox.patching.mint.repair` reports: one result per failure, per edit, and in all.

MINT (Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model
Repair for Code Generation", arXiv 2312.05356): the paper's measures are the
success rate (fixed / edits with a failure) and the neurons patched per
failure; both are properties of :class:`RepairReport`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from neurodetox.patching.failures import Edit
from neurodetox.patching.mint.settings import MintSettings

__all__ = ["FailureResult", "EditResult", "RepairReport"]


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    m = len(v) // 2
    return float(v[m]) if len(v) % 2 else (v[m - 1] + v[m]) / 2


@dataclass
class FailureResult:
    """Outcome of one teacher-forced failure (see :class:`~neurodetox.patching.failures.Failure`)."""

    step: int
    position: int
    target_id: int
    argmax_id: int
    target_token: str = ""
    argmax_token: str = ""
    status: str = "skipped"  # "fixed" | "skipped"
    patches: list[dict[str, Any]] = field(default_factory=list)
    gap_before: float = 0.0
    gap_after: float = 0.0
    seconds: float = 0.0
    guarded: bool = False  # planned with the reference guard (False: no guard, or its fallback)
    phrasing: int = 0  # which phrasing failed: 0 the prompt, k >= 1 paraphrase k-1

    @property
    def neurons(self) -> list[tuple[int, int]]:
        seen = []
        for p in self.patches:
            key = (p["layer"], p["index"])
            if not p.get("pruned") and key not in seen:
                seen.append(key)
        return seen


@dataclass
class EditResult:
    """Outcome of one edit: ``status`` is ``"fixed"``, ``"skipped"`` (a failure
    could not be fixed within ``max_patches``; all its patches were undone),
    ``"nothing_to_fix"`` (the model already produces the target) or
    ``"broken"`` (fixed, then undone by a later edit and not re-fixed)."""

    index: int
    edit: Edit
    status: str
    failures: list[FailureResult] = field(default_factory=list)
    seconds: float = 0.0
    message: str = ""
    rechecks: int = 0
    reference_flips: Optional[int] = None  # reference prompts whose next token this edit changed (verified)
    attempts: int = 1

    @property
    def neurons(self) -> list[tuple[int, int]]:
        """Distinct ``(layer, index)`` neurons kept for this edit."""
        if self.status not in ("fixed", "broken"):
            return []
        seen = []
        for f in self.failures:
            for key in f.neurons:
                if f.status == "fixed" and key not in seen:
                    seen.append(key)
        return seen

    def to_json(self) -> dict[str, Any]:
        return {
            **self.edit.to_json(),
            "status": self.status,
            "message": self.message,
            "rechecks": self.rechecks,
            "reference_flips": self.reference_flips,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 4),
            "neurons": [list(n) for n in self.neurons],
            "failures": [
                {**{k: v for k, v in asdict(f).items()}, "neurons": [list(n) for n in f.neurons]} for f in self.failures
            ],
        }


@dataclass
class RepairReport:
    """What :func:`repair` did.

    Attributes:
        edits: one :class:`EditResult` per requested edit, in order.
        settings: the settings used.
        seconds: wall time of the call.
        cast_error: largest ``|new − stored|`` from rounding to ``storage_dtype``.
    """

    edits: list[EditResult]
    settings: MintSettings
    seconds: float = 0.0
    cast_error: float = 0.0

    def _with(self, status: str) -> list[EditResult]:
        return [e for e in self.edits if e.status == status]

    @property
    def fixed(self) -> list[EditResult]:
        return self._with("fixed")

    @property
    def needing_fix(self) -> list[EditResult]:
        """Edits that had at least one failure."""
        return [e for e in self.edits if e.status != "nothing_to_fix"]

    @property
    def success_rate(self) -> float:
        """Fixed / edits with a failure (``nan`` when none had one)."""
        n = len(self.needing_fix)
        return len(self.fixed) / n if n else float("nan")

    @property
    def neurons_per_fix(self) -> list[int]:
        """Distinct neurons kept per fixed edit (fact)."""
        return [len(e.neurons) for e in self.fixed]

    @property
    def failures(self) -> list[FailureResult]:
        """Every token-level failure repair attempted (re-repairs included)."""
        return [f for e in self.edits for f in e.failures]

    @property
    def neurons_per_failure(self) -> list[int]:
        """Neurons kept per fixed token-level failure of the fixed edits (the
        paper's "neurons per failure")."""
        return [len(f.neurons) for e in self.fixed for f in e.failures if f.status == "fixed"]

    @property
    def median_neurons_per_fix(self) -> float:
        return _median(self.neurons_per_fix)

    def summary(self) -> dict[str, Any]:
        return {
            "requested": len(self.edits),
            "needing_fix": len(self.needing_fix),
            "fixed": len(self.fixed),
            "skipped": len(self._with("skipped")),
            "broken": len(self._with("broken")),
            "nothing_to_fix": len(self._with("nothing_to_fix")),
            "success_rate": self.success_rate,
            "neurons_per_fix": self.neurons_per_fix,
            "median_neurons_per_fix": self.median_neurons_per_fix,
            "failures": len(self.failures),
            "failures_fixed": sum(f.status in ("fixed", "undone") for f in self.failures),
            "failure_success_rate": (
                sum(f.status in ("fixed", "undone") for f in self.failures) / len(self.failures)
                if self.failures
                else float("nan")
            ),
            "neurons_per_failure": self.neurons_per_failure,
            "median_neurons_per_failure": _median(self.neurons_per_failure),
            "reference_flips": sum(e.reference_flips or 0 for e in self.fixed),
            "retried_edits": sum(e.attempts > 1 for e in self.edits),
            "seconds": round(self.seconds, 3),
            "seconds_per_fix": round(self.seconds / max(1, len(self.needing_fix)), 3),
            "cast_error": self.cast_error,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "settings": self.settings.to_json(),
            "edits": [e.to_json() for e in self.edits],
        }
