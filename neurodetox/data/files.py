"""Load user fact data (json, jsonl, csv, parquet, or a folder from ``write_fact_dataset``)
into the fact schema of :mod:`neurodetox.data.facts`."""

from __future__ import annotations

import bisect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import datasets

from neurodetox.core.errors import UserError
from neurodetox.core.paths import PathNotFoundError
from neurodetox.data.facts import (
    RELATIONS,
    SPLITS,
    assign_splits,
    build_fact_dataset,
    expand_aliases,
    to_dataset_dict,
    validate_fractions,
    validate_seed,
)

__all__ = ["SUPPORTED_EXTENSIONS", "load_fact_file", "load_facts"]

#: File extension -> ``datasets`` builder name.
SUPPORTED_EXTENSIONS: Mapping[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return ""
    return str(value).strip()


def _text_list(value: Any) -> list[str]:
    """A list, or a ``|``-separated string, as a list of non-blank strings."""
    if value is None:
        return []
    if isinstance(value, str):
        items: Iterable[Any] = value.split("|")
    elif isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
    else:
        items = [value]
    return [t for t in (_text(v) for v in items) if t]


def _normalize_row(row: Mapping[str, Any], index: int, text_column: str) -> dict[str, Any]:
    statement = _text(row.get(text_column))
    if not statement:
        raise UserError(f"row {index}: column {text_column!r} is empty")
    prompt, answer = _text(row.get("prompt")), _text(row.get("answer"))
    # Derive the missing one of prompt/answer when the statement is "<prompt> <answer>."
    if prompt and not answer and statement.startswith(prompt + " ") and statement.endswith("."):
        answer = statement[len(prompt) + 1 : -1].strip()
    elif answer and not prompt and statement.endswith(" " + answer + "."):
        prompt = statement[: -len(answer) - 2].rstrip()
    aliases = _text_list(row.get("aliases"))
    return {
        "fact_id": _text(row.get("fact_id")) or f"row:{index}",
        "relation": _text(row.get("relation")) or "custom",
        "subject": _text(row.get("subject")),
        "answer": answer,
        "aliases": expand_aliases(answer, aliases) if answer else expand_aliases("", aliases),
        "statement": statement,
        "prompt": prompt,
        "paraphrases": list(dict.fromkeys(_text_list(row.get("paraphrases")))),
    }


def _normalize_rows(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str], source: Path, start: int = 0
) -> list[tuple[dict[str, Any], str | None]]:
    """Normalise rows; returns (record, split from the ``split`` column or None)."""
    if "statement" in columns:
        text_column = "statement"
    elif "text" in columns:
        text_column = "text"
    else:
        raise UserError(f"{source}: a 'statement' (or 'text') column is required; columns found: {list(columns)}")
    out = []
    for i, row in enumerate(rows, start=start):
        split = None
        if "split" in columns:
            split = _text(row.get("split")).lower()
            if split not in SPLITS:
                raise UserError(f"{source}: row {i} has split {row.get('split')!r}; valid splits are {list(SPLITS)}")
        out.append((_normalize_row(row, i, text_column), split))
    return out


def _check_and_build(records: list[dict[str, Any]], splits: dict[str, list[dict[str, Any]]], source: Path):
    if not records:
        raise UserError(f"{source}: no rows to load")
    seen: set[str] = set()
    duplicates = []
    for rec in records:
        if rec["fact_id"] in seen:
            duplicates.append(rec["fact_id"])
        seen.add(rec["fact_id"])
    if duplicates:
        raise UserError(f"{source}: fact_id values must be unique; duplicated: {sorted(set(duplicates))[:10]}")
    # A held-out statement equal to, or the ending of, a train/tracking statement.
    seen = sorted(r["statement"][::-1] for split in ("train", "tracking") for r in splits[split])
    leaked = []
    for rec in splits["test"]:
        key = rec["statement"][::-1]
        i = bisect.bisect_left(seen, key)
        if i < len(seen) and seen[i].startswith(key):
            leaked.append(rec["statement"])
    if leaked:
        warnings.warn(
            f"{source}: {len(leaked)} test statement(s) also appear in train/tracking, e.g. {leaked[0]!r}",
            stacklevel=3,
        )
    return to_dataset_dict(splits)


def _file_problem(path: Path, builder: str) -> str | None:
    """Why ``path`` cannot be read as ``builder`` (empty, not UTF-8, a malformed JSON line), or ``None``."""
    data = path.read_bytes()
    if not data.strip():
        return f"{path} is empty: a fact file needs at least one row with a 'statement' column"
    if builder == "parquet":
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return (
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at line {line} (a Latin-1/Windows-1252 file?); "
            f"re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}"
        )
    if builder == "json":
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                rows = json.loads(text)
            except ValueError as e:
                return f"{path} is not valid JSON ({e})"
            return f"{path} holds an empty JSON list: no rows to load" if not rows else None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                if number == 1 and stripped.startswith("{"):
                    try:
                        json.loads(text)
                        return None  # one JSON object spread over several lines
                    except ValueError:
                        pass
                return f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}"
            if not isinstance(row, dict):
                return f"{path}: line {number} is a JSON {type(row).__name__}, expected an object with a 'statement'"
    return None


def _read_file(path: Path, builder: str, cache_dir: str | None) -> datasets.Dataset:
    """``datasets.load_dataset`` on one file; what it cannot read becomes one :class:`UserError` line."""
    problem = _file_problem(path, builder)
    if problem:
        raise UserError(problem)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration, ImportError) as e:
        cause = e.__cause__ or e.__context__ or e
        if "corresponds to no data" in str(e):
            raise UserError(f"{path} has no rows to load (only a header or blank lines)") from None
        raise UserError(f"cannot read {path} as {builder}: {type(cause).__name__}: {str(cause)[:200]}") from None


