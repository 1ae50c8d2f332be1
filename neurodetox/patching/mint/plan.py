"""MINT's plan step: every candidate patch measured in one batched forward (``docs/methods.md`` §4, step 3).

Gu, Aleti, Chen, Zhang, "Neuron Patching: Semantic-based Neuron-level Language
Model Repair for Code Generation", arXiv 2312.05356. Patching neuron ``j`` of a
layer adds exactly ``a_j · Δw_j`` to that layer's FFN output, so each batch row
gets its own rank-one correction through a forward hook and :func:`plan`
returns, per candidate, the gap ``p_a − p_t`` and argmax that writing its
value vector would give. The batch starts as one row (the unpatched model) and
grows at each candidate's own layer, so the blocks below it run once for all
rows (ours; same result, fewer FLOPs).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import nullcontext
from typing import Optional, Sequence

import torch
from torch import nn

from neurodetox.core.checks import model_device
from neurodetox.core.logits import tail_logits
from neurodetox.core.sites import decoder_layers
from neurodetox.patching.locate import Candidate
from neurodetox.patching.mint.replay import PrefixCache

__all__ = ["NO_SHARED_PREFIX", "gaps_from_logits", "measure", "plan"]

logger = logging.getLogger(__name__)


def gaps_from_logits(logits: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_best_other − p_t, argmax)`` per row of ``logits [B, V]``."""
    probs = torch.softmax(logits.float(), dim=-1)
    p_t = probs[:, target].clone()
    probs[:, target] = -1.0
    return probs.max(dim=-1).values - p_t, logits.argmax(dim=-1)


@torch.no_grad()
def measure(model: nn.Module, ids: Sequence[int], target: int) -> tuple[float, int]:
    """``(p_best_other − p_t, argmax)`` of one forward over ``ids`` (its last position), on the current weights."""
    x = torch.tensor([list(ids)], device=model_device(model))
    logits = tail_logits(model, 1, input_ids=x)[:, -1]
    gap, arg = gaps_from_logits(logits, target)
    return float(gap[0]), int(arg[0])


def _append_rows(count: int):
    """Forward pre-hook (``with_kwargs``) that appends ``count`` copies of row 0 of a decoder block's input."""

    def grow(h):
        return torch.cat([h, h[:1].expand(count, *h.shape[1:])], dim=0)

    def hook(module, args, kwargs):
        if args:
            return (grow(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": grow(kwargs["hidden_states"])}

    return hook


#: model classes whose decoder blocks cannot take a batch larger than the
#: model's input (e.g. a batch-shaped ALiBi bias): the plan runs them unshared.
NO_SHARED_PREFIX: set[type] = set()


@torch.no_grad()
def plan(
    model,
    sites_by_layer,
    ids,
    target,
    cands: list[Candidate],
    deltas: list[torch.Tensor],
    share_prefix: bool = True,
    prefix: Optional[PrefixCache] = None,
):
    """Gaps ``p_a − p_t`` after each candidate's patch, in one batched forward.

    Row ``r`` adds ``a_j · Δw_r`` to the FFN output of its candidate's layer
    (exactly what writing the patched value vector does). A row's blocks below
    its candidate's layer see the unpatched input, the same for every row:
    with ``share_prefix`` the forward starts on a batch of one (the unpatched
    model) and each candidate layer's block appends a copy of it for each of
    its rows, so a row costs only the blocks from its own layer up (same
    result, fewer FLOPs). Model classes whose blocks reject a batch that grows
    (a batch-shaped bias) fall back to the full batch from the first block.
    ``prefix``: a :class:`~neurodetox.patching.mint.replay.PrefixCache` whose blocks (all below every
    candidate's layer, never patched) replay their recorded outputs.

    Returns:
        ``(gaps [B], argmax [B])`` on CPU.
    """
    device = model_device(model)
    B = len(cands)
    rows_by_layer: dict[int, list[int]] = defaultdict(list)
    for r, c in enumerate(cands):
        rows_by_layer[c.layer].append(r)
    share = share_prefix and B >= 1 and type(model) not in NO_SHARED_PREFIX
    if share:
        # batch layout: row 0 is the unpatched model, then the candidates' rows in layer order
        order = [r for layer in sorted(rows_by_layer) for r in rows_by_layer[layer]]
        at = {r: 1 + k for k, r in enumerate(order)}
        seen, width = 1, {}
        for layer in sorted(rows_by_layer):
            seen += len(rows_by_layer[layer])
            width[layer] = seen
    else:
        at = {r: r for r in range(B)}
        width = {layer: B for layer in rows_by_layer}

    handles = []
    for layer, rows in rows_by_layer.items():
        site = sites_by_layer[layer]
        r_idx = torch.tensor([at[r] for r in rows], device=device)
        j_idx = torch.tensor([cands[r].index for r in rows], device=device)
        dw = torch.stack([deltas[r] for r in rows]).to(device)  # [n, d]

        def hook(module, args, output, r_idx=r_idx, j_idx=j_idx, dw=dw, n=width[layer]):
            inp = args[0]
            out = output
            inp3 = inp.reshape(n, -1, inp.shape[-1])
            out3 = out.reshape(n, -1, out.shape[-1])
            a = inp3[r_idx, :, j_idx]  # [k, T]
            corr = a[:, :, None].float() * dw[:, None, :]  # [k, T, d]
            out3 = out3.clone()
            out3[r_idx] = (out3[r_idx].float() + corr).to(out3.dtype)
            return out3.reshape(out.shape)

        handles.append(site.module.register_forward_hook(hook))
    try:
        logits = None
        if share:
            blocks = decoder_layers(model)
            for layer in sorted(rows_by_layer):
                handles.append(
                    blocks[layer].register_forward_pre_hook(_append_rows(len(rows_by_layer[layer])), with_kwargs=True)
                )
            try:
                replay = prefix is not None and len(prefix.blocks) <= min(rows_by_layer)
                with prefix.replay(ids) if replay else nullcontext():
                    out = tail_logits(model, 1, input_ids=torch.tensor([list(ids)], device=device))[:, -1]
                if out.shape[0] == B + 1:
                    logits = out[[at[r] for r in range(B)]]
            except (RuntimeError, ValueError, IndexError) as err:  # a block that needs the real batch size
                logger.debug("plan without a shared prefix for %s: %s", type(model).__name__, err)
            if logits is None:
                NO_SHARED_PREFIX.add(type(model))
                for h in handles:
                    h.remove()
                return plan(model, sites_by_layer, ids, target, cands, deltas, share_prefix=False)
        else:
            x = torch.tensor([list(ids)] * B, device=device)
            logits = tail_logits(model, 1, input_ids=x)[:, -1]
    finally:
        for h in handles:
            h.remove()
    gaps, args = gaps_from_logits(logits, target)
    return gaps.cpu(), args.cpu()
