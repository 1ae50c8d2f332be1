"""Console tables that fit the terminal.

Rich wraps a long cell over as many lines as it needs, so a prompt column can fill a screen at 80
columns. :func:`fitted_table` keeps short columns whole and truncates the long-text columns (``wide``)
with an ellipsis so the table fits in the console width; the full text is always in the command's JSON
or patch-file output, which the caller names in ``caption``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MIN_WIDE = 8  # a truncated column keeps at least this many characters


def wide_column_widths(natural: Sequence[int], wide: Sequence[bool], width: int) -> list[int | None]:
    """Character budget of each column so that the table fits in ``width`` terminal columns.

    A rich table with the default box and padding uses ``3 * n + 1`` characters besides the cells
    (one padding space each side of a cell and ``n + 1`` rules). Short columns keep their natural width;
    the wide columns share what is left by water-filling (a column narrower than its fair share keeps
    its natural width and frees the rest), each keeping at least :data:`MIN_WIDE`.

    Args:
        natural: widest cell (header included) of each column, in characters.
        wide: which columns may be truncated.
        width: the terminal width in characters.

    Returns:
        per column, the maximum width to set (``None``: keep the natural width).

    Raises:
        ValueError: if ``natural`` and ``wide`` differ in length.
    """
    if len(natural) != len(wide):
        raise ValueError(f"natural ({len(natural)}) and wide ({len(wide)}) must have the same length")
    n = len(natural)
    fixed = sum(w for w, is_wide in zip(natural, wide) if not is_wide)
    avail = width - (3 * n + 1) - fixed
    todo = [i for i in range(n) if wide[i]]
    out: list[int | None] = [None] * n
    if sum(natural[i] for i in todo) <= avail:
        return out
    while todo:
        share = max(MIN_WIDE, avail // len(todo))
        fits = [i for i in todo if natural[i] <= share]
        if not fits:
            for i in todo:
                out[i] = share
            break
        for i in fits:
            avail -= natural[i]
            todo.remove(i)
    return out


def fitted_table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    wide: Iterable[str] = (),
    justify: dict[str, str] | None = None,
    width: int | None = None,
    caption: str | None = None,
):
    """A ``rich.table.Table`` whose ``wide`` columns are truncated with "…" to fit the terminal.

    Args:
        title: table title (``None`` for none).
        columns: column headers.
        rows: cell strings, one sequence per row, in column order.
        wide: headers of the columns that may be truncated (prompts, targets, token lists).
        justify: optional ``{header: "left"|"center"|"right"}``.
        width: terminal width in characters; default: what ``rich.console.Console`` detects (the
            terminal, else ``$COLUMNS``, else 80).
        caption: shown under the table, e.g. where the untruncated text is written.

    Returns:
        the table, ready for ``Console.print``.

    Raises:
        ValueError: if a row has a different number of cells than ``columns``.
    """
    from rich.console import Console
    from rich.table import Table

    rows = [[str(c) for c in r] for r in rows]
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"a row has {len(r)} cells for {len(columns)} columns: {r!r}")
    wide = set(wide)
    width = Console().width if width is None else width
    natural = [
        max([len(h)] + [max((len(line) for line in r[i].splitlines()), default=0) for r in rows])
        for i, h in enumerate(columns)
    ]
    caps = wide_column_widths(natural, [h in wide for h in columns], width)
    t = Table(title=title, caption=caption)
    for h, cap, nat in zip(columns, caps, natural):
        kw = {"justify": (justify or {}).get(h, "left")}
        if h in wide:
            t.add_column(h, no_wrap=True, overflow="ellipsis", max_width=cap, **kw)
        else:
            t.add_column(h, no_wrap=True, min_width=nat, **kw)
    for r in rows:
        t.add_row(*r)
    return t
