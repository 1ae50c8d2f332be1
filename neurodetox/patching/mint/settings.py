"""MINT's settings and value-vector update rule (``docs/methods.md`` §4).

Gu, Aleti, Chen, Zhang, "Neuron Patching: Semantic-based Neuron-level Language
Model Repair for Code Generation", arXiv 2312.05356. :class:`MintSettings` is
the one place the defaults of :func:`~neurodetox.patching.mint.repair` are
declared and range-checked; every field carries a ``help`` string in its
metadata, so a command line can be derived from the dataclass
(``transformers.HfArgumentParser``). Why each default is what it is, with the
measurements behind it: ``docs/results/patching.md``, section "Why the
defaults".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, get_args

import torch

from neurodetox.core.checks import DTYPES, check_int, check_number, resolve_dtype
from neurodetox.core.errors import UserError
from neurodetox.patching.locate import LOCATORS, Locator

__all__ = ["MintSettings", "UPDATE_RULES", "UpdateRule", "update_rule", "step_scale"]

#: The value-vector update rules of :func:`update_rule`.
UpdateRule = Literal["additive", "interpolate"]
UPDATE_RULES: tuple[str, ...] = get_args(UpdateRule)


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
        UserError: an unknown ``rule`` (a ``ValueError``).
    """
    if rule == "additive":
        return w.float() + (alpha * sign) * tau.float()
    if rule == "interpolate":
        return (w.float() + (alpha * sign) * tau.float()) / (1.0 + alpha)
    raise UserError(f"unknown update rule {rule!r}; valid rules are {', '.join(UPDATE_RULES)}")


