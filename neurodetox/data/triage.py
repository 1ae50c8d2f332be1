"""Which training facts the base model already knows: SliCK categories, and training on known facts only.

Gekhman et al., "Does Fine-Tuning LLMs on New Knowledge Encourage Hallucinations?", EMNLP 2024,
arXiv 2405.05904, found that fine-tuning examples the base model does not know are learned
slowly and, once learned, raise hallucination on held-out facts; training on the known
examples only does better. Their SliCK categories come from the base model's greedy and
sampled answers to each question:

* **HighlyKnown**: every greedy answer is correct (``P_greedy = 1``);
* **MaybeKnown**: some but not all greedy answers are correct (``0 < P_greedy < 1``);
* **WeaklyKnown**: no greedy answer is correct but some sampled answer is (``P_greedy = 0``,
  ``P_sampled > 0``);
* **Unknown**: no greedy or sampled answer is correct.

*Known* = the first three. **Departure:** Gekhman et al. vary the prompt over 10 random
4-shot exemplar sets and draw 16 samples at temperature 0.5 per set; here the prompt varies
over the fact's own phrasings (its completion prompt and up to ``phrasings − 1`` paraphrases)
in the prompt format of the detection work (``prompt_format``), with ``k`` samples per
phrasing. Answers end at the detection work's answer boundary (``stop``, INSIDE's line
break / ``.`` / ``,`` by default; :func:`neurodetox.metrics.sampling.sample_answers`), and an
answer is correct when it contains a gold alias (:func:`neurodetox.metrics.factual.is_correct`).

``neurodetox data triage`` writes :func:`triage_facts`' result as JSON; a training recipe's
``known_facts_file`` then keeps only the facts it labels known (:func:`filter_known`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from neurodetox.core.checks import check_int, check_number
from neurodetox.core.errors import UserError
from neurodetox.metrics.settings import DEFAULTS

__all__ = [
    "CATEGORIES",
    "KNOWN",
    "TriageResult",
    "TriageOutputArguments",
    "TriageSettings",
    "categorize",
    "fact_key",
    "filter_known",
    "parse_categories",
    "read_triage",
    "run_triage",
    "triage_facts",
]

#: SliCK categories (Gekhman et al., arXiv 2405.05904), most known first.
CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
#: The categories that count as known.
KNOWN = CATEGORIES[:3]
#: Format tag of a triage file.
TRIAGE_FORMAT = "neurodetox-triage/1"


@dataclass
class TriageSettings:
    """How the base model is asked about each fact (flags of ``neurodetox data triage``).

    Attributes:
        phrasings: phrasings asked per fact: the completion prompt plus up to ``phrasings − 1``
            paraphrases (≥ 1).
        k: sampled answers per phrasing (≥ 2; Gekhman et al.: 16).
        temperature: sampling temperature (> 0; Gekhman et al.: 0.5).
        top_p, top_k: nucleus and top-k sampling (the detection defaults).
        max_new_tokens: answer length cap in tokens (≥ 1).
        stop: answer boundary (``inside``, ``none`` or stop strings; the detection work's).
        prompt_format: ``raw``, ``qa1shot`` or ``chat`` (the detection work's).
        batch_size: phrasings per ``generate`` call (each expands to ``k`` rows), ≥ 1.
        seed: sampling seed.
    """

    phrasings: int = field(default=3, metadata={"help": "Phrasings per fact: the prompt plus paraphrases (>= 1)."})
    k: int = field(default=DEFAULTS.k, metadata={"help": "Sampled answers per phrasing (>= 2; Gekhman et al.: 16)."})
    temperature: float = field(default=0.5, metadata={"help": "Sampling temperature (> 0; Gekhman et al.: 0.5)."})
    top_p: float = field(default=DEFAULTS.top_p, metadata={"help": "Nucleus sampling top-p in (0, 1]."})
    top_k: int = field(default=DEFAULTS.top_k, metadata={"help": "Top-k sampling (>= 0)."})
    max_new_tokens: int = field(default=DEFAULTS.max_new_tokens, metadata={"help": "Answer length cap in tokens."})
    stop: str = field(
        default=DEFAULTS.stop,
        metadata={"help": "Answer boundary: 'inside' (line break, '.', ','), 'none' or stop strings 'a|b'."},
    )
    prompt_format: str = field(
        default=DEFAULTS.prompt_format, metadata={"help": "Prompt format: 'raw', 'qa1shot' or 'chat'."}
    )
    batch_size: int = field(default=8, metadata={"help": "Phrasings per generate call (each expands to k rows)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def __post_init__(self) -> None:
        check_int("phrasings", self.phrasings, minimum=1)
        check_int("k", self.k, minimum=2)
        check_number("temperature", self.temperature, minimum=0.0, min_inclusive=False)
        check_number("top_p", self.top_p, minimum=0.0, maximum=1.0, min_inclusive=False)
        check_int("top_k", self.top_k, minimum=0)
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seed", self.seed, minimum=None)


def categorize(greedy_correct: Sequence[bool], sampled_correct: Sequence[bool]) -> str:
    """SliCK category from the correctness of the greedy answers (one per phrasing) and the samples.

    Raises:
        ValueError: no greedy answer.
    """
    if not len(greedy_correct):
        raise ValueError("categorize needs at least one greedy answer")
    p_greedy = sum(map(bool, greedy_correct)) / len(greedy_correct)
    if p_greedy == 1:
        return "HighlyKnown"
    if p_greedy > 0:
        return "MaybeKnown"
    return "WeaklyKnown" if any(sampled_correct) else "Unknown"


def fact_key(row: Mapping[str, Any]) -> str:
    """A fact's identity in a triage file: its ``fact_id`` when it has one, else its statement."""
    return str(row.get("fact_id") or row["statement"])


def parse_categories(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"HighlyKnown,MaybeKnown"`` (or a list) → a tuple of valid categories.

    Raises:
        UserError: an empty list or an unknown category.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in CATEGORIES]
    if bad or not names:
        raise UserError(f"known_categories {spec!r} is invalid: give a comma list of {', '.join(CATEGORIES)}")
    return tuple(names)


@dataclass
class TriageResult:
    """What :func:`triage_facts` found.

    Attributes:
        records: per fact ``{"key", "statement", "category", "p_greedy", "p_sampled", "greedy"}``
            (``p_*``: fraction of greedy answers over phrasings / of sampled answers that are correct;
            ``greedy``: the greedy answers, one per phrasing).
        counts: facts per category (every category present, zeros included).
        settings: the :class:`TriageSettings` used, as a dict.
    """

    records: list[dict]
    counts: dict[str, int]
    settings: dict

    @property
    def known(self) -> int:
        """Facts in a known category."""
        return sum(self.counts[c] for c in KNOWN)

    def to_json(self, **extra: Any) -> dict:
        """The triage file's content (``format``, ``counts``, ``settings``, ``records`` and ``extra``)."""
        return {
            "format": TRIAGE_FORMAT,
            **extra,
            "counts": self.counts,
            "settings": self.settings,
            "records": self.records,
        }


def triage_facts(
    model,
    tokenizer,
    facts: Sequence[Mapping[str, Any]],
    settings: Optional[TriageSettings] = None,
    *,
    allow_all_unknown: bool = False,
    show_progress: bool = False,
) -> TriageResult:
    """Label each fact HighlyKnown / MaybeKnown / WeaklyKnown / Unknown for ``model`` (module docstring).

    Args:
        model, tokenizer: the base model (before fine-tuning) and its tokenizer.
        facts: rows with ``prompt``, ``aliases``, ``statement`` and optionally ``paraphrases``, ``fact_id``
            (the fact schema of :mod:`neurodetox.data`).
        settings: :class:`TriageSettings` (default: its defaults).
        allow_all_unknown: return a result even when every fact is Unknown.
        show_progress: a progress bar over generate batches.

    Returns:
        :class:`TriageResult`, records in ``facts`` order.

    Raises:
        UserError: no facts, a fact without prompt or aliases, or (unless ``allow_all_unknown``)
            a model that knows none of the facts (training on known facts would have no data).
    """
    from neurodetox.metrics.boundary import format_prompts
    from neurodetox.metrics.factual import is_correct
    from neurodetox.metrics.sampling import sample_answers

    settings = settings or TriageSettings()
    if not len(facts):
        raise UserError("triage needs at least one fact, got none")
    owners: list[int] = []
    prompts: list[str] = []
    for i, row in enumerate(facts):
        if not row.get("prompt") or not row.get("aliases"):
            raise UserError(f"fact {i} ({row.get('statement', '?')!r}) has no prompt or no aliases: it cannot be asked")
        phr = [row["prompt"], *(row.get("paraphrases") or [])][: settings.phrasings]
        prompts += phr
        owners += [i] * len(phr)
    out = sample_answers(
        model,
        tokenizer,
        format_prompts(tokenizer, prompts, settings.prompt_format),
        k=settings.k,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        seed=settings.seed,
        greedy=True,
        show_progress=show_progress,
        stop=settings.stop,
    )
    greedy: list[list[bool]] = [[] for _ in facts]
    sampled: list[list[bool]] = [[] for _ in facts]
    answers: list[list[str]] = [[] for _ in facts]
    for j, i in enumerate(owners):
        aliases = facts[i]["aliases"]
        greedy[i].append(is_correct(out.greedy[j], aliases))
        sampled[i] += [is_correct(s, aliases) for s in out.samples[j]]
        answers[i].append(out.greedy[j])
    records = []
    for i, row in enumerate(facts):
        records.append(
            {
                "key": fact_key(row),
                "statement": row["statement"],
                "category": categorize(greedy[i], sampled[i]),
                "p_greedy": sum(greedy[i]) / len(greedy[i]),
                "p_sampled": sum(sampled[i]) / len(sampled[i]),
                "greedy": answers[i],
            }
        )
    counted = Counter(r["category"] for r in records)
    result = TriageResult(records, {c: counted.get(c, 0) for c in CATEGORIES}, asdict(settings))
    if result.known == 0 and not allow_all_unknown:
        raise UserError(
            f"the model knows none of the {len(records)} facts (all Unknown: no greedy or sampled answer contains "
            "a gold alias): training on known facts only would have no data; check the model, the prompt_format "
            "and the stop setting, or train on all facts"
        )
    return result


def read_triage(path: str | Path) -> dict:
    """Load a triage file written by ``neurodetox data triage``.

    Raises:
        UserError: missing file, not JSON, or not a triage file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"known_facts_file {p} not found: write it with `neurodetox data triage --out {p}`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"known_facts_file {p} is not a JSON triage file: {e}") from None
    if not isinstance(data, dict) or data.get("format") != TRIAGE_FORMAT or not isinstance(data.get("records"), list):
        raise UserError(f"known_facts_file {p} is not a triage file written by `neurodetox data triage`")
    return data


def filter_known(train, path: str | Path, categories: str | Sequence[str] = KNOWN, split: Optional[dict] = None):
    """Keep the training facts that the triage file at ``path`` labels with one of ``categories``.

    Args:
        train: the training split (``datasets.Dataset`` or a list of fact rows).
        path: a ``neurodetox data triage`` file of the same facts.
        categories: categories kept (default: the known ones, :data:`KNOWN`).
        split: the run's split record (:meth:`neurodetox.data.settings.FactDataArguments.split_record`);
            when given it must equal the one the triage file recorded.

    Returns:
        The filtered split (same type as ``train``), in its original order.

    Raises:
        UserError: the file is missing or not a triage file; it was made for another split; a
            training fact has no label in it; or no fact is left (e.g. all Unknown).
    """
    keep = set(parse_categories(categories))
    data = read_triage(path)
    if split is not None and data.get("split") is not None and data["split"] != split:
        diff = sorted(k for k in set(split) | set(data["split"]) if split.get(k) != data["split"].get(k))
        raise UserError(
            f"known_facts_file {path} was made for another data split (differs in {', '.join(diff)}): "
            "run `neurodetox data triage` with this run's data settings"
        )
    labels = {r["key"]: r["category"] for r in data["records"]}
    rows = list(train)
    missing = [fact_key(r) for r in rows if fact_key(r) not in labels]
    if missing:
        raise UserError(
            f"known_facts_file {path} has no label for {len(missing)} of the {len(rows)} training facts "
            f"(e.g. {missing[0]!r}): run `neurodetox data triage` on this run's training split"
        )
    idx = [i for i, r in enumerate(rows) if labels[fact_key(r)] in keep]
    if not idx:
        raise UserError(
            f"no training fact is in {', '.join(sorted(keep))} according to {path} "
            f"(counts: {data.get('counts')}): training on known facts only would have no data"
        )
    return train.select(idx) if hasattr(train, "select") else [rows[i] for i in idx]


@dataclass
class TriageOutputArguments:
    """Where ``neurodetox data triage`` writes its labels, and of which split.

    Attributes:
        output: the triage JSON file (written atomically; alias ``--out``).
        split: the split whose facts are labelled (default ``train``: what ``known_facts_file`` filters).
        overwrite: replace an existing file.
        allow_all_unknown: write the file even when the model knows none of the facts.
    """

    output: str = field(metadata={"help": "Triage JSON file to write (atomically).", "aliases": ["--out"]})
    split: str = field(default="train", metadata={"help": "Split to label: train (default), tracking or test."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing file."})
    allow_all_unknown: bool = field(
        default=False, metadata={"help": "Write the file even if the model knows none of the facts."}
    )

    def __post_init__(self) -> None:
        if self.split not in ("train", "tracking", "test"):
            raise UserError(f"split {self.split!r} is invalid: must be train, tracking or test")


def run_triage(model_args, data_args, settings: TriageSettings, out: TriageOutputArguments, show_progress=True) -> dict:
    """``neurodetox data triage``: label a split's facts for a model and write the triage file.

    Args:
        model_args: :class:`neurodetox.core.settings.ModelArguments`.
        data_args: :class:`neurodetox.data.settings.FactDataArguments` (the same data settings as the
            training run whose ``known_facts_file`` this becomes; the split is recorded and checked).
        settings, out: :class:`TriageSettings`, :class:`TriageOutputArguments`.

    Returns:
        The written file's content.

    Raises:
        UserError: an existing output without ``overwrite``, an empty split, a model that knows none
            of the facts (unless ``allow_all_unknown``), or any model/data error.
    """
    import time

    from neurodetox.core.io import atomic_write_json
    from neurodetox.core.models import load_model

    path = Path(out.output).expanduser()
    if path.exists() and not out.overwrite:
        raise UserError(f"{path} exists: pass --overwrite to replace it")
    if path.is_dir():
        raise UserError(f"output {path} is a folder; give a .json file path")
    ds = data_args.load()
    rows = list(ds[out.split])
    if not rows:
        raise UserError(f"the {out.split!r} split of {data_args.data} is empty: nothing to triage")
    model, tok = load_model(model_args.model_name_or_path, dtype=model_args.model_dtype, tokenizer=model_args.tokenizer)
    t0 = time.time()
    result = triage_facts(
        model, tok, rows, settings, allow_all_unknown=out.allow_all_unknown, show_progress=show_progress
    )
    content = result.to_json(
        model=model_args.model_name_or_path,
        split=data_args.split_record(),
        fact_split=out.split,
        seconds=round(time.time() - t0, 1),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, content)
    return content
