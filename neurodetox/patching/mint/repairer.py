"""MINT: the plan / patch loop (``shared/docs/methods.md`` §4, steps 3–4).

Gu, Aleti, Chen, Zhang, "Neuron Patching: Semantic-based Neuron-level Language
Model Repair for Code Generation", arXiv 2312.05356. For each edit (a prompt and
its desired continuation, as token ids), every teacher-forced failure (target
token ``t``, wrong argmax ``a``) is repaired in order:

1. direction ``τ = δ / (max δ − min δ)``, ``δ = G⁻¹ (u_t − u_a)``
   (:mod:`~neurodetox.patching.direction`);
2. candidates: the global top-``k`` FFN neurons of the searched layers by the
   locator (:mod:`~neurodetox.patching.locate`);
3. plan (gain-guided): each candidate's patch is tried and ``p_a − p_t`` (``a``
   the strongest competitor of ``t``) measured; the best one is kept. All
   candidates are measured in ONE batched forward: patching neuron ``j`` of a
   layer adds exactly ``a_j · Δw_j`` to that layer's FFN output, so each batch
   row gets its own rank-one correction through a forward hook. Step-size
   search (our addition; ``alpha_steps=(1,)`` turns it off): candidates are
   compared at the largest step ``α·max(alpha_steps)``; if the best one fixes
   the failure, the smallest step of ``α·alpha_steps`` that still fixes it is
   used (the smallest change that works), else the largest. With the guard
   (our addition, default on) "best" is the fewest reference prompts whose
   next token the patch is predicted to flip, then the gain; a failure the
   guarded plan cannot fix is planned again by gain alone. The forward
   starts on one row (the unpatched model) and each candidate's row is added
   at its own layer, so the blocks below it run once for all rows; the blocks
   below the searched layers (never patched) replay their outputs recorded at
   the edit's first forward;
4. patch the value vector ``w ← (w + α s τ) / (1 + α)`` (the paper's rule,
   ``update="interpolate"``; the default ``"additive"`` is ``w ← w + α s τ``,
   see :class:`MintSettings`) and repeat 3–4 over
   the same candidates (``relocate=True``: 2–4, locating again) until the
   argmax is ``t``. After ``max_patches`` (10) patches without success the
   failure's patches are undone and it is reported skipped.

``s`` is ``+1`` in the paper. With ``signed=True`` (default) it is the sign of
the neuron's activation at the failure position: gated FFNs (SwiGLU) have
signed activations, and a neuron with ``a_j < 0`` would move the output along
``−τ`` under the unsigned rule.

Edits are repaired in sequence on the same model; with ``recheck`` the
earlier fixed edits are re-verified (one batched forward) after each new fix,
and an edit that a later edit broke is repaired again (at most twice, plus a
final pass); an edit still broken at the end has its own neurons undone
(when no other fix needs them) and is reported skipped. The model is changed
in place during the call and restored before it returns; the result is a
:class:`~neurodetox.patching.patchfile.PatchSet` (apply it to keep the fix).

Reference check (our addition, opt-in ``verify_reference``): after an edit is fixed,
the next-token predictions of the reference prompts (what must not change) are
compared with those before the edit; an edit that changed any is undone and
repaired again without the neurons it used, and the attempt that changed the
fewest is kept. Selectivity and the plan only *predict* side effects; this
measures them, on prompts that the evaluation's specificity set never shares.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict, defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from neurodetox.core.logits import tail_logits
from neurodetox.core.sites import NeuronSite, base_model, decoder_layers, resolve_sites, value_vector_parameter
from neurodetox.patching.direction import final_norm_gain, semantic_space
from neurodetox.patching.failures import (
    Edit,
    Failure,
    coerce_edits,
    encode_edit,
    find_failures,
    right_pad,
    still_failing,
)
from neurodetox.patching.locate import (
    DEFAULT_REFERENCE_PROMPTS,
    LOCATORS,
    Candidate,
    neuron_scores,
    reference_stats,
    top_candidates,
)
from neurodetox.patching.neurons import entropy_neurons
from neurodetox.patching.patchfile import ParamPatch, PatchSet
from neurodetox.patching.protect import ReferenceProtection

__all__ = ["MintSettings", "FailureResult", "EditResult", "RepairReport", "repair", "update_rule", "UPDATE_RULES"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


UPDATE_RULES = ("additive", "interpolate")


def update_rule(
    w: torch.Tensor, tau: torch.Tensor, alpha: float, sign: float = 1.0, rule: str = "additive"
) -> torch.Tensor:
    """A value-vector update, in float32 math.

    Args:
        w: the neuron's value vector, ``[d_model]`` (any float dtype).
        tau: the direction ``τ``, ``[d_model]``.
        alpha: the step ``α > 0``.
        sign: ``±1``, the orientation of ``τ`` (see ``MintSettings.signed``).
        rule: ``"additive"`` (default): ``w + α·sign·τ``, which adds the
            direction and leaves the rest of ``w`` as it is. ``"interpolate"``:
            MINT's ``(w + α·sign·τ) / (1 + α)`` (Gu et al., arXiv
            2312.05356), which also scales the neuron's existing output down
            by ``1/(1 + α)`` on every prompt where it fires.

    Returns:
        the new value vector, float32 ``[d_model]``.

    Raises:
        ValueError: an unknown ``rule``.
    """
    if rule == "additive":
        return w.float() + (alpha * sign) * tau.float()
    if rule == "interpolate":
        return (w.float() + (alpha * sign) * tau.float()) / (1.0 + alpha)
    raise ValueError(f"unknown update rule {rule!r}; valid rules are {', '.join(UPDATE_RULES)}")


def _step_scale(alpha: float, rule: str) -> float:
    """``c(α)`` with ``update_rule(w, τ, α, s) − w = c(α) · v``, ``v`` independent of ``α``.

    ``"additive"``: ``c = α``, ``v = s·τ``; ``"interpolate"``: ``c = α/(1+α)``, ``v = s·τ − w``.
    """
    return alpha if rule == "additive" else alpha / (1.0 + alpha)


@dataclass
class MintSettings:
    """Settings of :func:`repair`.

    Attributes:
        update: the value-vector update (:func:`update_rule`). ``"additive"``
            (default): ``w ← w + α s τ``. ``"interpolate"``: MINT's
            ``w ← (w + α s τ) / (1 + α)`` (methods.md §4), which also scales
            the neuron's existing output by ``1/(1 + α)`` (by half at
            ``α = 1``) on every prompt where the neuron fires. Measured on the
            demo model with two sets of 20 wrong facts (A: mostly capitals;
            B: continents and currencies), next-token specificity on 250
            held-out fact prompts per set: all 20 edits in one call, additive
            fixed 20 and 17 facts at 92.4% and 86.8% in 26 and 16 s,
            interpolate 17 and 19 facts at 88.4% and 79.6% in 32 and 22 s;
            each edit alone, both fixed 40 of 40, additive at 98.9% and
            97.9%, interpolate at 98.5% and 97.6%. The cost: a patched
            neuron keeps all of its old output, so perplexity drifts more
            (set A in one call: +3.7% against +2.0% on 64 fact statements).
        alpha: step ``α`` of the update rule. Default 0.1 (the authors'
            benchmark path; methods.md lists 0.01 for the paper's prose).
        alpha_steps: multipliers of ``alpha`` the planner may use (step-size
            search, see the module docstring). Default ``(1, 2.5, 5, 10)``,
            i.e. ``α ∈ {0.1, 0.25, 0.5, 1}``; ``(1,)`` is the fixed-step rule.
        locator: ``"grad_x_act"`` (default), ``"contrastive"`` or ``"activation"``.
        candidates: size of the candidate pool (global top-k). Default 10.
        max_patches: patches per failure before it is undone and skipped. Default 10.
        layers: layers searched (site ``mlp``), a spec of
            :func:`neurodetox.core.sites.parse_layers`. Default ``"last_sixth"``
            (the last ``L//6`` blocks, blocks 25–29 of SmolLM2-135M), not
            methods.md's ``"second_half"``: on 20 wrong facts of the demo
            model (guard on, reference prompts of all three relations), each
            repaired alone, both fixed 19–20 facts with the same next-token
            specificity on 250 held-out fact prompts (98.5% against 98.3%) in
            1.46 against 2.55 s per edit; all 20 in one call, 17 against 19
            facts, 88.4% against 89.6%, in 29 against 55 s. The lower blocks'
            output is replayed, so each plan and locate runs 5 blocks, not 15.
        fold_norm: fold the final norm's gain into ``W_U`` for ``δ``. Default True.
        orthogonalize: project ``τ`` off directions already used in the same
            layer by earlier repairs of this call. Default False.
        signed: orient ``τ`` by the sign of the neuron's activation. Default True.
        entropy_guard: never patch last-layer entropy neurons (Stolfo et al.,
            arXiv 2406.16254). Default True.
        storage_dtype: the dtype the patched values will be stored in (e.g.
            ``"bfloat16"`` for a bf16 checkpoint): every update is rounded to it
            while repairing, so what is verified is what will be written.
            ``None``: the parameter's own dtype.
        recheck: after each fix, re-verify earlier edits and repair the ones
            it broke (see the module docstring). Default True.
        max_failures_per_edit: most failure repairs attempted per edit. Default 16.
        margin: a failure counts as repaired when ``t`` is the argmax AND
            ``p_t − max_{v≠t} p_v >= margin``. Default 0.1: a fix that barely
            flips the argmax is undone by the next edit of the same kind (on the
            fact probes, 20 sequential capital fixes kept 40% with margin 0).
            ``0`` is the paper's stopping rule.
        selectivity: multiply the locator score by the neuron's relative
            activation ``|a_j(p)| / rms_ref(a_j)`` (RMS over reference prompts),
            so neurons that fire for this prompt and not in general are
            preferred (specificity). Default True.
        guard: in the plan, prefer the candidate whose patch is predicted to
            flip the fewest reference prompts' next token (first-order direct
            effect through the final norm and LM head, from the reference
            statistics taken when :func:`repair` starts), then the best gain.
            Default True: on 20 wrong facts of the demo model (relocating,
            ``benchmarks/patch_vs_finetune.py``), each repaired alone, the
            next-token specificity on 250 held-out fact prompts was 98.4% with
            the guard and 97.7% without, with the same 19/20 fixed; with 20
            edits in one call 87.6% against 89.2% (within noise). Without
            relocating, 98.8% / 97.7% alone and 92.0% / 88.0% together.
        guard_fallback: a failure that the guarded plan cannot fix within
            ``max_patches`` is repaired again by gain alone (the guard's
            first choices are weaker neurons: without the fallback 16 of the
            20 facts above were fixed, with it 19). Default True.
        relocate: locate again (one forward + backward) before every patch
            of a failure. ``False`` (default): locate once per failure; the
            plan and patch repeat over that candidate pool, minus the neurons
            already patched for this failure, as methods.md §4 reads ("repeat
            3–4"). Measured on 20 wrong facts of the demo model (guard on,
            2 threads): each repaired alone, ``False`` fixed 18 facts against
            19 with next-token specificity 98.8% against 98.4%, in 2.5–3.1 s
            per edit against 4.5–4.8 s; all 20 in one call, 16 facts either
            way, 92.0% against 87.6%, in 60 s against 137 s.
        relocate_fallback: with ``relocate=False``, a failure that its
            candidate pool cannot fix (guard and guard fallback included) is
            repaired again by gain alone, locating before every patch.
            Default True: on the 20 facts above, each alone, 19 fixed instead
            of 18 (98.6% next-token specificity against 98.8%, 2.45 against
            2.02 s per edit); all 20 in one call, 17 instead of 16 (90.4%
            against 92.0%, 48 s against 46 s).
        prune: once an edit is fixed, undo each of its patched neurons in
            turn and keep it undone when the edit stays fixed without it
            (the smallest verifiable fix; one forward per neuron). Default
            False: on the fact probes it rarely removed a neuron.
        share_neurons: let an edit patch a neuron that an earlier edit of the
            same call patched. Default False (edits would fight over it).
        verify_reference: after each fixed edit, check the next-token
            prediction of every reference prompt (the prompts that must not
            change; one batched forward). When the edit changed more than
            ``max_reference_flips`` of them, it is undone and repaired again
            with the neurons it used excluded, at most ``reference_retries``
            times; the attempt that changed the fewest is kept (the first on
            ties), and its count is reported per edit. Default False: on 20
            fact edits of the demo model (``benchmarks/patch_vs_finetune.py``)
            15 edits were retried, almost none reached zero changes, the
            held-out specificity did not improve (86.0% against 88.0%) and a
            fix cost 3x more time. Turn it on to get the count per edit.
        max_reference_flips: changed reference predictions an edit may cause
            without a retry. Default 0.
        reference_retries: extra repair attempts per edit. Default 2.
        protect: strength ``λ`` of the reference protection
            (:class:`~neurodetox.patching.protect.ReferenceProtection`): every
            proposed value-vector change is replaced by the nearest one that
            keeps the reference prompts' gaps between their top token and
            ``protect_competitors`` competitors, weighted by how strongly the
            neuron fires for them (direct path). ``0`` (default) turns it off.
            With ``update="interpolate"``, on the 20 facts above, all in one
            call, ``1e4`` raised the next-token specificity from 88.4% to 94.0%
            with 17 facts fixed either way (42 s against 29 s); each alone, 18
            facts instead of 20 at 98.8% against 98.5%. With the additive
            update, all in one call: 92.4% → 94.0% with 18 facts fixed instead
            of 20 (set A of ``update``), 86.8% → 90.4% with 15 instead of 17
            (set B). It acts on the direct path only: with the
            methods.md layers (``"second_half"``) the changes of lower blocks
            reach the logits mostly through later blocks and it did not help
            (27 held-out flips against 26).
        protect_competitors: competitors protected per reference prompt. Default 3.
    """

    update: str = "additive"
    alpha: float = 0.1
    alpha_steps: tuple[float, ...] = (1.0, 2.5, 5.0, 10.0)
    locator: str = "grad_x_act"
    candidates: int = 10
    max_patches: int = 10
    layers: Union[str, Sequence[int]] = "last_sixth"
    fold_norm: bool = True
    orthogonalize: bool = False
    signed: bool = True
    entropy_guard: bool = True
    storage_dtype: Optional[str] = None
    recheck: bool = True
    max_failures_per_edit: int = 16
    margin: float = 0.1
    selectivity: bool = True
    guard: bool = True
    guard_fallback: bool = True
    relocate: bool = False
    relocate_fallback: bool = True
    prune: bool = False
    share_neurons: bool = False
    verify_reference: bool = False
    max_reference_flips: int = 0
    reference_retries: int = 2
    protect: float = 0.0
    protect_competitors: int = 3

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and what is valid."""
        if not isinstance(self.margin, (int, float)) or not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin!r}")
        if self.update not in UPDATE_RULES:
            raise ValueError(f"unknown update {self.update!r}; valid updates are {', '.join(UPDATE_RULES)}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        steps = tuple(self.alpha_steps) if not isinstance(self.alpha_steps, (int, float)) else (self.alpha_steps,)
        if not steps or any(not isinstance(m, (int, float)) or not m > 0 for m in steps):
            raise ValueError(f"alpha_steps must be positive numbers, got {self.alpha_steps!r}")
        self.alpha_steps = tuple(float(m) for m in steps)
        if self.locator not in LOCATORS:
            raise ValueError(f"unknown locator {self.locator!r}; valid locators are {', '.join(LOCATORS)}")
        for name in ("candidates", "max_patches", "max_failures_per_edit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("max_reference_flips", "reference_retries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if isinstance(self.protect, bool) or not isinstance(self.protect, (int, float)) or not self.protect >= 0:
            raise ValueError(f"protect must be a number >= 0 (0 turns it off), got {self.protect!r}")
        v = self.protect_competitors
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"protect_competitors must be an integer >= 1, got {v!r}")
        if self.storage_dtype is not None and str(self.storage_dtype) not in _DTYPES:
            raise ValueError(f"unknown storage_dtype {self.storage_dtype!r}; valid: {', '.join(_DTYPES)} or None")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["alpha_steps"] = list(d["alpha_steps"])
        if not isinstance(d["layers"], str):
            d["layers"] = list(d["layers"])
        return d


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


# ----------------------------------------------------------------------------- internals


class _Tracker:
    """Touched value vectors: originals, writes, snapshots and undo."""

    def __init__(self, model: nn.Module, sites: Sequence[NeuronSite], storage: Optional[torch.dtype]):
        names = {id(p): n for n, p in model.named_parameters()}
        self.entries: dict[int, tuple[str, torch.Tensor, int]] = {}
        for s in sites:
            weight, axis = value_vector_parameter(s)
            if id(weight) not in names:
                raise ValueError(f"the value-vector weight of layer {s.layer} is not a named parameter of the model")
            self.entries[s.layer] = (names[id(weight)], weight, axis)
        self.storage = storage
        self.originals: dict[tuple[int, int], torch.Tensor] = {}

    def column(self, layer: int, index: int) -> torch.Tensor:
        _, w, axis = self.entries[layer]
        return w.detach().select(axis, index).float().cpu().clone()

    def round(self, col: torch.Tensor, layer: int) -> torch.Tensor:
        _, w, _ = self.entries[layer]
        dtype = self.storage or w.dtype
        return col.to(dtype).float()

    def write(self, layer: int, index: int, col: torch.Tensor) -> None:
        key = (layer, index)
        if key not in self.originals:
            self.originals[key] = self.column(layer, index)
        _, w, axis = self.entries[layer]
        with torch.no_grad():
            w.select(axis, index).copy_(col.to(w.device, w.dtype))

    def snapshot(self) -> dict[tuple[int, int], torch.Tensor]:
        return {k: self.column(*k) for k in self.originals}

    def restore(self, snap: dict[tuple[int, int], torch.Tensor]) -> None:
        for key in list(self.originals):
            _, w, axis = self.entries[key[0]]
            value = snap.get(key, self.originals[key])
            with torch.no_grad():
                w.select(axis, key[1]).copy_(value.to(w.device, w.dtype))
            if key not in snap:
                del self.originals[key]

    def to_params(self) -> list[ParamPatch]:
        by_layer: dict[int, list[int]] = defaultdict(list)
        for (layer, index), orig in self.originals.items():
            if not torch.equal(self.column(layer, index), orig):
                by_layer[layer].append(index)
        out = []
        for layer, idx in sorted(by_layer.items()):
            name, w, axis = self.entries[layer]
            idx = sorted(idx)
            t = torch.tensor(idx, dtype=torch.long)
            orig = torch.stack([self.originals[(layer, i)] for i in idx], dim=axis)
            new = w.detach().index_select(axis, t.to(w.device)).float().cpu()
            out.append(ParamPatch(name=name, axis=axis, indices=t, original=orig, new=new, layer=layer))
        return out

    def full_originals(self, params: Sequence[ParamPatch]) -> dict[str, torch.Tensor]:
        """Full original tensors (in the storage dtype) of the touched parameters."""
        out = {}
        for p in params:
            _, w, _ = self.entries[p.layer]
            full = w.detach().cpu().clone()
            p.write(full, p.original)
            out[p.name] = full.to(self.storage) if self.storage is not None else full
        return out


def _gaps_from_logits(logits: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_best_other − p_t, argmax)`` per row of ``logits [B, V]``."""
    probs = torch.softmax(logits.float(), dim=-1)
    p_t = probs[:, target].clone()
    probs[:, target] = -1.0
    return probs.max(dim=-1).values - p_t, logits.argmax(dim=-1)


@torch.no_grad()
def _measure(model: nn.Module, ids: Sequence[int], target: int) -> tuple[float, int]:
    x = torch.tensor([list(ids)], device=next(model.parameters()).device)
    logits = tail_logits(model, 1, input_ids=x)[:, -1]
    gap, arg = _gaps_from_logits(logits, target)
    return float(gap[0]), int(arg[0])


def _append_rows(count: int):
    """Forward pre-hook (``with_kwargs``) that appends ``count`` copies of row 0 of a decoder block's input."""

    def grow(h):
        return torch.cat([h, h[:1].expand(count, *h.shape[1:])], dim=0)

    def hook(module, args, kwargs):
        if args:
            return (grow(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": grow(kwargs["hidden_states"])}

    return hook


def _first_positions(output: Any, n: int) -> Any:
    """A decoder block's batch-one output cut to its first ``n`` positions (``None`` when its form is unknown).

    Known forms: the hidden states ``[1, T, d]``, alone or first in a tuple
    whose other items are ``None`` or attention weights ``[1, H, T, T]``.
    """
    if isinstance(output, torch.Tensor):
        return output[:, :n] if output.dim() == 3 else None
    if not (isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 3):
        return None
    T = output[0].shape[1]
    rest = []
    for o in output[1:]:
        if o is None:
            rest.append(None)
        elif isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[-2:] == (T, T):
            rest.append(o[:, :, :n, :n])
        else:
            return None
    return (output[0][:, :n], *rest)


def _hidden(output: Any) -> Optional[torch.Tensor]:
    """The hidden states of a block output of a known form (a tensor, or a tuple of it and ``None``s)."""
    if isinstance(output, torch.Tensor) and output.dim() == 3:
        return output
    if (
        isinstance(output, tuple)
        and output
        and isinstance(output[0], torch.Tensor)
        and output[0].dim() == 3
        and all(o is None for o in output[1:])
    ):
        return output[0]
    return None


def _with_hidden(output: Any, h: torch.Tensor) -> Any:
    return h if isinstance(output, torch.Tensor) else (h, *output[1:])


def _detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    return output


def _leaf(output: Any) -> Any:
    """``output`` with its hidden states a fresh leaf that requires grad (gradients flow from there on)."""
    if isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True)
    return (output[0].detach().requires_grad_(True), *output[1:])


class _PrefixCache:
    """The input of the lowest searched block, recorded per input ids and replayed.

    Within one :func:`repair` call only blocks of the searched layers are
    patched, so the blocks below the lowest of them compute the same output
    for the same ids every time. The first batch-one forward over some ids
    runs them and records the output of the last of them; later forwards
    over the same ids, or over a prefix of them (causal attention: the first
    ``n`` positions do not depend on the rest), replace those blocks'
    ``forward`` with the recording for the duration of the call, so the
    searched blocks get the same input without the FLOPs below them.
    :meth:`replay_batch` does the same for a right-padded batch of recorded
    ids. The least recently used recordings are dropped beyond ``size``.
    """

    def __init__(self, model: nn.Module, below: int, size: int = 64):
        self.blocks = list(decoder_layers(model))[: max(int(below), 0)]
        self.size = size
        self.store: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def _recorded(self, key: tuple[int, ...]) -> Any:
        for known, output in reversed(self.store.items()):
            if known == key:
                found = output
            elif len(known) > len(key) and known[: len(key)] == key:
                found = _first_positions(output, len(key))
                if found is None:
                    continue
            else:
                continue
            self.store.move_to_end(known)
            return found
        return None

    @contextmanager
    def _stubbed(self, output: Any, grad: bool):
        saved = [b.__dict__.get("forward") for b in self.blocks]
        out = _leaf(output) if grad and torch.is_grad_enabled() else output
        for block in self.blocks:  # the loop only passes the last one on
            block.forward = lambda *args, **kwargs: out
        try:
            yield
        finally:
            for block, old in zip(self.blocks, saved):
                if old is None:
                    del block.forward
                else:
                    block.forward = old

    @contextmanager
    def replay(self, ids: Sequence[int], grad: bool = False):
        """Context in which a batch-one forward over ``ids`` reuses (or records) the blocks' output.

        ``grad``: under grad mode the replayed hidden states are a leaf that
        requires grad, so a backward reaches the searched blocks' activations
        even when no parameter requires grad.
        """
        key = tuple(int(i) for i in ids)
        output = self._recorded(key) if self.blocks else None
        if not self.blocks:
            yield
        elif output is not None:
            with self._stubbed(output, grad):
                yield
        else:
            got: list[Any] = []
            handle = self.blocks[-1].register_forward_hook(lambda m, a, o: got.append(_detached(o)))
            try:
                yield
            finally:
                handle.remove()
            if len(got) == 1 and (_hidden(got[0]) is not None or _first_positions(got[0], 1) is not None):
                self.store[key] = got[0]
                while len(self.store) > self.size:
                    self.store.popitem(last=False)

    @contextmanager
    def replay_batch(self, seqs: Sequence[Sequence[int]]):
        """Context for one forward over ``seqs`` right-padded to the longest: the
        recorded outputs, stacked and zero-padded (padding is masked and never
        read), when every sequence has one in a form that stacks; otherwise
        the blocks run."""
        outputs = [self._recorded(tuple(int(i) for i in s)) for s in seqs] if self.blocks else [None]
        hidden = [_hidden(o) if o is not None else None for o in outputs]
        if any(h is None for h in hidden):
            yield
            return
        width = max(h.shape[1] for h in hidden)
        stacked = hidden[0].new_zeros(len(hidden), width, hidden[0].shape[-1])
        for i, h in enumerate(hidden):
            stacked[i, : h.shape[1]] = h[0]
        with self._stubbed(_with_hidden(outputs[0], stacked), grad=False):
            yield


#: model classes whose decoder blocks cannot take a batch larger than the
#: model's input (e.g. a batch-shaped ALiBi bias): the plan runs them unshared.
_NO_SHARED_PREFIX: set[type] = set()


@torch.no_grad()
def _plan(
    model,
    sites_by_layer,
    ids,
    target,
    cands: list[Candidate],
    deltas: list[torch.Tensor],
    share_prefix: bool = True,
    prefix: Optional[_PrefixCache] = None,
):
    """Gaps ``p_a − p_t`` after each candidate's patch, in one batched forward.

    Row ``r`` adds ``a_j · Δw_r`` to the FFN output of its candidate's layer
    (exactly what writing the patched value vector does). A row's blocks below
    its candidate's layer see the unpatched input, the same for every row:
    with ``share_prefix`` the forward starts on a batch of one (the unpatched
    model) and each candidate layer's block appends a copy of it for each of
    its rows, so a row costs only the blocks from its own layer up (same
    result, fewer FLOPs). Model classes whose blocks reject a batch that grows
    (a batch-shaped bias) fall back to the full batch from the first block.
    ``prefix``: a :class:`_PrefixCache` whose blocks (all below every
    candidate's layer, never patched) replay their recorded outputs.

    Returns:
        ``(gaps [B], argmax [B])`` on CPU.
    """
    device = next(model.parameters()).device
    B = len(cands)
    rows_by_layer: dict[int, list[int]] = defaultdict(list)
    for r, c in enumerate(cands):
        rows_by_layer[c.layer].append(r)
    share = share_prefix and B >= 1 and type(model) not in _NO_SHARED_PREFIX
    if share:
        # batch layout: row 0 is the unpatched model, then the candidates' rows in layer order
        order = [r for layer in sorted(rows_by_layer) for r in rows_by_layer[layer]]
        at = {r: 1 + k for k, r in enumerate(order)}
        seen, width = 1, {}
        for layer in sorted(rows_by_layer):
            seen += len(rows_by_layer[layer])
            width[layer] = seen
    else:
        at = {r: r for r in range(B)}
        width = {layer: B for layer in rows_by_layer}

    handles = []
    for layer, rows in rows_by_layer.items():
        site = sites_by_layer[layer]
        r_idx = torch.tensor([at[r] for r in rows], device=device)
        j_idx = torch.tensor([cands[r].index for r in rows], device=device)
        dw = torch.stack([deltas[r] for r in rows]).to(device)  # [n, d]

        def hook(module, args, output, r_idx=r_idx, j_idx=j_idx, dw=dw, n=width[layer]):
            inp = args[0]
            out = output
            inp3 = inp.reshape(n, -1, inp.shape[-1])
            out3 = out.reshape(n, -1, out.shape[-1])
            a = inp3[r_idx, :, j_idx]  # [k, T]
            corr = a[:, :, None].float() * dw[:, None, :]  # [k, T, d]
            out3 = out3.clone()
            out3[r_idx] = (out3[r_idx].float() + corr).to(out3.dtype)
            return out3.reshape(out.shape)

        handles.append(site.module.register_forward_hook(hook))
    try:
        logits = None
        if share:
            blocks = decoder_layers(model)
            for layer in sorted(rows_by_layer):
                handles.append(
                    blocks[layer].register_forward_pre_hook(_append_rows(len(rows_by_layer[layer])), with_kwargs=True)
                )
            try:
                replay = prefix is not None and len(prefix.blocks) <= min(rows_by_layer)
                with prefix.replay(ids) if replay else nullcontext():
                    out = tail_logits(model, 1, input_ids=torch.tensor([list(ids)], device=device))[:, -1]
                if out.shape[0] == B + 1:
                    logits = out[[at[r] for r in range(B)]]
            except (RuntimeError, ValueError, IndexError) as err:  # a block that needs the real batch size
                logger.debug("plan without a shared prefix for %s: %s", type(model).__name__, err)
            if logits is None:
                _NO_SHARED_PREFIX.add(type(model))
                for h in handles:
                    h.remove()
                return _plan(model, sites_by_layer, ids, target, cands, deltas, share_prefix=False)
        else:
            x = torch.tensor([list(ids)] * B, device=device)
            logits = tail_logits(model, 1, input_ids=x)[:, -1]
    finally:
        for h in handles:
            h.remove()
    gaps, args = _gaps_from_logits(logits, target)
    return gaps.cpu(), args.cpu()


def _encode_right_padded(tokenizer, prompts: Sequence[str], batch_size: int = 64):
    """``[(input_ids [B, T], attention_mask [B, T])]`` batches, right-padded (pad id 0 where none is set)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[start : start + batch_size]]
        rows = [r for r in rows if r]
        if rows:
            out.append(right_pad(rows))
    return out


@torch.no_grad()
def _last_argmax(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token argmax at each row's last real position of a right-padded batch, ``[B]`` long (CPU)."""
    device = next(model.parameters()).device
    last = mask.sum(dim=1) - 1
    first = int(last.min())
    logits = tail_logits(model, ids.shape[1] - first, input_ids=ids.to(device), attention_mask=mask.to(device))
    return logits[torch.arange(ids.shape[0]), (last - first).to(logits.device)].argmax(dim=-1).cpu()


_REF_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """Cheap identity of the model's current weights: float32 sum and abs-sum of every parameter.

    Each parameter's pair is recomputed only when it was replaced or written in
    place since the last call (storage pointer and autograd version counter):
    an unchanged model costs a pass over the parameter list, and a patch
    applied or reverted costs the sums of the touched tensors only.
    """
    known = _FINGERPRINTS.setdefault(model, {})
    fp, seen = [], {}
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            key = (i, p.data_ptr(), p._version)
            pair = known.get(key)
            if pair is None:
                pair = (float(p.detach().sum()), float(p.detach().abs().sum()))
            seen[key] = pair
            fp.append(pair)
    _FINGERPRINTS[model] = seen
    return tuple(fp)


def _cached_reference(model, tokenizer, sites, prompts):
    """:func:`reference_stats`, computed once per model, sites, prompts and weights."""
    key = (tuple(prompts), tuple(s.layer for s in sites), _fingerprint(model))
    per_model = _REF_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model.clear()
        per_model[key] = reference_stats(model, tokenizer, sites, list(prompts))
    return per_model[key]


def _decode(tokenizer, token: int) -> str:
    try:
        return tokenizer.decode([int(token)])
    except Exception:
        return f"#{token}"


class _Repairer:
    def __init__(
        self,
        model,
        tokenizer,
        settings: MintSettings,
        show_progress: bool,
        reference_prompts: Optional[Sequence[str]] = None,
    ):
        self.model = model
        self.tok = tokenizer
        self.s = settings
        self.sites = resolve_sites(model, "mlp", settings.layers)
        self.sites_by_layer = {s.layer: s for s in self.sites}
        self.space = semantic_space(model, settings.fold_norm)
        storage = _DTYPES[str(settings.storage_dtype)] if settings.storage_dtype is not None else None
        self.tracker = _Tracker(model, self.sites, storage)
        # the blocks below the searched layers are never patched here: plans replay their outputs
        self.prefix = _PrefixCache(model, min(self.sites_by_layer, default=0))
        self.exclude: list[tuple[int, int]] = []
        if settings.entropy_guard:
            last = resolve_sites(model, "mlp", "last")[0].layer
            if last in self.sites_by_layer:
                self.exclude = entropy_neurons(model, last)
        self.used: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.owner: dict[tuple[int, int], int] = {}  # neuron -> edit that patched it
        self.show_progress = show_progress
        self.ref = None
        if settings.selectivity or settings.guard or settings.protect:
            self.ref = _cached_reference(model, tokenizer, self.sites, reference_prompts or DEFAULT_REFERENCE_PROMPTS)
        self.head = base_model(model).get_output_embeddings().weight
        self.gain = final_norm_gain(model)
        self.protection = (
            ReferenceProtection(
                self.ref, self.space, self.head, self.gain, settings.protect, settings.protect_competitors
            )
            if settings.protect
            else None
        )
        self.banned: set[tuple[int, int]] = set()  # neurons the current edit may not use (rejected attempts)
        self._flip_cache: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # per failure, see _flips
        self._head_cache: dict[tuple[int, int], tuple] = {}  # per failure, see _head_changes
        self.reference_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reference_now: Optional[torch.Tensor] = None  # next-token predictions of the current model
        if settings.verify_reference:
            self.reference_batches = _encode_right_padded(
                tokenizer, [p for p in (reference_prompts or DEFAULT_REFERENCE_PROMPTS) if p.strip()]
            )

    def failures(self, edit: Edit, i: int) -> list[Failure]:
        """:func:`find_failures` of ``edit`` under the current weights (the unpatched blocks replayed)."""
        with self.prefix.replay(list(edit.prompt_ids) + list(edit.target_ids)[:-1]):
            return find_failures(self.model, edit, i)

    def still_failing(self, edits: Sequence[Edit], batch_size: int = 32) -> list[bool]:
        """:func:`still_failing` under the current weights (the unpatched blocks replayed)."""
        out: list[bool] = []
        for start in range(0, len(edits), batch_size):
            chunk = list(edits[start : start + batch_size])
            with self.prefix.replay_batch([list(e.prompt_ids) + list(e.target_ids)[:-1] for e in chunk]):
                out += still_failing(self.model, chunk, batch_size=batch_size)
        return out

    def reference_predictions(self) -> torch.Tensor:
        """Next-token argmax of every reference prompt under the current weights, ``[N]`` long."""
        return torch.cat([_last_argmax(self.model, ids, mask) for ids, mask in self.reference_batches])

    def repair_edit_verified(self, i: int, edit: Edit) -> EditResult:
        """:meth:`repair_edit`, then the reference check and retries of ``settings.verify_reference``."""
        s = self.s
        if not s.verify_reference or not self.reference_batches:
            return self.repair_edit(i, edit)
        if self.reference_now is None:
            self.reference_now = self.reference_predictions()
        before = self.reference_now
        pre, owner_pre = self.tracker.snapshot(), dict(self.owner)
        attempts: list[tuple[int, EditResult, dict, dict, torch.Tensor]] = []  # fixed attempts only
        seconds, tries, at_last = 0.0, 0, False
        try:
            for _ in range(s.reference_retries + 1):
                tries += 1
                result = self.repair_edit(i, edit)
                seconds += result.seconds
                if result.status != "fixed":  # repair_edit left the model as it was before the attempt
                    break
                t0 = time.perf_counter()
                now = self.reference_predictions()
                flips = int((now != before).sum())
                seconds += time.perf_counter() - t0
                attempts.append((flips, result, self.tracker.snapshot(), dict(self.owner), now))
                at_last = True
                if flips <= s.max_reference_flips or not result.neurons:
                    break
                self.banned |= set(result.neurons)
                self.tracker.restore(pre)
                self.owner = dict(owner_pre)
                at_last = False
        finally:
            self.banned = set()
        if not attempts:
            result.attempts, result.seconds = tries, seconds
            return result
        best = min(range(len(attempts)), key=lambda k: (attempts[k][0], k))
        flips, result, snap, owner, now = attempts[best]
        if not (at_last and best == len(attempts) - 1):
            self.tracker.restore(pre)
            for key, col in snap.items():
                self.tracker.write(key[0], key[1], col)
        self.owner = owner
        self.reference_now = now
        result.reference_flips, result.attempts, result.seconds = flips, tries, seconds
        if tries > 1:
            result.message = (
                f"reference check: attempt {best + 1} of {tries} kept; it changes {flips} of "
                f"{len(now)} reference predictions"
            )
        return result

    def _proposals(self, cands: list[Candidate], t: int, a: int, alphas: Sequence[float]):
        """``(candidate, alpha, sign, new column, delta)`` rows for the batched plan."""
        rows = []
        for c in cands:
            if c.layer not in self._taus:
                used = self.used[c.layer] if self.s.orthogonalize else ()
                self._taus[c.layer] = self.space.tau(t, a, used)
            sign = (1.0 if c.activation >= 0 else -1.0) if self.s.signed else 1.0
            old = self.tracker.column(c.layer, c.index)
            for alpha in alphas:
                new = update_rule(old, self._taus[c.layer], alpha, sign, self.s.update)
                if self.protection is not None:
                    new = old.float() + self.protection.project(c, new - old.float())
                new = self.tracker.round(new, c.layer)
                rows.append((c, alpha, sign, new, new - old))
        return rows

    def _flips(self, rows, guard: bool) -> torch.Tensor:
        """Predicted next-token flips of the reference prompts, per plan row (zeros without the guard).

        A row whose neuron and value-vector change equal one already counted
        (the same pool planned again after another neuron's patch) reuses its
        count: the prediction reads only the reference statistics, which are
        fixed for the call.
        """
        if not guard or self.ref is None:
            return torch.zeros(len(rows), dtype=torch.long)
        out = [None] * len(rows)
        for i, r in enumerate(rows):
            known = self._flip_cache.get((r[0].layer, r[0].index))
            if known is not None and torch.equal(known[0], r[4]):
                out[i] = known[1]
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            dlog = self._head_changes([rows[i] for i in todo])
            new = self.ref.predicted_flips(
                self.head, self.gain, [rows[i][0] for i in todo], [rows[i][4] for i in todo], dlog
            )
            for i, n in zip(todo, new.tolist()):
                out[i] = n
                self._flip_cache[(rows[i][0].layer, rows[i][0].index)] = (rows[i][4], n)
        return torch.tensor(out, dtype=torch.long)

    def _head_changes(self, rows) -> torch.Tensor:
        """``W_U (g ⊙ Δ)`` per plan row (float32 ``[R, V]``) for the guard.

        A candidate's changes at different steps are proportional,
        ``Δ(α) = c(α) · v`` (see :func:`_step_scale`; the reference
        protection is linear too), so when nothing rounds them (float32 weights) a candidate's head
        change is computed once per failure and scaled for its other steps, as
        long as its ``τ``, sign and value vector ``w`` are the same: one pass
        over ``W_U`` per candidate, not one per plan stage.
        """
        out: list[Optional[torch.Tensor]] = [None] * len(rows)
        miss = []
        for i, (c, alpha, sign, _, _) in enumerate(rows):
            known = self._head_cache.get((c.layer, c.index))
            if (
                known is not None
                and known[0] == sign
                and torch.equal(known[1], self._taus[c.layer])
                and torch.equal(known[2], self.tracker.column(c.layer, c.index))
            ):
                out[i] = known[4] * (_step_scale(alpha, self.s.update) / known[3])
            else:
                miss.append(i)
        if miss:
            fresh = self.ref.head_change(self.head, self.gain, [rows[i][4] for i in miss])
            for i, row in zip(miss, fresh):
                out[i] = row
                c, alpha, sign = rows[i][0], rows[i][1], rows[i][2]
                if self.tracker.entries[c.layer][1].dtype == torch.float32 and self.tracker.storage in (
                    None,
                    torch.float32,
                ):
                    self._head_cache[(c.layer, c.index)] = (
                        sign,
                        self._taus[c.layer],
                        self.tracker.column(c.layer, c.index),
                        _step_scale(alpha, self.s.update),
                        row,
                    )
        return torch.stack(out)

    def _ok(self, gap: float, arg: int, t: int) -> bool:
        """Fixed: ``t`` is the argmax, ahead of every other token by ``margin`` in probability."""
        return arg == t and gap <= -self.s.margin

    def repair_failure(self, edit: Edit, f: Failure) -> FailureResult:
        """Repair one failure; with the guard, a failure it cannot fix is repaired again by gain alone."""
        res = self._repair_failure(edit, f, guard=self.s.guard, relocate=self.s.relocate)
        res.guarded = self.s.guard
        if res.status != "fixed" and self.s.guard and self.s.guard_fallback:
            again = self._repair_failure(edit, f, guard=False, relocate=self.s.relocate)
            again.seconds += res.seconds
            again.guarded = False
            res = again
        if res.status != "fixed" and not self.s.relocate and self.s.relocate_fallback:
            again = self._repair_failure(edit, f, guard=False, relocate=True)
            again.seconds += res.seconds
            again.guarded = False
            res = again
        return res

    def _repair_failure(self, edit: Edit, f: Failure, guard: bool, relocate: bool) -> FailureResult:
        s = self.s
        t0 = time.perf_counter()
        ids = list(edit.prompt_ids) + list(edit.target_ids[: f.step])
        t = f.target_id
        res = FailureResult(
            step=f.step,
            position=f.position,
            target_id=t,
            argmax_id=f.argmax_id,
            target_token=_decode(self.tok, t),
            argmax_token=_decode(self.tok, f.argmax_id),
        )
        snap = self.tracker.snapshot()
        alphas = sorted({float(s.alpha) * float(m) for m in s.alpha_steps})
        used_taus: dict[int, torch.Tensor] = {}
        a = f.argmax_id
        gap, arg = float("nan"), a
        pool: Optional[list[Candidate]] = None
        self._flip_cache: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
        self._head_cache = {}
        for it in range(s.max_patches + 1):
            if it == s.max_patches:  # out of patches: measure the last one
                gap, arg = _measure(self.model, ids, t)
                break
            if pool is not None and not relocate:
                # plan and patch again over the first pool (methods.md §4: "repeat 3–4"); gap, arg
                # and the competitor are the last plan's, which is exact
                done = {(p["layer"], p["index"]) for p in res.patches}
                cands = [c for c in pool if (c.layer, c.index) not in done]
            else:
                # one forward (+ backward) scores the neurons and measures the current state
                with self.prefix.replay(ids, grad=True):
                    scores, acts, logits = neuron_scores(self.model, self.sites, ids, t, a, s.locator, self.space)
                g0, a0 = _gaps_from_logits(logits[None], t)
                gap, arg = float(g0[0]), int(a0[0])
                if it == 0:
                    res.gap_before = gap
                if self._ok(gap, arg, t):
                    break
                if arg != t:
                    a = arg
                if s.selectivity:
                    scores = scores * acts.abs() / (self.ref.rms + 1e-6)
                exclude = list(self.exclude)
                if not s.share_neurons:
                    exclude += [k for k, owner in self.owner.items() if owner != f.edit]
                exclude += list(self.banned)
                cands = pool = top_candidates(scores, acts, self.sites, s.candidates, exclude)
            if not cands:
                break
            self._taus = {}
            # plan, stage 1: every candidate at the largest step; the fewest predicted flips win,
            # then the gain, so only the candidates tied at the fewest flips need the forward
            rows = self._proposals(cands, t, a, alphas[-1:])
            flips = self._flips(rows, guard)
            fewest = int(flips.min())
            rows = [r for r, fl in zip(rows, flips.tolist()) if fl == fewest]
            gaps, args = _plan(
                self.model, self.sites_by_layer, ids, t, [r[0] for r in rows], [r[4] for r in rows], prefix=self.prefix
            )
            best = min(range(len(rows)), key=lambda i: (float(gaps[i]), i))

            chosen = (rows[best], float(gaps[best]), int(args[best]))
            # plan, stage 2: the best candidate at smaller steps (those predicted to flip no more
            # reference prompts); keep the smallest step that fixes
            if len(alphas) > 1 and self._ok(float(gaps[best]), int(args[best]), t):
                small = self._proposals([rows[best][0]], t, a, alphas[:-1])
                small = [r for r, fl in zip(small, self._flips(small, guard).tolist()) if fl <= fewest]
                if small:
                    g2, a2 = _plan(
                        self.model,
                        self.sites_by_layer,
                        ids,
                        t,
                        [r[0] for r in small],
                        [r[4] for r in small],
                        prefix=self.prefix,
                    )
                    for r, g, ar in zip(small, g2.tolist(), a2.tolist()):
                        if self._ok(g, ar, t):
                            chosen = (r, g, ar)
                            break
            (c, alpha, sign, new, _), gap, arg = chosen
            self.tracker.write(c.layer, c.index, new)
            used_taus[c.layer] = self._taus[c.layer]
            res.patches.append(
                {
                    "layer": c.layer,
                    "index": c.index,
                    "alpha": alpha,
                    "sign": sign,
                    "score": c.score,
                    "competitor": int(a),
                    "gap_after": gap,
                }
            )
            if self._ok(gap, arg, t):  # the plan's batched forward is exact (repair_edit re-checks the target)
                break
            if arg != t:
                a = arg
        res.gap_after = gap
        if arg == t:
            res.status = "fixed"
            if s.orthogonalize:
                for layer, tau in used_taus.items():
                    self.used[layer].append(tau)
        else:
            res.status = "skipped"
            self.tracker.restore(snap)
        res.seconds = time.perf_counter() - t0
        return res

    def _prune(self, result: EditResult, snap: dict[tuple[int, int], torch.Tensor]) -> None:
        """Undo neurons of a fixed edit that it does not need (one forward each)."""
        edit, i = result.edit, result.index
        if len(result.neurons) <= 1:
            return
        mine = [
            k
            for k in self.tracker.originals
            if not torch.equal(self.tracker.column(*k), snap.get(k, self.tracker.originals[k]))
        ]
        removed = set()
        # last patched first: later patches often compensate for earlier ones
        order = [k for f in reversed(result.failures) if f.status == "fixed" for k in reversed(f.neurons)]
        for key in dict.fromkeys(order):
            if key not in mine:
                continue
            current = self.tracker.column(*key)
            before = snap.get(key, self.tracker.originals[key])
            self.tracker.write(key[0], key[1], before)
            if self.failures(edit, i):
                self.tracker.write(key[0], key[1], current)
            else:
                removed.add(key)
        if removed:
            for f in result.failures:
                f.patches = [dict(p, pruned=True) if (p["layer"], p["index"]) in removed else p for p in f.patches]

    def recheck(self, results: Sequence[EditResult], max_rechecks: int) -> bool:
        """Re-repair fixed edits that a later edit broke (each at most ``max_rechecks`` times in all).

        Returns whether any fixed edit was found failing (re-repaired or marked broken).
        """
        fixed = [r for r in results if r.status == "fixed"]
        if not fixed:
            return False
        found = False
        for r, failing in zip(fixed, self.still_failing([r.edit for r in fixed])):
            if not failing:
                continue
            found = True
            if r.rechecks >= max_rechecks:
                r.status = "broken"
                continue
            r.rechecks += 1
            logger.info("edit %d (%r) was broken by a later edit; repairing it again", r.index, r.edit.prompt)
            self.repair_edit(r.index, r.edit, previous=r)
            self.reference_now = None  # the weights moved: re-measure before the next reference check
        return found

    def drop_broken(self, results: Sequence[EditResult]) -> None:
        """Final state: mark edits still failing as broken and undo their own neurons
        when that keeps every fixed edit fixed (fewer changed values, same fixes)."""
        fixed = [r for r in results if r.status == "fixed"]
        for r, failing in zip(fixed, self.still_failing([r.edit for r in fixed])):
            if failing:
                r.status = "broken"
        broken = [r for r in results if r.status == "broken"]
        if not broken:
            return
        mine = {k for k, owner in self.owner.items() if owner in {r.index for r in broken}}
        mine &= set(self.tracker.originals)
        if not mine:
            return
        snap = self.tracker.snapshot()
        self.reference_now = None
        for key in mine:
            self.tracker.write(key[0], key[1], self.tracker.originals[key])
        fixed = [r for r in results if r.status == "fixed"]
        if any(self.still_failing([r.edit for r in fixed])):
            self.tracker.restore(snap)  # some fix relied on them: keep them
        else:
            for r in broken:
                r.message = (r.message + "; " if r.message else "") + "broken by later edits; its neurons were undone"
                r.status = "skipped"

    def repair_edit(self, i: int, edit: Edit, previous: Optional[EditResult] = None) -> EditResult:
        t0 = time.perf_counter()
        failures = self.failures(edit, i)
        if not failures:
            status = "fixed" if previous is not None else "nothing_to_fix"
            msg = (
                ""
                if previous is not None
                else (f"nothing to fix: the model already predicts {edit.target!r} after {edit.prompt!r}")
            )
            return previous if previous is not None else EditResult(i, edit, status, message=msg)
        snap = self.tracker.snapshot()
        result = previous or EditResult(i, edit, "skipped")
        attempts = 0
        while failures:
            if attempts >= self.s.max_failures_per_edit:
                result.message = f"gave up after {attempts} failure repairs"
                break
            attempts += 1
            fr = self.repair_failure(edit, failures[0])
            result.failures.append(fr)
            if fr.status != "fixed":
                result.message = (
                    f"target step {fr.step} ({fr.target_token!r} instead of {fr.argmax_token!r}) "
                    f"not fixed within {self.s.max_patches} patches; all patches of this edit undone"
                )
                break
            failures = self.failures(edit, i)
        if failures:
            self.tracker.restore(snap)
            result.status = "skipped" if previous is None else "broken"
            for fr in result.failures:
                if fr.status == "fixed":
                    fr.status = "undone"
        else:
            result.status = "fixed"
            result.message = ""
            if self.s.prune:
                self._prune(result, snap)
            for key in result.neurons:
                self.owner.setdefault(key, i)
        result.seconds += time.perf_counter() - t0
        return result


def repair(
    model: nn.Module,
    tokenizer,
    edits: Sequence[Union[Edit, dict]],
    settings: Optional[MintSettings] = None,
    *,
    show_progress: bool = True,
    base: Optional[dict[str, Any]] = None,
    reference_prompts: Optional[Sequence[str]] = None,
) -> tuple[PatchSet, RepairReport]:
    """Repair ``edits`` with MINT and return the patch (the model is left unchanged).

    Args:
        model: a transformers causal LM of a family known to
            :mod:`neurodetox.core.sites` (patched: the value vectors of FFN neurons
            of ``settings.layers``; compute in the model's dtype, updates in
            float32).
        tokenizer: its tokenizer (targets are tokenised once, see
            :func:`~neurodetox.patching.failures.encode_edit`).
        edits: :class:`~neurodetox.patching.failures.Edit` objects or dicts with
            ``prompt`` and ``target`` (or ``answer``), optional ``fact_id``,
            ``paraphrases``, ``aliases``. Repaired in sequence.
        settings: :class:`MintSettings` (defaults if ``None``).
        show_progress: a tqdm bar over edits.
        base: base-checkpoint identity for the manifest (default: from the
            model's config).
        reference_prompts: prompts that define each neuron's background
            activation for ``settings.selectivity`` (default
            :data:`~neurodetox.patching.locate.DEFAULT_REFERENCE_PROMPTS`);
            use prompts like the ones that must not change.

    Returns:
        ``(patch, report)``: a :class:`~neurodetox.patching.patchfile.PatchSet`
        with every kept change (``patch.apply(model)`` reproduces the repaired
        model; it may be empty when nothing was fixed) and a
        :class:`RepairReport`.

    Raises:
        ValueError: bad settings or edits (names the field / edit).
    """
    from tqdm.auto import tqdm

    s = settings or MintSettings()
    s.validate()
    edits = [encode_edit(tokenizer, e) for e in coerce_edits(edits)]
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    rep = _Repairer(model, tokenizer, s, show_progress, reference_prompts)
    results: list[EditResult] = []
    try:
        for i, e in enumerate(tqdm(edits, desc="MINT repair", unit="edit", disable=not show_progress)):
            results.append(rep.repair_edit_verified(i, e))
            if s.recheck and i > 0 and results[-1].status == "fixed":
                rep.recheck(results[:-1], max_rechecks=2)
        # final pass, needed only when a later edit could have broken an earlier one (each edit
        # leaves repair_edit verified); drop_broken only when some edit failed a check
        if s.recheck and len(results) > 1:
            found = rep.recheck(results, max_rechecks=3)
            if found or any(r.status == "broken" for r in results):
                rep.drop_broken(results)
        params = rep.tracker.to_params()
        originals = rep.tracker.full_originals(params)
    finally:
        rep.tracker.restore({})
        model.train(was)
    report = RepairReport(results, s, seconds=time.perf_counter() - t0)
    report.cast_error = 0.0
    storage = rep.tracker.storage
    if storage is not None:
        # the updates were rounded to the storage dtype; the error is that rounding
        report.cast_error = max((p.cast_error(storage) for p in params), default=0.0)
    patch = PatchSet(params, _manifest(model, report, base))
    patch.set_hashes(originals)
    return patch, report


def _manifest(model: nn.Module, report: RepairReport, base: Optional[dict[str, Any]]) -> dict[str, Any]:
    from datetime import datetime, timezone

    cfg = getattr(base_model(model), "config", None)
    ident = {
        "name_or_path": getattr(cfg, "_name_or_path", None),
        "model_type": getattr(cfg, "model_type", None),
        "architectures": getattr(cfg, "architectures", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }
    if base:
        ident.update(base)
    neurons = []
    for r in report.edits:
        for layer, index in r.neurons:
            neurons.append({"layer": layer, "index": index, "edit": r.index, "fact_id": r.edit.fact_id})
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": ident,
        "settings": report.settings.to_json(),
        "summary": report.summary(),
        "edits": [e.to_json() for e in report.edits],
        "neurons": neurons,
    }