def _load_saved_folder(path: Path) -> datasets.DatasetDict:
    dataset_path = path / "dataset" if (path / "dataset" / "dataset_dict.json").is_file() else path
    loaded = datasets.load_from_disk(str(dataset_path))
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    unknown = [s for s in loaded if s not in SPLITS]
    if unknown:
        raise UserError(f"{path}: unknown split(s) {unknown}; valid splits are {list(SPLITS)}")
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    records = []
    start = 0
    for split in SPLITS:
        if split not in loaded:
            continue
        ds = loaded[split]
        for rec, _ in _normalize_rows(ds, ds.column_names, path, start=start):
            splits[split].append(rec)
            records.append(rec)
        start += len(ds)
    return _check_and_build(records, splits, path)


def load_fact_file(
    path: str | os.PathLike,
    seed: int = 0,
    tracking_fraction: float = 0.1,
    test_fraction: float = 0.1,
    *,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load user facts into the fact schema (splits ``train``, ``tracking``, ``test``).

    Args:
        path: a local ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` file (read with
            ``datasets.load_dataset``), or a folder written by
            :func:`~neurodetox.data.write_fact_dataset` (its ``dataset/`` is read
            with ``datasets.load_from_disk``; its stored splits are kept).
        seed, tracking_fraction, test_fraction: deterministic split, stratified by
            relation, as in :func:`~neurodetox.data.build_fact_dataset`; used only
            for files without a ``split`` column.
        cache_dir: ``datasets`` cache folder for files (default: the HF cache).

    Columns: ``statement`` is required (a ``text`` column is accepted instead).
    Optional: ``prompt``, ``answer`` (whichever is missing is derived when the
    statement reads ``"<prompt> <answer>."``), ``aliases`` and ``paraphrases`` (a
    list or a ``|``-separated string), ``relation`` (default ``"custom"``),
    ``fact_id`` (default ``"row:<index>"``), ``subject`` (default ``""``) and
    ``split`` (``train``/``tracking``/``test``, honoured when present). Other
    columns are dropped. Unknown values are filled with ``""`` or ``[]``; aliases
    always start with the answer and include accent-stripped variants.

    Returns:
        ``DatasetDict`` with the columns of :data:`~neurodetox.data.FACT_FEATURES`.

    Raises:
        PathNotFoundError: ``path`` does not exist (also a ``FileNotFoundError``).
        UserError: an empty file; a file that is not UTF-8 (names the byte and line); a malformed
            JSON line (names the line number); unsupported extension; folder not written by
            ``write_fact_dataset``; no ``statement``/``text`` column; empty
            statement; invalid ``split`` value; duplicate ``fact_id``; no rows; bad
            fractions.
        TypeError: ``seed`` is not an int.
    """
    validate_seed(seed)
    validate_fractions(tracking_fraction, test_fraction)
    p = Path(path).expanduser()
    if not p.exists():
        raise PathNotFoundError(f"fact file not found: {p}")
    if p.is_dir():
        if (p / "dataset" / "dataset_dict.json").is_file() or (p / "dataset_dict.json").is_file():
            return _load_saved_folder(p)
        raise UserError(
            f"{p} is a folder but not one written by write_fact_dataset (no dataset/dataset_dict.json inside)"
        )
    builder = SUPPORTED_EXTENSIONS.get(p.suffix.lower())
    if builder is None:
        raise UserError(
            f"unsupported fact file extension {p.suffix!r} for {p}; "
            f"supported: {sorted(SUPPORTED_EXTENSIONS)} or a folder from write_fact_dataset"
        )
    ds = _read_file(p, builder, cache_dir)
    rows = _normalize_rows(ds, ds.column_names, p)
    records = [rec for rec, _ in rows]
    if "split" in ds.column_names:
        splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for rec, split in rows:
            splits[split].append(rec)
    else:
        splits = assign_splits(records, seed, tracking_fraction, test_fraction)
    return _check_and_build(records, splits, p)


def load_facts(
    source: str | os.PathLike = "facts",
    *,
    seed: int = 0,
    tracking_fraction: float = 0.1,
    test_fraction: float = 0.1,
    relations: Sequence[str] | None = None,
    max_facts_per_relation: int | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load facts from the built-in set or from a user file.

    Args:
        source: ``"facts"`` (default) for :func:`~neurodetox.data.build_fact_dataset`,
            otherwise a path for :func:`load_fact_file`.
        seed, tracking_fraction, test_fraction: the split, for either source.
        relations: built-in relations to include (default: all); ``"facts"`` only.
        max_facts_per_relation: cap per relation (default: none); ``"facts"`` only.
        cache_dir: ``datasets`` cache folder, used for files only.

    Returns:
        ``DatasetDict`` with splits ``train``, ``tracking``, ``test`` in the fact schema.

    Raises:
        ValueError: ``relations`` or ``max_facts_per_relation`` given with a file
            source, plus everything the called loader raises.
        FileNotFoundError: the file source does not exist.
    """
    if isinstance(source, str) and source == "facts":
        return build_fact_dataset(
            relations=RELATIONS if relations is None else relations,
            seed=seed,
            tracking_fraction=tracking_fraction,
            test_fraction=test_fraction,
            max_facts_per_relation=max_facts_per_relation,
        )
    given = [
        name
        for name, value in (("relations", relations), ("max_facts_per_relation", max_facts_per_relation))
        if value is not None
    ]
    if given:
        raise UserError(f"{given} only apply to source='facts', not to the file {str(source)!r}")
    return load_fact_file(
        source,
        seed=seed,
        tracking_fraction=tracking_fraction,
        test_fraction=test_fraction,
        cache_dir=cache_dir,
    )
