"""MINT's repair loop: locate, plan, patch, verify, per failure and per edit (``docs/methods.md`` §4).

Gu, Aleti, Chen, Zhang, "Neuron Patching: Semantic-based Neuron-level Language
Model Repair for Code Generation", arXiv 2312.05356. :func:`repair` is the
entry point; :class:`Repairer` holds one call's state. The algorithm, and where
it departs from the paper, is described in :mod:`neurodetox.patching.mint`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from neurodetox.core.sites import base_model, resolve_sites
from neurodetox.patching.direction import final_norm_gain, semantic_space
from neurodetox.patching.failures import Edit, Failure, coerce_edits, encode_edit, find_failures, still_failing
from neurodetox.patching.locate import DEFAULT_REFERENCE_PROMPTS, Candidate, neuron_scores, top_candidates
from neurodetox.patching.mint.plan import gaps_from_logits, measure, plan
from neurodetox.patching.mint.reference import cached_reference, encode_right_padded, last_argmax
from neurodetox.patching.mint.replay import PrefixCache
from neurodetox.patching.mint.results import EditResult, FailureResult, RepairReport
from neurodetox.patching.mint.settings import MintSettings, step_scale, update_rule
from neurodetox.patching.mint.tracker import Tracker
from neurodetox.patching.neurons import entropy_neurons
from neurodetox.patching.patchfile import PatchSet
from neurodetox.patching.protect import ReferenceProtection

__all__ = ["Repairer", "combine_gaps", "repair"]

logger = logging.getLogger(__name__)


def _decode(tokenizer, token: int) -> str:
    try:
        return tokenizer.decode([int(token)])
    except Exception:
        return f"#{token}"


class Repairer:
    """The state of one :func:`repair` call: sites, semantic space, tracked writes, replayed prefix, reference
    statistics, and which edit owns which neuron. Its methods are MINT's steps (docs/methods.md §4) on one edit or failure."""

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
        self.tracker = Tracker(model, self.sites, settings.storage)
        # the blocks below the searched layers are never patched here: plans replay their outputs
        self.prefix = PrefixCache(model, min(self.sites_by_layer, default=0))
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
            self.ref = cached_reference(model, tokenizer, self.sites, reference_prompts or DEFAULT_REFERENCE_PROMPTS)
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
            self.reference_batches = encode_right_padded(
                tokenizer, [p for p in (reference_prompts or DEFAULT_REFERENCE_PROMPTS) if p.strip()]
            )

    def variants(self, edit: Edit) -> list[Edit]:
        """The phrasings repaired together: the prompt, then its paraphrases (``use_paraphrases``)."""
        return list(edit.variants or [edit]) if self.s.use_paraphrases else [edit]

    def failures(self, edit: Edit, i: int) -> list[Failure]:
        """:func:`find_failures` of every phrasing of ``edit`` under the current weights (the
        unpatched blocks replayed), the prompt's first; ``Failure.phrasing`` says which."""
        out: list[Failure] = []
        for k, v in enumerate(self.variants(edit)):
            with self.prefix.replay(list(v.prompt_ids) + list(v.target_ids)[:-1]):
                found = find_failures(self.model, v, i)
            for f in found:
                f.phrasing = k
            out += found
        return out

    def still_failing(self, edits: Sequence[Edit], batch_size: int = 32) -> list[bool]:
        """:func:`still_failing` of every phrasing under the current weights (the unpatched blocks
        replayed): one flag per edit, true when any of its phrasings fails."""
        flat = [(n, v) for n, e in enumerate(edits) for v in self.variants(e)]
        out = [False] * len(edits)
        for start in range(0, len(flat), batch_size):
            chunk = [v for _, v in flat[start : start + batch_size]]
            with self.prefix.replay_batch([list(e.prompt_ids) + list(e.target_ids)[:-1] for e in chunk]):
                flags = still_failing(self.model, chunk, batch_size=batch_size)
            for (n, _), flag in zip(flat[start : start + batch_size], flags):
                out[n] = out[n] or flag
        return out

    def group(self, edit: Edit, f: Failure) -> list[list[int]]:
        """Teacher-forced ids, up to the failure's step, of every phrasing that must produce the same
        target token there: the failing phrasing first, then the others (fixed or not), so the plan
        prefers a patch that fixes them together and does not break one that is already right."""
        vs = self.variants(edit)
        first = vs[f.phrasing]
        out = [list(first.prompt_ids) + list(first.target_ids[: f.step])]
        for k, v in enumerate(vs):
            if k != f.phrasing and len(v.target_ids) > f.step and v.target_ids[f.step] == f.target_id:
                out.append(list(v.prompt_ids) + list(v.target_ids[: f.step]))
        return out

    def plan_group(self, group: list[list[int]], t: int, cands, deltas) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`plan` on every phrasing of ``group``; per candidate the worst gap (and its argmax)."""
        outs = [plan(self.model, self.sites_by_layer, ids, t, cands, deltas, prefix=self.prefix) for ids in group]
        return combine_gaps([o[0] for o in outs], [o[1] for o in outs])

    def measure_group(self, group: list[list[int]], t: int) -> tuple[float, int]:
        """:func:`measure` of every phrasing of ``group``: the worst gap and its argmax."""
        gs, args = zip(*(measure(self.model, ids, t) for ids in group))
        g, a = combine_gaps([torch.tensor([x]) for x in gs], [torch.tensor([x]) for x in args])
        return float(g[0]), int(a[0])

    def reference_predictions(self) -> torch.Tensor:
        """Next-token argmax of every reference prompt under the current weights, ``[N]`` long."""
        return torch.cat([last_argmax(self.model, ids, mask) for ids, mask in self.reference_batches])

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
        ``Δ(α) = c(α) · v`` (see :func:`~neurodetox.patching.mint.settings.step_scale`; the reference
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
                out[i] = known[4] * (step_scale(alpha, self.s.update) / known[3])
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
                        step_scale(alpha, self.s.update),
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
        group = self.group(edit, f)
        ids = group[0]
        t = f.target_id
        res = FailureResult(
            step=f.step,
            position=f.position,
            target_id=t,
            argmax_id=f.argmax_id,
            target_token=_decode(self.tok, t),
            argmax_token=_decode(self.tok, f.argmax_id),
            phrasing=f.phrasing,
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
                gap, arg = self.measure_group(group, t)
                break
            if pool is not None and not relocate:
                # plan and patch again over the first pool (docs/methods.md §4: "repeat 3–4"); gap, arg
                # and the competitor are the last plan's, which is exact
                done = {(p["layer"], p["index"]) for p in res.patches}
                cands = [c for c in pool if (c.layer, c.index) not in done]
            else:
                # one forward (+ backward) scores the neurons and measures the current state
                with self.prefix.replay(ids, grad=True):
                    scores, acts, logits = neuron_scores(self.model, self.sites, ids, t, a, s.locator, self.space)
                g0, a0 = gaps_from_logits(logits[None], t)
                gaps_all, args_all = [g0], [a0]
                if len(group) > 1:
                    # paraphrase-aware locate: every phrasing's scores, each scaled to its largest, summed
                    scores = scores / (scores.abs().max() + 1e-12)
                    for other in group[1:]:
                        with self.prefix.replay(other, grad=True):
                            sc, _, lg = neuron_scores(self.model, self.sites, other, t, a, s.locator, self.space)
                        scores = scores + sc / (sc.abs().max() + 1e-12)
                        g1, a1 = gaps_from_logits(lg[None], t)
                        gaps_all.append(g1)
                        args_all.append(a1)
                g0, a0 = combine_gaps(gaps_all, args_all)
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
            gaps, args = self.plan_group(group, t, [r[0] for r in rows], [r[4] for r in rows])
            best = min(range(len(rows)), key=lambda i: (float(gaps[i]), i))

            chosen = (rows[best], float(gaps[best]), int(args[best]))
            # plan, stage 2: the best candidate at smaller steps (those predicted to flip no more
            # reference prompts); keep the smallest step that fixes
            if len(alphas) > 1 and self._ok(float(gaps[best]), int(args[best]), t):
                small = self._proposals([rows[best][0]], t, a, alphas[:-1])
                small = [r for r, fl in zip(small, self._flips(small, guard).tolist()) if fl <= fewest]
                if small:
                    g2, a2 = self.plan_group(group, t, [r[0] for r in small], [r[4] for r in small])
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
                else (
                    f"nothing to fix: the model already predicts {edit.target!r} after {edit.prompt!r}"
                    + (" and its paraphrases" if len(self.variants(edit)) > 1 else "")
                )
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


def combine_gaps(gaps: Sequence[torch.Tensor], args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the worst (largest) gap ``p_best_other − p_t`` over phrasings and that phrasing's argmax.

    Args:
        gaps, args: one ``[R]`` tensor per phrasing (same rows).

    Returns:
        ``(gaps [R], argmax [R])``: a row counts as fixed (argmax ``t``, gap ``<= −margin``) only
        when every phrasing is.
    """
    if len(gaps) == 1:
        return gaps[0], args[0]
    G, A = torch.stack(list(gaps)), torch.stack(list(args))
    worst = G.argmax(dim=0)
    rows = torch.arange(G.shape[1])
    return G[worst, rows], A[worst, rows]


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
            ``paraphrases`` (repaired together with the prompt when
            ``settings.use_paraphrases``: an edit is fixed only when every
            phrasing is), ``eval_paraphrases`` (never used here), ``aliases``.
            Repaired in sequence.
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
        UserError: bad settings (names the field and what is valid).
        ValueError: bad edits (names the edit); a :class:`~neurodetox.core.errors.UserError`
            for a bad phrasing or one prompt with two targets (names the edits file's line).
    """
    from tqdm.auto import tqdm

    s = settings or MintSettings()
    s.validate()
    edits = [encode_edit(tokenizer, e) for e in coerce_edits(edits)]
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    rep = Repairer(model, tokenizer, s, show_progress, reference_prompts)
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
