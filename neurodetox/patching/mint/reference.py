"""Reference prompts during a repair: cached statistics and next-token checks (ours, on top of MINT).

The selectivity weighting, the guard and the protection of
:func:`~neurodetox.patching.mint.repair` read statistics of the reference
prompts (:func:`~neurodetox.patching.locate.reference_stats`). They depend only
on the model's weights, the searched sites and the prompts, so
:func:`cached_reference` keeps one set per model, keyed by a cheap fingerprint
of the weights (:func:`fingerprint`). ``verify_reference`` compares next-token
predictions of right-padded batches (:func:`encode_right_padded`,
:func:`last_argmax`).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import nn

from neurodetox.core.checks import model_device
from neurodetox.core.logits import tail_logits
from neurodetox.patching.failures import right_pad
from neurodetox.patching.locate import reference_stats

__all__ = [
    "FINGERPRINTS",
    "REFERENCE_CACHE",
    "cached_reference",
    "encode_right_padded",
    "fingerprint",
    "last_argmax",
]


def encode_right_padded(tokenizer, prompts: Sequence[str], batch_size: int = 64):
    """``[(input_ids [B, T], attention_mask [B, T])]`` batches, right-padded (pad id 0 where none is set)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[start : start + batch_size]]
        rows = [r for r in rows if r]
        if rows:
            out.append(right_pad(rows))
    return out


@torch.no_grad()
def last_argmax(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token argmax at each row's last real position of a right-padded batch, ``[B]`` long (CPU)."""
    device = model_device(model)
    last = mask.sum(dim=1) - 1
    first = int(last.min())
    logits = tail_logits(model, ids.shape[1] - first, input_ids=ids.to(device), attention_mask=mask.to(device))
    return logits[torch.arange(ids.shape[0]), (last - first).to(logits.device)].argmax(dim=-1).cpu()


REFERENCE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def fingerprint(model: nn.Module) -> tuple:
    """Cheap identity of the model's current weights: float32 sum and abs-sum of every parameter.

    Each parameter's pair is recomputed only when it was replaced or written in
    place since the last call (storage pointer and autograd version counter):
    an unchanged model costs a pass over the parameter list, and a patch
    applied or reverted costs the sums of the touched tensors only.
    """
    known = FINGERPRINTS.setdefault(model, {})
    fp, seen = [], {}
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            key = (i, p.data_ptr(), p._version)
            pair = known.get(key)
            if pair is None:
                pair = (float(p.detach().sum()), float(p.detach().abs().sum()))
            seen[key] = pair
            fp.append(pair)
    FINGERPRINTS[model] = seen
    return tuple(fp)


def cached_reference(model, tokenizer, sites, prompts):
    """:func:`reference_stats`, computed once per model, sites, prompts and weights."""
    key = (tuple(prompts), tuple(s.layer for s in sites), fingerprint(model))
    per_model = REFERENCE_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model.clear()
        per_model[key] = reference_stats(model, tokenizer, sites, list(prompts))
    return per_model[key]
