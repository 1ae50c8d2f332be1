"""Samples → embeddings: sample K answers per prompt and embed each one.

This produces what EigenScore needs (Chen et al., "INSIDE: LLMs' Internal
States Retain the Power of Hallucination Detection", ICLR 2024,
arXiv 2402.03744; ``docs/methods.md`` §2): for every prompt, ``K``
sampled answers (paper: ``K = 10``, temperature 0.5, top-p 0.99, top-k 10 as in
the authors' code) and, for each answer, the hidden state of the **middle
layer** at the answer's **last generated real token**, plus the greedy answer
whose correctness is the evaluation label.

The answer boundary. Every answer, greedy and sampled, ends at the first EOS or
stop token: by default INSIDE's boundary (its code adds the ids of ``"\n"``,
``","`` and ``"."`` to ``eos_token_id``; here every token whose text starts with
a line break, and the ``.`` and ``,`` tokens, from
:func:`neurodetox.metrics.boundary.stop_token_ids`). The answer is the text
before the stop and "last real token" below means the last token before it;
``stop="none"`` restores answers that run to EOS or the token cap.

How the embedding is captured. One observer hook (``neurodetox.core.sites``) sits on
the output of the chosen decoder block while ``model.generate`` runs. At
decoding step ``s`` the model processes the token generated at step ``s − 1``,
so the hook's ``activation[:, -1]`` at step ``s`` is the embedding of generated
token ``s − 1`` (at the prefill step: of the last prompt token; prompts are
left-padded). The final generated token is never fed back by ``generate``, so
when some sample's last real token is the final one, ONE extra single-token
forward over the final tokens is run with the returned KV cache (extended
attention mask, ``position_ids = #real tokens − 1``). If the cache cannot be
used that way (no cache returned, a cache of unexpected length, a chunked
prefill, or the extra step fails) a single full forward over the
``[B·K, prompt + generation]`` sequences is run instead. Either way the
embedding equals that of a plain forward over ``prompt + answer`` at the
answer's last real token (EOS and padding after it excluded; an answer with
no real token is embedded at the last prompt token).

Options beyond the paper's defaults:

* ``pooling="mean"``: the mean over the answer's real generated tokens of the
  same layer (read from the same per-step hook records; no extra pass).
* feature clipping (:class:`FeatureClipper`, INSIDE §3.2 "test time feature
  clipping", absent from the authors' code): each feature of the penultimate
  block's output is clamped, during generation, to its
  ``[p, 100 − p]`` percentiles (``p = 0.2``) over a FIFO memory bank of the most
  recent ``3000`` real-token activations.
* ``return_logprobs=True``: natural-log probabilities of every scored token
  under the model's raw next-token distribution (temperature 1, no top-k /
  top-p), taken from ``generate(output_logits=True)`` — the logits generate
  computes anyway — with no extra forward pass. Scored tokens are the answer's
  real tokens plus the EOS or stop token that ended it, if any.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from neurodetox.core.checks import check_int, check_number, model_device
from neurodetox.core.errors import UserError
from neurodetox.core.sites import LayerSpec, base_model, register_site_hook, resolve_sites
from neurodetox.metrics.boundary import stop_token_ids
from neurodetox.metrics.clipping import FeatureClipper
from neurodetox.metrics.settings import DEFAULTS, POOLINGS

__all__ = [
    "GreedyAnswers",
    "SampledAnswers",
    "FeatureClipper",
    "eos_token_ids",
    "generation_mode",
    "sample_answers",
    "greedy_answers",
    "greedy_generate",
    "POOLINGS",
]


@dataclass
class SampledAnswers:
    """Sampled answers and their embeddings for a list of prompts.

    Attributes:
        prompts: the ``P`` prompts, in input order.
        greedy: the greedy answer of each prompt (``P`` strings); an empty list
            when sampling ran with ``greedy=False``.
        samples: ``P`` lists of ``K`` sampled answers (special tokens removed,
            cut at the first EOS).
        embeddings: float32 CPU tensor ``[P, K, d]``: the hidden state output by
            decoder block ``layer`` at each sample's last generated real token
            (``d`` = hidden size). Feed it to
            :func:`neurodetox.metrics.eigenscore`.
        layer: the 0-based decoder block index whose output was read
            (``hidden_states[layer + 1]`` in Hugging Face numbering).
        pooling: ``"last"`` (last generated real token) or ``"mean"`` (mean
            over the answer's real generated tokens).
        feature_clip: whether feature clipping was active while sampling.
        greedy_logprobs: with ``return_logprobs``: per prompt, the log-prob
            (nats) of each scored token of the greedy answer (its real tokens,
            then the EOS that ended it, if any); else ``[]``.
        sample_logprobs: with ``return_logprobs``: ``P`` lists of ``K`` such
            lists for the samples; else ``[]``.
        greedy_lengths: real tokens per greedy answer (EOS excluded).
        sample_lengths: ``P`` lists of ``K`` real-token counts.
        greedy_features: with ``feature_layer``: float32 ``[P, 2, d]``, block
            ``feature_layer``'s output at the last prompt token and at the greedy answer's
            last real token (the hidden-state probe's input); else ``None``.
        feature_layer: the block of ``greedy_features`` (``None`` without them).
        stop_ids: the stop token ids added to EOS (``[]`` with ``stop="none"``).
        _extra: diagnostics, not part of the stable API
            (``{"embedding_paths": [...]}``: ``"hook"``, ``"hook+extra_step"``
            or ``"full_forward"``, how the embeddings were read; ``"seconds"``:
            wall time of the greedy generation (features included), of the
            feature forwards alone, and of the sampled generation).
    """

    prompts: list[str]
    greedy: list[str]
    samples: list[list[str]]
    embeddings: torch.Tensor
    layer: int
    _extra: dict = field(default_factory=dict, repr=False)
    pooling: str = "last"
    feature_clip: bool = False
    greedy_logprobs: list = field(default_factory=list, repr=False)
    sample_logprobs: list = field(default_factory=list, repr=False)
    greedy_lengths: list = field(default_factory=list, repr=False)
    sample_lengths: list = field(default_factory=list, repr=False)
    greedy_features: Optional[torch.Tensor] = field(default=None, repr=False)
    feature_layer: Optional[int] = None
    stop_ids: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.prompts)


# ----------------------------------------------------------------------------- helpers


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.flatten().tolist()]
    if isinstance(x, (list, tuple, set)):
        return [int(v) for v in x]
    return [int(x)]


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS ids ``generate`` stops on: the model's ``generation_config.eos_token_id``, else the tokenizer's.

    Returns:
        Sorted, deduplicated ids (empty when neither defines one).
    """
    gc = getattr(model, "generation_config", None)
    ids = _as_list(getattr(gc, "eos_token_id", None)) if gc is not None else []
    if not ids:
        ids = _as_list(getattr(tokenizer, "eos_token_id", None))
    return sorted(set(ids))


def _max_context(model: nn.Module) -> Optional[int]:
    cfg = getattr(base_model(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string; wrap it: [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, expected str")
    return prompts


def _check_lengths(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int) -> None:
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenises to zero tokens")
    ctx = _max_context(model)
    if ctx is None:
        return
    limit = ctx - max_new_tokens
    for i, n in enumerate(lengths):
        if n > limit:
            raise ValueError(
                f"prompt {i} is {n} tokens long, but the model's context is {ctx} tokens and "
                f"max_new_tokens={max_new_tokens}, so prompts may have at most {limit} tokens"
            )


@contextlib.contextmanager
def generation_mode(model: nn.Module, tokenizer) -> Iterator[None]:
    """Context for batched generation: ``eval()``, ``torch.no_grad()``, left padding and a pad token.

    The training mode of every submodule and the tokenizer's padding side / pad token are
    restored on exit. Without a pad token the EOS token pads.

    Raises:
        ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    modes = [(m, m.training) for m in model.modules()]
    side = getattr(tokenizer, "padding_side", None)
    set_pad = False
    if getattr(tokenizer, "pad_token_id", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
        set_pad = True
    try:
        tokenizer.padding_side = "left"
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        if side is not None:
            tokenizer.padding_side = side
        if set_pad:
            tokenizer.pad_token = None


def _real_lengths(gen: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Number of real generated tokens per row: tokens before the first EOS or stop token."""
    n = gen.shape[1]
    if not eos_ids or n == 0:
        return torch.full((gen.shape[0],), n, dtype=torch.long, device=gen.device)
    is_eos = torch.isin(gen, torch.tensor(eos_ids, device=gen.device))
    first = torch.argmax(is_eos.to(torch.int8), dim=1)
    return torch.where(is_eos.any(dim=1), first, torch.full_like(first, n))


def _decode(tokenizer, gen: torch.Tensor, n_real: torch.Tensor) -> list[str]:
    return [tokenizer.decode(gen[i, : int(n_real[i])].tolist(), skip_special_tokens=True) for i in range(gen.shape[0])]


def _token_logprobs(logits_steps, gen: torch.Tensor, n_real: torch.Tensor) -> list[list[float]]:
    """Log-probs of the scored tokens (real tokens + the ending EOS) from raw per-step logits."""
    rows, n = gen.shape
    if n == 0 or not logits_steps:
        return [[] for _ in range(rows)]
    lp = torch.empty(rows, n, dtype=torch.float64)
    for s, lg in enumerate(logits_steps[:n]):
        lg = lg.to(torch.float32)
        lp[:, s] = (
            (lg.gather(1, gen[:, s : s + 1].to(lg.device)).squeeze(1) - torch.logsumexp(lg, dim=-1)).double().cpu()
        )
    n_scored = torch.where(n_real < n, n_real + 1, n_real).tolist()
    return [lp[r, : n_scored[r]].tolist() for r in range(rows)]


def _answer_features(model, site, seqs, prompt_mask, t_prompt: int, n_real: torch.Tensor) -> torch.Tensor:
    """Block ``site``'s output at the last prompt token and the last real answer token, ``[rows, 2, d]``.

    One forward over ``prompt + generation`` (tokens after the stop cannot change earlier
    positions: the model is causal). An answer with no real token uses the last prompt token twice.
    """
    n = seqs.shape[1] - t_prompt
    mask = torch.cat([prompt_mask, torch.ones(seqs.shape[0], n, dtype=prompt_mask.dtype, device=prompt_mask.device)], 1)
    pos = (mask.long().cumsum(dim=1) - 1).clamp_min(0)
    seen: list = []

    def hook(act: torch.Tensor):
        seen.append(act.detach().to(torch.float32))
        return None

    handle = register_site_hook(site, hook, observer=True)
    try:
        model(input_ids=seqs, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        handle.remove()
    h = seen[-1]
    rows = torch.arange(h.shape[0], device=h.device)
    last_answer = t_prompt - 1 + n_real.to(h.device)
    return torch.stack([h[rows, t_prompt - 1], h[rows, last_answer]], dim=1).cpu()


def _greedy_batch(
    model,
    tokenizer,
    batch: list[str],
    max_new_tokens: int,
    eos_ids: list[int],
    want_logprobs: bool = False,
    detail: bool = False,
    feature_site=None,
):
    """Greedy answers of one batch; ``eos_ids`` holds EOS and the stop ids.

    Returns the answers, or with ``detail`` ``(answers, logprobs or None, n_real list, features or None,
    seconds of the feature forward)``."""
    enc = tokenizer(batch, return_tensors="pt", padding=True).to(model_device(model))
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids or None,
        **({"return_dict_in_generate": True, "output_logits": True} if want_logprobs else {}),
    )
    seqs = out.sequences if hasattr(out, "sequences") else out
    t_prompt = enc["input_ids"].shape[1]
    gen = seqs[:, t_prompt:]
    n_real = _real_lengths(gen, eos_ids)
    answers = _decode(tokenizer, gen, n_real)
    if not detail:
        return answers
    lps = _token_logprobs(getattr(out, "logits", None) or (), gen, n_real) if want_logprobs else None
    feats = None
    t0 = time.perf_counter()
    if feature_site is not None:
        feats = _answer_features(model, feature_site, seqs, enc["attention_mask"], t_prompt, n_real)
    return answers, lps, n_real.tolist(), feats, time.perf_counter() - t0


def _output_fields(out) -> set:
    """Field names of a ``ModelOutput`` dataclass (set or not)."""
    return set(getattr(type(out), "__dataclass_fields__", {}))


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _pool(stacked: torch.Tensor, n_real: torch.Tensor, pooling: str) -> torch.Tensor:
    """``stacked [n + 1, rows, d]``: entry 0 = last prompt token, entry s = generated token s − 1."""
    rows = torch.arange(stacked.shape[1], device=stacked.device)
    idx = n_real.to(stacked.device)
    if pooling == "last":
        return stacked[idx, rows]
    # mean over generated real tokens = entries 1..n_real (entry 0 when n_real = 0)
    csum = stacked[1:].cumsum(dim=0)  # csum[j] = sum of entries 1..j+1
    safe = (idx - 1).clamp_min(0)
    mean = csum[safe, rows] / idx.clamp_min(1).unsqueeze(1).to(stacked.dtype)
    return torch.where((idx > 0).unsqueeze(1), mean, stacked[0, rows])


def lockstep_forwards() -> bool:
    """True when every rank must run the same forwards: DeepSpeed ZeRO-3 with more than one process.

    Under ZeRO-3 each forward all-gathers the partitioned parameters, so a
    forward that runs on one rank only hangs the others.
    """
    from neurodetox.core.distributed import is_distributed, world_size, zero3_enabled

    return is_distributed() and world_size() > 1 and zero3_enabled()


def _sample_batch(
    model,
    tokenizer,
    site,
    batch,
    *,
    k,
    temperature,
    top_p,
    top_k,
    max_new_tokens,
    eos_ids,
    pooling="last",
    want_logprobs=False,
    clipper=None,
    special_ids=(),
):
    """Sample K answers for each prompt of ``batch``.

    Returns ``(answers, embeddings [B*K, d], path, logprobs or None, n_real list)``."""
    device = model_device(model)
    enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    t_prompt = ids.shape[1]

    record: dict = {"full": False, "steps": []}

    def hook(act: torch.Tensor):
        if record["full"]:
            record["steps"].append(act.detach().to(torch.float32))
        else:
            record["steps"].append((int(act.shape[1]), act[:, -1, :].detach().to(torch.float32).clone()))
        return None

    clip_ctx = clipper.attached(model, special_ids) if clipper is not None else contextlib.nullcontext()
    with clip_ctx:
        handle = register_site_hook(site, hook, observer=True)
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                num_return_sequences=k,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_ids or None,
                return_dict_in_generate=True,
                output_logits=bool(want_logprobs),
                use_cache=True,
            )
            seqs = out.sequences  # [B*K, T + n], rows grouped by prompt
            n = seqs.shape[1] - t_prompt
            gen = seqs[:, t_prompt:]
            n_real = _real_lengths(gen, eos_ids)
            bk = seqs.shape[0]
            full_mask = torch.cat(
                [mask.repeat_interleave(k, dim=0), torch.ones(bk, n, dtype=mask.dtype, device=mask.device)], dim=1
            )
            logprobs = _token_logprobs(getattr(out, "logits", None) or (), gen, n_real) if want_logprobs else None

            steps = record["steps"]
            # Step s recorded the embedding of generated token s-1 (s=0: last prompt token).
            ok = (
                n >= 1
                and len(steps) == n
                and steps[0][0] == t_prompt
                and all(s[0] == 1 for s in steps[1:])
                and all(s[1].shape[0] == bk for s in steps)
            )
            path = "hook"
            emb = None
            # Under ZeRO-3 on several ranks every forward is a collective (parameters are gathered), so
            # all ranks must run the same number of forwards: whether the extra cached step is needed
            # depends on this rank's samples, so take the one fixed path instead (one full forward).
            if ok and lockstep_forwards():
                ok = False
            if ok:
                table = [s[1] for s in steps]
                if bool((n_real == n).any()):
                    # transformers 5 names the cache `cache` (`past_key_values` is a deprecated alias)
                    cache = out.cache if "cache" in _output_fields(out) else getattr(out, "past_key_values", None)
                    ok = False
                    if cache is not None and hasattr(cache, "get_seq_length"):
                        try:
                            cache_len = int(cache.get_seq_length())
                        except Exception:
                            cache_len = -1
                        if cache_len == t_prompt + n - 1:
                            record["steps"] = []
                            kwargs = dict(
                                input_ids=seqs[:, -1:],
                                attention_mask=full_mask,
                                position_ids=(full_mask.sum(dim=1, keepdim=True) - 1).long(),
                                use_cache=True,
                            )
                            # the name generate returned the cache under is the one forward takes
                            kwargs["cache" if "cache" in _output_fields(out) else "past_key_values"] = cache
                            if _accepts(model, "cache_position"):
                                kwargs["cache_position"] = torch.tensor([t_prompt + n - 1], device=device)
                            try:
                                model(**kwargs)
                            except torch.cuda.OutOfMemoryError:
                                raise
                            except (TypeError, ValueError, RuntimeError, IndexError, AttributeError):
                                ok = False
                            else:
                                extra = record["steps"]
                                ok = len(extra) == 1 and extra[0][0] == 1 and extra[0][1].shape[0] == bk
                            if ok:
                                table.append(extra[0][1])
                                path = "hook+extra_step"
                if ok:
                    if len(table) == n:  # no sample needs the final token
                        table.append(torch.full_like(table[0], float("nan")))
                    stacked = torch.stack(table, dim=0)  # [n + 1, B*K, d]
                    emb = _pool(stacked, n_real, pooling)
            if emb is None:
                # Fallback: one full forward over prompt + generation (the bank is not fed again).
                record["full"] = True
                record["steps"] = []
                if clipper is not None:
                    clipper.collect = False
                try:
                    pos = (full_mask.long().cumsum(dim=1) - 1).clamp_min(0)
                    model(input_ids=seqs, attention_mask=full_mask, position_ids=pos, use_cache=False)
                finally:
                    if clipper is not None:
                        clipper.collect = True
                if len(record["steps"]) != 1:
                    raise RuntimeError(
                        f"expected one forward through {site.module_name} in the embedding pass, saw {len(record['steps'])}"
                    )
                hidden = record["steps"][0]  # [B*K, T + n, d]
                rows = torch.arange(bk, device=hidden.device)
                if pooling == "last":
                    emb = hidden[rows, t_prompt + n_real - 1]
                else:
                    gen_h = hidden[:, t_prompt - 1 :]  # entry 0 = last prompt token, entry s = gen token s-1
                    emb = _pool(gen_h.transpose(0, 1), n_real, pooling)
                path = "full_forward"
        finally:
            handle.remove()
    answers = _decode(tokenizer, gen, n_real)
    return answers, emb.to("cpu", torch.float32), path, logprobs, n_real.tolist()


# ----------------------------------------------------------------------------- public API


def _single_site(model, layer: LayerSpec, what: str):
    sites = resolve_sites(model, "residual", layer)
    if len(sites) != 1:
        raise UserError(
            f"{what} must name exactly one decoder block, got {layer!r} -> blocks {[s.layer for s in sites]}"
        )
    return sites[0]


@dataclass
class GreedyAnswers:
    """Greedy answers with what the detectors read from them.

    Attributes:
        answers: ``P`` answer strings, cut before the first EOS or stop token.
        lengths: real tokens per answer (the stop / EOS excluded).
        logprobs: with ``return_logprobs``: per answer, the natural-log probability of each
            scored token (its real tokens, then the stop or EOS that ended it, if any); else ``[]``.
        features: with ``feature_layer``: float32 CPU tensor ``[P, 2, d]``, the output of that
            block at the last prompt token (``[:, 0]``) and at the answer's last real token
            (``[:, 1]``; the last prompt token for an empty answer); else ``None``.
        feature_layer: the 0-based block the features come from (``None`` without features).
        stop_ids: the stop token ids added to EOS.
    """

    answers: list[str]
    lengths: list[int]
    logprobs: list = field(default_factory=list, repr=False)
    features: Optional[torch.Tensor] = field(default=None, repr=False)
    feature_layer: Optional[int] = None
    stop_ids: list = field(default_factory=list, repr=False)


def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    batch_size: int = 16,
    stop=DEFAULTS.stop,
    feature_layer: Optional[LayerSpec] = None,
    return_logprobs: bool = False,
    show_progress: bool = False,
) -> GreedyAnswers:
    """Greedy (``do_sample=False``) answers, cut at INSIDE's answer boundary by default.

    Prompts are left-padded in batches; generation stops at EOS or at a stop token
    (:func:`neurodetox.metrics.boundary.stop_token_ids`, added to ``eos_token_id``) and the answer
    is the text before it, decoded with ``skip_special_tokens=True``. The model runs in
    ``eval()`` mode under ``torch.no_grad()``; its training mode and the tokenizer's padding
    side / pad token are restored afterwards.

    Args:
        model: a transformers causal LM (PEFT-wrapped allowed).
        tokenizer: its tokenizer; without a pad token the EOS token pads.
        prompts: ``P`` prompt strings.
        max_new_tokens: most tokens generated per answer (default from
            :class:`~neurodetox.metrics.settings.EigenScoreSettings`).
        batch_size: prompts per ``generate`` call. Default 16.
        stop: ``"inside"`` (default), ``"none"`` or user stop strings (see
            :func:`~neurodetox.metrics.settings.parse_stop`).
        feature_layer: if given, one block whose output is read at the last prompt token and the
            last answer token (one extra forward per batch) for the hidden-state probe.
        return_logprobs: also return the scored tokens' log-probs (from the same ``generate``).
        show_progress: a tqdm bar over batches.

    Returns:
        :class:`GreedyAnswers`.

    Raises:
        ValueError: empty ``prompts``; bad ``max_new_tokens`` / ``batch_size``; a prompt longer
            than the model's context minus ``max_new_tokens``; a stop string that tokenises to
            nothing (:class:`~neurodetox.core.errors.UserError`); ``feature_layer`` not one block.
        TypeError: ``prompts`` is a single string or holds non-strings.
    """
    from tqdm.auto import tqdm

    prompts = _check_prompts(prompts)
    check_int("max_new_tokens", max_new_tokens)
    check_int("batch_size", batch_size)
    _check_lengths(model, tokenizer, prompts, max_new_tokens)
    site = _single_site(model, feature_layer, "feature_layer") if feature_layer is not None else None
    stops = stop_token_ids(tokenizer, stop)
    end_ids = sorted(set(eos_token_ids(model, tokenizer)) | set(stops))
    out = GreedyAnswers(answers=[], lengths=[], stop_ids=stops, feature_layer=site.layer if site else None)
    feats = []
    with generation_mode(model, tokenizer):
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="greedy answers", disable=not show_progress):
            a, lp, n, f, _ = _greedy_batch(
                model,
                tokenizer,
                prompts[start : start + batch_size],
                max_new_tokens,
                end_ids,
                want_logprobs=return_logprobs,
                detail=True,
                feature_site=site,
            )
            out.answers.extend(a)
            out.lengths.extend(n)
            if return_logprobs:
                out.logprobs.extend(lp)
            if f is not None:
                feats.append(f)
    if feats:
        out.features = torch.cat(feats, dim=0)
    return out


def greedy_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    batch_size: int = 16,
    stop=DEFAULTS.stop,
) -> list[str]:
    """Greedy answer strings of :func:`greedy_generate` (same arguments, same errors).

    Answers end before INSIDE's answer boundary (a line break, ``.`` or ``,``) unless
    ``stop="none"``.

    Returns:
        ``P`` answer strings, in prompt order.
    """
    return greedy_generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop
    ).answers


