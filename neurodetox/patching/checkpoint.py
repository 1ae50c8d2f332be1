"""Apply, verify and revert MINT patches on Hugging Face checkpoint folders.

A deployed checkpoint is a folder with ``config.json`` and either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``; its
tensors may be float32, bfloat16 or float16. A
:class:`~neurodetox.patching.patchfile.PatchSet` (Gu et al., "Neuron Patching",
arXiv 2312.05356; ``docs/methods.md`` §4, "A patch is data") is applied to it
like this:

1. Every touched tensor is read with ``safetensors.safe_open`` (only that
   tensor) and hashed (sha256 of its stored bytes). Its state is
   ``"original"`` (hash = manifest ``sha256_original``), ``"patched"``
   (= ``sha256_patched``) or a mismatch, which is refused with a message
   naming the tensor and its shard (wrong base model, or changed since).
2. New values (float32) are cast to the tensor's dtype; the cast error
   ``max |new − cast(new)|`` is reported.
3. Only shards holding touched tensors are rewritten: each is copied to a
   temporary file in the same folder, the touched tensors' byte ranges are
   overwritten in place (the header, metadata, tensor order and every other
   byte stay identical, whatever wrote the file), the copy is fsynced and
   re-read with ``safe_open`` to check the hashes, and only when every shard's
   temporary file is ready are they renamed over the shards with
   ``os.replace``. A failure or kill before the renames leaves the checkpoint
   byte-identical (temporary files are removed on errors); the per-tensor
   states make a second ``apply`` / ``revert`` finish a run killed between
   renames.

Hardening (issue 19): every shard name read from ``model.safetensors.index.json`` must be a
relative path that resolves inside the folder (no absolute path, no ``..``, symlinks resolved),
checked by :func:`neurodetox.core.paths.safe_member` before any byte is read or written. In-place
writes hold :func:`neurodetox.core.locks.folder_lock` on the folder (a second writer waits, then is
refused), remove temporary files a killed run left (named with
:data:`neurodetox.core.paths.TEMP_PREFIX`) and keep each shard's file mode. Writing a copy
(``out=``) refuses a destination that contains, equals or lies inside the checkpoint or the patch.

``revert`` is the same with originals: the result is bit-exact, so the sha256
of every file is what it was before ``apply``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from neurodetox.core.errors import UserError
from neurodetox.core.io import replace_folder
from neurodetox.core.locks import LOCK_NAME, folder_lock
from neurodetox.core.paths import (
    TEMP_PREFIX,
    PathExistsError,
    check_disjoint,
    check_writable_destination,
    clean_stale_temps,
    safe_member,
)
from neurodetox.patching.patchfile import PatchError, PatchMismatchError, PatchSet, tensor_sha256

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "inspect_checkpoint",
    "read_tensors",
    "checkpoint_states",
    "verify_checkpoint",
    "apply_to_checkpoint",
    "revert_checkpoint",
    "bind_to_checkpoint",
    "file_sha256",
    "folder_sha256",
    "copy_checkpoint",
    "checkpoint_dtype",
    "shard_path",
]

PathLike = Union[str, os.PathLike]
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
#: Age (s) after which a copy's temporary folder beside ``out`` counts as left by a killed run.
_STALE_COPY_AGE_S = 6 * 3600
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CheckpointError(UserError):
    """A folder is not a checkpoint that patches can be applied to; the message says why and what to do."""


@dataclass
class CheckpointInfo:
    """Where the tensors of a safetensors checkpoint live.

    Attributes:
        folder: the checkpoint folder.
        weight_map: tensor name -> shard file name.
        index_file: ``model.safetensors.index.json`` path, or ``None`` (single file).
        shards: the shard file names, sorted.
    """

    folder: Path
    weight_map: dict[str, str]
    index_file: Optional[Path] = None
    shards: list[str] = field(default_factory=list)

    def shard_of(self, name: str) -> str:
        if name not in self.weight_map:
            near = [k for k in self.weight_map if k.split(".")[-2:] == name.split(".")[-2:]][:3]
            raise CheckpointError(
                f"tensor {name!r} is not in the checkpoint {self.folder} "
                f"({len(self.weight_map)} tensors{'; similar: ' + ', '.join(near) if near else ''}); "
                "the patch was made for another architecture"
            )
        return self.weight_map[name]


def _zero_message(folder: Path) -> str:
    return (
        f"{folder} is a DeepSpeed ZeRO checkpoint (it has global_step*/, 'latest' or zero_to_fp32.py) without "
        "consolidated safetensors weights. Consolidate it with DeepSpeed's own utility first, e.g.\n"
        f'  python -c "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict; '
        f"convert_zero_checkpoint_to_fp32_state_dict('{folder}', 'OUT', safe_serialization=True)\"\n"
        f"(or: python {folder / 'zero_to_fp32.py'} {folder} OUT --safe_serialization), copy config.json and the "
        "tokenizer files into OUT, and patch OUT"
    )


def inspect_checkpoint(folder: PathLike) -> CheckpointInfo:
    """Find the safetensors weights of an HF checkpoint folder.

    Raises:
        FileNotFoundError: the folder does not exist.
        CheckpointError: a PEFT adapter-only folder (merge first with ``peft``'s
            ``merge_and_unload()`` then ``save_pretrained``), a DeepSpeed ZeRO
            folder without consolidated weights (names
            ``deepspeed.utils.zero_to_fp32`` / ``convert_zero_checkpoint_to_fp32_state_dict``),
            ``.bin``-only weights, or no weights at all.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; a checkpoint is a folder holding config.json and *.safetensors")
    index = folder / INDEX_NAME
    single = folder / SINGLE_NAME
    has_zero = (
        any(folder.glob("global_step*")) or (folder / "zero_to_fp32.py").exists() or (folder / "latest").is_file()
    )
    if (folder / "adapter_config.json").is_file() and not index.is_file() and not single.is_file():
        raise CheckpointError(
            f"{folder} holds only a PEFT adapter (adapter_config.json), not a full model; MINT patches full "
            "weights. Merge first with peft's merge_and_unload() then save_pretrained, e.g.\n"
            "  from peft import AutoPeftModelForCausalLM\n"
            f"  AutoPeftModelForCausalLM.from_pretrained('{folder}').merge_and_unload().save_pretrained('MERGED')\n"
            "and copy the tokenizer files into MERGED, then patch MERGED"
        )
    if has_zero and not index.is_file() and not single.is_file():
        raise CheckpointError(_zero_message(folder))
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values()), key=str):
            safe_member(folder, shard, f"shard name in {index}")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing from {folder}: {', '.join(missing)}")
        return CheckpointInfo(folder, weight_map, index, sorted(set(weight_map.values())))
    if single.is_file():
        with _safe_open(single) as f:
            names = list(f.keys())
        return CheckpointInfo(folder, {n: SINGLE_NAME for n in names}, None, [SINGLE_NAME])
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} stores its weights as .bin / .pt (pickle); patches are applied to safetensors. Convert once "
            f"with AutoModelForCausalLM.from_pretrained('{folder}').save_pretrained('OUT', safe_serialization=True)"
        )
    other = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(other) == 1:
        with _safe_open(folder / other[0]) as f:
            names = list(f.keys())
        return CheckpointInfo(folder, {n: other[0] for n in names}, None, other)
    raise CheckpointError(
        f"no model weights in {folder}: expected {SINGLE_NAME} or {INDEX_NAME} with its shards"
        + (f" (found {', '.join(other)} but no index)" if other else "")
    )


