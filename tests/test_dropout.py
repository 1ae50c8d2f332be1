"""Dropout masks: training forwards only, and identical during gradient-checkpoint recompute."""

import torch

from neurodetox.core.runtime import in_backward_recompute
from neurodetox.core.sites import register_site_hook, resolve_sites
from neurodetox.send.callbacks import ActivationStatsCallback
from neurodetox.send.masks import NeuronDropout


def _batch(tok):
    enc = tok(["the capital of france is paris .", "japan is in asia"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_mask_applies_in_train_mode_only(tiny_llama, tiny_tokenizer):
    ids, am = _batch(tiny_tokenizer)
    site = resolve_sites(tiny_llama, "mlp", [1])[0]
    drop = NeuronDropout([site])
    drop.set({site.key: [0, 5, 7]})
    seen = []
    register_site_hook(site, lambda a: seen.append(a.detach().clone()))  # after the mask: sees masked input
    tiny_llama.eval()
    tiny_llama(input_ids=ids, attention_mask=am)
    assert seen[-1][..., [0, 5, 7]].abs().sum() > 0, "eval forward must not be masked"
    tiny_llama.train()
    tiny_llama(input_ids=ids, attention_mask=am)
    assert torch.all(seen[-1][..., [0, 5, 7]] == 0)
    assert seen[-1][..., [1, 2, 3]].abs().sum() > 0
    drop.clear()
    tiny_llama(input_ids=ids, attention_mask=am)
    assert seen[-1][..., [0, 5, 7]].abs().sum() > 0


def test_rescale_option(tiny_llama):
    site = resolve_sites(tiny_llama, "residual", "penultimate")[0]
    drop = NeuronDropout([site], rescale=True)
    drop.set({site.key: list(range(8))})
    m = drop.mask(site.key)
    assert torch.all(m[:8] == 0) and torch.allclose(m[8:], torch.full((24,), 32 / 24))


def test_mask_identical_in_gradient_checkpoint_recompute_and_stats_not_double_counted(tiny_llama, tiny_tokenizer):
    ids, am = _batch(tiny_tokenizer)
    m = tiny_llama
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    site = resolve_sites(m, "mlp", [2])[0]
    drop = NeuronDropout([site])
    drop.set({site.key: [3, 4, 9]})
    fwd, rec = [], []
    register_site_hook(site, lambda a: (rec if in_backward_recompute() else fwd).append(a.detach().clone()))
    stats = ActivationStatsCallback("mlp", [2])
    stats.attach(m)
    out = m(input_ids=ids, attention_mask=am, labels=ids)
    out.loss.backward()
    assert len(fwd) == 1 and len(rec) == 1, "checkpointing should recompute the block exactly once"
    assert torch.equal(fwd[0], rec[0])
    assert torch.all(rec[0][..., [3, 4, 9]] == 0)
    assert stats.moments[site.key].count == int(am.sum()), "recomputed activations must not be counted"
    # the statistics see the *unmasked* activation at real tokens only
    assert stats.moments[site.key].mean[[3, 4, 9]].abs().sum() > 0


def test_stats_match_brute_force_over_real_tokens(tiny_llama, tiny_tokenizer):
    ids, am = _batch(tiny_tokenizer)
    site = resolve_sites(tiny_llama, "mlp", [0])[0]
    raw = []
    register_site_hook(site, lambda a: raw.append(a.detach().double()), observer=True)
    stats = ActivationStatsCallback("mlp", [0])
    stats.attach(tiny_llama)
    tiny_llama.train()
    for _ in range(2):
        tiny_llama(input_ids=ids, attention_mask=am)
    tiny_llama.eval()
    tiny_llama(input_ids=ids, attention_mask=am)  # not counted
    rows = torch.cat([r[am.bool()] for r in raw[:2]])
    mom = stats.moments[site.key]
    assert mom.count == rows.shape[0]
    torch.testing.assert_close(mom.mean, rows.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mom.variance, rows.var(0, unbiased=False), rtol=1e-8, atol=1e-12)
