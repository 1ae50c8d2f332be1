"""Samples → embeddings: sample K answers per prompt and embed each one.

This produces what EigenScore needs (Chen et al., "INSIDE: LLMs' Internal
States Retain the Power of Hallucination Detection", ICLR 2024,
arXiv 2402.03744; ``shared/docs/methods.md`` §2): for every prompt, ``K``
sampled answers (paper: ``K = 10``, temperature 0.5, top-p 0.99, top-k 10 as in
the authors' code) and, for each answer, the hidden state of the **middle
layer** at the answer's **last generated real token**, plus the greedy answer
whose correctness is the evaluation label.

How the embedding is captured. One observer hook (``neurodetox.sites``) sits on
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
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .sites import LayerSpec, base_model, register_site_hook, resolve_sites

__all__ = ["SampledAnswers", "sample_answers", "greedy_answers"]


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
        _extra: diagnostics, not part of the stable API
            (``{"embedding_paths": [...]}``: ``"hook+extra_step"`` or
            ``"full_forward"``, how the last-token embeddings were read).
    """

    prompts: list[str]
    greedy: list[str]
    samples: list[list[str]]
    embeddings: torch.Tensor
    layer: int
    _extra: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.prompts)


# ----------------------------------------------------------------------------- helpers


def _device(model: nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.flatten().tolist()]
    if isinstance(x, (list, tuple, set)):
        return [int(v) for v in x]
    return [int(x)]


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS ids generate stops on: the model's generation config, else the tokenizer's."""
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


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


@contextlib.contextmanager
def _generation_mode(model: nn.Module, tokenizer) -> Iterator[None]:
    """eval() + no_grad + left padding + a pad token; everything restored after."""
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
    """Number of real generated tokens per row: tokens before the first EOS."""
    n = gen.shape[1]
    if not eos_ids or n == 0:
        return torch.full((gen.shape[0],), n, dtype=torch.long, device=gen.device)
    is_eos = torch.isin(gen, torch.tensor(eos_ids, device=gen.device))
    first = torch.argmax(is_eos.to(torch.int8), dim=1)
    return torch.where(is_eos.any(dim=1), first, torch.full_like(first, n))


def _decode(tokenizer, gen: torch.Tensor, n_real: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(gen[i, : int(n_real[i])].tolist(), skip_special_tokens=True) for i in range(gen.shape[0])
    ]


def _greedy_batch(model, tokenizer, batch: list[str], max_new_tokens: int, eos_ids: list[int]) -> list[str]:
    enc = tokenizer(batch, return_tensors="pt", padding=True).to(_device(model))
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids or None,
    )
    seqs = out.sequences if hasattr(out, "sequences") else out
    gen = seqs[:, enc["input_ids"].shape[1] :]
    return _decode(tokenizer, gen, _real_lengths(gen, eos_ids))


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _sample_batch(model, tokenizer, site, batch, *, k, temperature, top_p, top_k, max_new_tokens, eos_ids):
    """Sample K answers for each prompt of ``batch``; return (answers, embeddings [B*K, d], path)."""
    device = _device(model)
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
        if ok:
            table = [s[1] for s in steps]
            if bool((n_real == n).any()):
                cache = getattr(out, "past_key_values", None)
                ok = False
                if cache is not None and hasattr(cache, "get_seq_length"):
                    try:
                        cache_len = int(cache.get_seq_length())
                    except Exception:  # noqa: BLE001 - any odd cache: use the full forward
                        cache_len = -1
                    if cache_len == t_prompt + n - 1:
                        record["steps"] = []
                        kwargs = dict(
                            input_ids=seqs[:, -1:],
                            attention_mask=full_mask,
                            position_ids=(full_mask.sum(dim=1, keepdim=True) - 1).long(),
                            past_key_values=cache,
                            use_cache=True,
                        )
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
                emb = stacked[n_real, torch.arange(bk, device=stacked.device)]
        if emb is None:
            # Fallback: one full forward over prompt + generation.
            record["full"] = True
            record["steps"] = []
            pos = (full_mask.long().cumsum(dim=1) - 1).clamp_min(0)
            model(input_ids=seqs, attention_mask=full_mask, position_ids=pos, use_cache=False)
            if len(record["steps"]) != 1:
                raise RuntimeError(
                    f"expected one forward through {site.module_name} in the embedding pass, saw {len(record['steps'])}"
                )
            hidden = record["steps"][0]  # [B*K, T + n, d]
            idx = t_prompt + n_real - 1
            emb = hidden[torch.arange(bk, device=hidden.device), idx]
            path = "full_forward"
    finally:
        handle.remove()
    answers = _decode(tokenizer, gen, n_real)
    return answers, emb.to("cpu", torch.float32), path


# ----------------------------------------------------------------------------- public API


def greedy_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 10,
    batch_size: int = 16,
) -> list[str]:
    """Greedy (``do_sample=False``) answer for each prompt.

    Prompts are left-padded in batches; each answer is cut at the first EOS and
    decoded with ``skip_special_tokens=True``. The model runs in ``eval()``
    mode under ``torch.no_grad()``; its training mode and the tokenizer's
    padding side / pad token are restored afterwards.

    Args:
        model: a transformers causal LM (PEFT-wrapped allowed).
        tokenizer: its tokenizer; without a pad token the EOS token pads.
        prompts: ``P`` prompt strings.
        max_new_tokens: most tokens generated per answer. Default 10.
        batch_size: prompts per ``generate`` call. Default 16.

    Returns:
        ``P`` answer strings, in prompt order.

    Raises:
        ValueError: empty ``prompts``; bad ``max_new_tokens`` / ``batch_size``;
            a prompt longer than the model's context minus ``max_new_tokens``.
        TypeError: ``prompts`` is a single string or holds non-strings.
    """
    prompts = _check_prompts(prompts)
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("batch_size", batch_size)
    _check_lengths(model, tokenizer, prompts, max_new_tokens)
    eos_ids = _eos_ids(model, tokenizer)
    answers: list[str] = []
    with _generation_mode(model, tokenizer):
        for start in range(0, len(prompts), batch_size):
            answers.extend(_greedy_batch(model, tokenizer, prompts[start : start + batch_size], max_new_tokens, eos_ids))
    return answers


def sample_answers(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    k: int = 10,
    temperature: float = 0.5,
    top_p: float = 0.99,
    top_k: int = 10,
    max_new_tokens: int = 10,
    layer: LayerSpec = "middle",
    batch_size: int = 8,
    seed: Optional[int] = None,
    greedy: bool = True,
    show_progress: bool = False,
) -> SampledAnswers:
    """Sample ``k`` answers per prompt and embed each at its last generated token.

    Per batch of prompts (left-padded): one greedy ``generate`` (unless
    ``greedy=False``) and ONE sampled ``generate(do_sample=True,
    num_return_sequences=k)`` for all ``K`` samples. The embedding of a sample
    is the output of decoder block ``layer`` (``hidden_states[layer + 1]``)
    at its last generated real token — EOS and the padding after it excluded;
    a sample with no real token is embedded at the last prompt token. It is
    read by a single observer hook on that block during generation, plus one
    extra single-token forward with the KV cache for samples whose last real
    token is the final generated one (fallback: one full forward over the
    sequences; see the module docstring). Defaults follow INSIDE (Chen et al.,
    ICLR 2024, arXiv 2402.03744) and its code: ``K = 10``, temperature 0.5,
    top-p 0.99, top-k 10, the middle layer.

    The model runs in ``eval()`` mode under ``torch.no_grad()``; the training
    mode of every submodule and the tokenizer's padding side / pad token are
    restored afterwards.

    Args:
        model: a transformers causal LM of a family known to
            :mod:`neurodetox.sites` (PEFT-wrapped allowed).
        tokenizer: its tokenizer; without a pad token the EOS token pads.
        prompts: ``P`` prompt strings.
        k: samples per prompt, >= 2. Default 10.
        temperature, top_p, top_k: sampling settings passed to ``generate``.
        max_new_tokens: most tokens per answer. Default 10.
        layer: one decoder block, as :func:`neurodetox.sites.parse_layers`
            accepts (``"middle"`` = block ``(L+1)//2 - 1``, INSIDE's
            ``hidden_states[len(hidden_states)//2]``). Default ``"middle"``.
        batch_size: prompts per ``generate`` call (the sampled call runs
            ``batch_size * k`` sequences). Default 8.
        seed: if not None, ``torch.manual_seed(seed)`` once before sampling,
            so the same call gives the same samples. Default None.
        greedy: also produce the greedy answers. Default True.
        show_progress: a tqdm progress bar over batches. Default False.

    Returns:
        :class:`SampledAnswers` with ``embeddings`` float32 ``[P, K, d]`` on CPU.

    Raises:
        ValueError: empty ``prompts``; ``k < 2``; bad ``max_new_tokens`` /
            ``batch_size`` / ``temperature`` / ``top_p`` / ``top_k``; ``layer``
            not naming exactly one block; a prompt longer than the model's
            context (``max_position_embeddings``) minus ``max_new_tokens``
            (the message names the prompt index and the lengths).
        TypeError: ``prompts`` is a single string or holds non-strings.

    Warns:
        UserWarning: some embeddings are NaN/inf (names the prompt indices).
    """
    prompts = _check_prompts(prompts)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (EigenScore needs at least two samples), got {k!r}")
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("batch_size", batch_size)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None:
        _positive_int("top_k", top_k, minimum=0)
    sites = resolve_sites(model, "residual", layer)
    if len(sites) != 1:
        raise ValueError(f"layer must name exactly one decoder block, got {layer!r} -> blocks {[s.layer for s in sites]}")
    site = sites[0]
    _check_lengths(model, tokenizer, prompts, max_new_tokens)
    eos_ids = _eos_ids(model, tokenizer)

    from tqdm.auto import tqdm

    greedy_out: list[str] = []
    samples: list[list[str]] = []
    embs: list[torch.Tensor] = []
    paths: set[str] = set()
    starts = list(range(0, len(prompts), batch_size))
    with _generation_mode(model, tokenizer):
        if seed is not None:
            torch.manual_seed(seed)
        for start in tqdm(starts, desc="sampling answers", disable=not show_progress):
            batch = prompts[start : start + batch_size]
            if greedy:
                greedy_out.extend(_greedy_batch(model, tokenizer, batch, max_new_tokens, eos_ids))
            answers, emb, path = _sample_batch(
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
            )
            paths.add(path)
            samples.extend(answers[i * k : (i + 1) * k] for i in range(len(batch)))
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
        _extra={"embedding_paths": sorted(paths)},
    )
