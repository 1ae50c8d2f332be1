"""Atomic file writes: a killed process leaves the old file or the new one, never half of one.

The temporary file sits beside the target, named ``.neurodetox-tmp.<name>.*`` (see
:data:`neurodetox.core.paths.TEMP_PREFIX`), so what a killed process left is recognisable and
:func:`neurodetox.core.paths.clean_stale_temps` removes it. The new file gets the old file's
mode (or the usual ``0666 & ~umask`` for a new one), not ``mkstemp``'s ``0600``. A read-only or
full disk raises :class:`~neurodetox.core.errors.UserError` naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

from neurodetox.core.errors import UserError
from neurodetox.core.paths import TEMP_PREFIX

PathLike = Union[str, os.PathLike]

#: errno values that mean "the user's disk or permissions", reported as a UserError.
DISK_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_error(path: PathLike, e: OSError) -> UserError:
    """The one-line :class:`UserError` for a read-only, forbidden or full destination."""
    return UserError(f"cannot write {path}: {e.strerror or e} (read-only folder, no permission or disk full)")


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Raises:
        UserError: the folder cannot be created or written (read-only, no permission, disk full).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(path, e) from None
        raise
    os.close(fd)
    try:
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask()
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in DISK_ERRNOS:
            raise disk_error(path, e) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    def w(tmp):
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, w)


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    try:
        import numpy as np
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_safetensors(path: PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def replace_folder(tmp: PathLike, dst: PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``dst`` by rename, so ``dst`` is always whole.

    An existing ``dst`` (folder, file or link) is first renamed aside, then removed once ``tmp`` is
    in place; if that rename fails the old ``dst`` is put back. ``tmp`` and ``dst`` must be on one
    file system (make ``tmp`` beside ``dst``, e.g. with :func:`atomic_folder`).

    Returns:
        ``dst`` as a :class:`Path`.
    """
    import shutil
    import uuid

    tmp, dst = Path(tmp), Path(dst)
    if not (dst.exists() or dst.is_symlink()):
        os.replace(tmp, dst)
        return dst
    backup = dst.parent / f"{TEMP_PREFIX}{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, backup)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(backup, dst)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink(missing_ok=True)
    return dst
