"""Tests for ``neurodetox.patching.mint.repairer``: MINT's repair loop (Gu et al., arXiv 2312.05356).

The written value vectors are checked against the update rule, the guard and fallbacks against repairs
with them off, the reference check against unbatched forwards, the protection against its projection.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import make_tokenizer
from patching_helpers import FIX_EDIT, REFERENCE, fixed_patch, make_model, next_tokens_one_by_one, one_thread

from neurodetox.core.sites import resolve_sites, value_vector_parameter
from neurodetox.patching import MintSettings, coerce_edits, encode_edit, find_failures, repair, semantic_space


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """A checkpoint, a model loaded from it and a bound patch that fixes FIX_EDIT (see ``fixed_patch``)."""
    return fixed_patch(tmp_path_factory)


@pytest.mark.parametrize("rule", ["additive", "interpolate"])
def test_repair_writes_exactly_the_update_rule(rule):
    model = make_model()
    tok = make_tokenizer()
    settings = MintSettings(
        update=rule,
        alpha=0.5,
        alpha_steps=(1.0,),
        max_patches=1,
        entropy_guard=False,
        prune=False,
        selectivity=False,
        fold_norm=False,
    )
    edit = encode_edit(tok, coerce_edits([FIX_EDIT])[0])
    fail = find_failures(model, edit)[0]
    patch, report = repair(model, tok, [FIX_EDIT], settings, show_progress=False)
    f = report.edits[0].failures[0]
    assert len(f.patches) == 1
    p = f.patches[0]
    tau = semantic_space(model).tau(fail.target_id, fail.argmax_id)
    site = resolve_sites(model, "mlp", [p["layer"]])[0]
    weight, axis = value_vector_parameter(site)
    old = weight.detach().select(axis, p["index"]).float()
    expected = old + 0.5 * p["sign"] * tau
    if rule == "interpolate":
        expected = expected / 1.5
    if report.edits[0].status == "fixed":
        pp = patch.params[0]
        got = pp.new.select(pp.axis, pp.indices.tolist().index(p["index"]))
        assert torch.equal(got, expected)
    else:  # not fixed in one patch: undone, the model is unchanged
        assert len(patch) == 0
    assert torch.equal(weight.detach().select(axis, p["index"]).float(), old)  # repair leaves the model as it was


def test_repair_fixes_and_leaves_model_unchanged(fixed):
    _, model, tok, patch, report = fixed
    e = report.edits[0]
    assert e.status == "fixed" and 1 <= len(e.neurons) <= 10
    assert find_failures(model, e.edit)  # the model itself was restored
    patch.apply(model)
    try:
        assert not find_failures(model, e.edit)
    finally:
        patch.revert(model)


def test_nothing_to_fix_is_reported():
    model = make_model()
    tok = make_tokenizer()
    edit = encode_edit(tok, coerce_edits([{"prompt": "the capital of", "target": "x"}])[0])
    with torch.no_grad():
        pred = int(model(input_ids=torch.tensor([edit.prompt_ids])).logits[0, -1].argmax())
    target = tok.decode([pred]).strip()
    patch, report = repair(model, tok, [{"prompt": "the capital of", "target": target}], show_progress=False)
    assert report.edits[0].status == "nothing_to_fix"
    assert "nothing to fix" in report.edits[0].message and len(patch) == 0


def test_reference_check_counts_changed_predictions_and_retries_without_rejected_neurons():
    tok = make_tokenizer()
    model = make_model()
    before = next_tokens_one_by_one(model, tok, REFERENCE)
    runs = {}
    for retries in (0, 2):
        s = MintSettings(verify_reference=True, reference_retries=retries, max_reference_flips=0)
        patch, report = repair(model, tok, [FIX_EDIT], s, show_progress=False, reference_prompts=REFERENCE)
        e = report.edits[0]
        assert e.status == "fixed", report.to_json()
        patch.apply(model)
        try:
            after = next_tokens_one_by_one(model, tok, REFERENCE)  # unbatched, independent of the check's forward
        finally:
            patch.revert(model)
        assert e.reference_flips == sum(a != b for a, b in zip(before, after))
        runs[retries] = e
    first, retried = runs[0], runs[2]
    assert first.attempts == 1
    assert first.reference_flips > 0, "the tiny model should change some reference prediction (else nothing is tested)"
    assert retried.attempts > 1 and retried.reference_flips <= first.reference_flips
    if retried.neurons != first.neurons:  # a later attempt was kept: it could not use the rejected neurons
        assert not set(retried.neurons) & set(first.neurons)
        assert "attempt" in retried.message
    off = repair(model, tok, [FIX_EDIT], MintSettings(), show_progress=False, reference_prompts=REFERENCE)[1].edits[0]
    assert off.reference_flips is None and off.neurons == first.neurons  # the check does not change attempt 1


def test_guard_plans_the_candidate_with_fewest_predicted_flips(monkeypatch):
    """With the guard, the plan takes the candidate predicted to flip the fewest
    reference prompts, even when it is the lowest-ranked one."""
    from neurodetox.patching.locate import ReferenceStats
    from neurodetox.patching.mint import repairer

    seen = []
    real_top = repairer.top_candidates
    monkeypatch.setattr(repairer, "top_candidates", lambda *a, **k: seen.append(real_top(*a, **k)) or seen[-1])
    monkeypatch.setattr(
        ReferenceStats,
        "predicted_flips",
        lambda self, head, gain, cands, deltas, dlog=None: torch.tensor(
            [0 if (c.layer, c.index) == (seen[-1][-1].layer, seen[-1][-1].index) else 5 for c in cands]
        ),
    )
    tok = make_tokenizer()
    model = make_model()
    patch, report = repair(
        model,
        tok,
        [FIX_EDIT],
        MintSettings(max_patches=1, guard_fallback=False, relocate_fallback=False),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    first = report.edits[0].failures[0].patches[0]
    assert len(seen[0]) > 1
    assert (first["layer"], first["index"]) == (seen[0][-1].layer, seen[0][-1].index)


def test_guard_falls_back_to_gain_alone_for_a_failure_it_cannot_fix(monkeypatch):
    """A failure the guarded plan leaves unfixed is repaired again without the
    guard; the result equals a repair with the guard off."""
    from neurodetox.patching import mint
    from neurodetox.patching.mint import repairer

    tok = make_tokenizer()
    plain_patch, plain = repair(
        make_model(), tok, [FIX_EDIT], MintSettings(guard=False), show_progress=False, reference_prompts=REFERENCE
    )
    assert plain.edits[0].status == "fixed"
    real = repairer.Repairer._repair_failure
    calls = []

    def guarded_fails(self, edit, f, guard, relocate):
        calls.append(guard)
        if guard:  # the guarded plan gives up, leaving the model as it was
            return mint.FailureResult(
                step=f.step, position=f.position, target_id=f.target_id, argmax_id=f.argmax_id, status="skipped"
            )
        return real(self, edit, f, guard, relocate)

    monkeypatch.setattr(repairer.Repairer, "_repair_failure", guarded_fails)
    patch, report = repair(
        make_model(), tok, [FIX_EDIT], MintSettings(guard=True), show_progress=False, reference_prompts=REFERENCE
    )
    assert report.edits[0].status == "fixed"
    assert calls[:2] == [True, False]
    assert all(not f.guarded for f in report.edits[0].failures)
    assert [(p.name, p.indices.tolist()) for p in patch.params] == [
        (p.name, p.indices.tolist()) for p in plain_patch.params
    ]
    assert all(torch.equal(a.new, b.new) for a, b in zip(patch.params, plain_patch.params))
    monkeypatch.setattr(repairer.Repairer, "_repair_failure", guarded_fails)
    calls.clear()
    _, off = repair(
        make_model(),
        tok,
        [FIX_EDIT],
        MintSettings(guard=True, guard_fallback=False, relocate_fallback=False),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    assert off.edits[0].status == "skipped" and calls == [True]


@pytest.mark.parametrize("relocate", [True, False])
def test_relocate_off_plans_over_the_first_pool(monkeypatch, relocate):
    """``relocate=False`` locates once per failure and patches from that pool
    (never the same neuron twice); ``True`` locates before every patch."""
    from neurodetox.patching.mint import repairer

    calls = []
    real = repairer.neuron_scores
    monkeypatch.setattr(repairer, "neuron_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    pools = []
    real_top = repairer.top_candidates
    monkeypatch.setattr(repairer, "top_candidates", lambda *a, **k: pools.append(real_top(*a, **k)) or pools[-1])
    tok = make_tokenizer()
    s = MintSettings(
        alpha=0.02,
        alpha_steps=(1.0,),
        guard=False,
        relocate=relocate,  # small steps: several patches
        relocate_fallback=False,
    )
    patch, report = repair(make_model(), tok, [FIX_EDIT], s, show_progress=False, reference_prompts=REFERENCE)
    failures = report.edits[0].failures
    patches = sum(len(f.patches) for f in failures)
    assert patches > len(failures)  # some failure needed more than one patch
    if relocate:
        assert len(calls) >= patches
    else:
        assert len(calls) == len(failures) == len(pools)
        for f, pool in zip(failures, pools):
            keys = [(p["layer"], p["index"]) for p in f.patches]
            assert len(keys) == len(set(keys)) and set(keys) <= {(c.layer, c.index) for c in pool}


def test_relocate_fallback_repairs_what_the_pool_cannot(monkeypatch):
    """Without relocating, a failure that its candidate pool cannot fix (guard and
    gain-only attempts) is repaired again by gain alone, locating before every
    patch; the result equals a repair with ``relocate=True`` and no guard.
    ``relocate_fallback=False`` leaves it skipped."""
    from neurodetox.patching import mint
    from neurodetox.patching.mint import repairer

    tok = make_tokenizer()
    plain_patch, plain = repair(
        make_model(),
        tok,
        [FIX_EDIT],
        MintSettings(guard=False, relocate=True),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    assert plain.edits[0].status == "fixed"
    real = repairer.Repairer._repair_failure
    calls = []

    def pool_fails(self, edit, f, guard, relocate):
        calls.append((guard, relocate))
        if not relocate:  # the first pool gives up, leaving the model as it was
            return mint.FailureResult(
                step=f.step, position=f.position, target_id=f.target_id, argmax_id=f.argmax_id, status="skipped"
            )
        return real(self, edit, f, guard, relocate)

    monkeypatch.setattr(repairer.Repairer, "_repair_failure", pool_fails)
    patch, report = repair(
        make_model(), tok, [FIX_EDIT], MintSettings(), show_progress=False, reference_prompts=REFERENCE
    )
    assert report.edits[0].status == "fixed"
    assert calls[:3] == [(True, False), (False, False), (False, True)]
    assert [(p.name, p.indices.tolist()) for p in patch.params] == [
        (p.name, p.indices.tolist()) for p in plain_patch.params
    ]
    assert all(torch.equal(a.new, b.new) for a, b in zip(patch.params, plain_patch.params))
    calls.clear()
    _, off = repair(
        make_model(),
        tok,
        [FIX_EDIT],
        MintSettings(relocate_fallback=False),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    assert off.edits[0].status == "skipped" and calls == [(True, False), (False, False)]


def test_guard_flip_counts_are_reused_only_for_the_same_value_vector_change(monkeypatch):
    """Planning the same pool again reuses the flip counts of unchanged rows:
    the repair is bit-identical to one that counts every row afresh, with
    fewer rows counted."""
    from neurodetox.patching.locate import ReferenceStats
    from neurodetox.patching.mint import repairer

    real = ReferenceStats.predicted_flips
    counted = []
    monkeypatch.setattr(ReferenceStats, "predicted_flips", lambda self, *a: counted.append(len(a[2])) or real(self, *a))
    tok = make_tokenizer()
    s = MintSettings(alpha=0.02, alpha_steps=(1.0, 2.0), relocate_fallback=False)  # small steps: several patches
    patch, report = repair(make_model(), tok, [FIX_EDIT], s, show_progress=False, reference_prompts=REFERENCE)
    with_cache = sum(counted)

    def afresh(self, rows, guard):
        return self.ref.predicted_flips(self.head, self.gain, [r[0] for r in rows], [r[4] for r in rows])

    monkeypatch.setattr(repairer.Repairer, "_flips", afresh)
    counted.clear()
    patch2, report2 = repair(make_model(), tok, [FIX_EDIT], s, show_progress=False, reference_prompts=REFERENCE)
    assert sum(len(f.patches) for f in report.edits[0].failures) > 1  # the pool was planned again
    assert [f.patches for f in report.edits[0].failures] == [f.patches for f in report2.edits[0].failures]
    assert [(p.name, p.indices.tolist()) for p in patch.params] == [(p.name, p.indices.tolist()) for p in patch2.params]
    assert all(torch.equal(a.new, b.new) for a, b in zip(patch.params, patch2.params))
    assert with_cache < sum(counted)


def test_repair_with_protection_writes_the_protected_update(monkeypatch):
    """Every planned row of a protected repair is ``old + project(update_rule(old) − old)``,
    and the protected repair still fixes the edit."""
    from neurodetox.patching import mint
    from neurodetox.patching.mint import repairer
    from neurodetox.patching.protect import ReferenceProtection

    seen = []
    real = repairer.Repairer._proposals

    def spy(self, cands, t, a, alphas):
        rows = real(self, cands, t, a, alphas)
        seen.append((self, rows, dict(self._taus)))
        return rows

    monkeypatch.setattr(repairer.Repairer, "_proposals", spy)
    tok = make_tokenizer()
    model = make_model()
    patch, report = repair(
        model, tok, [FIX_EDIT], MintSettings(protect=0.01), show_progress=False, reference_prompts=REFERENCE
    )
    assert report.edits[0].status == "fixed"
    self_, rows, taus = seen[0]
    assert isinstance(self_.protection, ReferenceProtection)
    # recompute the first plan's rows on the original model
    patch.revert(model)
    for c, alpha, sign, new, _delta in rows:
        old = self_.tracker.column(c.layer, c.index).float()
        plain = mint.update_rule(old, taus[c.layer], alpha, sign) - old
        expect = old + self_.protection.project(c, plain)
        assert torch.allclose(new.float(), expect, atol=1e-6)
        assert not torch.allclose(new.float(), old + plain)
    with pytest.raises(ValueError, match="protect must be"):
        MintSettings(protect=-1.0).validate()
    with pytest.raises(ValueError, match="protect_competitors"):
        MintSettings(protect_competitors=0).validate()


@pytest.mark.parametrize("rule", ["additive", "interpolate"])
def test_guard_head_changes_scaled_within_a_round_equal_a_fresh_pass(monkeypatch, rule):
    """The guard's ``W_U (g ⊙ Δ)`` of a candidate at a smaller step, scaled from
    its largest step by linearity, equals a fresh pass over the LM head."""
    from neurodetox.patching.locate import ReferenceStats

    calls = []
    real = ReferenceStats.predicted_flips

    def spy(self, head, gain, cands, deltas, dlog=None):
        calls.append((self, head, gain, list(deltas), dlog))
        return real(self, head, gain, cands, deltas, dlog)

    from neurodetox.patching.mint import repairer

    scaled = []
    real_changes = repairer.Repairer._head_changes

    def count(self, rows):
        scaled.append(sum((r[0].layer, r[0].index) in self._head_cache for r in rows))
        return real_changes(self, rows)

    monkeypatch.setattr(ReferenceStats, "predicted_flips", spy)
    monkeypatch.setattr(repairer.Repairer, "_head_changes", count)
    tok = make_tokenizer()
    model = make_model()
    patch, report = repair(
        model,
        tok,
        [FIX_EDIT],
        MintSettings(layers="second_half", update=rule),
        show_progress=False,
        reference_prompts=REFERENCE,
    )
    assert len(calls) >= 2 and sum(scaled) > 0  # some rows were scaled, not recomputed
    for stats, head, gain, deltas, dlog in calls:
        fresh = stats.head_change(head, gain, deltas)
        assert dlog is not None
        assert torch.allclose(dlog, fresh, rtol=1e-4, atol=1e-6 * float(fresh.abs().max()))
