"""Replay of the blocks below the searched layers (MINT plan and locate, our speed-up).

Within one :func:`~neurodetox.patching.mint.repair` call only the blocks of the
searched layers are patched, so the blocks below them compute the same output
for the same input ids every time. :class:`PrefixCache` records that output at
an edit's first forward and, for later forwards over the same ids (or a prefix
of them, or a right-padded batch of recorded ids), temporarily replaces those
blocks' ``forward`` with the recording: same logits, none of the FLOPs below.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch
from torch import nn

from neurodetox.core.sites import decoder_layers

__all__ = ["PrefixCache"]


def _first_positions(output: Any, n: int) -> Any:
    """A decoder block's batch-one output cut to its first ``n`` positions (``None`` when its form is unknown).

    Known forms: the hidden states ``[1, T, d]``, alone or first in a tuple
    whose other items are ``None`` or attention weights ``[1, H, T, T]``.
    """
    if isinstance(output, torch.Tensor):
        return output[:, :n] if output.dim() == 3 else None
    if not (isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 3):
        return None
    T = output[0].shape[1]
    rest = []
    for o in output[1:]:
        if o is None:
            rest.append(None)
        elif isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[-2:] == (T, T):
            rest.append(o[:, :, :n, :n])
        else:
            return None
    return (output[0][:, :n], *rest)


def _hidden(output: Any) -> Optional[torch.Tensor]:
    """The hidden states of a block output of a known form (a tensor, or a tuple of it and ``None``s)."""
    if isinstance(output, torch.Tensor) and output.dim() == 3:
        return output
    if (
        isinstance(output, tuple)
        and output
        and isinstance(output[0], torch.Tensor)
        and output[0].dim() == 3
        and all(o is None for o in output[1:])
    ):
        return output[0]
    return None


def _with_hidden(output: Any, h: torch.Tensor) -> Any:
    return h if isinstance(output, torch.Tensor) else (h, *output[1:])


def _detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    return output


def _leaf(output: Any) -> Any:
    """``output`` with its hidden states a fresh leaf that requires grad (gradients flow from there on)."""
    if isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True)
    return (output[0].detach().requires_grad_(True), *output[1:])


class PrefixCache:
    """The input of the lowest searched block, recorded per input ids and replayed.

    Within one :func:`repair` call only blocks of the searched layers are
    patched, so the blocks below the lowest of them compute the same output
    for the same ids every time. The first batch-one forward over some ids
    runs them and records the output of the last of them; later forwards
    over the same ids, or over a prefix of them (causal attention: the first
    ``n`` positions do not depend on the rest), replace those blocks'
    ``forward`` with the recording for the duration of the call, so the
    searched blocks get the same input without the FLOPs below them.
    :meth:`replay_batch` does the same for a right-padded batch of recorded
    ids. The least recently used recordings are dropped beyond ``size``.
    """

    def __init__(self, model: nn.Module, below: int, size: int = 64):
        self.blocks = list(decoder_layers(model))[: max(int(below), 0)]
        self.size = size
        self.store: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def _recorded(self, key: tuple[int, ...]) -> Any:
        for known, output in reversed(self.store.items()):
            if known == key:
                found = output
            elif len(known) > len(key) and known[: len(key)] == key:
                found = _first_positions(output, len(key))
                if found is None:
                    continue
            else:
                continue
            self.store.move_to_end(known)
            return found
        return None

    @contextmanager
    def _stubbed(self, output: Any, grad: bool):
        saved = [b.__dict__.get("forward") for b in self.blocks]
        out = _leaf(output) if grad and torch.is_grad_enabled() else output
        for block in self.blocks:  # the loop only passes the last one on
            block.forward = lambda *args, **kwargs: out
        try:
            yield
        finally:
            for block, old in zip(self.blocks, saved):
                if old is None:
                    del block.forward
                else:
                    block.forward = old

    @contextmanager
    def replay(self, ids: Sequence[int], grad: bool = False):
        """Context in which a batch-one forward over ``ids`` reuses (or records) the blocks' output.

        ``grad``: under grad mode the replayed hidden states are a leaf that
        requires grad, so a backward reaches the searched blocks' activations
        even when no parameter requires grad.
        """
        key = tuple(int(i) for i in ids)
        output = self._recorded(key) if self.blocks else None
        if not self.blocks:
            yield
        elif output is not None:
            with self._stubbed(output, grad):
                yield
        else:
            got: list[Any] = []
            handle = self.blocks[-1].register_forward_hook(lambda m, a, o: got.append(_detached(o)))
            try:
                yield
            finally:
                handle.remove()
            if len(got) == 1 and (_hidden(got[0]) is not None or _first_positions(got[0], 1) is not None):
                self.store[key] = got[0]
                while len(self.store) > self.size:
                    self.store.popitem(last=False)

    @contextmanager
    def replay_batch(self, seqs: Sequence[Sequence[int]]):
        """Context for one forward over ``seqs`` right-padded to the longest: the
        recorded outputs, stacked and zero-padded (padding is masked and never
        read), when every sequence has one in a form that stacks; otherwise
        the blocks run."""
        outputs = [self._recorded(tuple(int(i) for i in s)) for s in seqs] if self.blocks else [None]
        hidden = [_hidden(o) if o is not None else None for o in outputs]
        if any(h is None for h in hidden):
            yield
            return
        width = max(h.shape[1] for h in hidden)
        stacked = hidden[0].new_zeros(len(hidden), width, hidden[0].shape[-1])
        for i, h in enumerate(hidden):
            stacked[i, : h.shape[1]] = h[0]
        with self._stubbed(_with_hidden(outputs[0], stacked), grad=False):
            yield
