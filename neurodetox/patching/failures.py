"""Edits and teacher-forced failures on token ids (MINT step 0).

MINT (Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model
Repair for Code Generation", arXiv 2312.05356; ``shared/docs/methods.md`` §4)
starts from a prompt and the continuation the model should produce. The
continuation is turned into token ids **once**; the pair is then
teacher-forced: every position where the model's argmax differs from the
desired token is a *failure*, repaired in order. Repairs never re-tokenise
strings, they only append ids, so a repaired failure stays the same
token-level problem from start to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from neurodetox.core.checks import model_device
from neurodetox.core.logits import tail_logits

__all__ = ["Edit", "Failure", "encode_edit", "teacher_forced_argmax", "find_failures", "still_failing", "coerce_edits"]


@dataclass
class Edit:
    """One requested fix: ``prompt`` should continue with ``target``.

    Attributes:
        prompt: the prompt text, e.g. ``"The capital of Burkina Faso is"``.
        target: the desired continuation, e.g. ``"Ouagadougou"``; a leading
            space is added when tokenising unless it already starts with
            whitespace.
        fact_id: optional identifier (e.g. ``"capital_of:BF"``).
        paraphrases: other prompts of the same fact, used to measure
            generalisation (never used for repair).
        aliases: accepted answers for greedy correctness; ``[target]`` if empty.
        prompt_ids, target_ids: filled by :func:`encode_edit`.
    """

    prompt: str
    target: str
    fact_id: Optional[str] = None
    paraphrases: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)

    @property
    def answers(self) -> list[str]:
        """Accepted answers: ``aliases`` or ``[target]``."""
        return list(self.aliases) or [self.target.strip()]

    def to_json(self) -> dict[str, Any]:
        return {
            "fact_id": self.fact_id,
            "prompt": self.prompt,
            "target": self.target,
            "paraphrases": list(self.paraphrases),
            "aliases": list(self.aliases),
            "prompt_ids": list(self.prompt_ids),
            "target_ids": list(self.target_ids),
        }


@dataclass
class Failure:
    """One teacher-forced failure.

    Attributes:
        edit: index of the edit in the request.
        step: index into the edit's ``target_ids`` of the wrong token.
        position: index (into ``prompt_ids + target_ids``) of the position
            whose logits should predict ``target_id``: ``len(prompt_ids) + step - 1``.
        target_id: the desired token ``t``.
        argmax_id: the token ``a`` the model predicted instead.
    """

    edit: int
    step: int
    position: int
    target_id: int
    argmax_id: int


def _as_str_list(value: Any, what: str, index: int) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"edit {index}: {what} must be a string or a list of strings, got {value!r}")
    return list(value)


def coerce_edits(edits: Sequence[Any]) -> list[Edit]:
    """Turn dicts (JSONL rows or fact records) or :class:`Edit` objects into edits.

    A dict needs ``prompt`` and ``target`` (``answer`` is accepted for
    ``target``, which is what the fact schema calls it); optional
    ``fact_id``, ``paraphrases``, ``aliases``.

    Raises:
        ValueError: an empty list, a missing/empty prompt or target (the message
            names the edit index and the keys it has).
    """
    if isinstance(edits, (Edit, Mapping)):
        edits = [edits]
    out: list[Edit] = []
    for i, e in enumerate(edits):
        if isinstance(e, Edit):
            out.append(e)
            continue
        if not isinstance(e, Mapping):
            raise ValueError(f"edit {i} must be a dict with 'prompt' and 'target', got {type(e).__name__}")
        prompt = e.get("prompt")
        target = e.get("target", e.get("answer"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"edit {i} has no non-empty 'prompt' (keys: {sorted(e)})")
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"edit {i} has no non-empty 'target' (or 'answer') (keys: {sorted(e)})")
        out.append(
            Edit(
                prompt=prompt,
                target=target,
                fact_id=e.get("fact_id"),
                paraphrases=_as_str_list(e.get("paraphrases"), "paraphrases", i),
                aliases=_as_str_list(e.get("aliases"), "aliases", i),
                prompt_ids=list(e.get("prompt_ids") or []),
                target_ids=list(e.get("target_ids") or []),
            )
        )
    if not out:
        raise ValueError("no edits given: pass at least one {'prompt': ..., 'target': ...}")
    return out


def encode_edit(tokenizer, edit: Edit) -> Edit:
    """Fill ``edit.prompt_ids`` and ``edit.target_ids`` (once; kept if already set).

    The prompt is tokenised as the model sees it at generation time
    (special tokens included). The target ids are the continuation of
    ``prompt + " " + target`` past the prompt's ids when the prompt's ids are a
    prefix of it; otherwise (a BPE merge across the boundary) ``" " + target``
    tokenised alone, without special tokens.

    Raises:
        ValueError: the target tokenises to no ids.
    """
    if edit.prompt_ids and edit.target_ids:
        return edit
    target = edit.target if edit.target[:1].isspace() else " " + edit.target
    p_ids = list(tokenizer(edit.prompt)["input_ids"])
    full = list(tokenizer(edit.prompt + target)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        cont = full[len(p_ids) :]
        # a tokenizer that appends EOS to every text: drop it from the continuation
        if eos is not None and p_ids and p_ids[-1] == eos and cont and cont[-1] == eos:
            cont = cont[:-1]
    else:
        cont = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not cont:
        raise ValueError(f"target {edit.target!r} of prompt {edit.prompt!r} tokenises to no ids")
    edit.prompt_ids, edit.target_ids = p_ids, cont
    return edit


@torch.no_grad()
def teacher_forced_argmax(model: nn.Module, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> torch.Tensor:
    """Argmax of the model at each target step under teacher forcing.

    Args:
        prompt_ids: ``P`` prompt ids (``P >= 1``).
        target_ids: ``K`` target ids.

    Returns:
        Long tensor ``[K]``: the model's argmax at positions ``P-1 .. P+K-2``
        of ``prompt_ids + target_ids``.
    """
    ids = torch.tensor([list(prompt_ids) + list(target_ids)[:-1]], device=model_device(model))
    was = model.training
    model.eval()
    try:
        logits = tail_logits(model, len(target_ids), input_ids=ids)[0]  # positions P-1 .. P+K-2
    finally:
        model.train(was)
    return logits.argmax(dim=-1).cpu()


def find_failures(model: nn.Module, edit: Edit, edit_index: int = 0, start: int = 0) -> list[Failure]:
    """Teacher-forced failures of one encoded edit, from target step ``start`` on.

    Returns:
        One :class:`Failure` per target step whose argmax is not the target
        token, in order (empty when the model already produces the target).

    Raises:
        ValueError: the edit was not encoded (call :func:`encode_edit`).
    """
    if not edit.prompt_ids or not edit.target_ids:
        raise ValueError("edit is not encoded: call encode_edit(tokenizer, edit) first")
    pred = teacher_forced_argmax(model, edit.prompt_ids, edit.target_ids).tolist()
    p = len(edit.prompt_ids)
    return [
        Failure(edit=edit_index, step=k, position=p + k - 1, target_id=int(t), argmax_id=int(a))
        for k, (t, a) in enumerate(zip(edit.target_ids, pred))
        if k >= start and t != a
    ]


def right_pad(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists with id 0: ``(input_ids [B, T], attention_mask [B, T])``, both long.

    Raises:
        ValueError: no sequences, or an empty one.
    """
    if not seqs or any(len(x) == 0 for x in seqs):
        raise ValueError("right_pad needs at least one sequence and no empty ones")
    width = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(list(x))
        mask[i, : len(x)] = 1
    return ids, mask


@torch.no_grad()
def still_failing(model: nn.Module, edits: Sequence[Edit], batch_size: int = 32) -> list[bool]:
    """For each encoded edit, whether some target token is not the argmax under
    teacher forcing: :func:`find_failures` for many edits in batched,
    right-padded forwards (padding is masked and never read).

    Returns:
        One bool per edit, in order.
    """
    device = model_device(model)
    out: list[bool] = []
    was = model.training
    model.eval()
    try:
        for start in range(0, len(edits), batch_size):
            chunk = list(edits[start : start + batch_size])
            ids, mask = right_pad([list(e.prompt_ids) + list(e.target_ids)[:-1] for e in chunk])
            width = ids.shape[1]
            first = min(len(e.prompt_ids) for e in chunk) - 1  # earliest position read
            logits = tail_logits(model, width - first, input_ids=ids.to(device), attention_mask=mask.to(device))
            for i, e in enumerate(chunk):
                p = len(e.prompt_ids) - first
                pred = logits[i, p - 1 : p - 1 + len(e.target_ids)].argmax(-1).cpu().tolist()
                out.append(pred != list(e.target_ids))
    finally:
        model.train(was)
    return out
