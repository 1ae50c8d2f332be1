"""Tests for ``neurodetox.patching.pools``: the prompt pools of ``neurodetox patch`` (reference, unrelated, texts)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_reference_prompts_cover_every_relation():
    """The built-in train split is sorted by relation; the reference prompts
    and texts are interleaved so each relation is represented."""
    import collections

    from neurodetox.data import interleave_relations, load_facts
    from neurodetox.patching.pools import fact_pools, reference_prompts

    rows = [{"relation": r, "i": i} for i, r in enumerate("aaaabbc")]
    assert [r["i"] for r in interleave_relations(rows)] == [0, 4, 6, 1, 5, 2, 3]
    assert interleave_relations([]) == []
    ds = load_facts("facts", seed=0)
    relation = {r["prompt"]: r["relation"] for r in ds["train"]}
    ref, unrelated, texts = fact_pools("facts", 0, [], [], 50, 128, 12)
    counts = collections.Counter(relation[p] for p in ref)
    assert len(counts) == 3 and min(counts.values()) >= 42, counts
    assert not set(ref) & {u["prompt"] for u in unrelated}
    assert reference_prompts("facts") == ref
    assert len({relation[p] for p in reference_prompts("facts+default")[:96]}) == 3