def shard_path(info: CheckpointInfo, shard: str) -> Path:
    """``info.folder / shard``, checked to stay inside the folder when the name came from an index.

    Raises:
        UserError: an absolute shard name, one with ``..``, or one resolving (through a symlink) outside
            the folder (see :func:`neurodetox.core.paths.safe_member`).
    """
    if info.index_file is None and shard == Path(shard).name:
        return info.folder / shard  # the folder's own single weights file (may be an HF-cache symlink)
    return safe_member(info.folder, shard, f"shard name in {info.index_file or 'the weight map'}")


def _safe_open(path: PathLike):
    """``safetensors.safe_open(path)``; a truncated or corrupt file raises :class:`CheckpointError` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        raise CheckpointError(
            f"{path} ({size} bytes) is not a readable safetensors file (truncated or corrupt: {e}); "
            "copy it again from its source"
        ) from None


def read_tensors(info: CheckpointInfo, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Read only ``names`` from their shards (``safe_open``), in their stored dtype.

    Raises:
        CheckpointError: a name missing from the checkpoint, or a truncated/corrupt shard.
    """
    from safetensors import SafetensorError

    by_shard: dict[str, list[str]] = {}
    for n in names:
        by_shard.setdefault(info.shard_of(n), []).append(n)
    out = {}
    for shard, ns in by_shard.items():
        path = shard_path(info, shard)
        with _safe_open(path) as f:
            for n in ns:
                try:
                    out[n] = f.get_tensor(n)
                except (SafetensorError, KeyError) as e:
                    raise CheckpointError(f"cannot read tensor {n!r} from {path} (truncated or corrupt: {e})") from None
    return out


