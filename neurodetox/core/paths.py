"""Safe paths: names read from files stay inside their folder, outputs never swallow inputs.

Every name that a file on disk gives us (a shard name in ``model.safetensors.index.json``,
a file name in a patch manifest) goes through :func:`safe_member`, which refuses absolute
paths, ``..`` components and anything whose resolved path (symlinks followed) leaves the
folder, before a byte is read or written. Output locations go through
:func:`check_writable_destination` (refuse an existing one unless ``overwrite``; a missing
or read-only parent is named) and :func:`check_disjoint` (an output folder may neither
contain nor lie inside an input). Temporary files this tool writes are named with
:data:`TEMP_PREFIX`, so :func:`clean_stale_temps` can remove what a killed process left.
"""

from __future__ import annotations

import os
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Optional, Union

from neurodetox.core.errors import UserError

__all__ = [
    "PathExistsError",
    "PathNotFoundError",
    "TEMP_PREFIX",
    "LEGACY_TEMP_SUFFIX",
    "safe_member",
    "is_within",
    "check_disjoint",
    "check_writable_destination",
    "clean_stale_temps",
]

PathLike = Union[str, os.PathLike]

#: Prefix of every temporary file or folder neurodetox writes beside its outputs.
TEMP_PREFIX = ".neurodetox-tmp."
#: Suffix of the shard temporaries written by older versions (cleaned too).
LEGACY_TEMP_SUFFIX = ".neurodetox.tmp"


class PathExistsError(UserError, FileExistsError):
    """An output path exists and ``overwrite`` was not given (a :class:`UserError` and a ``FileExistsError``)."""


class PathNotFoundError(UserError, FileNotFoundError):
    """An input path does not exist (a :class:`UserError` and a ``FileNotFoundError``)."""


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def is_within(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved, symlinks followed)."""
    p, f = _resolved(path), _resolved(folder)
    return p == f or f in p.parents


def safe_member(folder: PathLike, name: str, what: str = "file name") -> Path:
    """``folder / name``, refused unless ``name`` is a plain relative path that stays inside ``folder``.

    Args:
        folder: the folder the name belongs to (e.g. a checkpoint folder).
        name: a relative name read from a file (e.g. a shard name from an index).
        what: how the error message calls the name, e.g. ``"shard name in model.safetensors.index.json"``.

    Returns:
        The joined (unresolved) path ``folder / name``.

    Raises:
        UserError: ``name`` is not a non-empty string, is absolute (POSIX or Windows form), contains a
            ``..`` component, a NUL or a control character, or resolves (symlinks followed) outside ``folder``.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} {name!r} is not a file name; expected a relative path inside {folder}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UserError(f"{what} {name!r} contains control characters; expected a plain relative path")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\", "~")):
        raise UserError(f"{what} {name!r} is an absolute path; expected a relative path inside {folder}")
    if ".." in posix.parts or ".." in windows.parts:
        raise UserError(f"{what} {name!r} contains '..'; expected a relative path inside {folder}")
    joined = Path(folder) / name
    if not is_within(joined, folder):
        raise UserError(
            f"{what} {name!r} resolves to {_resolved(joined)} (through a symlink), outside {_resolved(folder)}"
        )
    return joined


def check_disjoint(output: PathLike, inputs: Iterable[tuple[str, Optional[PathLike]]], what: str = "output") -> None:
    """Refuse an output location that contains, equals or lies inside any input.

    Args:
        output: the folder or file about to be (re)written or deleted.
        inputs: ``(label, path)`` pairs, e.g. ``[("checkpoint", src), ("patch", patch_dir)]``; ``None`` paths
            are skipped.
        what: how the message calls ``output`` (e.g. ``"--out"``).

    Raises:
        UserError: naming the overlapping input.
    """
    out = _resolved(output)
    for label, path in inputs:
        if path is None:
            continue
        src = _resolved(path)
        if out == src:
            raise UserError(f"{what} {output} is the {label} itself; choose another folder")
        if out in src.parents:
            raise UserError(f"{what} {output} contains the {label} {path}; choose a folder outside it")
        if src in out.parents:
            raise UserError(f"{what} {output} lies inside the {label} {path}; choose a folder outside it")


def check_writable_destination(path: PathLike, overwrite: bool = False, what: str = "output") -> Path:
    """Cheap check, before any expensive work, that ``path`` may be written.

    Call it first in every command that writes; the write itself checks again.

    Args:
        path: file or folder about to be written.
        overwrite: allow replacing an existing (non-empty) ``path``.
        what: how the message names the location (e.g. ``"--out"``).

    Returns:
        ``path`` as a :class:`Path` (``~`` expanded).

    Raises:
        PathExistsError: ``path`` exists (a file, or a non-empty folder) and ``overwrite`` is false.
        UserError: its parent
            is an existing file; the nearest existing parent is not writable.
    """
    p = Path(path).expanduser()
    exists = p.is_file() or p.is_symlink() or (p.is_dir() and any(p.iterdir()))
    if exists and not overwrite:
        raise PathExistsError(
            f"{what} {p} already exists; choose another path or pass overwrite (--overwrite) to replace it"
        )
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {p}: the folder {parent} is not writable (read-only or no permission)")
    if p.is_dir() and exists and not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{what} {p} is not writable (read-only or no permission)")
    return p


def clean_stale_temps(folder: PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Remove temporary files and folders this tool left in ``folder`` (not recursive).

    Matches names starting with :data:`TEMP_PREFIX` or ending with :data:`LEGACY_TEMP_SUFFIX`.
    Call it while holding the folder's lock (then ``min_age_s=0`` is safe), or with a
    ``min_age_s`` (seconds since the last change) that no live writer can reach.

    Returns:
        The paths removed.
    """
    import shutil

    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        if not (p.name.startswith(TEMP_PREFIX) or p.name.endswith(LEGACY_TEMP_SUFFIX)):
            continue
        try:
            if now - p.lstat().st_mtime < min_age_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:  # pragma: no cover - vanished or not ours to remove
            continue
    return removed
