"""Tests for ``neurodetox.patching.mint.replay``: replayed blocks give the logits and gradients of plain forwards."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from patching_helpers import one_thread

from neurodetox.core.sites import resolve_sites
from neurodetox.patching import neuron_scores


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.mark.parametrize("family", __import__("test_sites").FAMILY_NAMES)
def test_prefix_cache_replays_recorded_blocks_for_the_same_ids_and_their_prefixes(family):
    """After one recorded forward, a forward over the same ids, a prefix of
    them, or a right-padded batch of both gives the logits of a plain forward
    without running the replayed blocks (their weights are scrambled
    meanwhile, and the result is unchanged); the locator's gradient scores are
    unchanged with a frozen model; other ids run the blocks."""
    from test_sites import tiny

    from neurodetox.core.logits import tail_logits
    from neurodetox.core.sites import decoder_layers
    from neurodetox.patching.failures import right_pad
    from neurodetox.patching.mint.replay import PrefixCache

    model = copy.deepcopy(tiny(family)).eval()
    ids = [5, 9, 3, 17, 11, 4, 8]

    def logits(x):
        with torch.no_grad():
            return tail_logits(model, len(x), input_ids=torch.tensor([x]))[0]

    want_full, want_cut, want_other = logits(ids), logits(ids[:4]), logits([6, 2, 9])
    cache = PrefixCache(model, below=2)
    with cache.replay(ids):
        assert torch.allclose(logits(ids), want_full, atol=1e-6)  # recorded
    block_params = [p for b in list(decoder_layers(model))[:2] for p in b.parameters()]
    saved = [p.detach().clone() for p in block_params]
    with torch.no_grad():
        for p in block_params:
            p.add_(torch.randn_like(p))  # the replayed blocks would now compute something else
    try:
        with cache.replay(ids):
            assert torch.allclose(logits(ids), want_full, atol=1e-6)
        with cache.replay(ids[:4]):
            assert torch.allclose(logits(ids[:4]), want_cut, atol=1e-5)
        # a right-padded batch of recorded ids (one a prefix): each row's real positions as alone
        ids_b, mask_b = right_pad([ids, ids[:4]])
        with cache.replay_batch([ids, ids[:4]]), torch.no_grad():
            batch = tail_logits(model, ids_b.shape[1], input_ids=ids_b, attention_mask=mask_b)
        if family != "gptj":  # its blocks also return attention weights: a batch is not stacked, the blocks run
            assert torch.allclose(batch[0], want_full, atol=1e-5)
            assert torch.allclose(batch[1, :4], want_cut, atol=1e-5)
        # under grad mode the replayed input is a leaf: the locator's backward reaches the searched blocks
        sites = resolve_sites(model, "mlp", "all")[2:]
        for p in model.parameters():
            p.requires_grad_(False)
        with cache.replay(ids[:5], grad=True):
            scores, acts, lg = neuron_scores(model, sites, ids[:5], 7, 3)
        for p, s in zip(block_params, saved):
            with torch.no_grad():
                p.copy_(s)
        plain_scores, plain_acts, plain_lg = neuron_scores(model, sites, ids[:5], 7, 3)
        assert torch.allclose(scores, plain_scores, atol=1e-6, rtol=1e-4) and scores.abs().max() > 0
        assert torch.allclose(lg, plain_lg, atol=1e-5)
        with torch.no_grad():
            for p in block_params:
                p.add_(torch.randn_like(p))
        with cache.replay([6, 2, 9]):  # not recorded: the blocks run (scrambled), and it is recorded
            assert not torch.allclose(logits([6, 2, 9]), want_other, atol=1e-3)
    finally:
        with torch.no_grad():
            for p, s in zip(block_params, saved):
                p.copy_(s)
    assert all("forward" not in b.__dict__ for b in decoder_layers(model))