def sample_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    k: int = DEFAULTS.k,
    temperature: float = DEFAULTS.temperature,
    top_p: float = DEFAULTS.top_p,
    top_k: int = DEFAULTS.top_k,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    layer: LayerSpec = DEFAULTS.layer,
    batch_size: int = DEFAULTS.batch_size,
    seed: Optional[int] = None,
    greedy: bool = True,
    show_progress: bool = False,
    pooling: str = DEFAULTS.pooling,
    feature_clip: Union[bool, FeatureClipper, None] = None,
    return_logprobs: bool = False,
    stop=DEFAULTS.stop,
    feature_layer: Optional[LayerSpec] = None,
) -> SampledAnswers:
    """Sample ``k`` answers per prompt and embed each one (INSIDE's EigenScore inputs).

    Per batch of prompts (left-padded): one greedy ``generate`` (unless
    ``greedy=False``) and ONE sampled ``generate(do_sample=True,
    num_return_sequences=k)`` for all ``K`` samples. The embedding of a sample
    is the output of decoder block ``layer`` (``hidden_states[layer + 1]``)
    at its last generated real token (``pooling="last"``, the paper's choice)
    or averaged over its real generated tokens (``pooling="mean"``) — EOS and
    the padding after it excluded; a sample with no real token is embedded at
    the last prompt token. It is read by a single observer hook on that block
    during generation, plus one extra single-token forward with the KV cache
    for samples whose last real token is the final generated one (fallback: one
    full forward over the sequences; see the module docstring); no
    ``output_hidden_states``. Defaults follow INSIDE (Chen et al., ICLR 2024,
    arXiv 2402.03744) and its code: ``K = 10``, temperature 0.5, top-p 0.99,
    top-k 10, the middle layer.

    Every answer, greedy and sampled, ends at INSIDE's answer boundary by default
    (``stop="inside"``: the stop token ids of
    :func:`neurodetox.metrics.boundary.stop_token_ids` are added to ``eos_token_id``, as
    INSIDE's code does); the answer is the text before the stop and the embedded token is
    the last one before it.

    The model runs in ``eval()`` mode under ``torch.no_grad()``; the training
    mode of every submodule and the tokenizer's padding side / pad token are
    restored afterwards.

    Args:
        model: a transformers causal LM of a family known to
            :mod:`neurodetox.core.sites` (PEFT-wrapped allowed).
        tokenizer: its tokenizer; without a pad token the EOS token pads.
        prompts: ``P`` prompt strings.
        k: samples per prompt, >= 2. Default 10.
        temperature, top_p, top_k: sampling settings passed to ``generate``.
        max_new_tokens: most tokens per answer. Default 10.
        layer: one decoder block, as :func:`neurodetox.core.sites.parse_layers`
            accepts (``"middle"`` = block ``(L+1)//2 - 1``, INSIDE's
            ``hidden_states[len(hidden_states)//2]``). Default ``"middle"``.
        batch_size: prompts per ``generate`` call (the sampled call runs
            ``batch_size * k`` sequences). Default 8.
        seed: if not None, ``torch.manual_seed(seed)`` once before sampling,
            so the same call gives the same samples. Default None.
        greedy: also produce the greedy answers. Default True.
        show_progress: a tqdm progress bar over batches. Default False.
        pooling: ``"last"`` (default) or ``"mean"``.
        feature_clip: ``True`` for a fresh :class:`FeatureClipper` (paper
            settings), a :class:`FeatureClipper` to use (its bank carries over
            between calls), or ``None``/``False`` (default: no clipping). Only
            the sampled generation is clipped; the greedy answer (the
            correctness label) never is.
        return_logprobs: also return per-token log-probs of the greedy answer
            and of every sample (for perplexity and length-normalised entropy).
            Default False.
        stop: the answer boundary: ``"inside"`` (default), ``"none"`` or user stop strings
            (see :func:`neurodetox.metrics.settings.parse_stop`).
        feature_layer: with ``greedy``: also read this block's output at the last prompt
            token and the greedy answer's last token (``SampledAnswers.greedy_features``,
            the hidden-state probe's input; one extra forward per batch).

    Returns:
        :class:`SampledAnswers` with ``embeddings`` float32 ``[P, K, d]`` on CPU.

    Raises:
        ValueError: empty ``prompts``; ``k < 2``; bad ``max_new_tokens`` /
            ``batch_size`` / ``temperature`` / ``top_p`` / ``top_k`` /
            ``pooling``; ``layer`` (or the clipper's layer) out of range or not
            naming exactly one block; a prompt longer than the model's context
            (``max_position_embeddings``) minus ``max_new_tokens`` (the
            message names the prompt index and the lengths).
        TypeError: ``prompts`` is a single string or holds non-strings.

    Warns:
        UserWarning: some embeddings are NaN/inf (names the prompt indices).
    """
    prompts = _check_prompts(prompts)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise UserError(f"k must be an integer >= 2 (EigenScore needs at least two samples), got {k!r}")
    check_int("max_new_tokens", max_new_tokens)
    check_int("batch_size", batch_size)
    check_number("temperature", temperature, minimum=0.0, min_inclusive=False)
    check_number("top_p", top_p, minimum=0.0, maximum=1.0, min_inclusive=False)
    if top_k is not None:
        check_int("top_k", top_k, minimum=0)
    if pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    site = _single_site(model, layer, "layer")
    feat_site = _single_site(model, feature_layer, "feature_layer") if feature_layer is not None and greedy else None
    if feature_clip is True:
        clipper: Optional[FeatureClipper] = FeatureClipper()
    elif feature_clip is None or feature_clip is False:
        clipper = None
    elif isinstance(feature_clip, FeatureClipper):
        clipper = feature_clip
    else:
        raise ValueError(f"feature_clip must be a bool, None or a FeatureClipper, got {type(feature_clip).__name__}")
    if clipper is not None:
        clip_sites = resolve_sites(model, "residual", clipper.layer)
        if len(clip_sites) != 1:
            raise ValueError(f"the feature-clipping layer must name exactly one block, got {clipper.layer!r}")
    _check_lengths(model, tokenizer, prompts, max_new_tokens)
    stops = stop_token_ids(tokenizer, stop)
    eos_ids = sorted(set(eos_token_ids(model, tokenizer)) | set(stops))

    from tqdm.auto import tqdm

    greedy_out: list[str] = []
    greedy_lp: list = []
    greedy_len: list = []
    greedy_feats: list = []
    seconds = {"greedy": 0.0, "features": 0.0, "sampled": 0.0}
    samples: list[list[str]] = []
    sample_lp: list = []
    sample_len: list = []
    embs: list[torch.Tensor] = []
    paths: set[str] = set()
    starts = list(range(0, len(prompts), batch_size))
    with generation_mode(model, tokenizer):
        special = sorted(set(eos_ids) | {int(tokenizer.pad_token_id)})
        if clipper is not None and clipper.count < clipper.bank_size:
            clipper.seed(model, tokenizer, prompts, special)
        if seed is not None:
            torch.manual_seed(seed)
        for start in tqdm(starts, desc="sampling answers", disable=not show_progress):
            batch = prompts[start : start + batch_size]
            t0 = time.perf_counter()
            if greedy:
                g = _greedy_batch(
                    model,
                    tokenizer,
                    batch,
                    max_new_tokens,
                    eos_ids,
                    want_logprobs=return_logprobs,
                    detail=True,
                    feature_site=feat_site,
                )
                greedy_out.extend(g[0])
                greedy_len.extend(g[2])
                if return_logprobs:
                    greedy_lp.extend(g[1])
                if g[3] is not None:
                    greedy_feats.append(g[3])
                seconds["features"] += g[4]
            seconds["greedy"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            answers, emb, path, lps, n_real = _sample_batch(
                model,
                tokenizer,
                site,
                batch,
                k=k,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                eos_ids=eos_ids,
                pooling=pooling,
                want_logprobs=return_logprobs,
                clipper=clipper,
                special_ids=special,
            )
            seconds["sampled"] += time.perf_counter() - t0
            paths.add(path)
            samples.extend(answers[i * k : (i + 1) * k] for i in range(len(batch)))
            sample_len.extend(n_real[i * k : (i + 1) * k] for i in range(len(batch)))
            if return_logprobs:
                sample_lp.extend(lps[i * k : (i + 1) * k] for i in range(len(batch)))
            embs.append(emb.reshape(len(batch), k, -1))
    embeddings = torch.cat(embs, dim=0)
    bad = (~torch.isfinite(embeddings)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        warnings.warn(
            f"non-finite (NaN/inf) embeddings at block {site.layer} for prompt index(es) {bad}; "
            "their EigenScore will be rejected",
            stacklevel=2,
        )
    return SampledAnswers(
        prompts=prompts,
        greedy=greedy_out,
        samples=samples,
        embeddings=embeddings,
        layer=site.layer,
        _extra={"embedding_paths": sorted(paths), "seconds": seconds},
        pooling=pooling,
        feature_clip=clipper is not None,
        greedy_logprobs=greedy_lp,
        sample_logprobs=sample_lp,
        greedy_lengths=greedy_len,
        sample_lengths=sample_len,
        greedy_features=torch.cat(greedy_feats, dim=0) if greedy_feats else None,
        feature_layer=feat_site.layer if feat_site is not None else None,
        stop_ids=stops,
    )