def checkpoint_dtype(info: CheckpointInfo, names: Sequence[str]) -> Optional[torch.dtype]:
    """The common stored dtype of ``names`` (``None`` if they differ)."""
    dtypes = set()
    for n in names:
        with _safe_open(shard_path(info, info.shard_of(n))) as f:
            dtypes.add(f.get_slice(n).get_dtype())
    if len(dtypes) != 1:
        return None
    return _ST_DTYPES.get(dtypes.pop())


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: PathLike) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` (relative path -> hex)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _state(patch: PatchSet, name: str, tensor: torch.Tensor) -> str:
    entry = patch.manifest.get("tensors", {}).get(name, {})
    digest = tensor_sha256(tensor)
    if entry.get("sha256_original") == digest:
        return "original"
    if entry.get("sha256_patched") == digest:
        return "patched"
    return "mismatch"


def checkpoint_states(folder: PathLike, patch: PatchSet) -> dict[str, str]:
    """Per touched tensor: ``"original"``, ``"patched"`` or ``"mismatch"`` (by sha256)."""
    info = inspect_checkpoint(folder)
    tensors = read_tensors(info, [p.name for p in patch.params])
    return {n: _state(patch, n, t) for n, t in tensors.items()}


def _mismatch(patch: PatchSet, info: CheckpointInfo, name: str, tensor: torch.Tensor, expect: str) -> str:
    entry = patch.manifest.get("tensors", {}).get(name, {})
    want_dtype, want_shape = entry.get("dtype"), entry.get("shape")
    have_dtype = _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
    why = ""
    if want_dtype and want_dtype != have_dtype:
        why = (
            f" It is stored as {have_dtype} but the patch was made against a {want_dtype} copy: run "
            "`neurodetox patch find` on this checkpoint instead."
        )
    elif want_shape and list(tensor.shape) != list(want_shape):
        why = f" Its shape is {list(tensor.shape)}, the patch expects {want_shape}."
    key = "sha256_original" if expect == "original" else "sha256_patched"
    return (
        f"tensor {name!r} in {info.folder / info.shard_of(name)} has sha256 {tensor_sha256(tensor)[:16]}…, "
        f"expected the patch's {expect} {str(entry.get(key, '?'))[:16]}… (nor is it the "
        f"{'patched' if expect == 'original' else 'original'} state): this is not the checkpoint the patch was "
        f"made for (base: {patch.manifest.get('base', {}).get('name_or_path', '?')}).{why}"
    )


def verify_checkpoint(folder: PathLike, patch: PatchSet, expect: str = "original") -> dict[str, str]:
    """Check that every touched tensor of ``folder`` is in state ``expect``.

    Returns:
        The states (all equal to ``expect``).

    Raises:
        PatchMismatchError: names the first tensor in another state.
        PatchError: the manifest has no hashes (a patch never bound to a checkpoint).
    """
    _require_hashes(patch)
    info = inspect_checkpoint(folder)
    tensors = read_tensors(info, [p.name for p in patch.params])
    states = {}
    for n, t in tensors.items():
        states[n] = _state(patch, n, t)
        if states[n] != expect:
            if states[n] == "mismatch":
                raise PatchMismatchError(_mismatch(patch, info, n, t, expect))
            raise PatchMismatchError(
                f"tensor {n!r} in {info.folder / info.shard_of(n)} is already {states[n]!r}, expected {expect!r}"
            )
    return states


def _require_hashes(patch: PatchSet) -> None:
    for p in patch.params:
        entry = patch.manifest.get("tensors", {}).get(p.name, {})
        if not entry.get("sha256_original") or not entry.get("sha256_patched"):
            raise PatchError(
                f"the patch manifest has no sha256 for {p.name!r}; bind it to its base checkpoint "
                "with bind_to_checkpoint() (the CLI's `patch find` does)"
            )


def bind_to_checkpoint(patch: PatchSet, folder: PathLike) -> PatchSet:
    """Record ``folder`` as the patch's base: its identity and the sha256 of
    every touched tensor as stored there (original and patched, in the stored
    dtype).

    Raises:
        PatchMismatchError: the checkpoint's columns are not the patch's
            originals (the model in memory was not loaded from ``folder``).
    """
    info = inspect_checkpoint(folder)
    tensors = read_tensors(info, [p.name for p in patch.params])
    for p in patch.params:
        if p.state_of(tensors[p.name]) != "original":
            raise PatchMismatchError(
                f"tensor {p.name!r} in {info.folder / info.shard_of(p.name)} does not hold the "
                "patch's original values: the patch was not made from this checkpoint"
            )
    patch.set_hashes(tensors)
    base = patch.manifest.setdefault("base", {})
    cfg = info.folder / "config.json"
    base.update(
        {
            "path": str(info.folder.resolve()),
            "config_sha256": file_sha256(cfg) if cfg.is_file() else None,
            "index_sha256": file_sha256(info.index_file) if info.index_file else None,
            "weight_files": {s: (info.folder / s).stat().st_size for s in info.shards},
            "dtype": _DTYPE_NAMES.get(checkpoint_dtype(info, [p.name for p in patch.params]), "mixed"),
        }
    )
    return patch


# ----------------------------------------------------------------------------- writing


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors file (format: u64 little-endian
    header length, JSON header, raw little-endian tensor bytes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    return 8 + n, header


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _write_shard(src: Path, tmp: Path, updates: dict[str, torch.Tensor]) -> None:
    """Copy ``src`` to ``tmp`` and overwrite the byte ranges of ``updates``'
    tensors (same dtype and shape as stored). Module-level so tests can make
    it fail mid-write."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise CheckpointError("in-place shard rewriting needs a little-endian machine")
    start, header = _header(src)
    shutil.copyfile(src, tmp)
    with open(tmp, "r+b") as f:
        for name, tensor in updates.items():
            meta = header[name]
            lo, hi = meta["data_offsets"]
            data = _tensor_bytes(tensor)
            if len(data) != hi - lo or list(tensor.shape) != list(meta["shape"]):
                raise CheckpointError(
                    f"tensor {name!r}: new data {tuple(tensor.shape)} does not fit the stored "
                    f"{meta['shape']} {meta['dtype']}"
                )
            f.seek(start + lo)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@dataclass
class CheckpointWrite:
    """What :func:`apply_to_checkpoint` / :func:`revert_checkpoint` did.

    Attributes:
        folder: the checkpoint written.
        tensors: tensor name -> state before (``"original"`` / ``"patched"``).
        written: tensor names rewritten.
        shards: shard files rewritten (the others were not opened for writing).
        cast_error: tensor name -> ``max |new − cast(new)|`` (0 for float32).
        dtype: tensor name -> stored dtype.
    """

    folder: Path
    tensors: dict[str, str]
    written: list[str]
    shards: list[str]
    cast_error: dict[str, float]
    dtype: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "tensors": self.tensors,
            "written": self.written,
            "shards": self.shards,
            "cast_error": self.cast_error,
            "dtype": self.dtype,
            "max_cast_error": max(self.cast_error.values(), default=0.0),
        }


def _transition(folder: PathLike, patch: PatchSet, src: str, dst: str, lock_timeout: Optional[float] = None):
    """Move every touched tensor of ``folder`` from state ``src`` to ``dst``, holding the folder's lock."""
    folder = Path(folder).expanduser()
    _require_hashes(patch)
    inspect_checkpoint(folder)  # refuse a non-checkpoint or hostile index before creating the lock file
    with folder_lock(folder, timeout=lock_timeout, what="checkpoint"):
        clean_stale_temps(folder)  # what a killed apply/revert left (we hold the lock: nobody is writing)
        return _transition_locked(folder, patch, src, dst)


def _transition_locked(folder: Path, patch: PatchSet, src: str, dst: str) -> CheckpointWrite:
    from safetensors import safe_open

    info = inspect_checkpoint(folder)  # again, under the lock
    names = [p.name for p in patch.params]
    tensors = read_tensors(info, names)
    states = {}
    for n, t in tensors.items():
        states[n] = _state(patch, n, t)
        if states[n] not in (src, dst):
            raise PatchMismatchError(_mismatch(patch, info, n, t, src))
    updates: dict[str, dict[str, torch.Tensor]] = {}
    cast_error: dict[str, float] = {}
    dtypes: dict[str, str] = {}
    for p in patch.params:
        t = tensors[p.name]
        if t.dtype not in _DTYPE_NAMES:
            raise CheckpointError(
                f"tensor {p.name!r} is stored as {t.dtype}; patches support float32, bfloat16, float16"
            )
        dtypes[p.name] = _DTYPE_NAMES[t.dtype]
        cast_error[p.name] = p.cast_error(t.dtype) if dst == "patched" else 0.0
        if states[p.name] == src:
            new = t.clone()
            p.write(new, p.new if dst == "patched" else p.original)
            want = patch.manifest["tensors"][p.name]["sha256_" + dst]
            if tensor_sha256(new) != want:
                raise PatchError(
                    f"writing the {dst} values of {p.name!r} in {dtypes[p.name]} does not reproduce "
                    f"the manifest's sha256_{dst}; the patch file is inconsistent"
                )
            updates.setdefault(info.shard_of(p.name), {})[p.name] = new
    temps: dict[str, Path] = {}
    try:
        for shard, ups in sorted(updates.items()):
            target = shard_path(info, shard)
            fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{Path(shard).name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            temps[shard] = Path(tmp)
            _write_shard(target, Path(tmp), ups)
            shutil.copymode(target, tmp)  # keep the shard's file mode (mkstemp creates 0600)
            with safe_open(tmp, framework="pt") as f:  # re-read what was written
                for name, t in ups.items():
                    if tensor_sha256(f.get_tensor(name)) != tensor_sha256(t):
                        raise CheckpointError(f"read-back check of {name!r} in {tmp} failed; nothing was changed")
        for shard, tmp in sorted(temps.items()):
            os.replace(tmp, shard_path(info, shard))
        temps.clear()
        _fsync_dir(info.folder)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"cannot write the checkpoint {info.folder}: {e.strerror} ({e.filename or info.folder}); "
                "nothing was changed — free space or make the folder writable, or write a copy with out="
            ) from None
        raise
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
    return CheckpointWrite(
        info.folder, states, sorted(n for ups in updates.values() for n in ups), sorted(updates), cast_error, dtypes
    )


def copy_checkpoint(
    src: PathLike, dst: PathLike, overwrite: bool = False, inputs: Sequence[tuple[str, Optional[PathLike]]] = ()
) -> Path:
    """Copy a checkpoint folder (files only, top level and subfolders) to ``dst``,
    atomically: built in a temporary sibling and renamed into place.

    Args:
        src: the checkpoint folder.
        dst: the new folder.
        overwrite: replace an existing non-empty ``dst``.
        inputs: more ``(label, path)`` that ``dst`` must neither contain nor lie inside (e.g. the patch).

    Raises:
        UserError: ``dst`` is, contains or lies inside ``src`` or one of ``inputs`` (checked even with
            ``overwrite``, before anything is written).
        PathExistsError: ``dst`` exists and is not empty (without ``overwrite``); also a ``FileExistsError``.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    check_disjoint(dst, [("checkpoint", src), *inputs], what="output folder")
    nonempty = (dst.is_dir() and any(dst.iterdir())) or (dst.exists() and not dst.is_dir()) or dst.is_symlink()
    if nonempty and not overwrite:
        raise PathExistsError(f"output folder {dst} exists and is not empty; pass --overwrite to replace it")
    check_writable_destination(dst, overwrite=True, what="output folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dst.parent, min_age_s=_STALE_COPY_AGE_S)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LOCK_NAME, f"{TEMP_PREFIX}*"))
        replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _with_output(
    folder: PathLike,
    patch: PatchSet,
    src: str,
    dst: str,
    out: Optional[PathLike],
    overwrite: bool,
    patch_path: Optional[PathLike] = None,
    lock_timeout: Optional[float] = None,
) -> CheckpointWrite:
    if out is None:
        return _transition(folder, patch, src, dst, lock_timeout)
    # check the destination and the source before copying anything
    patch_path = patch_path if patch_path is not None else getattr(patch, "source", None)
    check_disjoint(out, [("checkpoint", folder), ("patch", patch_path)], what="output folder")
    _require_hashes(patch)
    info = inspect_checkpoint(folder)
    tensors = read_tensors(info, [p.name for p in patch.params])
    for n, t in tensors.items():
        if _state(patch, n, t) not in (src, dst):
            raise PatchMismatchError(_mismatch(patch, info, n, t, src))
    target = copy_checkpoint(folder, out, overwrite=overwrite, inputs=[("patch", patch_path)])
    try:
        return _transition(target, patch, src, dst, lock_timeout)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def apply_to_checkpoint(
    folder: PathLike,
    patch: PatchSet,
    out: Optional[PathLike] = None,
    overwrite: bool = False,
    *,
    patch_path: Optional[PathLike] = None,
    lock_timeout: Optional[float] = None,
) -> CheckpointWrite:
    """Apply ``patch`` to the checkpoint ``folder`` (in place), or to a copy at ``out``.

    Tensors already patched are skipped, so a second call is a no-op and a
    call after a kill between shard renames finishes the job. In place, the
    folder's lock is held (:func:`neurodetox.core.locks.folder_lock`); a
    second writer waits ``lock_timeout`` seconds (default 60, or
    ``$NEURODETOX_LOCK_TIMEOUT``), then is refused.

    Args:
        folder: the checkpoint folder.
        patch: a bound :class:`PatchSet`.
        out: write a patched copy there instead of changing ``folder``.
        overwrite: replace an existing ``out``.
        patch_path: where the patch lives (default: where it was loaded from); ``out`` may not contain it.
        lock_timeout: seconds to wait for another writer of the same folder.

    Returns:
        A :class:`CheckpointWrite` (shards rewritten, cast error per tensor).

    Raises:
        PatchMismatchError: a touched tensor hashes to neither the manifest's
            original nor patched sha256 (names the tensor and shard); nothing
            is written.
        CheckpointError / FileNotFoundError: see :func:`inspect_checkpoint`.
        UserError: a shard name that leaves the folder; ``out`` equal to, containing or inside the
            checkpoint or the patch; a read-only or full disk (nothing changed).
        PathExistsError: ``out`` exists (without ``overwrite``); also a ``FileExistsError``.
        FolderLockedError: another writer held the folder for ``lock_timeout`` seconds.
    """
    return _with_output(folder, patch, "original", "patched", out, overwrite, patch_path, lock_timeout)


def revert_checkpoint(
    folder: PathLike,
    patch: PatchSet,
    out: Optional[PathLike] = None,
    overwrite: bool = False,
    *,
    patch_path: Optional[PathLike] = None,
    lock_timeout: Optional[float] = None,
) -> CheckpointWrite:
    """Restore the original values bit-exactly (in place, or into a copy at ``out``).

    Arguments and locking as :func:`apply_to_checkpoint`.

    Raises:
        PatchMismatchError, UserError, PathExistsError, FolderLockedError: as :func:`apply_to_checkpoint`.
    """
    return _with_output(folder, patch, "patched", "original", out, overwrite, patch_path, lock_timeout)
