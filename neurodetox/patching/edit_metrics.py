"""How good is a patch: success, generalisation, specificity, perplexity drift.

The measures of Gu et al., "Neuron Patching: Semantic-based Neuron-level
Language Model Repair for Code Generation" (arXiv 2312.05356) and their code,
adapted to fact probes (``docs/methods.md`` §4):

``success``
    the edit's target is produced under teacher forcing (every target token is
    the argmax): the failure is fixed. ``success_greedy`` also checks the
    greedy answer with :func:`neurodetox.metrics.factual.is_correct`.
``generalisation``
    fraction of the edited facts' **unseen** phrasings (``eval_paraphrases``,
    which the repair never uses) whose greedy answer is correct after the
    patch (reported with the value before it; ``nan`` when no edit has one).
    The ``paraphrases`` the repair may use are scored apart
    (``seen_paraphrases_correct``; ``success_all_phrasings``: the prompt and
    every such paraphrase answered right by greedy decoding). "The Mirage of
    Model Editing" (arXiv 2502.11177): measure with free generation and with
    phrasings the repair never saw.
``specificity``
    fraction of unrelated prompts whose predicted answer is unchanged: the
    greedy continuation's first line up to the first sentence or clause end
    (``.``, ``,``, ``;``, ``!``, ``?`` followed by a space or the end; not
    after abbreviations such as ``St.``), compared after
    :func:`~neurodetox.metrics.factual.normalize_answer`. Also reported:
    ``specificity_next_token`` (next-token argmax unchanged) and
    ``specificity_exact`` (all ``max_new_tokens`` greedy tokens unchanged,
    which also counts changes in the chatter after the answer).
``known_facts_kept``
    when the unrelated facts come with their aliases: of the unrelated facts
    answered correctly before the patch, the fraction still answered correctly
    (the facts the patch broke, which specificity mixes with wrong answers
    that merely changed); ``changes`` splits the changed answers into
    right→wrong, wrong→right, wrong→wrong and right→right (another alias).
``perplexity drift``
    ``ppl_after / ppl_before − 1`` on reference texts (mean token NLL).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from neurodetox.core.errors import UserError
from neurodetox.core.logits import tail_logits
from neurodetox.metrics.factual import is_correct, normalize_answer
from neurodetox.metrics.sampling import greedy_answers
from neurodetox.patching.failures import Edit, coerce_edits, encode_edit, teacher_forced_argmax
from neurodetox.patching.patchfile import PatchSet

__all__ = ["measure_model", "compare", "evaluate_patch", "perplexity", "answer_span", "next_token_predictions"]

_END = re.compile(r"(?<![A-Z][a-z])(?<![^A-Za-z][A-Z])[.,;!?](?=\s|$)")


def answer_span(text: str) -> str:
    """The answer part of a greedy continuation: its first non-empty line, up
    to the first sentence/clause end (``"St. George's. The"`` -> ``"St. George's"``,
    ``" Paris, the"`` -> ``"Paris"``), normalised with
    :func:`~neurodetox.metrics.factual.normalize_answer`."""
    line = text.lstrip().split("\n", 1)[0] if text.strip() else ""
    m = _END.search(" " + line)
    if m:
        line = (" " + line)[: m.start()]
    return normalize_answer(line)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16) -> float:
    """``exp(mean token NLL)`` of ``texts`` (padding excluded; each text scored
    from its second token on).

    Raises:
        UserError: no texts.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise UserError("perplexity needs at least one non-empty reference text")
    device = next(model.parameters()).device
    side = getattr(tokenizer, "padding_side", "right")
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        tokenizer.padding_side = "right"
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            logits = model(**enc, use_cache=False).logits[:, :-1].float()
            labels = enc["input_ids"][:, 1:]
            mask = enc["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            total += float(nll[mask].sum())
            count += int(mask.sum())
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def next_token_predictions(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> list[int]:
    """Greedy next-token id after each prompt (left-padded batches, one forward each).

    Returns:
        a list of ``len(prompts)`` token ids (the argmax of the last position's logits).
    """
    device = next(model.parameters()).device
    side = getattr(tokenizer, "padding_side", "right")
    was = model.training
    model.eval()
    out: list[int] = []
    try:
        tokenizer.padding_side = "left"
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            logits = tail_logits(model, 1, **enc)[:, -1]
            out.extend(logits.argmax(-1).tolist())
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return out


def measure_model(
    model: nn.Module,
    tokenizer,
    edits: Sequence[Edit],
    unrelated: Sequence[Any],
    reference_texts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Everything :func:`compare` needs from one model state.

    Returns:
        dict with ``teacher_forced`` (per edit: all target tokens are the
        argmax), ``edit_answers``, ``paraphrase_answers`` (per edit, a list,
        of its ``eval_paraphrases``), ``seen_paraphrase_answers`` (of its ``paraphrases``),
        ``unrelated_answers``, ``unrelated_next`` (next-token argmax ids) and
        ``perplexity`` (``nan`` without reference texts).
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=5, desc="evaluating", disable=not show_progress)
    tf = [
        bool(torch.equal(teacher_forced_argmax(model, e.prompt_ids, e.target_ids), torch.tensor(e.target_ids)))
        for e in edits
    ]
    bar.update()
    edit_answers = (
        greedy_answers(
            model, tokenizer, [e.prompt for e in edits], max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        if edits
        else []
    )
    bar.update()
    para_answers = _answers_per_edit(
        model, tokenizer, [e.eval_paraphrases for e in edits], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    seen_answers = _answers_per_edit(
        model, tokenizer, [e.paraphrases for e in edits], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    bar.update()
    unrelated = unrelated_prompts(unrelated)
    un = (
        greedy_answers(model, tokenizer, unrelated, max_new_tokens=max_new_tokens, batch_size=batch_size)
        if unrelated
        else []
    )
    un_next = next_token_predictions(model, tokenizer, unrelated) if unrelated else []
    bar.update()
    ppl = perplexity(model, tokenizer, reference_texts) if reference_texts else float("nan")
    bar.update()
    bar.close()
    return {
        "teacher_forced": tf,
        "edit_answers": edit_answers,
        "paraphrase_answers": para_answers,
        "seen_paraphrase_answers": seen_answers,
        "unrelated_answers": un,
        "unrelated_next": un_next,
        "perplexity": ppl,
    }


def _answers_per_edit(model, tokenizer, prompts: Sequence[Sequence[str]], **kw) -> list[list[str]]:
    """Greedy answers to each edit's list of prompts, in one batched pass."""
    flat = [p for ps in prompts for p in ps]
    answers = greedy_answers(model, tokenizer, flat, **kw) if flat else []
    out, k = [], 0
    for ps in prompts:
        out.append(answers[k : k + len(ps)])
        k += len(ps)
    return out


def unrelated_prompts(unrelated: Sequence[Any]) -> list[str]:
    """Prompts of unrelated facts given as strings or ``{"prompt", "aliases"}`` dicts."""
    return [u["prompt"] if isinstance(u, Mapping) else str(u) for u in unrelated]


def _frac(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


def compare(
    before: dict[str, Any], after: dict[str, Any], edits: Sequence[Edit], unrelated: Sequence[Any]
) -> dict[str, Any]:
    """Success, generalisation, specificity and perplexity drift from two
    :func:`measure_model` results (same edits and prompts).

    ``unrelated``: prompts (str) or ``{"prompt", "aliases"}`` dicts; with
    aliases for all of them, ``known_facts``, ``known_facts_kept`` and
    ``changes`` are added (see the module docstring).
    """
    per_edit = []
    for i, e in enumerate(edits):
        ok = e.answers
        per_edit.append(
            {
                "fact_id": e.fact_id,
                "prompt": e.prompt,
                "target": e.target,
                "fixed": after["teacher_forced"][i],
                "was_right": before["teacher_forced"][i],
                "answer_before": before["edit_answers"][i],
                "answer_after": after["edit_answers"][i],
                "greedy_correct": is_correct(after["edit_answers"][i], ok),
                "paraphrases_correct_before": [is_correct(a, ok) for a in before["paraphrase_answers"][i]],
                "paraphrases_correct_after": [is_correct(a, ok) for a in after["paraphrase_answers"][i]],
                "seen_paraphrases_correct_after": [
                    is_correct(a, ok) for a in (after.get("seen_paraphrase_answers") or [[]] * len(edits))[i]
                ],
            }
        )
    for r in per_edit:
        r["all_phrasings_greedy_correct"] = r["greedy_correct"] and all(r["seen_paraphrases_correct_after"])
    para_before = [f for r in per_edit for f in r["paraphrases_correct_before"]]
    para_after = [f for r in per_edit for f in r["paraphrases_correct_after"]]
    seen_after = [f for r in per_edit for f in r["seen_paraphrases_correct_after"]]
    same = [answer_span(a) == answer_span(b) for a, b in zip(before["unrelated_answers"], after["unrelated_answers"])]
    exact = [a == b for a, b in zip(before["unrelated_answers"], after["unrelated_answers"])]
    same_next = [a == b for a, b in zip(before["unrelated_next"], after["unrelated_next"])]
    prompts = unrelated_prompts(unrelated)
    changed = [
        {"prompt": p, "before": a, "after": b}
        for p, a, b, ok in zip(prompts, before["unrelated_answers"], after["unrelated_answers"], same)
        if not ok
    ]
    aliases = [u.get("aliases") if isinstance(u, Mapping) else None for u in unrelated]
    known: dict[str, Any] = {}
    if aliases and all(aliases):
        right_b = [is_correct(a, al) for a, al in zip(before["unrelated_answers"], aliases)]
        right_a = [is_correct(a, al) for a, al in zip(after["unrelated_answers"], aliases)]
        for c in changed:
            i = prompts.index(c["prompt"])
            c["right_before"], c["right_after"] = right_b[i], right_a[i]
        moved = [(rb, ra) for rb, ra, ok in zip(right_b, right_a, same) if not ok]
        known = {
            "known_facts": sum(right_b),
            "known_facts_kept": _frac([ra for rb, ra in zip(right_b, right_a) if rb]),
            "changes": {
                "right_to_wrong": sum(rb and not ra for rb, ra in moved),
                "wrong_to_right": sum(ra and not rb for rb, ra in moved),
                "wrong_to_wrong": sum(not rb and not ra for rb, ra in moved),
                "right_to_right": sum(rb and ra for rb, ra in moved),
            },
        }
    ppl_b, ppl_a = before["perplexity"], after["perplexity"]
    return {
        "edits": len(edits),
        "success": _frac([r["fixed"] for r in per_edit]),
        "success_greedy": _frac([r["greedy_correct"] for r in per_edit]),
        "generalisation_before": _frac(para_before),
        "generalisation": _frac(para_after),
        "paraphrases": len(para_after),
        "seen_paraphrases_correct": _frac(seen_after),
        "seen_paraphrases": len(seen_after),
        "success_all_phrasings": _frac([r["all_phrasings_greedy_correct"] for r in per_edit]),
        "specificity": _frac(same),
        "specificity_next_token": _frac(same_next),
        "specificity_exact": _frac(exact),
        "unrelated_prompts": len(same),
        **known,
        "perplexity_before": ppl_b,
        "perplexity_after": ppl_a,
        "perplexity_drift": (ppl_a / ppl_b - 1.0) if ppl_b == ppl_b and ppl_b > 0 else float("nan"),
        "per_edit": per_edit,
        "changed_unrelated": changed[:50],
    }


def evaluate_patch(
    model: nn.Module,
    tokenizer,
    patch: PatchSet,
    edits: Optional[Sequence[Any]] = None,
    unrelated: Sequence[Any] = (),
    reference_texts: Sequence[str] = (),
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``patch`` on ``model`` by toggling it in memory.

    The model may hold the original or the patched values; it is measured in
    both states and left in the state it came in.

    Args:
        edits: the edits to score (default: the manifest's edits).
        unrelated: prompts that must not change (the issue asks for >= 200), as str or
            ``{"prompt", "aliases"}`` dicts (then known facts kept is reported too).
        reference_texts: texts for perplexity drift.
        max_new_tokens: greedy answer length. Default 8.

    Returns:
        The :func:`compare` dict plus ``neurons_per_fix`` and ``parameters_changed``.

    Raises:
        PatchMismatchError: the model is neither in the original nor the
            patched state of ``patch``.
    """
    edits = coerce_edits(edits if edits is not None else patch.manifest.get("edits", []))
    edits = [encode_edit(tokenizer, e) for e in edits]
    states = set(patch.states(model).values())
    if states - {"original", "patched"}:
        patch.verify(model, "original")  # raises with the tensor's name
    was_patched = states == {"patched"}
    try:
        patch.revert(model)
        before = measure_model(
            model,
            tokenizer,
            edits,
            unrelated,
            reference_texts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
        )
        patch.apply(model)
        after = measure_model(
            model,
            tokenizer,
            edits,
            unrelated,
            reference_texts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
        )
    finally:
        (patch.apply if was_patched else patch.revert)(model)
    out = compare(before, after, edits, unrelated)
    out["neurons_per_fix"] = [
        len(e.get("neurons", [])) for e in patch.manifest.get("edits", []) if e.get("status") == "fixed"
    ]
    out["parameters_changed"] = patch.num_values
    return out
