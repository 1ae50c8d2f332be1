"""Prompt pools for patch search and evaluation: reference prompts, unrelated facts, reference texts.

Reference prompts define what a patch must not change (the MINT guard's background, see
``docs/methods.md`` §4); unrelated facts measure specificity; reference texts measure perplexity
drift. All are drawn from a fact source disjoint from the edits.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from neurodetox.core.errors import UserError

__all__ = ["edit_reference_prompts", "fact_pools", "read_edits", "read_lines", "reference_prompts"]


def read_edits(path: str) -> list[dict]:
    """The edits of a JSONL file, one ``{"prompt", "target", ...}`` object per line.

    Each row gets ``"source": "FILE:LINE"`` (unless it has one), so errors about an edit name its line.

    Raises:
        FileNotFoundError: no such file.
        UserError: a line that is not a JSON object (naming ``file:line``), or no edit at all.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"edits file not found: {p}")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(
                f'{p}:{n} is not a JSON object ({e}); each line must be {{"prompt": ..., "target": ...}}'
            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{p}:{n} must be a JSON object with 'prompt' and 'target', got {type(row).__name__}")
        row.setdefault("source", f"{p}:{n}")
        rows.append(row)
    if not rows:
        raise UserError(f'{p} holds no edits (one JSON object per line: {{"prompt": ..., "target": ...}})')
    return rows


def read_lines(path: str) -> list[str]:
    """Prompts or texts of a file: one per line, or JSONL with ``prompt``/``text``/``statement``.

    Raises:
        FileNotFoundError: no such file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            row = json.loads(line)
            line = row.get("prompt") or row.get("text") or row.get("statement") or ""
        if line:
            out.append(line)
    return out


def fact_pools(
    source: str,
    seed: int,
    exclude_prompts: Sequence[str],
    exclude_ids: Sequence[str],
    n_unrelated: int,
    n_reference_prompts: int,
    n_texts: int,
    shuffle_seed: int = 0,
):
    """``(reference prompts, unrelated facts, reference texts)`` from a fact source, disjoint and without the edits.

    ``source`` is a fact source name or file (split with ``seed``) or an already split
    ``datasets.DatasetDict`` (``seed`` is then unused).

    Reference prompts and texts are taken from the train split with the
    relations interleaved (:func:`neurodetox.data.interleave_relations`).

    Unrelated facts are ``{"prompt", "aliases"}`` dicts (the aliases let the
    evaluation tell a broken known fact from a changed wrong answer).
    """
    from neurodetox.data import interleave_relations, load_facts

    ds = load_facts(source, seed=seed) if isinstance(source, (str, Path)) else source
    skip_p, skip_id = set(exclude_prompts), {i for i in exclude_ids if i}
    rows = [
        r
        for split in ("train", "tracking", "test")
        for r in ds[split]
        if r["prompt"] not in skip_p and r["fact_id"] not in skip_id
    ]
    # every relation in turn: the built-in train split is sorted by relation, and reference prompts
    # of one relation only (all capitals) cannot tell which neurons the other relations use
    train = interleave_relations([r for r in ds["train"] if r["prompt"] not in skip_p and r["fact_id"] not in skip_id])
    ref = [r["prompt"] for r in train[:n_reference_prompts]]
    texts = [r["statement"] for r in train[n_reference_prompts : n_reference_prompts + n_texts]]
    used = set(ref)
    rest = [{"prompt": r["prompt"], "aliases": list(r["aliases"])} for r in rows if r["prompt"] not in used]
    random.Random(shuffle_seed).shuffle(rest)
    if len(rest) < n_unrelated:  # a small fact file: top up with the reference prompts rather than fall short
        have = {u["prompt"] for u in rest}
        rest += [
            {"prompt": r["prompt"], "aliases": list(r["aliases"])}
            for r in train[:n_reference_prompts]
            if r["prompt"] not in have
        ][: n_unrelated - len(rest)]
    return ref, rest[:n_unrelated], texts


def reference_prompts(
    spec: str, exclude: Sequence[str] = (), *, model=None, tokenizer=None, edits: Sequence = ()
) -> Optional[list[str]]:
    """Reference prompts named by ``spec``: a file (:func:`read_lines`), or ``+``-joined parts:
    ``edits`` (:func:`edit_reference_prompts`: from the model and the edits themselves; needs
    ``model``, ``tokenizer`` and ``edits``), ``facts`` (built-in fact prompts of every relation: 128
    alone, 96 combined) and ``default`` (the generic built-in prompts). ``default`` alone gives
    ``None`` (MINT's built-in ones). Prompts in ``exclude`` (the edits) are never used.

    Raises:
        UserError: an unknown part, or ``edits`` without a model.
    """
    from neurodetox.patching.locate import DEFAULT_REFERENCE_PROMPTS

    if spec == "default":
        return None
    if Path(spec).is_file():
        return read_lines(spec)
    parts = spec.split("+")
    bad = [p for p in parts if p not in ("edits", "facts", "default")]
    if bad:
        raise UserError(
            f"reference {spec!r}: unknown part(s) {bad}; use 'edits', 'facts', 'default' joined by '+', or a file"
        )
    out: list[str] = []
    skip = set(exclude)
    for part in parts:
        if part == "edits":
            if model is None or tokenizer is None or not edits:
                raise UserError("reference 'edits' needs the model, its tokenizer and the edits")
            out += edit_reference_prompts(model, tokenizer, edits)
        elif part == "facts":
            ref, _, _ = fact_pools("facts", 0, exclude, (), 0, 128, 0)
            out += ref if len(parts) == 1 else ref[:96]
        else:
            out += list(DEFAULT_REFERENCE_PROMPTS)
    return [p for p in dict.fromkeys(out) if p not in skip]


#: Starts of the model's own general text (reference prompts that no fact source supplies).
GENERAL_STARTS: tuple[str, ...] = (
    "The",
    "In the morning",
    "Therefore",
    "Because",
    "I think",
    "You can",
    "It was",
    "Many people",
    "The new",
    "After the",
    "One of the most",
    "Scientists",
)

#: Prompts of other relations, filled with subjects the model names itself.
OTHER_RELATIONS: tuple[str, ...] = (
    "{} is known for",
    "The name {} means",
    "A famous person from {} is",
    "The weather in {} is",
    "Most people in {} speak",
    "The history of {} began",
)


def _subject_template(edit) -> Optional[str]:
    """The edit's prompt with its subject replaced by ``{}`` (``None`` without a subject found in it)."""
    subject = getattr(edit, "subject", None)
    if not subject or subject not in edit.prompt:
        return None
    return edit.prompt.replace("{", "{{").replace("}", "}}").replace(subject, "{}", 1)


def _list_items(text: str) -> list[str]:
    items = []
    for part in text.replace("\n", ",").replace(";", ",").replace(" and ", ",").split(","):
        part = part.strip().strip(".").strip()
        if 2 <= len(part) <= 40 and part[:1].isupper() and len(part.split()) <= 4:
            items.append(part)
    return items


def edit_reference_prompts(
    model,
    tokenizer,
    edits: Sequence,
    n_same: int = 48,
    n_other: int = 24,
    n_general: int = 24,
    max_new_tokens: int = 20,
) -> list[str]:
    """Reference prompts built from the model and the edits themselves (issue 18, "specificity that carries").

    Three kinds, none taken from a fact source, so they carry to facts that no
    default was tuned on:

    * **same relation, other subjects**: each edit's prompt with its subject
      (``Edit.subject``, when it occurs in the prompt) replaced by other
      subjects of the same kind, which the model names itself: it continues
      comma-separated lists of the edits' subjects (greedy), and items that
      are not edit subjects are kept;
    * **other relations**: :data:`OTHER_RELATIONS` filled with those subjects;
    * **general text**: the model's greedy continuations of :data:`GENERAL_STARTS`,
      cut at several lengths.

    Edit prompts and paraphrases are never returned. Deterministic (greedy).

    Args:
        model, tokenizer: the model to be repaired and its tokenizer.
        edits: :class:`~neurodetox.patching.failures.Edit` objects or dicts (``prompt``, optional ``subject``).
        n_same, n_other, n_general: most prompts of each kind (integers ``>= 0``).
        max_new_tokens: length of each greedy continuation.

    Returns:
        up to ``n_same + n_other + n_general`` distinct prompts.
    """
    from neurodetox.metrics.sampling import greedy_generate
    from neurodetox.patching.failures import coerce_edits

    edits = coerce_edits(edits)
    banned = {e.prompt for e in edits} | {p for e in edits for p in e.paraphrases + e.eval_paraphrases}
    subjects = [e.subject for e in edits if e.subject]
    templates = list(dict.fromkeys(t for t in (_subject_template(e) for e in edits) if t))
    others: list[str] = []
    if subjects:
        lists = []
        for k in range(0, min(4 * 4, len(subjects)), 4):
            rot = subjects[k:] + subjects[:k]
            lists.append(", ".join(rot[:4]) + ",")
        out = greedy_generate(model, tokenizer, lists, max_new_tokens=max_new_tokens, stop="none")
        known = {s.casefold() for s in subjects}
        for text in out.answers:
            for item in _list_items(text):
                if item.casefold() not in known and item not in others:
                    others.append(item)
    same = [t.format(s) for s in others for t in templates]
    other = [r.format(s) for s in others for r in OTHER_RELATIONS]
    # interleave so that a cut keeps every template and relation
    same = [p for k in range(len(others)) for p in same[k * len(templates) : (k + 1) * len(templates)]]
    general: list[str] = []
    if n_general:
        gen = greedy_generate(model, tokenizer, list(GENERAL_STARTS), max_new_tokens=max_new_tokens, stop="none")
        for start, text in zip(GENERAL_STARTS, gen.answers):
            words = (start + " " + text.strip()).split()
            for cut in (4, 7, 10):
                if len(words) > cut:
                    general.append(" ".join(words[:cut]))
    picked: list[str] = []
    for pool, n in ((same, n_same), (_spread(other, len(OTHER_RELATIONS)), n_other), (general, n_general)):
        kept = [p for p in dict.fromkeys(pool) if p not in banned and p not in picked]
        picked += kept[:n]
    return picked


def _spread(prompts: list[str], stride: int) -> list[str]:
    """Reorder ``prompts`` (grouped by subject, ``stride`` per subject) so consecutive ones differ in relation."""
    return [prompts[i] for r in range(stride) for i in range(r, len(prompts), stride)]
