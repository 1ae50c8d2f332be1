"""One writer at a time per folder: a ``filelock`` lock file inside the folder.

The lock file ``.neurodetox.lock`` exists only while the lock is held: it is unlinked just
before release, which ``filelock`` (>= 4) tolerates without letting two holders in.

In-place writes to a checkpoint (``patch apply --in-place``, ``patch revert --in-place``)
hold :func:`folder_lock` on the checkpoint folder, so two concurrent writers cannot both
read the old shard and each rename their own copy over it (a lost update). A second
writer waits up to ``timeout`` seconds and is then refused with a :class:`FolderLockedError`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

from filelock import FileLock, Timeout

from neurodetox.core.errors import UserError

__all__ = ["LOCK_NAME", "DEFAULT_LOCK_TIMEOUT", "FolderLockedError", "folder_lock"]

#: Name of the lock file created inside a locked folder (removed on release).
LOCK_NAME = ".neurodetox.lock"
#: Seconds a second writer waits before it is refused (``NEURODETOX_LOCK_TIMEOUT`` overrides).
DEFAULT_LOCK_TIMEOUT = 60.0


class FolderLockedError(UserError):
    """Another neurodetox process holds the folder's lock past the timeout."""


@contextlib.contextmanager
def folder_lock(folder: Union[str, os.PathLike], timeout: float | None = None, what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (a lock file ``folder/.neurodetox.lock``) for the ``with`` block.

    Args:
        folder: an existing folder.
        timeout: seconds to wait for another holder; default ``$NEURODETOX_LOCK_TIMEOUT`` or
            :data:`DEFAULT_LOCK_TIMEOUT` (60 s). ``0`` refuses at once.
        what: how the message calls the folder (e.g. ``"checkpoint"``).

    Yields:
        The lock file path.

    Raises:
        FolderLockedError: still locked by another process after ``timeout`` seconds.
        UserError: the lock file cannot be created (read-only folder).
    """
    folder = Path(folder)
    if timeout is None:
        timeout = float(os.environ.get("NEURODETOX_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT))
    path = folder / LOCK_NAME
    lock = FileLock(str(path), timeout=timeout, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise FolderLockedError(
            f"{what} {folder} is locked by another neurodetox process (lock file {path}) and stayed locked for "
            f"{timeout:g} s; wait for it to finish and retry"
        ) from None
    except PermissionError:
        raise UserError(
            f"cannot lock {what} {folder}: the folder is not writable (read-only or no permission)"
        ) from None
    try:
        yield path
    finally:
        # unlinked while still held: a waiter that locks the old inode sees st_nlink == 0 and reopens
        # (filelock >= 4 checks this), so removing the file cannot let two holders in
        with contextlib.suppress(OSError):
            path.unlink()
        lock.release()
