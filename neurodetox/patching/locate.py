"""Locators: which FFN neurons to patch for one failure (MINT step 2).

Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model Repair
for Code Generation" (arXiv 2312.05356) and ``docs/methods.md`` §4.
Neuron ``j`` of layer ``l`` is the ``j``-th input feature ``a_j`` of the FFN
output projection (site ``mlp``); its value vector ``w_j`` is column ``j`` of
that projection's weight. Locators score the neurons of the given sites
(default: the last half of the layers) on the teacher-forced sequence cut at
the failure position ``p`` (the position whose logits should predict ``t``):

``grad_x_act`` (default)
    ``s_j = ‖ a_j(·) · ∂P(t)/∂a_j(·) ‖₂`` over positions ``0..p``: gradient ×
    activation for the probability of ``t`` (one forward, one backward).
``contrastive``
    the direct score ``a_j(p) · (u_t − u_a) · w_j`` (``u`` rows of the LM head,
    gain-folded when ``fold_norm``): the neuron's direct contribution to
    ``logit_t − logit_a``. One forward, no backward. Ranked by magnitude.
``activation``
    ``‖ a_j(·) ‖₂`` over positions ``0..p`` (activation only).

The candidate pool is the global top ``k`` (default 10) over all sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Literal, Optional, Sequence, get_args

import torch
from torch import nn

from neurodetox.core.checks import check_int, model_device
from neurodetox.core.errors import UserError
from neurodetox.core.logits import tail_logits
from neurodetox.core.sites import NeuronSite, register_site_hook, value_vector_parameter
from neurodetox.patching.direction import SemanticSpace, final_norm

__all__ = [
    "LOCATORS",
    "Locator",
    "DEFAULT_REFERENCE_PROMPTS",
    "Candidate",
    "ReferenceStats",
    "neuron_scores",
    "top_candidates",
    "locate",
    "reference_stats",
    "reference_rms",
]

#: The neuron locators of :func:`neuron_scores` (see the module docstring).
Locator = Literal["grad_x_act", "contrastive", "activation"]
LOCATORS: tuple[str, ...] = get_args(Locator)

#: Generic prompts whose activations define a neuron's background level for the
#: selectivity weighting of :func:`neurodetox.patching.repair` (used when no
#: reference prompts are given). Varied topics and templates, no fact probes.
DEFAULT_REFERENCE_PROMPTS: tuple[str, ...] = (
    "The weather today is",
    "My favourite food is",
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water boils at a temperature of",
    "The author of Romeo and Juliet is",
    "The currency of Japan is the",
    "Mount Everest is located in",
    "The chemical symbol for gold is",
    "The first president of the United States was",
    "A week has seven",
    "The opposite of hot is",
    "Python is a programming language that",
    "The speed of light is about",
    "In the morning I usually",
    "The main ingredient of bread is",
    "The Amazon river flows through",
    "The official language of Brazil is",
    "Cats and dogs are",
    "The Eiffel Tower is in",
    "Germany is a country in",
    "The capital of Italy is",
    "The continent of Kenya is",
    "The currency of the United Kingdom is the",
    "Photosynthesis converts sunlight into",
    "The tallest animal in the world is the",
    "She opened the door and",
    "The number after nine is",
    "Shakespeare was born in",
    "The Pacific Ocean is the",
    "Tokyo is the capital of",
    "The human heart has four",
)


@dataclass
class ReferenceStats:
    """Activations of reference prompts: what a patch must not disturb.

    Attributes:
        rms: float32 ``[S, d_ff]``: root-mean-square activation of every neuron
            of the ``S`` sites over all real tokens of the prompts.
        last_acts: float32 ``[N, S, d_ff]``: activations at each prompt's last token.
        last_logits: float32 ``[N, V]``: the model's logits there.
        norm_scale: float32 ``[N]``: the final norm's scale at that token
            (``norm(x) = g ⊙ scale · x`` for RMSNorm), so a change ``Δx`` of the
            residual stream moves the logits by about ``scale · W_U (g ⊙ Δx)``.
        layers: the sites' layers, in order.
    """

    rms: torch.Tensor
    last_acts: torch.Tensor
    last_logits: torch.Tensor
    norm_scale: torch.Tensor
    layers: list[int]

    def head_change(
        self, unembedding: torch.Tensor, gain: Optional[torch.Tensor], deltas: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """``W_U (g ⊙ Δ_i)`` for each value-vector change ``Δ_i`` (float32 ``[C, V]``, one pass over ``W_U``)."""
        W = unembedding.detach().float().cpu()
        D = torch.stack([d.float().cpu() for d in deltas], dim=0)  # [C, d]
        if gain is not None:
            D = D * gain.float().cpu()[None, :]
        return torch.nn.functional.linear(D, W)  # [C, V]

    def _deltas(self, unembedding, gain, cands, deltas, dlog=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coef [C, N], dlog [C, V])``: the direct-path logit change of prompt ``x`` under patch ``i`` is
        ``coef[i, x] · dlog[i]``."""
        if dlog is None:
            dlog = self.head_change(unembedding, gain, deltas)
        pos = {layer: i for i, layer in enumerate(self.layers)}
        coef = torch.stack([self.last_acts[:, pos[c.layer], c.index] for c in cands], dim=0)  # [C, N]
        return coef * self.norm_scale[None, :], dlog

    def predicted_logits(
        self,
        unembedding: torch.Tensor,
        gain: Optional[torch.Tensor],
        cands: Sequence[Candidate],
        deltas: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Next-token logits of the reference prompts if each candidate's value
        vector moved by ``deltas[i]`` (``[d]``), to first order through the
        direct path: ``a_j(x) · Δw_j`` added to the residual stream at the last
        token, times the final norm's scale there, then ``W_U (g ⊙ ·)``. For a
        last-layer neuron this leaves out only the norm scale's own change (the
        component of the patch along the residual stream; a few per cent of
        the logit change in
        ``tests/test_patching_locate.py::test_guard_predicted_logits_match_a_real_last_layer_patch``).

        Args:
            unembedding: ``W_U``, ``[V, d]``.
            gain: the final norm's gain ``g`` (``[d]``) or ``None``.

        Returns:
            float32 ``[len(cands), N, V]``.
        """
        if not cands:
            return torch.zeros(0, *self.last_logits.shape)
        coef, dlog = self._deltas(unembedding, gain, cands, deltas)
        return self.last_logits[None] + coef[:, :, None] * dlog[:, None, :]

    def predicted_flips(
        self,
        unembedding: torch.Tensor,
        gain: Optional[torch.Tensor],
        cands: Sequence[Candidate],
        deltas: Sequence[torch.Tensor],
        dlog: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """How many reference prompts would change their next-token argmax under
        each candidate's patch, by :meth:`predicted_logits`. Exact over the
        whole vocabulary, though only each prompt's top 64 tokens are scored
        for every candidate (``[C, N, 64]``); a prompt that a patch could move
        beyond them is scored in full, one candidate at a time.

        Args:
            dlog: optional :meth:`head_change` of ``deltas``, already computed
                (e.g. by linearity from a proportional change).

        Returns:
            int64 ``[len(cands)]``.
        """
        if not cands:
            return torch.zeros(0, dtype=torch.long)
        coef, dlog = self._deltas(unembedding, gain, cands, deltas, dlog)  # [C, N], [C, V]
        logits = self.last_logits
        top = logits.argmax(dim=-1)  # [N]
        # Exact, without scoring the whole vocabulary for every prompt: a token outside a
        # prompt's top k can only take over when its old logit (at most the k-th largest)
        # plus the largest possible move beats the best of the top k after the move; only
        # those (candidate, prompt) pairs are scored in full.
        top_v, top_i = self._top_tokens(64)  # [N, k]
        moved = top_v[None] + coef[:, :, None] * dlog[:, top_i]  # [C, N, k]
        best_v, best_k = moved.max(dim=-1)  # [C, N]
        new = top_i[None].expand(len(cands), -1, -1).gather(2, best_k[..., None])[..., 0]  # [C, N]
        reach = coef.abs() * dlog.abs().max(dim=1).values[:, None]  # [C, N]
        full = (top_v[None, :, -1] + reach >= best_v).nonzero()
        for i in full[:, 0].unique().tolist():
            x = full[full[:, 0] == i, 1]
            new[i, x] = (logits[x] + coef[i, x, None] * dlog[i][None, :]).argmax(dim=-1)
        return (new != top[None]).sum(dim=1)

    def _top_tokens(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` of each prompt's top ``k`` logits, ``[N, k]`` (computed once)."""
        k = min(k, self.last_logits.shape[-1])
        cached = getattr(self, "_top_cache", None)
        if cached is None or cached[0].shape[-1] != k:
            cached = self.last_logits.topk(k, dim=-1)
            self._top_cache = cached
        return cached


