"""Console tables fit the terminal: long cells are cut with "…", short ones stay whole (issue 20)."""

from __future__ import annotations

import io
import random
from types import SimpleNamespace

import pytest

from neurodetox.reports.tables import MIN_WIDE, fitted_table, wide_column_widths


def _largest_fair_cap(natural, avail):
    """Brute force: the largest cap c with sum(min(n, c)) <= avail (max-min fair share)."""
    return max(c for c in range(0, max(natural) + 1) if sum(min(n, c) for n in natural) <= avail)


@pytest.mark.parametrize("seed", range(40))
def test_water_filling_equals_the_brute_force_fair_cap(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 4)
    fixed = [rng.randint(1, 12) for _ in range(rng.randint(0, 5))]
    wide = [rng.randint(1, 120) for _ in range(k)]
    width = rng.randint(60, 200)
    natural = fixed + wide
    flags = [False] * len(fixed) + [True] * k
    caps = wide_column_widths(natural, flags, width)
    avail = width - (3 * len(natural) + 1) - sum(fixed)
    if sum(wide) <= avail:
        assert caps == [None] * len(natural)
        return
    c = _largest_fair_cap(wide, avail)
    if c < MIN_WIDE:  # too narrow for a fair share: every cut column keeps MIN_WIDE characters
        assert all(cap is None or cap == MIN_WIDE for cap in caps[len(fixed) :])
        assert all(cap is None for cap in caps[: len(fixed)])
        return
    got = [min(n, cap) if cap is not None else n for n, cap in zip(wide, caps[len(fixed) :])]
    assert got == [min(n, c) for n in wide]
    assert sum(got) + sum(fixed) + 3 * len(natural) + 1 <= width


def test_minimum_width_is_kept_when_nothing_fits():
    caps = wide_column_widths([5, 100, 100], [False, True, True], 20)
    assert caps == [None, MIN_WIDE, MIN_WIDE]


def test_lengths_must_match():
    with pytest.raises(ValueError, match="same length"):
        wide_column_widths([1, 2], [True], 80)


def _render(table, width):
    from rich.console import Console

    buf = io.StringIO()
    Console(width=width, file=buf).print(table)
    return buf.getvalue().splitlines()


def test_patch_find_table_fits_80_columns_one_line_per_edit(monkeypatch):
    from neurodetox.cli.patch import _edit_table

    long_prompt = "The official language spoken in the country of Burkina Faso, in West Africa, is"
    edits = [
        SimpleNamespace(
            index=i,
            edit=SimpleNamespace(prompt=long_prompt + f" (#{i})", target="French"),
            status="fixed",
            failures=[SimpleNamespace(status="fixed")],
            neurons=[(28, 1234), (27, 55), (26, 9999)],
            reference_flips=0,
            attempts=1,
            seconds=12.25,
        )
        for i in range(3)
    ]
    monkeypatch.setenv("COLUMNS", "80")  # what rich reads when stdout is not a terminal
    lines = _render(_edit_table(SimpleNamespace(edits=edits), caption="full text: x"), 80)
    assert max(len(line) for line in lines) <= 80
    body = [line for line in lines if line.startswith("│")]
    assert len(body) == 3  # no cell wrapped onto a second line
    assert all("…" in line and "fixed" in line and "12.2" in line for line in body)
    monkeypatch.setenv("COLUMNS", "200")
    wide_lines = _render(_edit_table(SimpleNamespace(edits=edits)), 200)
    assert sum(long_prompt in line for line in wide_lines) == 3  # a wide terminal shows the whole prompt


def test_row_length_is_checked():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        fitted_table("t", ("a", "b", "c"), [("1", "2")])


BAR_SCRIPT = """
import sys, time
from neurodetox.cli.main import _quiet_third_party
_quiet_third_party()  # what `neurodetox ...` runs before it imports transformers or tqdm
from tqdm.auto import tqdm
for _ in tqdm(range(25), desc="work"):
    time.sleep(0.02)  # 0.5 s: tqdm's default 0.1 s refresh would write about 5 lines
"""


@pytest.mark.parametrize("preset", [None, "0"])
def test_progress_bars_in_a_log_file_refresh_rarely_and_keep_user_settings(preset):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_MININTERVAL", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env.pop("DS_ACCELERATOR", None)  # as for a user: _quiet_third_party then imports torch, which imports tqdm
    if preset is not None:
        env["TQDM_MININTERVAL"] = preset  # the user's own setting wins
    proc = subprocess.run([sys.executable, "-c", BAR_SCRIPT], stderr=subprocess.PIPE, env=env, check=True, timeout=120)
    refreshes = proc.stderr.count(b"\r")  # bytes: text mode would turn "\r" into "\n"
    if preset is None:
        assert refreshes <= 3, proc.stderr  # the first and the final state only
    else:
        assert refreshes >= 5, proc.stderr
