"""MINT: the plan / patch loop (``docs/methods.md`` §4, steps 3–4).

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
   search (our addition; ``alpha_steps=[1]`` turns it off): candidates are
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

Modules, in the order the data flows: :mod:`~neurodetox.patching.mint.settings`
(:class:`MintSettings`, :func:`update_rule`), :mod:`~neurodetox.patching.mint.tracker`
(touched value vectors and undo), :mod:`~neurodetox.patching.mint.replay` (the
blocks below the searched layers, recorded and replayed),
:mod:`~neurodetox.patching.mint.plan` (step 3, one batched forward),
:mod:`~neurodetox.patching.mint.reference` (cached reference statistics and
next-token checks), :mod:`~neurodetox.patching.mint.repairer` (:func:`repair`)
and :mod:`~neurodetox.patching.mint.results` (:class:`RepairReport`).
"""

from neurodetox.patching.mint.repairer import repair
from neurodetox.patching.mint.results import EditResult, FailureResult, RepairReport
from neurodetox.patching.mint.settings import UPDATE_RULES, MintSettings, UpdateRule, update_rule

__all__ = [
    "MintSettings",
    "FailureResult",
    "EditResult",
    "RepairReport",
    "repair",
    "update_rule",
    "UPDATE_RULES",
    "UpdateRule",
]
