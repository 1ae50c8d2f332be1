"""Test-time feature clipping of INSIDE (Chen et al., ICLR 2024, arXiv 2402.03744, §3.2).

Absent from the authors' released code (github alibaba/eigenscore); this follows the paper.
:func:`neurodetox.metrics.sampling.sample_answers` applies it with ``feature_clip=``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from neurodetox.core.checks import check_int, check_number, model_device
from neurodetox.core.sites import LayerSpec, NeuronSite, base_model, register_site_hook, resolve_sites
from neurodetox.metrics.settings import DEFAULTS

__all__ = ["FeatureClipper"]


class FeatureClipper:
    """Test-time feature clipping of INSIDE (Chen et al., ICLR 2024, arXiv 2402.03744, §3.2).

    While the model generates, every feature ``j`` of the output of one decoder
    block (default: the penultimate block, as in the paper) is clamped to
    ``[lo_j, hi_j]``, the ``percentile``-th and ``(100 − percentile)``-th
    percentiles (linear interpolation, as ``numpy.percentile``) of feature ``j``
    over a memory bank of the most recent ``bank_size`` real-token activations
    of that block. Paper settings: ``bank_size = 3000``, ``percentile = 0.2``.
    The authors' released code has no clipping; this follows the paper.

    Per forward call through the block: the thresholds come from the bank as it
    is *before* the call; every position is clamped; then the call's real-token
    activations (unclipped; padding and tokens fed after an EOS excluded) are
    pushed in, oldest out. Clipping starts once the bank holds ``min_tokens``
    activations; :func:`sample_answers` first seeds the bank with one forward
    pass over the prompts' real tokens, so clipping is active from the first
    generated token. Set ``frozen = True`` to stop updates (fixed thresholds).

    Args:
        bank_size: activations kept (FIFO). Default 3000.
        percentile: lower percentile in percent, ``0 ≤ p < 50``. Default 0.2.
        layer: the clipped block, any spec of :func:`neurodetox.core.sites.parse_layers`
            naming one block. Default ``"penultimate"``.
        min_tokens: bank fill needed before clamping starts. Default 500
            (or ``bank_size`` if smaller).

    Raises:
        ValueError: bad ``bank_size``, ``percentile`` or ``min_tokens``.
    """

    def __init__(
        self,
        bank_size: int = DEFAULTS.clip_bank_size,
        percentile: float = DEFAULTS.clip_percentile,
        layer: LayerSpec = DEFAULTS.clip_layer,
        min_tokens: int = 500,
    ):
        check_int("bank_size", bank_size)
        check_int("min_tokens", min_tokens)
        check_number("percentile", percentile, minimum=0.0, maximum=50.0, max_inclusive=False)
        self.bank_size, self.percentile, self.layer = int(bank_size), float(percentile), layer
        self.min_tokens = min(int(min_tokens), self.bank_size)
        self.bank: Optional[torch.Tensor] = None
        self.count = 0  # activations held (≤ bank_size)
        self.pushed = 0  # activations ever pushed
        self._pos = 0
        self.frozen = False
        self.collect = True
        self.clamp_enabled = True
        self.clamped_calls = 0

    # -- bank
    def push(self, acts: torch.Tensor) -> None:
        """Append ``[N, d]`` activations (FIFO; the newest ``bank_size`` are kept)."""
        if self.frozen or not self.collect or acts.numel() == 0:
            return
        acts = acts.detach().to("cpu", torch.float32).reshape(-1, acts.shape[-1])
        if self.bank is None:
            self.bank = torch.zeros(self.bank_size, acts.shape[-1], dtype=torch.float32)
        if acts.shape[-1] != self.bank.shape[1]:
            raise ValueError(f"activation width {acts.shape[-1]} differs from the bank's {self.bank.shape[1]}")
        self.pushed += acts.shape[0]
        if acts.shape[0] >= self.bank_size:
            acts = acts[-self.bank_size :]
        n = acts.shape[0]
        end = self._pos + n
        if end <= self.bank_size:
            self.bank[self._pos : end] = acts
        else:
            first = self.bank_size - self._pos
            self.bank[self._pos :] = acts[:first]
            self.bank[: n - first] = acts[first:]
        self._pos = end % self.bank_size
        self.count = min(self.count + n, self.bank_size)

    def contents(self) -> torch.Tensor:
        """The activations in the bank, oldest first, ``[count, d]``."""
        if self.bank is None:
            return torch.zeros(0, 0)
        if self.count < self.bank_size:
            return self.bank[: self.count].clone()
        return torch.cat([self.bank[self._pos :], self.bank[: self._pos]], dim=0)

    def thresholds(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Per-feature ``(lo, hi)`` from the bank, or ``None`` before ``min_tokens``."""
        if self.bank is None or self.count < self.min_tokens:
            return None
        data = self.bank[: self.count]
        q = torch.tensor([self.percentile / 100.0, 1.0 - self.percentile / 100.0], dtype=torch.float32)
        lo_hi = torch.quantile(data, q, dim=0)
        return lo_hi[0], lo_hi[1]

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        thr = self.thresholds() if self.clamp_enabled else None
        if thr is None:
            return x
        lo, hi = (t.to(x.device, x.dtype) for t in thr)
        self.clamped_calls += 1
        return torch.clamp(x, min=lo, max=hi)

    # -- hooks
    @contextlib.contextmanager
    def attached(self, model: nn.Module, special_ids: Sequence[int]) -> Iterator[NeuronSite]:
        """Clamp the block's output and feed the bank while the context is open."""
        sites = resolve_sites(model, "residual", self.layer)
        if len(sites) != 1:
            raise ValueError(
                f"feature clipping needs exactly one block, got layer={self.layer!r} -> "
                f"blocks {[s.layer for s in sites]}"
            )
        site = sites[0]
        embed = base_model(model).get_input_embeddings()
        special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long)
        state: dict = {"ids": None}

        def ids_hook(module, args):
            state["ids"] = args[0] if args and isinstance(args[0], torch.Tensor) else None

        def block_fn(hidden: torch.Tensor):
            ids = state["ids"]
            out = self.clamp(hidden)
            if ids is not None and ids.shape == hidden.shape[:2]:
                real = ~torch.isin(ids, special.to(ids.device))
                self.push(hidden[real])
            return out if out is not hidden else None

        h1 = embed.register_forward_pre_hook(ids_hook)
        h2 = register_site_hook(site, block_fn)
        try:
            yield site
        finally:
            h1.remove()
            h2.remove()

    def seed(
        self, model: nn.Module, tokenizer, prompts: Sequence[str], special_ids: Sequence[int], batch_size: int = 16
    ) -> None:
        """Fill the bank by forward passes over ``prompts`` (real tokens only) until full."""
        if self.frozen:
            return
        device = model_device(model)
        clamp = self.clamp_enabled
        self.clamp_enabled = False
        try:
            with self.attached(model, special_ids):
                for start in range(0, len(prompts), batch_size):
                    if self.count >= self.bank_size:
                        break
                    # left padding with the pad token: padded positions are excluded from the bank
                    enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(
                        device
                    )
                    pos = (enc["attention_mask"].long().cumsum(1) - 1).clamp_min(0)
                    model(
                        input_ids=enc["input_ids"],
                        attention_mask=enc["attention_mask"],
                        position_ids=pos,
                        use_cache=False,
                    )
        finally:
            self.clamp_enabled = clamp
