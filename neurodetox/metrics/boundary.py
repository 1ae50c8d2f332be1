"""Where an answer ends, and how a fact prompt is shown to the model.

**Answer boundary.** INSIDE's generation (Chen et al., ICLR 2024, arXiv 2402.03744; code
github alibaba/eigenscore, ``dataeval/triviaqa.py`` and ``dataeval/nq_open.py``,
``_generate_config``) stops every answer, greedy and sampled, at the first line break, comma
or full stop besides EOS, following the LLaMA paper's open-QA protocol: it adds the ids of
``"\\n"``, ``","`` and ``"."`` to ``eos_token_id``. The answer is the text before the stop,
and the embedded token is the last one before it. Ids differ per tokenizer, so
:func:`stop_token_ids` derives the set from the vocabulary: every token whose text starts
with a line break (``"\\n"``, ``"\\n\\n"``, ``"\\r\\n"``, ...) and the ``.`` and ``,`` tokens
(also with trailing whitespace, e.g. a merged ``".\\n"``).

**Prompt formats.** ``raw``: the fact's completion prompt as is. ``qa1shot``: INSIDE's
1-shot template for TriviaQA (``dataeval/triviaqa.py``, ``sample_to_prompt``):
``"Answer these questions:\\nQ: In Scotland a bothy/bothie is a?\\nA: House\\nQ: {q}\\nA:"``,
with the completion prompt as the question (a ``?`` appended, as in INSIDE's own example
question). ``chat``: the tokenizer's chat template with the prompt as the user turn and the
generation prompt appended.
"""

from __future__ import annotations

import weakref
from typing import Sequence

from neurodetox.core.errors import UserError
from neurodetox.metrics.settings import PROMPT_FORMATS, STOP_INSIDE, STOP_NONE, parse_stop

__all__ = ["QA1SHOT_TEMPLATE", "format_prompts", "stop_token_ids"]

#: INSIDE's 1-shot question-answer template (alibaba/eigenscore ``dataeval/triviaqa.py``).
QA1SHOT_TEMPLATE = "Answer these questions:\nQ: In Scotland a bothy/bothie is a?\nA: House\nQ: {question}\nA:"

_VOCAB_TEXT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_texts(tokenizer) -> list[str]:
    """The decoded text of every token id (cached per tokenizer object); ``""`` for special tokens."""
    try:
        cached = _VOCAB_TEXT.get(tokenizer)
    except TypeError:
        cached = None
    n = len(tokenizer)
    if cached is not None and len(cached) == n:
        return cached
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    texts = ["" if i in special else t for i, t in enumerate(texts)]
    try:
        _VOCAB_TEXT[tokenizer] = texts
    except TypeError:
        pass
    return texts


def stop_token_ids(tokenizer, stop=STOP_INSIDE) -> list[int]:
    """Token ids that end an answer (added to ``generate``'s ``eos_token_id``).

    Args:
        tokenizer: a Hugging Face tokenizer.
        stop: ``"inside"`` (default): every token whose text starts with a line break, and the
            ``.`` and ``,`` tokens (with or without trailing whitespace); ``"none"`` / ``None``:
            no stop token; user stop strings (``"a|b"`` or a list, see
            :func:`neurodetox.metrics.settings.parse_stop`): every token whose text starts with
            one of them.

    Returns:
        Sorted token ids (special tokens never included; EOS is handled separately).

    Raises:
        UserError: a stop string that tokenises to nothing (and no token's text starts with it),
            or that no single token starts with (it spans several tokens, so no token id can end
            the answer there).
    """
    spec = parse_stop(stop)
    if spec == STOP_NONE:
        return []
    texts = _token_texts(tokenizer)
    if spec == STOP_INSIDE:
        return [i for i, t in enumerate(texts) if t and (t[0] in "\n\r" or t.rstrip(" \t\r\n") in (".", ","))]
    ids: set[int] = set()
    for s in spec:
        found = [i for i, t in enumerate(texts) if t.startswith(s)]
        if not found and not tokenizer(s, add_special_tokens=False)["input_ids"]:
            raise UserError(f"stop string {s!r} tokenises to nothing with this tokenizer; give a visible string")
        if not found:
            raise UserError(
                f"no single token of this tokenizer starts with the stop string {s!r} (it spans several tokens); "
                "give a shorter stop string, e.g. its first character"
            )
        ids.update(found)
    return sorted(ids)


def format_prompts(tokenizer, prompts: Sequence[str], prompt_format: str = "raw") -> list[str]:
    """The prompts as the model sees them under ``prompt_format``.

    Args:
        tokenizer: the model's tokenizer (``chat`` uses its chat template).
        prompts: completion prompts such as ``"The capital of France is"``.
        prompt_format: ``"raw"`` (unchanged), ``"qa1shot"`` (:data:`QA1SHOT_TEMPLATE` with the
            prompt as the question) or ``"chat"``.

    Returns:
        One string per prompt.

    Raises:
        UserError: an unknown format, or ``chat`` with a tokenizer that has no chat template.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise UserError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "raw":
        return list(prompts)
    if prompt_format == "qa1shot":
        return [
            QA1SHOT_TEMPLATE.format(question=p.strip() if p.strip().endswith("?") else p.strip() + "?") for p in prompts
        ]
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "prompt_format='chat' needs a tokenizer with a chat template, and this one has none; "
            "use prompt_format='raw' or 'qa1shot'"
        )
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
