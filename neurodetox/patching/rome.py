"""Rank-one key→value edits at the subject's last token (ROME; MEMIT-style batches).

Meng, Bau, Andonian, Belinkov, "Locating and Editing Factual Associations in
GPT", arXiv 2202.05262 (ROME); Meng, Sen Sharma, Andonian, Belinkov, Bau,
"Mass-Editing Memory in a Transformer", arXiv 2210.07229 (MEMIT);
``docs/methods.md`` §8. The FFN output projection ``W`` (``[d, d_ff]``) of one
mid-layer block is read as a key→value memory: the key ``k`` is the FFN's
hidden activation (the projection's input, ``[d_ff]``) at the subject's last
token, the value ``W k`` its output (``[d]``). For each edit:

1. **key** ``k*``: the mean key over the edit's phrasings (the prompt, its
   ``paraphrases`` when ``use_paraphrases``, each behind the optional
   model-generated context prefixes);
2. **value** ``v* = W k + δ``: ``δ`` (``[d]``) is added to the projection's
   output at the subject's last token of every phrasing and optimised with
   Adam to make the target the continuation of every phrasing (mean token NLL),
   plus ``kl_factor`` × KL of the next-token distribution after
   ``"{subject} is a"`` to its unedited value (keeps the subject's other
   properties) and ``weight_decay · ‖δ‖ / ‖W k‖²``; ``‖δ‖`` is clamped to
   ``clamp_norm_factor · ‖W k‖``. All edits of a batch are optimised at once:
   each has its own ``δ`` and loss, so the batch is the same as one
   optimisation per edit (Adam is element-wise);
3. **update** (closed form, :func:`rank_update`): the smallest change of ``W``
   in the metric of the key second moment ``C = E[k kᵀ]`` that maps every
   ``k*_i`` to ``v*_i``: ``ΔW = R (KᵀC⁻¹K + λI)⁻¹ (C⁻¹K)ᵀ`` with ``K = [k*_i]``
   (``[d_ff, n]``), ``R = [v*_i − W k*_i] = [δ_i]``. ``λ = 0`` (default) meets
   the constraints exactly; for one edit it is ROME's
   ``ΔW = (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)``. ``λ > 0`` is MEMIT's
   least-squares form ``ΔW = R Kᵀ (λC + KKᵀ)⁻¹``.

By default (``covariance="model_text"``) ``C`` is estimated from the model's
own sampled text (no corpus download; the papers use 100,000 Wikipedia
samples), with a ridge of ``covariance_ridge × mean diagonal``;
``covariance="identity"`` is EasyEdit's ROME setting for Llama
(``mom2_adjustment: false``). The defaults are MEMIT's (``spread_layers=5``
blocks ending at block 8, ``λ = 15000``), chosen on a dev set of GeoNames
cities (``docs/results/patching.md``); ``spread_layers=1, lam=0`` is ROME.

Edits whose phrasings are not all fixed by the update are optimised again on
the updated weights (``rounds``), with the keys of the fixed edits held to
their current values (``R = 0`` columns). ``mode="sequential"`` edits one fact
at a time in that way (ROME's protocol); ``"batch"`` (default) all at once.

The result is a :class:`~neurodetox.patching.patchfile.PatchSet` in the same
reversible, hash-checked format as MINT's: the touched projection's changed
columns with their originals (float32, so revert is bit-exact in any dtype).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Sequence, Union, get_args

import torch
from torch import nn

from neurodetox.core.checks import DTYPES, check_int, check_number, model_device, resolve_dtype
from neurodetox.core.errors import UserError
from neurodetox.core.sites import base_model, num_layers, resolve_sites, value_vector_parameter
from neurodetox.patching.covariance import TEXT_STARTS, edit_site, key_covariance, key_covariances, weights_sha256
from neurodetox.patching.failures import Edit, coerce_edits, encode_edit, encode_pair, still_failing
from neurodetox.patching.mint.results import EditResult, RepairReport
from neurodetox.patching.patchfile import ParamPatch, PatchSet

__all__ = [
    "COVARIANCES",
    "check_edit_layer",
    "MODES",
    "RomeSettings",
    "edit_rank_one",
    "edit_site",
    "optimise_values",
    "key_covariance",
    "key_covariances",
    "weights_sha256",
    "rank_update",
    "subject_last_index",
]

logger = logging.getLogger(__name__)

Covariance = Literal["model_text", "identity"]
COVARIANCES: tuple[str, ...] = get_args(Covariance)
Mode = Literal["batch", "sequential"]
MODES: tuple[str, ...] = get_args(Mode)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class RomeSettings:
    """Settings of :func:`edit_rank_one` (ROME, arXiv 2202.05262; MEMIT, arXiv 2210.07229).

    Field names differ from :class:`~neurodetox.patching.mint.MintSettings`'s, so that
    ``neurodetox patch find`` takes both as flags; whether paraphrases are used and the
    storage dtype are arguments of :func:`edit_rank_one`.

    Attributes:
        edit_layer: the block whose FFN output projection is edited, an integer
            (negative counts from the end); the value is optimised at its output.
            Default 8 (of SmolLM2-135M's 30; EasyEdit's MEMIT ends at block 8 of
            Llama-2-7B's 32 and Llama-3.2-1B's 16; its ROME edits block 5). A model
            with fewer blocks needs another value.
        spread_layers: MEMIT's spreading (arXiv 2210.07229, §4.3): the value is
            optimised at ``edit_layer``'s output and the update is spread over the
            FFN output projections of the ``spread_layers`` blocks ending there,
            lowest first, each taking ``1/(blocks left)`` of the remaining
            residual at ``edit_layer`` (recomputed after every block's update), in
            its own key covariance. ``>= 1``; default 5 (blocks 4–8, as EasyEdit's
            MEMIT for Llama); 1 is ROME (``edit_layer`` only). Every block must
            exist (``edit_layer - spread_layers + 1 >= 0``).
        edit_mode: ``"batch"`` (default): every edit's value is optimised at once
            on the same weights and one update writes them all (MEMIT's
            batch, in one layer); ``"sequential"``: one edit after another,
            each on the weights the previous ones left (ROME's protocol).
        v_steps: Adam steps of the value optimisation, ``>= 1``. Default 25 (EasyEdit).
        v_lr: its learning rate, ``> 0``. Default 0.5 (EasyEdit).
        weight_decay: ``‖δ‖ / ‖W k‖²`` weight, ``>= 0``. Default 1e-3 (EasyEdit).
        clamp_norm_factor: ``‖δ‖ <= factor · ‖W k‖``, ``> 0``. Default 4 (EasyEdit).
        kl_factor: weight of the KL term on ``"{subject} is a"``, ``>= 0``. Default 0.0625 (EasyEdit).
        stop_loss: an edit's optimisation stops once its loss is below this, ``>= 0``. Default 0.05 (EasyEdit).
        stop_prob: ... or once every target token of every phrasing has at least this
            probability (ours, ``(0, 1]``; ``1`` turns it off). Default 0.5, which makes
            each target token the argmax; on a CPU it cuts the steps several-fold.
        context_templates: model-generated prefixes each phrasing is also
            optimised (and its key averaged) behind, ``>= 0``. Default 0
            (ours; ROME uses 20, which costs 21× the forwards; the edits'
            paraphrases play their part here).
        covariance: ``"model_text"`` (default; ``C`` from the model's own sampled
            text, once per model: about 1.5 min on a 2-core CPU, then kept in memory or
            with ``covariance_cache``) or ``"identity"`` (``C = I``, EasyEdit's ROME
            setting for Llama, ``mom2_adjustment: false``).
        covariance_samples: sampled texts for ``C``, ``>= 1``. Default 128.
        covariance_tokens: tokens per sampled text, ``>= 1``. Default 64.
        covariance_ridge: ridge added to ``C``, relative to its mean diagonal, ``> 0``. Default 0.01.
        lam: ``λ`` of :func:`rank_update`, ``>= 0``: 0 exact constraints (ROME);
            ``> 0`` MEMIT's least squares with ``λ C``. Default 15000 (EasyEdit's
            ``mom2_update_weight`` for MEMIT; ``C`` is the mean second moment there too).
        rounds: update rounds for edits the previous update left unfixed, ``>= 1``. Default 6.
        covariance_seed: seed of the sampled covariance text. Default 0.

    Raises:
        UserError: a field outside its valid values (at construction and in :meth:`validate`).
    """

    edit_layer: int = field(default=8, metadata=_help("rome: block whose FFN output projection is edited (default 8)."))
    spread_layers: int = field(
        default=5,
        metadata=_help(
            "MEMIT: spread the update over this many blocks ending at edit_layer, >= 1 (default 5; 1 = ROME)."
        ),
    )
    edit_mode: Mode = field(
        default="batch", metadata=_help("'batch' (all edits in one update, default) or 'sequential' (one by one).")
    )
    v_steps: int = field(default=25, metadata=_help("Adam steps of the value optimisation, >= 1 (default 25)."))
    v_lr: float = field(default=0.5, metadata=_help("Learning rate of the value optimisation, > 0 (default 0.5)."))
    weight_decay: float = field(default=1e-3, metadata=_help("Weight of ||δ||/||Wk||², >= 0 (default 1e-3)."))
    clamp_norm_factor: float = field(default=4.0, metadata=_help("Clamp ||δ|| to factor·||Wk||, > 0 (default 4)."))
    kl_factor: float = field(default=0.0625, metadata=_help("Weight of the KL term, >= 0 (default 0.0625)."))
    stop_loss: float = field(default=0.05, metadata=_help("Stop an edit's optimisation below this loss (0.05)."))
    stop_prob: float = field(
        default=0.5,
        metadata=_help("... or once every target token has at least this probability, (0, 1]; 1 = off (0.5)."),
    )
    context_templates: int = field(
        default=0, metadata=_help("Model-generated prefixes each phrasing is also optimised behind, >= 0 (0).")
    )
    covariance: Covariance = field(
        default="model_text", metadata=_help("Key covariance C: 'model_text' (default) or 'identity'.")
    )
    covariance_samples: int = field(default=128, metadata=_help("Sampled texts for C, >= 1 (default 128)."))
    covariance_tokens: int = field(default=64, metadata=_help("Tokens per sampled text for C, >= 1 (default 64)."))
    covariance_ridge: float = field(
        default=0.01, metadata=_help("Ridge added to C, relative to its mean diagonal, > 0 (default 0.01).")
    )
    lam: float = field(default=15000.0, metadata=_help("λ: 0 exact constraints (ROME); > 0 MEMIT (default 15000)."))
    rounds: int = field(default=6, metadata=_help("Update rounds for edits left unfixed, >= 1 (default 6)."))
    covariance_seed: int = field(default=0, metadata=_help("Seed of the sampled covariance text (default 0)."))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            UserError: naming the bad field and what is valid.
        """
        check_int("edit_layer", self.edit_layer, minimum=None)
        if self.edit_mode not in MODES:
            raise UserError(f"unknown edit_mode {self.edit_mode!r}; valid modes are {', '.join(MODES)}")
        if self.covariance not in COVARIANCES:
            raise UserError(f"unknown covariance {self.covariance!r}; valid: {', '.join(COVARIANCES)}")
        for name in ("v_steps", "covariance_samples", "covariance_tokens", "rounds", "spread_layers"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("context_templates", self.context_templates, minimum=0)
        check_int("covariance_seed", self.covariance_seed, minimum=None)
        check_number("stop_prob", self.stop_prob, minimum=0.0, maximum=1.0, min_inclusive=False)
        for name in ("v_lr", "clamp_norm_factor", "covariance_ridge"):
            check_number(name, getattr(self, name), minimum=0.0, min_inclusive=False)
        for name in ("weight_decay", "kl_factor", "stop_loss", "lam"):
            check_number(name, getattr(self, name), minimum=0.0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- closed form


def rank_update(
    W: torch.Tensor, K: torch.Tensor, R: torch.Tensor, C: Optional[torch.Tensor] = None, lam: float = 0.0
) -> torch.Tensor:
    """The smallest change of ``W`` in the ``C`` metric that moves ``W K`` by ``R``: ``ΔW = R (KᵀC⁻¹K + λI)⁻¹ (C⁻¹K)ᵀ``.

    With ``λ = 0`` it solves ``min ‖ΔW C^{1/2}‖_F`` subject to ``ΔW K = R``,
    i.e. ROME's ``min ‖(W+ΔW) K₀ − W K₀‖`` s.t. ``(W+ΔW) k* = v*`` for
    ``C = K₀K₀ᵀ`` (arXiv 2202.05262, eq. 2; one column of ``K`` gives
    ``R (C⁻¹k)ᵀ / (kᵀC⁻¹k)``). With ``λ > 0`` it is MEMIT's
    ``R Kᵀ (λC + KKᵀ)⁻¹`` (arXiv 2210.07229, eq. 14).

    Args:
        W: ``[d, m]`` (only its shape and dtype are read).
        K: keys ``[m, n]``.
        R: residuals ``[d, n]``.
        C: ``[m, m]`` symmetric positive definite, or ``None`` for the identity.
        lam: ``λ >= 0``.

    Returns:
        ``ΔW`` ``[d, m]`` float32.

    Raises:
        UserError: shapes that do not fit.
    """
    d, m = W.shape
    if K.dim() != 2 or K.shape[0] != m or R.shape != (d, K.shape[1]):
        raise UserError(f"rank_update: W {tuple(W.shape)}, K {tuple(K.shape)} and R {tuple(R.shape)} do not fit")
    K64, R64 = K.double(), R.double()
    A = K64 if C is None else torch.linalg.solve(C.double(), K64)  # C⁻¹K [m, n]
    M = K64.T @ A + lam * torch.eye(K.shape[1], dtype=torch.float64)
    return (R64 @ torch.linalg.solve(M, A.T)).float()


# ----------------------------------------------------------------------------- subject position


def subject_last_index(tokenizer, text: str, subject: str, where: str = "edit") -> int:
    """Index (into ``tokenizer(text)["input_ids"]``) of the last token of the first occurrence of ``subject``.

    Raises:
        UserError: ``subject`` is empty or does not occur in ``text`` (case-sensitive,
            then case-insensitive), naming ``where``.
    """
    if not subject or not subject.strip():
        raise UserError(f"{where}: the rome method needs a non-empty 'subject' that occurs in the prompt")
    start = text.find(subject)
    if start < 0:
        start = text.casefold().find(subject.casefold())
    if start < 0:
        raise UserError(f"{where}: subject {subject!r} is not in {text!r}; give the subject as it is written there")
    end = start + len(subject)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets:
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if hits:
            return hits[-1]
    return len(tokenizer(text[:end])["input_ids"]) - 1


def _context_prefixes(model, tokenizer, n: int) -> list[str]:
    """ROME's context templates: ``""`` and ``n`` short model-generated texts ending in ``". "``."""
    if n <= 0:
        return [""]
    from neurodetox.metrics.sampling import greedy_generate

    starts = [TEXT_STARTS[i % len(TEXT_STARTS)] for i in range(n)]
    out = greedy_generate(model, tokenizer, starts, max_new_tokens=8, stop="none")
    pre = []
    for s, a in zip(starts, out.answers):
        t = (s + " " + a.strip()).replace("{", "").replace("}", "").split("\n")[0].strip()
        pre.append(t + ". ")
    return [""] + pre


# ----------------------------------------------------------------------------- value optimisation


@dataclass
class _Row:
    edit: int  # index into the batch's edits
    ids: list[int]
    lookup: int  # subject's last token
    targets: list[tuple[int, int]] = field(default_factory=list)  # (position whose logits predict, token)
    kl: bool = False
    first: bool = False  # the edit's own prompt, no prefix: v = W k read here


def _rows(tokenizer, edits: Sequence[Edit], prefixes: Sequence[str], use_paraphrases: bool) -> list[_Row]:
    rows: list[_Row] = []
    for n, e in enumerate(edits):
        phrasings = [e.prompt] + (list(e.paraphrases) if use_paraphrases else [])
        for k, text in enumerate(phrasings):
            where = e.where if k == 0 else f"{e.where} (paraphrase {k})"
            for j, pre in enumerate(prefixes):
                p_ids, t_ids = encode_pair(tokenizer, pre + text, e.target)
                look = subject_last_index(tokenizer, pre + text, e.subject or "", where)
                ids = p_ids + t_ids[:-1]
                tg = [(len(p_ids) - 1 + s, t) for s, t in enumerate(t_ids)]
                rows.append(_Row(n, ids, look, tg, first=(k == 0 and j == 0)))
        kl_text = f"{e.subject} is a"
        rows.append(
            _Row(n, tokenizer(kl_text)["input_ids"], subject_last_index(tokenizer, kl_text, e.subject), kl=True)
        )
    return rows


def _pad(rows: Sequence[_Row], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
    return ids, mask


def _batch(rows: Sequence[_Row], active: set, pad: int, device, n: int) -> dict[str, Any]:
    """Tensors of one forward over the rows of the ``active`` edits (edit ids stay global)."""
    sub = [r for r in rows if r.edit in active]
    ids, mask = _pad(sub, pad)
    B = len(sub)
    pos_rows, pos_idx, pos_tok = [], [], []
    for i, r in enumerate(sub):
        for p, t in r.targets:
            pos_rows.append(i)
            pos_idx.append(p)
            pos_tok.append(t)
    kl_rows = [i for i, r in enumerate(sub) if r.kl]
    row_edit = torch.tensor([r.edit for r in sub], device=device)
    tg_row = torch.tensor(pos_rows, device=device)
    rw_rows = torch.tensor([i for i, r in enumerate(sub) if not r.kl], device=device)
    return {
        "ids": ids.to(device),
        "mask": mask.to(device),
        "B": B,
        "ar": torch.arange(B, device=device),
        "look": torch.tensor([r.lookup for r in sub], device=device),
        "row_edit": row_edit,
        # logits only where a loss reads them: the target positions, then each KL row's subject position
        "g_rows": torch.tensor(pos_rows + kl_rows, device=device),
        "g_idx": torch.tensor(pos_idx + [sub[i].lookup for i in kl_rows], device=device),
        "n_tg": len(pos_rows),
        "tok": torch.tensor(pos_tok, device=device),
        "tg_row": tg_row,
        "row_ntok": torch.bincount(tg_row, minlength=B).clamp(min=1).float(),
        "rw_rows": rw_rows,
        "rows_per_edit": torch.bincount(row_edit[rw_rows], minlength=n).clamp(min=1).float(),
        "kl_edit": row_edit[torch.tensor(kl_rows, dtype=torch.long, device=device)],
        "first": [i for i, r in enumerate(sub) if r.first],
    }


def optimise_values(
    model, tokenizer, edits: Sequence[Edit], site, s: RomeSettings, prefixes: Sequence[str], use_paraphrases: bool
):
    """``(K [d_ff, n], δ [d, n], losses [n])``: mean keys and optimised value shifts of encoded ``edits``
    at ``site`` (from :func:`edit_site`), each phrasing also behind every prefix of ``prefixes``.

    Every edit has its own ``δ`` and loss, so optimising them in one batch is the same as one
    optimisation each (Adam is element-wise); an edit that meets its stopping rule is frozen and
    its rows leave the batch (ours; same result, fewer FLOPs).
    """
    device = model_device(model)
    rows = _rows(tokenizer, edits, prefixes, use_paraphrases)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(edits)
    cur = _batch(rows, set(range(n)), pad, device, n)
    head = base_model(model).get_output_embeddings()
    d = head.weight.shape[1]
    delta = torch.zeros(n, d, device=device, requires_grad=True)
    state: dict[str, Any] = {"keys": None, "init": None}

    def hook(module, args, output):
        b = cur
        inp, out = args[0], output
        inp3 = inp.reshape(b["B"], -1, inp.shape[-1])
        out3 = out.reshape(b["B"], -1, out.shape[-1])
        if state["keys"] is None:  # the first forward holds every row
            state["keys"] = inp3[b["ar"], b["look"]].detach().float()
            first = torch.tensor(b["first"], device=device)
            init = torch.zeros(n, out3.shape[-1], device=device)
            init[b["row_edit"][first]] = out3[first, b["look"][first]].detach().float()
            state["init"] = init
        add = torch.zeros_like(out3, dtype=torch.float32)
        add = add.index_put((b["ar"], b["look"]), delta[b["row_edit"]])
        return (out3.float() + add).to(out3.dtype).reshape(out.shape)

    def gather(module, args):
        return (args[0][cur["g_rows"], cur["g_idx"]][None],)

    opt = torch.optim.Adam([delta], lr=s.v_lr)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    kl_init: Optional[torch.Tensor] = None
    losses = torch.full((n,), float("nan"))
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    h1 = site.module.register_forward_hook(hook)
    h2 = head.register_forward_pre_hook(gather)
    try:
        for it in range(s.v_steps):
            b = cur
            opt.zero_grad()
            logits = model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            n_tg = b["n_tg"]
            nll_tok = -logp[torch.arange(n_tg, device=device), b["tok"]]
            nll_row = torch.zeros(b["B"], device=device).index_add(0, b["tg_row"], nll_tok) / b["row_ntok"]
            rw = b["rw_rows"]
            nll = torch.zeros(n, device=device).index_add(0, b["row_edit"][rw], nll_row[rw]) / b["rows_per_edit"]
            kl_lp = logp[n_tg:]
            if kl_init is None:
                kl_init = torch.zeros(n, kl_lp.shape[-1], device=device)
                kl_init[b["kl_edit"]] = kl_lp.detach()
            kl = (kl_lp.exp() * (kl_lp - kl_init[b["kl_edit"]])).sum(-1)  # KL(current ‖ initial)
            kl_edit = torch.zeros(n, device=device).index_add(0, b["kl_edit"], kl)
            init_norm = state["init"].norm(dim=-1).clamp(min=1e-12)
            wd = s.weight_decay * delta.norm(dim=-1) / init_norm**2
            loss = nll + s.kl_factor * kl_edit + wd
            active = torch.zeros(n, dtype=torch.bool, device=device)
            active[b["row_edit"]] = True
            losses = torch.where(active.cpu(), loss.detach().cpu(), losses)
            # every target token of the edit at probability >= stop_prob (a token below counts 1)
            low = (nll_tok.detach() > -math.log(s.stop_prob)).float()
            low_edit = torch.zeros(n, device=device).index_add(0, b["row_edit"][b["tg_row"]], low)
            now = active & ((loss.detach() < s.stop_loss) | ((low_edit == 0) & (s.stop_prob < 1.0)))
            done = done | now
            logger.debug(
                "value step %d: %d/%d edits done, mean loss %.3g", it, int(done.sum()), n, float(loss.detach().mean())
            )
            if bool(done.all()) or it == s.v_steps - 1:
                break
            keep = delta.detach().clone()
            (loss * (active & ~done).float()).sum().backward()
            opt.step()
            with torch.no_grad():
                delta[done] = keep[done]
                limit = s.clamp_norm_factor * init_norm
                norm = delta.norm(dim=-1)
                scale = torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm))
                delta.mul_(scale[:, None])
            if bool(now.any()):  # the frozen edits leave the batch
                cur = _batch(rows, set((~done).nonzero().flatten().tolist()), pad, device, n)
    finally:
        h1.remove()
        h2.remove()
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    keys = state["keys"]  # [rows, d_ff], in the order of ``rows``
    rw_all = [i for i, r in enumerate(rows) if not r.kl]
    edit_of = torch.tensor([rows[i].edit for i in rw_all])
    return _per_edit_mean(keys[rw_all].cpu(), edit_of, n).T, delta.detach().T.cpu(), losses


@torch.no_grad()
def layer_keys(
    model, tokenizer, edits: Sequence[Edit], key_site, z_site, prefixes: Sequence[str], use_paraphrases: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K [d_ff, n], Z [d, n])``: the key at ``key_site`` (an ``mlp`` site) and the hidden state
    ``z_site`` (a ``residual`` site) outputs, at the subject's last token, each averaged over the
    edit's phrasings (each behind each prefix), as :func:`optimise_values` averages its keys."""
    from neurodetox.core.sites import register_site_hook

    device = model_device(model)
    rows = [r for r in _rows(tokenizer, edits, prefixes, use_paraphrases) if not r.kl]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = _pad(rows, pad)
    look = torch.tensor([r.lookup for r in rows])
    ar = torch.arange(len(rows))
    got: dict[str, torch.Tensor] = {}

    def grab(name):
        def fn(act):
            got[name] = act[ar.to(act.device), look.to(act.device)].detach().float().cpu()

        return fn

    handles = [register_site_hook(key_site, grab("k"), observer=True), register_site_hook(z_site, grab("z"))]
    try:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    edit_of = torch.tensor([r.edit for r in rows])
    return _per_edit_mean(got["k"], edit_of, len(edits)).T, _per_edit_mean(got["z"], edit_of, len(edits)).T


def _per_edit_mean(x: torch.Tensor, edit_of: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows ``x`` ``[rows, d]`` per edit (``edit_of`` ``[rows]``): ``[n, d]``."""
    out = torch.zeros(n, x.shape[1]).index_add(0, edit_of, x)
    return out / torch.bincount(edit_of, minlength=n).clamp(min=1)[:, None].float()


# ----------------------------------------------------------------------------- the editor


def _variants(edit: Edit, use_paraphrases: bool) -> list[Edit]:
    return list(edit.variants or [edit]) if use_paraphrases else [edit]


def _failing(model, edits: Sequence[Edit], use_paraphrases: bool) -> list[bool]:
    flat = [(n, v) for n, e in enumerate(edits) for v in _variants(e, use_paraphrases)]
    flags = still_failing(model, [v for _, v in flat]) if flat else []
    out = [False] * len(edits)
    for (n, _), f in zip(flat, flags):
        out[n] = out[n] or f
    return out


def check_edit_layer(model: nn.Module, s: RomeSettings) -> None:
    """Refuse an ``edit_layer`` the model does not have.

    Raises:
        UserError: naming the value, the valid range and the flags to give.
    """
    blocks = num_layers(model)
    if not -blocks <= s.edit_layer < blocks:
        raise UserError(
            f"edit_layer {s.edit_layer} is out of range: the model has {blocks} blocks (valid {-blocks}..{blocks - 1}); "
            f"the default ({RomeSettings.edit_layer}, with spread_layers {RomeSettings.spread_layers}) is MEMIT's "
            "for models of 16 to 32 blocks, so give --edit_layer (and --spread_layers) for this one"
        )


def _write_update(
    model, tokenizer, batch, K, R, s, layers, sites, z_site, touched, storage, covs, fixed_keys, prefixes,
    use_paraphrases,
) -> dict[int, torch.Tensor]:  # fmt: skip
    """Write one round's update into the model; return each layer's keys of ``batch`` (``{layer: [d_ff, n]}``).

    One block (ROME): ``ΔW`` maps the keys ``K`` (from :func:`optimise_values`) to their values plus ``R``.
    Several (MEMIT): block by block, lowest first, the residual still missing at ``edit_layer``'s output
    (``R`` minus how far the hidden state at the subject's last token has already moved, averaged over the
    phrasings) divided by the number of blocks left, mapped from the block's current keys.
    """
    keys: dict[int, torch.Tensor] = {}
    z0: Optional[torch.Tensor] = None
    for j, layer in enumerate(layers):
        if len(layers) == 1:
            Kl, resid = K, R
        else:
            Kl, z = layer_keys(model, tokenizer, batch, sites[layer], z_site, prefixes, use_paraphrases)
            z0 = z if z0 is None else z0
            resid = (R - (z - z0)) / (len(layers) - j)  # what the hidden state still has to move
        keys[layer] = Kl
        if fixed_keys[layer]:  # hold the fixed edits' keys where they are
            Kf = torch.stack(fixed_keys[layer], dim=1)
            Kl = torch.cat([Kl, Kf], dim=1)
            resid = torch.cat([resid, torch.zeros(resid.shape[0], Kf.shape[1])], dim=1)
        weight, axis, _, _ = touched[layer]
        W = weight.detach().float().cpu()
        W2 = W if axis == 1 else W.T  # [d, d_ff]
        new = W2 + rank_update(W2, Kl, resid, covs[layer], s.lam)
        with torch.no_grad():
            weight.copy_((new if axis == 1 else new.T).to(storage[layer]).to(weight.device, weight.dtype))
    return keys


def edit_rank_one(
    model: nn.Module,
    tokenizer,
    edits: Sequence[Union[Edit, dict]],
    settings: Optional[RomeSettings] = None,
    *,
    show_progress: bool = True,
    base: Optional[dict[str, Any]] = None,
    use_paraphrases: bool = True,
    storage_dtype: Optional[Union[str, torch.dtype]] = None,
    covariance_cache: Optional[Union[str, os.PathLike]] = None,
) -> tuple[PatchSet, RepairReport]:
    """Edit ``edits`` into one FFN output projection by ROME/MEMIT rank-one updates; return the patch.

    The model is changed during the call and restored before it returns.

    Args:
        model: a transformers causal LM known to :mod:`neurodetox.core.sites`.
        tokenizer: its tokenizer (fast tokenizers give the subject position from character offsets).
        edits: :class:`~neurodetox.patching.failures.Edit` objects or dicts with ``prompt``,
            ``target`` and ``subject`` (a substring of the prompt and of every paraphrase),
            optional ``paraphrases``, ``eval_paraphrases``, ``aliases``, ``fact_id``.
        settings: :class:`RomeSettings` (defaults if ``None``).
        show_progress: print one line per round.
        base: base-checkpoint identity for the manifest.
        use_paraphrases: optimise every edit's ``paraphrases`` with its prompt and count it
            fixed only when all are. Default True.
        storage_dtype: dtype the new weights are rounded to (a name of
            :data:`neurodetox.core.checks.DTYPES` or a torch dtype) or ``None`` (the weight's own),
            so what is verified is what will be written.
        covariance_cache: a folder that keeps the key covariances (``covariance="model_text"``)
            between runs (see :func:`key_covariances`); ``None`` (default) keeps them in memory only.

    Returns:
        ``(patch, report)``: a :class:`~neurodetox.patching.patchfile.PatchSet` (one tensor, the
        changed columns of the edited projection with their float32 originals; empty when nothing
        needed fixing) and a :class:`~neurodetox.patching.mint.results.RepairReport` whose edits are
        ``"fixed"`` (every phrasing's target is the teacher-forced argmax), ``"skipped"`` or
        ``"nothing_to_fix"``.

    Raises:
        UserError: bad settings; an edit without a subject, or whose subject is not in its prompt or a
            paraphrase; bad phrasings or one prompt with two targets (naming the edits file's line).
    """
    s = settings or RomeSettings()
    s.validate()
    if storage_dtype is not None and str(storage_dtype).lower().removeprefix("torch.") not in DTYPES:
        raise UserError(f"unknown storage_dtype {storage_dtype!r}; valid: {', '.join(DTYPES)} or None")
    storage_req = None if storage_dtype is None else resolve_dtype(str(storage_dtype).removeprefix("torch."))
    edits = [encode_edit(tokenizer, e) for e in coerce_edits(edits)]
    for e in edits:
        if not e.subject:
            raise UserError(
                f"{e.where}: the rome method needs a 'subject' (the entity in the prompt whose fact changes)"
            )
        for k, text in enumerate([e.prompt] + (e.paraphrases if use_paraphrases else [])):
            subject_last_index(tokenizer, text, e.subject, e.where if k == 0 else f"{e.where} (paraphrase {k})")
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    check_edit_layer(model, s)
    site = edit_site(model, s.edit_layer)
    first = site.layer - s.spread_layers + 1
    if first < 0:
        raise UserError(
            f"spread_layers {s.spread_layers} reaches below block 0 from edit_layer {site.layer}; "
            f"valid: 1 to {site.layer + 1}"
        )
    layers = list(range(first, site.layer + 1))
    sites = {layer: edit_site(model, layer) for layer in layers}
    z_site = resolve_sites(model, "residual", [site.layer])[0]
    names = {id(p): nm for nm, p in model.named_parameters()}
    touched: dict[int, tuple[nn.Parameter, int, str, torch.Tensor]] = {}
    for layer, st in sites.items():
        weight, axis = value_vector_parameter(st)
        if id(weight) not in names:
            raise UserError(f"the FFN output projection of layer {layer} is not a named parameter of the model")
        touched[layer] = (weight, axis, names[id(weight)], weight.detach().clone())
    storage = {layer: storage_req or w.dtype for layer, (w, _, _, _) in touched.items()}
    results = [EditResult(i, e, "skipped") for i, e in enumerate(edits)]
    final: dict[int, torch.Tensor] = {}
    try:
        failing = _failing(model, edits, use_paraphrases)
        for r, f in zip(results, failing):
            if not f:
                r.status, r.message = "nothing_to_fix", "the model already produces the target for every phrasing"
        todo = [i for i, f in enumerate(failing) if f]
        covs: dict[int, Optional[torch.Tensor]] = dict.fromkeys(layers)
        if todo and s.covariance == "model_text":
            covs.update(key_covariances(model, tokenizer, layers, s, covariance_cache, show_progress))
        prefixes = _context_prefixes(model, tokenizer, s.context_templates) if todo else [""]
        fixed_keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        groups = [[i] for i in todo] if s.edit_mode == "sequential" else [todo]
        for group in groups:
            pending = list(group)
            for rnd in range(s.rounds):
                if not pending:
                    break
                t1 = time.perf_counter()
                batch = [edits[i] for i in pending]
                K, R, losses = optimise_values(model, tokenizer, batch, site, s, prefixes, use_paraphrases)
                round_keys = _write_update(
                    model, tokenizer, batch, K, R, s, layers, sites, z_site, touched, storage, covs, fixed_keys,
                    prefixes, use_paraphrases,
                )  # fmt: skip
                still = _failing(model, batch, use_paraphrases)
                spent = time.perf_counter() - t1
                nxt = []
                for j, (i, f) in enumerate(zip(pending, still)):
                    results[i].seconds += spent / len(pending)
                    results[i].attempts = rnd + 1
                    results[i].message = f"value loss {float(losses[j]):.3g}"
                    if f:
                        nxt.append(i)
                    else:
                        results[i].status = "fixed"
                        for layer in layers:
                            fixed_keys[layer].append(round_keys[layer][:, j])
                if show_progress:
                    print(
                        f"rank-one edit: round {rnd + 1}, {len(pending) - len(nxt)}/{len(pending)} fixed "
                        f"({spent:.1f}s)",
                        flush=True,
                    )
                pending = nxt
        # an earlier edit a later update broke counts as not fixed
        fixed = [r for r in results if r.status == "fixed"]
        for r, f in zip(fixed, _failing(model, [r.edit for r in fixed], use_paraphrases)):
            if f:
                r.status, r.message = "broken", "broken by a later update"
        final = {layer: w.detach().clone() for layer, (w, _, _, _) in touched.items()}
    finally:
        with torch.no_grad():
            for w, _, _, orig in touched.values():
                w.copy_(orig)
        model.train(was)
    report = RepairReport(results, s, seconds=time.perf_counter() - t0)  # type: ignore[arg-type]
    params: list[ParamPatch] = []
    for layer, (_w, axis, name, orig) in touched.items():
        orig_cols = orig.float().cpu()
        new_cols = final[layer].float().cpu() if layer in final else orig_cols
        changed = (orig_cols != new_cols).any(dim=1 - axis).nonzero().flatten()
        if changed.numel():
            params.append(
                ParamPatch(
                    name=name,
                    axis=axis,
                    indices=changed,
                    original=orig_cols.index_select(axis, changed),
                    new=new_cols.index_select(axis, changed),
                    layer=layer,
                )
            )
    report.cast_error = max((p.cast_error(storage[p.layer]) for p in params), default=0.0)
    patch = PatchSet(params, _manifest(model, report, base, s))
    patch.manifest["settings"].update(
        {"use_paraphrases": use_paraphrases, "storage_dtype": None if storage_req is None else str(storage_req)}
    )
    if params:
        full = {name: orig.detach().cpu() for _, _, name, orig in touched.values()}
        patch.set_hashes({k: v.to(storage_req) if storage_req is not None else v for k, v in full.items()})
    return patch, report


def _manifest(model: nn.Module, report: RepairReport, base: Optional[dict[str, Any]], s: RomeSettings) -> dict:
    from datetime import datetime, timezone

    cfg = getattr(base_model(model), "config", None)
    ident = {
        "name_or_path": getattr(cfg, "_name_or_path", None),
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }
    if base:
        ident.update(base)
    summary = report.summary()
    summary["seconds_per_fix"] = round(report.seconds / max(1, len(report.needing_fix)), 3)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": {
            "name": (
                f"MEMIT, {s.spread_layers} blocks"
                if s.spread_layers > 1
                else "ROME"
                if len(report.edits) == 1 or s.edit_mode == "sequential"
                else "ROME (MEMIT-style batch)"
            ),
            "paper": "Meng et al., Locating and Editing Factual Associations in GPT, arXiv 2202.05262; "
            "Mass-Editing Memory in a Transformer, arXiv 2210.07229",
        },
        "base": ident,
        "settings": s.to_json(),
        "summary": summary,
        "edits": [e.to_json() for e in report.edits],
        "neurons": [],
    }
