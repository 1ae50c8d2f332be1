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

__all__ = ["fact_pools", "read_edits", "read_lines", "reference_prompts"]


def read_edits(path: str) -> list[dict]:
    """The edits of a JSONL file, one ``{"prompt", "target", ...}`` object per line.

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


def reference_prompts(spec: str, exclude: Sequence[str] = ()) -> Optional[list[str]]:
    """Reference prompts named by ``spec``: ``facts+default`` (96 built-in fact prompts of every
    relation and the generic built-in prompts), ``facts``, ``default`` (``None``: MINT's built-in
    ones) or a file (:func:`read_lines`). Prompts in ``exclude`` (the edits) are never used.
    """
    from neurodetox.patching.locate import DEFAULT_REFERENCE_PROMPTS

    if spec == "default":
        return None
    if spec in ("facts", "facts+default"):
        ref, _, _ = fact_pools("facts", 0, exclude, (), 0, 128, 0)
        return ref if spec == "facts" else ref[:96] + list(DEFAULT_REFERENCE_PROMPTS)
    return read_lines(spec)