def step_scale(alpha: float, rule: str) -> float:
    """``c(α)`` with ``update_rule(w, τ, α, s) − w = c(α) · v``, ``v`` independent of ``α``.

    ``"additive"``: ``c = α``, ``v = s·τ``; ``"interpolate"``: ``c = α/(1+α)``, ``v = s·τ − w``.
    The guard uses it to scale one LM-head pass per candidate to its other steps.
    """
    return alpha if rule == "additive" else alpha / (1.0 + alpha)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class MintSettings:
    """Settings of :func:`~neurodetox.patching.mint.repair` (MINT, arXiv 2312.05356; docs/methods.md §4).

    Every field is range-checked when the object is built (and again by
    :meth:`validate`, which :func:`~neurodetox.patching.mint.repair` calls);
    a bad value raises :class:`~neurodetox.core.errors.UserError` naming the
    field and what is valid. "Ours" marks additions to the paper's method.
    Measurements behind the defaults: ``docs/results/patching.md``, "Why the
    defaults".

    Attributes:
        update: the value-vector update (:func:`update_rule`), one of
            :data:`UPDATE_RULES`. ``"additive"`` (default, ours):
            ``w ← w + α s τ``. ``"interpolate"``: the paper's
            ``w ← (w + α s τ) / (1 + α)``, which also scales the neuron's
            existing output by ``1/(1 + α)`` on every prompt where it fires.
        alpha: step ``α`` of the update rule, a number ``> 0`` (unitless,
            relative to the range-normalised ``τ``). Default 0.1, the authors'
            benchmark path (docs/methods.md §4: 0.01 in the authors' planning path).
        alpha_steps: multipliers of ``alpha`` the planner may use (step-size
            search, ours; see :mod:`neurodetox.patching.mint`), a non-empty
            list of numbers ``> 0``. Default ``[1, 2.5, 5, 10]``, i.e.
            ``α ∈ {0.1, 0.25, 0.5, 1}``; ``[1]`` is the paper's fixed step.
        locator: neuron scoring, one of :data:`~neurodetox.patching.locate.LOCATORS`:
            ``"grad_x_act"`` (default, the paper's), ``"contrastive"`` or
            ``"activation"``.
        candidates: size of the candidate pool (global top-k), an integer ``>= 1``. Default 10.
        max_patches: patches per failure before its patches are undone and it
            is skipped, an integer ``>= 1``. Default 10.
        layers: blocks searched (site ``mlp``), a spec of
            :func:`neurodetox.core.sites.parse_layers` (a name, ``"3,5,-1"``,
            ``"10-20"``; from Python a sequence of ints works too). Default
            ``"last_sixth"`` (the last ``L//6`` blocks), not the authors' code's
            ``"second_half"`` (docs/methods.md §4). The blocks below are never patched and their
            output is replayed.
        fold_norm: fold the final norm's gain into ``W_U`` for ``δ``. Default True.
        orthogonalize: project ``τ`` off directions already used in the same
            layer by earlier repairs of this call. Default False.
        signed: orient ``τ`` by the sign of the neuron's activation (ours: the
            paper's ``s = +1`` moves a neuron with ``a_j < 0`` along ``−τ``
            in a gated FFN). Default True.
        entropy_guard: never patch last-layer entropy neurons (Stolfo et al.,
            "Confidence Regulation Neurons in Language Models", arXiv
            2406.16254). Default True.
        storage_dtype: the dtype the patched values will be stored in, a name
            of :data:`neurodetox.core.checks.DTYPES` (e.g. ``"bfloat16"`` for
            a bf16 checkpoint) or ``None`` (default: the parameter's own
            dtype). Every update is rounded to it while repairing, so what is
            verified is what will be written.
        recheck: after each fix, re-verify earlier edits and repair the ones
            it broke (ours). Default True.
        max_failures_per_edit: most token-level failure repairs attempted per
            edit, an integer ``>= 1``. Default 16.
        margin: a failure counts as repaired when ``t`` is the argmax AND
            ``p_t − max_{v≠t} p_v >= margin`` (a probability, ``0 <= margin < 1``).
            Default 0.1 (ours); ``0`` is the paper's stopping rule.
        selectivity: multiply the locator score by the neuron's relative
            activation ``|a_j(p)| / rms_ref(a_j)`` (RMS over reference
            prompts), preferring neurons that fire for this prompt and not in
            general (ours). Default True.
        guard: in the plan, prefer the candidate whose patch is predicted to
            flip the fewest reference prompts' next token (first-order direct
            effect through the final norm and LM head), then the best gain
            (ours). Default True.
        guard_fallback: repair a failure that the guarded plan cannot fix
            within ``max_patches`` again by gain alone. Default True.
        relocate: locate again (one forward + backward) before every patch of
            a failure. Default False: locate once per failure and plan over
            that pool, minus the neurons already patched for it (docs/methods.md
            §4, "repeat 3–4").
        relocate_fallback: with ``relocate=False``, a failure that its pool
            cannot fix (guard fallback included) is repaired again by gain
            alone, locating before every patch. Default True.
        prune: once an edit is fixed, undo each of its patched neurons in turn
            and keep it undone when the edit stays fixed without it (one
            forward per neuron). Default False.
        share_neurons: let an edit patch a neuron that an earlier edit of the
            same call patched. Default False (edits would fight over it).
        verify_reference: after each fixed edit, count the reference prompts
            whose next-token prediction changed (one batched forward); above
            ``max_reference_flips`` the edit is undone and repaired again
            without the neurons it used, at most ``reference_retries`` times,
            and the attempt that changed the fewest is kept (ours). Default False.
        max_reference_flips: changed reference predictions an edit may cause
            without a retry, an integer ``>= 0``. Default 0.
        reference_retries: extra repair attempts per edit, an integer ``>= 0``. Default 2.
        protect: strength ``λ >= 0`` of the reference protection
            (:class:`~neurodetox.patching.protect.ReferenceProtection`, ours):
            every proposed value-vector change is replaced by the nearest one
            that keeps the reference prompts' gaps to ``protect_competitors``
            competitors (direct path only). ``0`` (default) turns it off.
        protect_competitors: competitors protected per reference prompt, an
            integer ``>= 1``. Default 3.
        use_paraphrases: repair each edit's ``paraphrases`` together with its
            prompt (``docs/methods.md`` §8, ours): failures of every phrasing
            are repaired, the locator sums the phrasings' scores (each scaled
            to its largest), the plan ranks candidates by the worst gap over
            the phrasings that need the same token, and an edit counts as
            fixed only when every phrasing is. Default True (no effect on an
            edit without paraphrases).

    Raises:
        UserError: a field outside its valid values (at construction and in :meth:`validate`).
    """

    update: UpdateRule = field(
        default="additive",
        metadata=_help(
            "Value-vector update: 'additive' w+α s τ (default) or 'interpolate', the paper's (w+α s τ)/(1+α)."
        ),
    )
    alpha: float = field(default=0.1, metadata=_help("Update step α, a number > 0 (default 0.1)."))
    alpha_steps: list[float] = field(
        default_factory=lambda: [1.0, 2.5, 5.0, 10.0],
        metadata=_help("Multipliers of α the planner may try, numbers > 0 (default 1 2.5 5 10; '1' = fixed step)."),
    )
    locator: Locator = field(
        default="grad_x_act", metadata=_help("Neuron locator: grad_x_act (default), contrastive or activation.")
    )
    candidates: int = field(default=10, metadata=_help("Candidate pool size, global top-k neurons, >= 1 (default 10)."))
    max_patches: int = field(default=10, metadata=_help("Patches per failure before it is skipped, >= 1 (default 10)."))
    layers: str = field(
        default="last_sixth",
        metadata=_help("Blocks searched: a layer spec such as last_sixth (default), second_half, '3,5' or '10-20'."),
    )
    fold_norm: bool = field(default=True, metadata=_help("Fold the final norm's gain into W_U for δ (default true)."))
    orthogonalize: bool = field(
        default=False, metadata=_help("Project τ off directions used earlier in the same layer (default false).")
    )
    signed: bool = field(
        default=True, metadata=_help("Orient τ by the sign of the neuron's activation (default true).")
    )
    entropy_guard: bool = field(default=True, metadata=_help("Never patch last-layer entropy neurons (default true)."))
    storage_dtype: Optional[str] = field(
        default=None,
        metadata=_help("Round updates to this storage dtype (float32, bfloat16, float16; default: the weight's own)."),
    )
    recheck: bool = field(
        default=True, metadata=_help("Re-verify earlier edits after each fix and repair broken ones (default true).")
    )
    max_failures_per_edit: int = field(
        default=16, metadata=_help("Most token-level failure repairs per edit, >= 1 (default 16).")
    )
    margin: float = field(
        default=0.1,
        metadata=_help("Required probability lead of the target over every other token, in [0, 1) (default 0.1)."),
    )
    selectivity: bool = field(
        default=True,
        metadata=_help("Weight locator scores by activation relative to reference prompts (default true)."),
    )
    guard: bool = field(
        default=True,
        metadata=_help("Plan the candidate predicted to flip the fewest reference predictions first (default true)."),
    )
    guard_fallback: bool = field(
        default=True, metadata=_help("Repair a failure the guarded plan cannot fix again by gain alone (default true).")
    )
    relocate: bool = field(
        default=False, metadata=_help("Locate neurons again before every patch of a failure (default false).")
    )
    relocate_fallback: bool = field(
        default=True,
        metadata=_help("Without relocate, repair a failure its pool cannot fix again, relocating (default true)."),
    )
    prune: bool = field(
        default=False, metadata=_help("Undo patched neurons a fixed edit does not need (default false).")
    )
    share_neurons: bool = field(
        default=False, metadata=_help("Let an edit patch a neuron an earlier edit of the call patched (default false).")
    )
    verify_reference: bool = field(
        default=False,
        metadata=_help("Count changed reference predictions after each fix and retry above the limit (default false)."),
    )
    max_reference_flips: int = field(
        default=0, metadata=_help("Changed reference predictions an edit may cause without a retry, >= 0 (default 0).")
    )
    reference_retries: int = field(
        default=2, metadata=_help("Extra repair attempts per edit under verify_reference, >= 0 (default 2).")
    )
    protect: float = field(
        default=0.0, metadata=_help("Strength λ >= 0 of the reference protection; 0 turns it off (default 0).")
    )
    protect_competitors: int = field(
        default=3, metadata=_help("Competitors protected per reference prompt, >= 1 (default 3).")
    )
    use_paraphrases: bool = field(
        default=True,
        metadata=_help("Repair each edit's paraphrases with its prompt; fixed only when all are (default true)."),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (``alpha_steps`` becomes a list of floats).

        Raises:
            UserError: naming the bad field and what is valid.
        """
        check_number("margin", self.margin, minimum=0.0, maximum=1.0, max_inclusive=False)
        if self.update not in UPDATE_RULES:
            raise UserError(f"unknown update {self.update!r}; valid updates are {', '.join(UPDATE_RULES)}")
        check_number("alpha", self.alpha, minimum=0.0, min_inclusive=False)
        steps = [self.alpha_steps] if isinstance(self.alpha_steps, (int, float)) else list(self.alpha_steps)
        if not steps:
            raise UserError(f"alpha_steps must be positive numbers, got {self.alpha_steps!r}")
        self.alpha_steps = [check_number("alpha_steps", m, minimum=0.0, min_inclusive=False) for m in steps]
        if self.locator not in LOCATORS:
            raise UserError(f"unknown locator {self.locator!r}; valid locators are {', '.join(LOCATORS)}")
        for name in ("candidates", "max_patches", "max_failures_per_edit", "protect_competitors"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("max_reference_flips", "reference_retries"):
            check_int(name, getattr(self, name), minimum=0)
        if check_number("protect", self.protect) < 0:
            raise UserError(f"protect must be a number >= 0 (0 turns it off), got {self.protect!r}")
        if self.storage_dtype is not None:
            if isinstance(self.storage_dtype, torch.dtype):
                self.storage_dtype = str(self.storage_dtype).removeprefix("torch.")
            if str(self.storage_dtype).lower().removeprefix("torch.") not in DTYPES:
                raise UserError(f"unknown storage_dtype {self.storage_dtype!r}; valid: {', '.join(DTYPES)} or None")

    @property
    def storage(self) -> Optional[torch.dtype]:
        """``storage_dtype`` as a torch dtype (``None`` when unset)."""
        return None if self.storage_dtype is None else resolve_dtype(self.storage_dtype)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["alpha_steps"] = list(d["alpha_steps"])
        if not isinstance(d["layers"], str):
            d["layers"] = list(d["layers"])
        return d