@torch.no_grad()
def reference_stats(
    model: nn.Module, tokenizer, sites: Sequence[NeuronSite], prompts: Sequence[str], batch_size: int = 16
) -> ReferenceStats:
    """Collect :class:`ReferenceStats` for ``prompts`` (right-padded batches;
    padding excluded from the RMS).

    Raises:
        UserError: no non-empty prompts.
    """
    prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise UserError("reference prompts: need at least one non-empty prompt")
    device = next(model.parameters()).device
    width = sites[0].width if sites else 0
    sums = torch.zeros(len(sites), width, dtype=torch.float64)
    count = 0
    box: dict = {}
    last_acts: list[list[torch.Tensor]] = [[] for _ in sites]
    scales: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []

    def make_hook(i):
        def hook(x):
            m = box["mask"]
            sums[i] += ((x.detach().double() ** 2) * m[:, :, None]).sum(dim=(0, 1)).cpu()
            last_acts[i].append(x.detach()[torch.arange(x.shape[0]), box["last"]].float().cpu())
            return None

        return hook

    def norm_hook(module, args, output):
        x = args[0].detach().float()[torch.arange(args[0].shape[0]), box["last"]]
        y = output.detach().float()[torch.arange(output.shape[0]), box["last"]]
        g = getattr(module, "weight", None)
        if isinstance(g, torch.Tensor) and g.dim() == 1:
            gg = g.detach().float()
            if "gemma" in type(module).__name__.lower():
                gg = 1.0 + gg
            y = y / torch.where(gg == 0, torch.ones_like(gg), gg)
        scales.append(((y * x).sum(-1) / (x * x).sum(-1).clamp_min(1e-12)).cpu())

    handles = [register_site_hook(s, make_hook(i), observer=True) for i, s in enumerate(sites)]
    norm = final_norm(model)
    if norm is not None:
        handles.append(norm.register_forward_hook(norm_hook))
    was = model.training
    model.eval()
    side = getattr(tokenizer, "padding_side", "right")
    try:
        tokenizer.padding_side = "right"
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            box["mask"] = enc["attention_mask"].double()
            box["last"] = enc["attention_mask"].sum(dim=1) - 1
            first = int(box["last"].min())  # earliest position read
            logits = tail_logits(
                model,
                enc["input_ids"].shape[1] - first,
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
            )
            logits_out.append(logits[torch.arange(logits.shape[0]), box["last"] - first].float().cpu())
            count += int(enc["attention_mask"].sum())
    finally:
        tokenizer.padding_side = side
        for h in handles:
            h.remove()
        model.train(was)
    n = len(prompts)
    return ReferenceStats(
        rms=(sums / max(count, 1)).sqrt().float(),
        last_acts=torch.stack([torch.cat(a) for a in last_acts], dim=1) if sites else torch.zeros(n, 0, 0),
        last_logits=torch.cat(logits_out),
        norm_scale=torch.cat(scales) if scales else torch.ones(n),
        layers=[s.layer for s in sites],
    )


