"""Correctness of short factual answers against gold aliases.

Normalisation follows the SQuAD / TriviaQA evaluation convention (lowercase,
drop punctuation and the articles a/an/the, collapse whitespace), plus accent
stripping. An answer is correct when one of the gold aliases occurs in its
first line as a whole-word sequence — the lenient "contains" label commonly
used for EigenScore evaluation (INSIDE, arXiv 2402.03744, evaluates against the
greedy answer). Note "The Illusion of Progress" (EMNLP 2025): such labels are
lenient; report them as such.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Iterable, Sequence, Union

__all__ = ["normalize_answer", "is_correct", "factual_accuracy"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Normalise an answer or alias for matching.

    Steps: lowercase; Unicode NFKD and drop combining marks (``"Zürich"`` →
    ``"zurich"``); delete punctuation (Unicode categories ``P*`` and ASCII
    ``string.punctuation``, so ``"U.S."`` → ``"us"``); drop the articles
    ``a``, ``an``, ``the`` as whole words; collapse whitespace and strip.

    Args:
        text: any string.

    Returns:
        The normalised string (may be empty).

    Raises:
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str, got {type(text).__name__}")
    s = unicodedata.normalize("NFKD", text.lower())
    s = "".join(
        ch
        for ch in s
        if not unicodedata.combining(ch) and ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P")
    )
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _first_line(answer: str) -> str:
    stripped = answer.lstrip()
    return stripped.split("\n", 1)[0] if stripped else ""


def is_correct(answer: str, aliases: Union[str, Iterable[str]]) -> bool:
    """Whether ``answer`` contains one of the gold ``aliases``.

    Only the answer's first line counts (leading whitespace and blank lines are
    skipped first, so ``"\\nParis"`` is judged on ``"Paris"``). Both sides go
    through :func:`normalize_answer`; the answer is correct when any alias that
    is non-empty after normalisation occurs in it as a whole-word sequence:
    ``" Paris. It is known"`` matches ``"Paris"``, ``"Parisian"`` does not.

    Args:
        answer: the model's answer.
        aliases: one gold string or an iterable of accepted strings.

    Returns:
        ``True`` if some alias matches, else ``False`` (also when no alias is
        non-empty after normalisation).

    Raises:
        TypeError: ``answer`` or an alias is not a string.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    if isinstance(aliases, str):
        aliases = [aliases]
    hay = f" {normalize_answer(_first_line(answer))} "
    for alias in aliases:
        needle = normalize_answer(alias)
        if needle and f" {needle} " in hay:
            return True
    return False


def factual_accuracy(answers: Sequence[str], aliases_list: Sequence[Union[str, Iterable[str]]]) -> float:
    """Fraction of answers judged correct by :func:`is_correct`.

    Args:
        answers: ``N`` answers.
        aliases_list: ``N`` alias lists (or single strings), aligned with
            ``answers``.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: empty input, or ``len(answers) != len(aliases_list)``.
    """
    answers = list(answers)
    aliases_list = list(aliases_list)
    if not answers:
        raise ValueError("factual_accuracy needs at least one answer, got an empty list")
    if len(answers) != len(aliases_list):
        raise ValueError(
            f"answers and aliases_list must have the same length, got {len(answers)} answers "
            f"and {len(aliases_list)} alias lists"
        )
    return sum(is_correct(a, al) for a, al in zip(answers, aliases_list)) / len(answers)
