"""Issue 19 items 7, 8: atomic writes keep file modes, name their temps, report disk errors; safe-path helpers."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from neurodetox.core.errors import UserError
from neurodetox.core.io import atomic_write, atomic_write_json, atomic_write_text
from neurodetox.core.paths import (
    TEMP_PREFIX,
    PathExistsError,
    check_disjoint,
    check_writable_destination,
    clean_stale_temps,
    is_within,
)


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    p = tmp_path / "summary.json"
    p.write_text("{}")
    p.chmod(0o644)
    atomic_write_json(p, {"a": 1})
    assert stat.S_IMODE(p.stat().st_mode) == 0o644 and p.read_text().startswith("{")
    p.chmod(0o640)
    atomic_write_text(p, "x")
    assert stat.S_IMODE(p.stat().st_mode) == 0o640


def test_atomic_write_new_file_gets_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644


def test_atomic_write_temp_is_recognisable_and_removed_on_error(tmp_path):
    seen = []

    def write(tmp):
        seen.append(os.path.basename(tmp))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.json", write)
    assert seen[0].startswith(TEMP_PREFIX + "out.json.") and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_is_one_user_error(tmp_path, err):
    def write(tmp):
        raise OSError(err, os.strerror(err))

    with pytest.raises(UserError, match=f"cannot write .*out.json: {os.strerror(err)}"):
        atomic_write(tmp_path / "out.json", write)
    assert list(tmp_path.iterdir()) == []


def test_clean_stale_temps_removes_only_ours_and_respects_age(tmp_path):
    ours = tmp_path / f"{TEMP_PREFIX}model.safetensors.abc.tmp"
    ours_dir = tmp_path / f"{TEMP_PREFIX}final.xyz"
    legacy = tmp_path / ".model.safetensors.q1.neurodetox.tmp"
    theirs = tmp_path / ".model.safetensors.tmp"
    for p in (ours, legacy, theirs):
        p.write_text("x")
    ours_dir.mkdir()
    (ours_dir / "f").write_text("x")
    assert clean_stale_temps(tmp_path, min_age_s=3600) == []  # too fresh: maybe a live writer
    old = time.time() - 7200
    for p in (ours, legacy, ours_dir):
        os.utime(p, (old, old))
    removed = clean_stale_temps(tmp_path, min_age_s=3600)
    assert sorted(p.name for p in removed) == sorted([ours.name, legacy.name, ours_dir.name])
    assert theirs.exists()


def test_check_writable_destination(tmp_path):
    f = tmp_path / "eval.json"
    assert check_writable_destination(f) == f
    f.write_text("old")
    with pytest.raises(PathExistsError, match="already exists"):
        check_writable_destination(f, what="--out")
    assert check_writable_destination(f, overwrite=True) == f
    (tmp_path / "empty").mkdir()
    assert check_writable_destination(tmp_path / "empty")  # an empty folder is not "existing output"
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable_destination(f / "below.json")
    assert f.read_text() == "old"


def test_check_disjoint_and_is_within(tmp_path):
    a = tmp_path / "a"
    (a / "b").mkdir(parents=True)
    assert is_within(a / "b", a) and is_within(a, a) and not is_within(a, a / "b")
    (tmp_path / "link").symlink_to(a / "b")
    assert is_within(tmp_path / "link", a)  # symlinks resolved
    check_disjoint(tmp_path / "c", [("checkpoint", a), ("patch", None)])
    for out, word in [(a, "itself"), (tmp_path, "contains"), (a / "b" / "c", "inside"), (tmp_path / "link", "inside")]:
        with pytest.raises(UserError, match=word):
            check_disjoint(out, [("checkpoint", a)])


def test_data_facts_refuses_to_replace_the_working_folder(tmp_path, monkeypatch):
    from neurodetox.data import build_fact_dataset, write_fact_dataset

    ds = build_fact_dataset(relations=("capital_of",), max_facts_per_relation=5)
    (tmp_path / "mine.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="working folder"):
        write_fact_dataset(ds, ".", overwrite=True)
    with pytest.raises(PathExistsError, match=r"--overwrite"):
        write_fact_dataset(ds, ".")
    assert (tmp_path / "mine.txt").read_text() == "mine"
    out = write_fact_dataset(ds, tmp_path / "facts")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