def reference_rms(
    model: nn.Module, tokenizer, sites: Sequence[NeuronSite], prompts: Sequence[str], batch_size: int = 16
) -> torch.Tensor:
    """Root-mean-square activation of every neuron of ``sites`` over the real
    tokens of ``prompts`` (padding excluded): float32 ``[len(sites), d_ff]``."""
    return reference_stats(model, tokenizer, sites, prompts, batch_size).rms


@dataclass(frozen=True)
class Candidate:
    """A neuron proposed for patching.

    Attributes:
        layer: decoder block index.
        index: neuron index in ``[0, d_ff)``.
        score: the locator's score (higher ranks first).
        activation: ``a_j`` at the failure position (its sign orients the patch).
    """

    layer: int
    index: int
    score: float
    activation: float


def neuron_scores(
    model: nn.Module,
    sites: Sequence[NeuronSite],
    input_ids: Sequence[int],
    target_id: int,
    argmax_id: int,
    method: str = "grad_x_act",
    space: Optional[SemanticSpace] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every neuron of ``sites`` for one failure.

    Args:
        input_ids: the teacher-forced ids up to and including the failure
            position ``p`` (length ``p + 1``); the logits at the last position
            should predict ``target_id``.
        target_id, argmax_id: ``t`` and the wrong argmax ``a``.
        method: one of :data:`LOCATORS`.
        space: the :class:`~neurodetox.patching.direction.SemanticSpace`
            (needed by ``contrastive``).

    Returns:
        ``(scores, activations, logits)``: scores and activations at the
        failure position, both float32 ``[len(sites), d_ff]`` on CPU, and the
        float32 logits ``[V]`` at the failure position.

    Raises:
        UserError: unknown ``method`` (a ``ValueError``).
        ValueError: ``contrastive`` without ``space``.
    """
    if method not in LOCATORS:
        raise UserError(f"unknown locator {method!r}; valid locators are {', '.join(LOCATORS)}")
    if method == "contrastive" and space is None:
        raise ValueError("the contrastive locator needs the semantic space (space=semantic_space(model))")
    device = model_device(model)
    ids = torch.tensor([list(input_ids)], device=device)
    acts: list[Optional[torch.Tensor]] = [None] * len(sites)

    def make_hook(i):
        def hook(x):
            acts[i] = x
            # handed back as the activation: where the site sees a reshaped view of a flattened
            # input (OPT), the forward then runs through this tensor and the gradient reaches it
            return x

        return hook

    handles = [register_site_hook(s, make_hook(i), observer=True) for i, s in enumerate(sites)]
    was = model.training
    model.eval()
    try:
        if method == "grad_x_act":
            with torch.enable_grad():
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = tail_logits(model, 1, inputs_embeds=emb)[0, -1].float()
                p_t = torch.softmax(logits, dim=-1)[int(target_id)]
                logits = logits.detach()
                grads = torch.autograd.grad(p_t, acts, allow_unused=True)
            scores = torch.stack(
                [
                    (a[0].detach().float() * (g[0].float() if g is not None else 0.0)).norm(dim=0)
                    for a, g in zip(acts, grads)
                ]
            )
        else:
            with torch.no_grad():
                logits = tail_logits(model, 1, input_ids=ids)[0, -1].float()
            if method == "activation":
                scores = torch.stack([a[0].float().norm(dim=0) for a in acts])
            else:
                du = (space.row(target_id) - space.row(argmax_id)).float().to(device)  # [d]
                rows = []
                for site, a in zip(sites, acts):
                    weight, axis = value_vector_parameter(site)
                    w = weight.detach().float()
                    proj = du @ w if axis == 1 else w @ du  # [d_ff]: (u_t - u_a) . w_j
                    rows.append((a[0, -1].float() * proj).abs())
                scores = torch.stack(rows)
        last = torch.stack([a[0, -1].detach().float() for a in acts])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return scores.detach().cpu(), last.cpu(), logits.cpu()


def locate(
    model: nn.Module,
    sites: Sequence[NeuronSite],
    input_ids: Sequence[int],
    target_id: int,
    argmax_id: int,
    method: str = "grad_x_act",
    top_k: int = 10,
    space: Optional[SemanticSpace] = None,
    exclude: Collection[tuple[int, int]] = (),
) -> list[Candidate]:
    """The global top-``top_k`` neurons for one failure, best first.

    Neurons in ``exclude`` (``(layer, index)`` pairs, e.g. entropy neurons)
    and neurons with zero activation at the failure position (a patch of
    them cannot change this prediction) are skipped.

    Returns:
        Up to ``top_k`` :class:`Candidate` objects, sorted by score descending
        (ties broken by layer, then index).

    Raises:
        UserError: ``top_k < 1``, no sites, or see :func:`neuron_scores`.
    """
    if not sites:
        raise UserError("no neuron sites to search: check the layers setting")
    scores, last, _ = neuron_scores(model, sites, input_ids, target_id, argmax_id, method, space)
    return top_candidates(scores, last, sites, top_k, exclude)


def top_candidates(
    scores: torch.Tensor,
    activations: torch.Tensor,
    sites: Sequence[NeuronSite],
    top_k: int = 10,
    exclude: Collection[tuple[int, int]] = (),
) -> list[Candidate]:
    """Rank neurons by ``scores`` (``[len(sites), d_ff]``) into the global top-``top_k``.

    Neurons in ``exclude`` and neurons whose activation at the failure
    position (``activations``, same shape) is zero are skipped. Ties are
    broken by layer, then index.

    Raises:
        UserError: ``top_k`` not an integer ``>= 1``.
    """
    check_int("top_k", top_k, minimum=1)
    last = activations
    scores = scores.clone()
    scores[last == 0] = float("-inf")
    scores[torch.isnan(scores)] = float("-inf")
    layer_pos = {s.layer: i for i, s in enumerate(sites)}
    for layer, idx in exclude:
        if layer in layer_pos and 0 <= idx < scores.shape[1]:
            scores[layer_pos[layer], idx] = float("-inf")
    flat = scores.flatten()
    k = min(top_k, int(torch.isfinite(flat).sum()))
    if k == 0:
        return []
    order = torch.sort(flat, descending=True, stable=True).indices[:k].tolist()
    width = scores.shape[1]
    return [
        Candidate(
            layer=sites[i // width].layer,
            index=i % width,
            score=float(flat[i]),
            activation=float(last[i // width, i % width]),
        )
        for i in order
    ]
