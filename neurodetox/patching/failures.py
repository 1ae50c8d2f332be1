"""Edits and teacher-forced failures on token ids (MINT step 0).

MINT (Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model
Repair for Code Generation", arXiv 2312.05356; ``docs/methods.md`` §4)
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
from neurodetox.core.errors import UserError
from neurodetox.core.logits import tail_logits

__all__ = [
    "Edit",
    "Failure",
    "check_phrasings",
    "encode_edit",
    "encode_pair",
    "teacher_forced_argmax",
    "find_failures",
    "still_failing",
    "coerce_edits",
]


@dataclass
class Edit:
    """One requested fix: ``prompt`` should continue with ``target``.

    Attributes:
        prompt: the prompt text, e.g. ``"The capital of Burkina Faso is"``.
        target: the desired continuation, e.g. ``"Ouagadougou"``; a leading
            space is added when tokenising unless it already starts with
            whitespace.
        fact_id: optional identifier (e.g. ``"capital_of:BF"``).
        paraphrases: other prompts of the same fact that the repair may use:
            MINT (``MintSettings.use_paraphrases``) and the rank-one editor
            fix them together with ``prompt``, and an edit counts as fixed
            only when every one of them is (``docs/methods.md`` §8).
        eval_paraphrases: phrasings the repair never sees; generalisation is
            reported on these only (:mod:`~neurodetox.patching.edit_metrics`).
        aliases: accepted answers for greedy correctness; ``[target]`` if empty.
        subject: the entity the fact is about, a substring of ``prompt`` (and
            of each paraphrase), needed by the subject-position editor
            (:mod:`~neurodetox.patching.rome`); optional for MINT.
        source: where the edit came from, e.g. ``"edits.jsonl:3"`` (set by
            :func:`neurodetox.patching.pools.read_edits`; used in error messages).
        prompt_ids, target_ids: filled by :func:`encode_edit`.
        variants: the prompt and each paraphrase as encoded edits (filled by
            :func:`encode_edit`; not saved).
    """

    prompt: str
    target: str
    fact_id: Optional[str] = None
    paraphrases: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    eval_paraphrases: list[str] = field(default_factory=list)
    subject: Optional[str] = None
    source: Optional[str] = None
    variants: list[Edit] = field(default_factory=list, repr=False, compare=False)

    @property
    def where(self) -> str:
        """``source`` or ``"edit <fact_id or prompt>"``, for messages."""
        return self.source or f"edit {self.fact_id or repr(self.prompt)}"

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
            "eval_paraphrases": list(self.eval_paraphrases),
            "subject": self.subject,
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
        phrasing: which phrasing failed: 0 the prompt, ``k >= 1`` paraphrase ``k - 1``.
    """

    edit: int
    step: int
    position: int
    target_id: int
    argmax_id: int
    phrasing: int = 0


