"""Tests for ``neurodetox.patching.mint.plan``: the batched plan against writing each patch for real."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from patching_helpers import one_thread

from neurodetox.core.sites import resolve_sites, value_vector_parameter


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.mark.parametrize("family", __import__("test_sites").FAMILY_NAMES)
def test_plan_gaps_equal_writing_each_patch(family):
    """The batched plan (shared prefix, one row per candidate, rows added at
    their own layer, the block below them replayed) gives, for every row, the
    gap and argmax of a separate forward with that value vector really written
    into the weights, for candidates in several layers."""
    from test_sites import tiny

    from neurodetox.core.sites import decoder_layers
    from neurodetox.patching.locate import Candidate
    from neurodetox.patching.mint.plan import NO_SHARED_PREFIX, measure, plan
    from neurodetox.patching.mint.replay import PrefixCache

    model = copy.deepcopy(tiny(family))
    sites = resolve_sites(model, "mlp", "all")
    by_layer = {s.layer: s for s in sites}
    layers = sorted(by_layer)[1:]  # the lowest candidate layer is above block 0: the prefix is shared
    ids = [5, 9, 3, 17, 11, 4]
    target = 7
    g = torch.Generator().manual_seed(1)
    cands, deltas = [], []
    for k, layer in enumerate(layers * 2):
        weight, axis = value_vector_parameter(by_layer[layer])
        cands.append(Candidate(layer=layer, index=(3 * k + 1) % weight.shape[axis], score=0.0, activation=1.0))
        deltas.append(20.0 * torch.randn(weight.shape[1 - axis], generator=g))
    # every block's batch: one row (the unpatched model) below the lowest candidate layer, one more
    # per candidate from its own layer up; the block below replays its recorded output
    blocks = list(decoder_layers(model))
    seen: dict[int, list] = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, []).append(o)) for i, b in enumerate(blocks)
    ]
    prefix = PrefixCache(model, below=layers[0])
    try:
        gaps, args = plan(model, by_layer, ids, target, cands, deltas, prefix=prefix)  # records block 0
        again, again_args = plan(model, by_layer, ids, target, cands, deltas, prefix=prefix)  # replays it
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(gaps, again) and torch.equal(args, again_args)
    first = seen[0]
    assert len(first) == 2 and first[1] is prefix.store[tuple(ids)]  # the recording, not a new forward
    for i in range(1, len(blocks)):
        out = seen[i][0] if isinstance(seen[i][0], torch.Tensor) else seen[i][0][0]
        assert out.shape[0] == 1 + sum(c.layer <= i for c in cands), (family, i)
    assert "forward" not in blocks[0].__dict__  # the replay was undone
    full_gaps, full_args = plan(model, by_layer, ids, target, cands, deltas, share_prefix=False)
    base_gap, _ = measure(model, ids, target)
    for r, (c, d) in enumerate(zip(cands, deltas)):
        weight, axis = value_vector_parameter(by_layer[c.layer])
        col = weight.detach().select(axis, c.index)
        orig = col.clone()
        with torch.no_grad():
            col.add_(d.to(col.dtype))
        try:
            gap, arg = measure(model, ids, target)
        finally:
            with torch.no_grad():
                col.copy_(orig)
        assert gaps[r].item() == pytest.approx(gap, abs=2e-6), (family, r)
        assert full_gaps[r].item() == pytest.approx(gap, abs=2e-6), (family, r)
        assert int(args[r]) == arg == int(full_args[r])
    assert (gaps - base_gap).abs().max() > 1e-4  # the patches change the prediction: the check can fail
    assert type(model) not in NO_SHARED_PREFIX  # the shared prefix really ran
