"""tail_logits: the last positions' logits equal the full forward's, with and without logits_to_keep."""

import pytest
import torch
from conftest import make_tiny_llama

import neurodetox.core.logits as lg
from neurodetox.core.logits import tail_logits


@pytest.mark.parametrize("supported", [True, False])
def test_tail_logits_equal_full_forward_slice(monkeypatch, supported):
    model = make_tiny_llama(100, seed=0).eval()
    calls = []
    real = type(model).forward

    def spy(self, *a, **k):
        calls.append("logits_to_keep" in k)
        return real(self, *a, **k)

    monkeypatch.setattr(type(model), "forward", spy)
    lg._accepts_logits_to_keep.cache_clear()
    monkeypatch.setattr(lg, "_accepts_logits_to_keep", lambda cls: supported)
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        full = real(model, input_ids=ids, attention_mask=mask, use_cache=False).logits
        for keep in (1, 4, 9, 20):
            got = tail_logits(model, keep, input_ids=ids, attention_mask=mask)
            assert got.shape == (3, min(keep, 9), 100)
            torch.testing.assert_close(got, full[:, -keep:], rtol=1e-5, atol=1e-6)
    assert calls and all(c == supported for c in calls)
    with pytest.raises(ValueError, match="at least 1"):
        tail_logits(model, 0, input_ids=ids)


def test_real_families_accept_logits_to_keep():
    lg._accepts_logits_to_keep.cache_clear()
    assert lg._accepts_logits_to_keep(type(make_tiny_llama(100, seed=0)))