def _as_str_list(value: Any, what: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: {what} must be a string or a list of strings, got {value!r}")
    return list(value)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def check_phrasings(edit: Edit) -> None:
    """Refuse phrasings that cannot test or teach anything.

    Raises:
        UserError: naming ``edit.where`` (the edits file and line when read
            from one), for a paraphrase identical to the prompt (whitespace and
            case ignored), a paraphrase that already ends with the target (it
            answers itself), an empty paraphrase, or an evaluation paraphrase
            that is the prompt or one of the repair's paraphrases (not unseen).
    """
    prompt, target = _norm(edit.prompt), _norm(edit.target)
    seen = {prompt}
    for kind, items in (("paraphrase", edit.paraphrases), ("eval_paraphrase", edit.eval_paraphrases)):
        for k, p in enumerate(items, 1):
            q = _norm(p)
            if not q:
                raise UserError(f"{edit.where}: {kind} {k} is empty; give a prompt that asks for {edit.target!r}")
            if q == prompt:
                raise UserError(
                    f"{edit.where}: {kind} {k} {p!r} is the prompt itself; a paraphrase must be another phrasing"
                )
            if target and (q == target or q.endswith(" " + target)):
                raise UserError(
                    f"{edit.where}: {kind} {k} {p!r} already ends with the target {edit.target!r}; "
                    "a paraphrase must stop where the answer should come"
                )
            if kind == "eval_paraphrase" and q in seen:
                raise UserError(
                    f"{edit.where}: eval_paraphrase {k} {p!r} is also the prompt or a repair paraphrase; "
                    "evaluation phrasings must be unseen by the repair"
                )
            if kind == "paraphrase":
                seen.add(q)


def coerce_edits(edits: Sequence[Any]) -> list[Edit]:
    """Turn dicts (JSONL rows or fact records) or :class:`Edit` objects into edits.

    A dict needs ``prompt`` and ``target`` (``answer`` is accepted for
    ``target``, which is what the fact schema calls it); optional
    ``fact_id``, ``paraphrases``, ``eval_paraphrases``, ``aliases``,
    ``subject`` and ``source`` (where it was read, for messages).
    Every edit's phrasings are checked with :func:`check_phrasings`.

    Raises:
        ValueError: an empty list, a missing/empty prompt or target (the message
            names the edit index and the keys it has).
        UserError: a bad phrasing (:func:`check_phrasings`), or two edits with
            the same prompt and different targets (naming both).
    """
    if isinstance(edits, (Edit, Mapping)):
        edits = [edits]
    out: list[Edit] = []
    for i, e in enumerate(edits):
        if isinstance(e, Edit):
            check_phrasings(e)
            out.append(e)
            continue
        if not isinstance(e, Mapping):
            raise ValueError(f"edit {i} must be a dict with 'prompt' and 'target', got {type(e).__name__}")
        where = e.get("source") or f"edit {i}"
        prompt = e.get("prompt")
        target = e.get("target", e.get("answer"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where} has no non-empty 'prompt' (keys: {sorted(e)})")
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"{where} has no non-empty 'target' (or 'answer') (keys: {sorted(e)})")
        subject = e.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise UserError(f"{where}: subject must be a string, got {subject!r}")
        edit = Edit(
            prompt=prompt,
            target=target,
            fact_id=e.get("fact_id"),
            paraphrases=_as_str_list(e.get("paraphrases"), "paraphrases", where),
            aliases=_as_str_list(e.get("aliases"), "aliases", where),
            prompt_ids=list(e.get("prompt_ids") or []),
            target_ids=list(e.get("target_ids") or []),
            eval_paraphrases=_as_str_list(e.get("eval_paraphrases"), "eval_paraphrases", where),
            subject=subject,
            source=e.get("source") or None,
        )
        check_phrasings(edit)
        out.append(edit)
    if not out:
        raise ValueError("no edits given: pass at least one {'prompt': ..., 'target': ...}")
    first: dict[str, tuple[int, Edit]] = {}
    for i, e in enumerate(out):
        key = _norm(e.prompt)
        if key in first and _norm(first[key][1].target) != _norm(e.target):
            j, other = first[key]
            raise UserError(
                f"{e.source or f'edit {i}'}: prompt {e.prompt!r} is also the prompt of "
                f"{other.source or f'edit {j}'} with another target ({other.target!r} vs {e.target!r}); "
                "one prompt can have one target"
            )
        first.setdefault(key, (i, e))
    return out


def encode_edit(tokenizer, edit: Edit) -> Edit:
    """Fill ``edit.prompt_ids`` and ``edit.target_ids`` (once; kept if already set) and
    ``edit.variants`` (the edit itself, then one encoded edit per paraphrase).

    The prompt is tokenised as the model sees it at generation time
    (special tokens included). The target ids are the continuation of
    ``prompt + " " + target`` past the prompt's ids when the prompt's ids are a
    prefix of it; otherwise (a BPE merge across the boundary) ``" " + target``
    tokenised alone, without special tokens.

    Raises:
        ValueError: the target tokenises to no ids.
    """
    if not (edit.prompt_ids and edit.target_ids):
        edit.prompt_ids, edit.target_ids = encode_pair(tokenizer, edit.prompt, edit.target)
    if len(edit.variants) != 1 + len(edit.paraphrases):
        edit.variants = [edit] + [
            Edit(p, edit.target, edit.fact_id, subject=edit.subject, source=edit.source, aliases=list(edit.aliases))
            for p in edit.paraphrases
        ]
        for v in edit.variants[1:]:
            v.prompt_ids, v.target_ids = encode_pair(tokenizer, v.prompt, v.target)
            v.variants = [v]
    return edit


def encode_pair(tokenizer, prompt: str, target_text: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, target continuation ids)`` as :func:`encode_edit` tokenises them.

    Raises:
        ValueError: the target tokenises to no ids.
    """
    target = target_text if target_text[:1].isspace() else " " + target_text
    p_ids = list(tokenizer(prompt)["input_ids"])
    full = list(tokenizer(prompt + target)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        cont = full[len(p_ids) :]
        # a tokenizer that appends EOS to every text: drop it from the continuation
        if eos is not None and p_ids and p_ids[-1] == eos and cont and cont[-1] == eos:
            cont = cont[:-1]
    else:
        cont = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not cont:
        raise ValueError(f"target {target_text!r} of prompt {prompt!r} tokenises to no ids")
    return p_ids, cont


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
