"""core.io.replace_folder: the destination is always whole (old or new), never missing or mixed."""

import os

import pytest

from neurodetox.core.io import replace_folder


def _folder(path, text):
    path.mkdir()
    (path / "a.txt").write_text(text)
    return path


def test_new_destination_is_a_rename(tmp_path):
    tmp = _folder(tmp_path / ".tmp", "new")
    out = replace_folder(tmp, tmp_path / "out")
    assert (out / "a.txt").read_text() == "new" and not tmp.exists()


@pytest.mark.parametrize("kind", ["folder", "file", "link"])
def test_existing_destination_is_swapped_and_nothing_is_left_behind(tmp_path, kind):
    dst = tmp_path / "out"
    if kind == "folder":
        _folder(dst, "old")
    elif kind == "file":
        dst.write_text("old")
    else:
        target = _folder(tmp_path / "elsewhere", "keep")
        dst.symlink_to(target)
    tmp = _folder(tmp_path / ".tmp", "new")
    replace_folder(tmp, dst)
    assert (dst / "a.txt").read_text() == "new" and not dst.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + (["elsewhere"] if kind == "link" else []))
    if kind == "link":  # the link is replaced, never written through
        assert (tmp_path / "elsewhere" / "a.txt").read_text() == "keep"


def test_failed_swap_puts_the_old_destination_back(tmp_path, monkeypatch):
    dst = _folder(tmp_path / "out", "old")
    tmp = _folder(tmp_path / ".tmp", "new")
    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the rename of tmp into place
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        replace_folder(tmp, dst)
    assert (dst / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp", "out"]
