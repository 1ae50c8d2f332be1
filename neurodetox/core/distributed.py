"""Collective helpers: every number SeND computes is the same on one process or many.

All functions are no-ops (or identity) when ``torch.distributed`` is not
initialised, so single-process code paths stay plain.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from neurodetox.core.moments import RunningMoments


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def zero3_enabled() -> bool:
    """True when the model runs under DeepSpeed ZeRO-3 (parameters partitioned and gathered per forward)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - old transformers
        return False
    return bool(is_deepspeed_zero3_enabled())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(n: int) -> tuple[list[int], int]:
    """This rank's share of ``range(n)``, padded so every rank gets the same count.

    Items are dealt round-robin (rank ``r`` gets ``r, r + W, …``); short ranks
    repeat their last index (or index 0) so that all ranks run the same number
    of forward passes, which ZeRO-3 needs to stay in step.

    Returns:
        ``(indices, n_real)`` where the first ``n_real`` indices are real.
    """
    w, r = world_size(), rank()
    mine = list(range(r, n, w))
    per_rank = -(-n // w) if n else 0
    n_real = len(mine)
    pad = mine[-1] if mine else 0
    return mine + [pad] * (per_rank - n_real), n_real


def unshard(per_rank: Sequence[Sequence[Any]], n: int) -> list:
    """Inverse of :func:`shard` on gathered per-rank results: items in dataset order."""
    w = len(per_rank)
    out: list = [None] * n
    for r, items in enumerate(per_rank):
        for j, item in enumerate(items):
            i = r + j * w
            if i < n:
                out[i] = item
    return out


def merge_moments(local: RunningMoments) -> RunningMoments:
    """Chan-merge the per-rank moments of one site, in rank order; identical on every rank."""
    if not is_distributed():
        return local
    device = torch.device("cpu") if dist.get_backend() == "gloo" else torch.device("cuda", torch.cuda.current_device())
    packed = torch.cat([torch.tensor([float(local.count)], dtype=torch.float64), local.mean.cpu(), local.m2.cpu()])
    packed = packed.to(device)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, packed)
    merged = RunningMoments(local.width)
    n = local.width
    for p in parts:
        p = p.cpu()
        merged.merge_(int(p[0].item()), p[1 : 1 + n], p[1 + n :])
    return merged
