"""Patch files: a MINT repair as data, not as a mutated model.

A :class:`PatchSet` is a sparse diff of FFN value vectors (``docs/methods.md``
§4, decision): per edited parameter, the neuron indices, their original values
and their new values, saved as one safetensors file, plus a JSON manifest with
the base checkpoint's identity, the sha256 of every touched original tensor
(and of its patched version), the edits requested and fixed, the neurons per
failure, the settings and the library versions. It can be applied to, verified
against and reverted from a model in memory (this module) or an HF checkpoint
folder (:mod:`neurodetox.patching.checkpoint`).

On disk a patch is either a folder ``PATCH/`` holding ``patch.safetensors`` and
``manifest.json`` (the default), or a file ``NAME.safetensors`` with its
manifest ``NAME.json`` beside it. Tensor keys in the safetensors file are
``"<param name>::indices"`` (int64 ``[k]``), ``"<param name>::original"`` and
``"<param name>::new"`` (float32, ``weight.index_select(axis, indices)``, i.e.
``[d, k]`` for an ``nn.Linear`` FFN output projection). Float32 holds bf16 and
fp16 originals exactly, so a revert is bit-exact in any checkpoint dtype.

Method: Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model
Repair for Code Generation", arXiv 2312.05356.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from neurodetox.core.errors import UserError
from neurodetox.core.io import atomic_save_safetensors, atomic_write_json
from neurodetox.core.paths import PathExistsError, PathNotFoundError, check_writable_destination, clean_stale_temps

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ParamPatch",
    "PatchSet",
    "PatchError",
    "PatchMismatchError",
    "tensor_sha256",
    "patch_paths",
    "check_patch_destination",
    "terminal_text",
]

FORMAT = "neurodetox-mint-patch"
FORMAT_VERSION = 1
PathLike = Union[str, Path]


class PatchError(UserError):
    """A patch file is malformed or does not fit a model or checkpoint (a :class:`UserError`, so a ``ValueError``)."""


class PatchMismatchError(PatchError):
    """A touched tensor is neither in the patch's original nor its patched state
    (wrong base model, or changed since). The message names the tensor."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes as stored: its own dtype, C order,
    little-endian, no shape or dtype header (those are recorded separately).
    Equals the sha256 of the tensor's byte range in a safetensors file."""
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def patch_paths(path: PathLike) -> tuple[Path, Path]:
    """``(payload, manifest)`` paths of a patch: ``PATH/patch.safetensors`` and
    ``PATH/manifest.json`` for a folder, ``NAME.safetensors`` and ``NAME.json``
    for a ``.safetensors`` or ``.json`` file name."""
    p = Path(path).expanduser()
    if p.suffix in (".safetensors", ".json"):
        return p.with_suffix(".safetensors"), p.with_suffix(".json")
    return p / "patch.safetensors", p / "manifest.json"


@dataclass
class ParamPatch:
    """The patched neurons of one parameter.

    Attributes:
        name: parameter / checkpoint tensor name, e.g.
            ``"model.layers.20.mlp.down_proj.weight"``.
        axis: the axis that indexes neurons (1 for ``nn.Linear`` ``[d, d_ff]``,
            0 for GPT-2's ``Conv1D`` ``[d_ff, d]``).
        indices: int64 ``[k]``, sorted, unique neuron indices.
        original: float32 ``weight.index_select(axis, indices)`` before the patch.
        new: float32, same shape, after the patch.
        layer: decoder block index (informational).
    """

    name: str
    axis: int
    indices: torch.Tensor
    original: torch.Tensor
    new: torch.Tensor
    layer: Optional[int] = None

    def __post_init__(self):
        self.indices = torch.as_tensor(self.indices, dtype=torch.long).flatten()
        self.original = self.original.detach().float().cpu().contiguous()
        self.new = self.new.detach().float().cpu().contiguous()
        if self.axis not in (0, 1):
            raise PatchError(f"{self.name}: axis must be 0 or 1, got {self.axis!r}")
        k = self.indices.numel()
        if k and int(self.indices.min()) < 0:
            raise PatchError(f"{self.name}: negative neuron index {int(self.indices.min())}; indices must be >= 0")
        if self.original.shape != self.new.shape or self.original.dim() != 2 or self.original.shape[self.axis] != k:
            raise PatchError(
                f"{self.name}: original {tuple(self.original.shape)} / new {tuple(self.new.shape)} do not match "
                f"{k} indices along axis {self.axis}"
            )
        if k != len(set(self.indices.tolist())):
            raise PatchError(f"{self.name}: duplicate neuron indices {self.indices.tolist()}")

    @property
    def num_values(self) -> int:
        """Number of scalar parameters this patch changes."""
        return int((self.original != self.new).sum())

    def state_of(self, weight: torch.Tensor) -> str:
        """``"original"``, ``"patched"`` or ``"mismatch"`` for a full weight tensor
        (any dtype; compared after casting the patch values to its dtype)."""
        if weight.dim() != 2 or int(self.indices.max()) >= weight.shape[self.axis]:
            return "mismatch"
        cols = weight.detach().index_select(self.axis, self.indices.to(weight.device)).cpu()
        if torch.equal(cols, self.original.to(cols.dtype)):
            return "original"
        if torch.equal(cols, self.new.to(cols.dtype)):
            return "patched"
        return "mismatch"

    def write(self, weight: torch.Tensor, values: torch.Tensor) -> None:
        with torch.no_grad():
            weight.index_copy_(self.axis, self.indices.to(weight.device), values.to(weight.device, weight.dtype))

    def cast_error(self, dtype: torch.dtype) -> float:
        """Largest ``|new − float32(cast(new, dtype))|`` (0 for float32)."""
        if self.new.numel() == 0:
            return 0.0
        return float((self.new - self.new.to(dtype).float()).abs().max())


_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_text(value: Any) -> str:
    """``str(value)`` made safe to print from a manifest: terminal escape sequences and control
    characters removed (tabs and newlines become spaces), then ``rich`` markup escaped
    (``rich.markup.escape``), so a hostile manifest can neither style nor crash the output nor
    reach the terminal."""
    from rich.markup import escape

    text = _CONTROL.sub("", str(value)).replace("\t", " ").replace("\n", " ")
    return escape(text)


def check_patch_destination(path: PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Cheap check that a patch may be written at ``path``; call it before the repair.

    Returns:
        ``(payload, manifest)`` paths, as :func:`patch_paths`.

    Raises:
        PathExistsError: the payload or manifest exists and ``overwrite`` is false.
        UserError: ``path`` is an existing file where a folder is expected, or its folder is not writable.
    """
    payload, manifest_path = patch_paths(path)
    p = Path(path).expanduser()
    if payload.parent == p and p.exists() and not p.is_dir():
        raise UserError(f"patch folder {p} is an existing file; give a folder or a NAME.safetensors path")
    for f in (payload, manifest_path):
        if (f.exists() or f.is_symlink()) and not overwrite:
            raise PathExistsError(
                f"a patch already exists at {p} ({f.name}); choose another --out or pass --overwrite "
                "(if that patch was applied in place, keep it: it is needed to revert)"
            )
        check_writable_destination(f, overwrite=True, what="patch file")
    return payload, manifest_path


def _load_param(f, keys: set, name: Any, info: Any, payload: Path, manifest_path: Path) -> ParamPatch:
    """One :class:`ParamPatch` from an open payload, with every manifest value checked."""
    if not isinstance(name, str) or not name or not isinstance(info, dict):
        raise PatchError(f"{manifest_path}: tensor entry {name!r} must be a non-empty name with an object of fields")
    need = [f"{name}::indices", f"{name}::original", f"{name}::new"]
    missing = [k for k in need if k not in keys]
    if missing:
        raise PatchError(f"{payload} lacks {missing} for tensor {name!r} listed in the manifest")
    axis = info.get("axis")
    if axis not in (0, 1) or isinstance(axis, bool):
        raise PatchError(f"{manifest_path}: tensor {name!r} has axis {axis!r}; valid: 0 or 1")
    indices = f.get_tensor(need[0])
    if indices.dtype.is_floating_point or indices.dim() != 1:
        raise PatchError(
            f"{payload}: {need[0]} must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}"
        )
    listed = info.get("indices")
    if listed is not None and listed != indices.tolist():
        raise PatchError(f"{manifest_path}: tensor {name!r} lists indices that differ from the payload's")
    shape = info.get("shape")
    if shape is not None:
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise PatchError(f"{manifest_path}: tensor {name!r} has shape {shape!r}; expected two positive integers")
        if indices.numel() and int(indices.max()) >= shape[axis]:
            raise PatchError(
                f"{manifest_path}: tensor {name!r} has neuron index {int(indices.max())}, but its shape {shape} "
                f"allows at most {shape[axis] - 1} on axis {axis}"
            )
    original, new = f.get_tensor(need[1]), f.get_tensor(need[2])
    if shape is not None and original.dim() == 2 and original.shape[1 - axis] != shape[1 - axis]:
        raise PatchError(
            f"{payload}: {need[1]} has shape {tuple(original.shape)}, which does not fit the tensor shape {shape}"
        )
    layer = info.get("layer")
    return ParamPatch(
        name=name,
        axis=axis,
        indices=indices,
        original=original,
        new=new,
        layer=layer if isinstance(layer, int) and not isinstance(layer, bool) else None,
    )


def _versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.lru_cache(maxsize=1)
def _installed_versions() -> dict[str, str]:
    """Versions of the packages a patch records (read once per process: about 3 ms each)."""
    from importlib import metadata

    out = {}
    for dist in ("neurodetox", "torch", "transformers", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "neurodetox":
                from neurodetox import __version__

                out[dist] = __version__
    return out


class PatchSet:
    """A MINT patch: :class:`ParamPatch` objects plus a JSON manifest.

    Build one with :func:`neurodetox.patching.repair`, or load one with
    :meth:`load`. In memory, :meth:`apply` / :meth:`revert` write the new or
    original values into the model's parameters; both first check every
    touched parameter and refuse (changing nothing) when one is neither in
    the expected state nor already in the target state.

    Manifest keys (all JSON): ``format``, ``format_version``, ``library``
    (versions), ``base`` (checkpoint identity), ``tensors`` (per parameter:
    ``shape``, ``dtype``, ``axis``, ``layer``, ``indices``,
    ``sha256_original``, ``sha256_patched``), ``edits`` (requested edits
    with their results), ``neurons``, ``summary``, ``settings``, ``payload``
    (file name and sha256 of the safetensors file, set on save).
    """

    def __init__(self, params: list[ParamPatch], manifest: Optional[dict[str, Any]] = None):
        names = [p.name for p in params]
        if len(names) != len(set(names)):
            raise PatchError(f"duplicate parameter names in patch: {names}")
        self.params = sorted(params, key=lambda p: p.name)
        self.manifest: dict[str, Any] = manifest if manifest is not None else {}
        self.manifest.setdefault("format", FORMAT)
        self.manifest.setdefault("format_version", FORMAT_VERSION)
        self.manifest.setdefault("library", _versions())
        self.manifest.setdefault("method", {"name": "MINT", "paper": "Gu et al., Neuron Patching, arXiv 2312.05356"})
        self.manifest.setdefault("tensors", {})
        for p in self.params:
            entry = self.manifest["tensors"].setdefault(p.name, {})
            entry.update({"axis": p.axis, "layer": p.layer, "indices": p.indices.tolist()})

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        return f"PatchSet({len(self.params)} tensors, {len(self.neurons)} neurons)"

    @property
    def neurons(self) -> list[tuple[str, Optional[int], int]]:
        """``(param name, layer, neuron index)`` of every patched neuron."""
        return [(p.name, p.layer, int(i)) for p in self.params for i in p.indices.tolist()]

    @property
    def num_values(self) -> int:
        """Number of scalar parameters changed."""
        return sum(p.num_values for p in self.params)

    def param(self, name: str) -> ParamPatch:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"the patch does not touch {name!r}; it touches {[p.name for p in self.params]}")

    # ------------------------------------------------------------ in memory
    def _weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for p in self.params:
            try:
                out[p.name] = model.get_parameter(p.name)
            except AttributeError:
                raise PatchError(
                    f"the model has no parameter {p.name!r} that the patch touches "
                    f"(model type {type(model).__name__}); was the patch made for another architecture?"
                ) from None
        return out

    def states(self, model: nn.Module) -> dict[str, str]:
        """Per touched parameter: ``"original"``, ``"patched"`` or ``"mismatch"``."""
        return {name: self.param(name).state_of(w) for name, w in self._weights(model).items()}

    def verify(self, model: nn.Module, expect: str = "original") -> None:
        """Raise :class:`PatchMismatchError` unless every touched parameter is
        in state ``expect`` (``"original"`` or ``"patched"``)."""
        for name, state in self.states(model).items():
            if state != expect:
                raise PatchMismatchError(self._mismatch_message(model, name, state, expect))

    def _mismatch_message(self, model, name, state, expect) -> str:
        p = self.param(name)
        w = model.get_parameter(name)
        if w.dim() != 2 or int(p.indices.max()) >= w.shape[p.axis]:
            return (
                f"tensor {name!r} has shape {tuple(w.shape)}, the patch expects neuron indices up to "
                f"{int(p.indices.max())} on axis {p.axis}: wrong base model"
            )
        cols = w.detach().index_select(p.axis, p.indices.to(w.device)).float().cpu()
        diff = float((cols - (p.original if expect == "original" else p.new)).abs().max())
        return (
            f"tensor {name!r} is {state!r}, expected {expect!r}: its patched columns differ from the patch's "
            f"{expect} values by up to {diff:.3g}; this is not the model the patch was made for "
            f"(base: {self.manifest.get('base', {}).get('name_or_path', '?')})"
        )

    def _transition(self, model: nn.Module, src: str, dst: str) -> int:
        weights = self._weights(model)
        states = {n: self.param(n).state_of(w) for n, w in weights.items()}
        for name, state in states.items():
            if state not in (src, dst):
                raise PatchMismatchError(self._mismatch_message(model, name, state, src))
        changed = 0
        for name, state in states.items():
            if state == src:
                p = self.param(name)
                p.write(weights[name], p.new if dst == "patched" else p.original)
                changed += 1
        return changed

    def apply(self, model: nn.Module) -> int:
        """Write the new values into ``model`` (in place).

        Parameters already patched are left alone (idempotent).

        Returns:
            Number of parameters written.

        Raises:
            PatchMismatchError: a touched parameter holds neither the original
                nor the patched values (nothing is written); names the tensor.
            PatchError: the model lacks a touched parameter.
        """
        return self._transition(model, "original", "patched")

    def revert(self, model: nn.Module) -> int:
        """Write the original values back (bit-exact; idempotent).

        Raises:
            PatchMismatchError / PatchError: as :meth:`apply`.
        """
        return self._transition(model, "patched", "original")

    # -------------------------------------------------------------- on disk
    def save(self, path: PathLike, overwrite: bool = False) -> Path:
        """Write ``patch.safetensors`` then ``manifest.json`` (each atomically).

        Args:
            path: a patch folder, or a ``NAME.safetensors`` / ``NAME.json`` file name (see :func:`patch_paths`).
            overwrite: replace an existing patch there. Off by default: a patch that was applied in place
                is the only record of the original values, so replacing it can make a revert impossible.

        Returns:
            The manifest path.

        Raises:
            PathExistsError: a patch (payload or manifest) already exists at ``path`` and ``overwrite`` is
                false; nothing is written. Call :func:`check_patch_destination` before expensive work.
            UserError: the destination's folder is not writable.
        """
        payload, manifest_path = check_patch_destination(path, overwrite)
        clean_stale_temps(payload.parent, min_age_s=3600)  # what a killed save left (older than an hour)
        tensors = {}
        for p in self.params:
            tensors[f"{p.name}::indices"] = p.indices
            tensors[f"{p.name}::original"] = p.original
            tensors[f"{p.name}::new"] = p.new
        atomic_save_safetensors(payload, tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        digest = hashlib.sha256(payload.read_bytes()).hexdigest()
        self.manifest["payload"] = {"file": payload.name, "sha256": digest}
        atomic_write_json(manifest_path, self.manifest)
        return manifest_path

    @classmethod
    def load(cls, path: PathLike) -> PatchSet:
        """Load a patch saved by :meth:`save` (folder or ``.safetensors`` path).

        The loaded patch remembers its location in ``source`` (a :class:`Path`), so
        writing a checkpoint copy can refuse an output folder that holds the patch.

        Raises:
            PathNotFoundError: the payload or manifest is missing (names both paths); also a
                ``FileNotFoundError``.
            PatchError: a manifest that is not JSON or not a neurodetox manifest, a payload whose
                sha256 differs from the manifest's, a truncated payload, tensors missing from the
                payload, indices that are negative, duplicated, differ from the manifest's or exceed
                the tensor's recorded shape, or value shapes that do not match the indices.
        """
        from safetensors import SafetensorError, safe_open

        payload, manifest_path = patch_paths(path)
        if not payload.is_file() or not manifest_path.is_file():
            raise PathNotFoundError(
                f"no patch at {path}: expected {payload} and {manifest_path} "
                "(a patch folder as written by `neurodetox patch find --out PATCH`)"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise PatchError(
                f"{manifest_path} is not valid JSON ({e}); it is not a neurodetox patch manifest"
            ) from None
        if not isinstance(manifest, dict):
            raise PatchError(f"{manifest_path} is not a neurodetox patch manifest (a JSON object is expected)")
        if manifest.get("format") != FORMAT:
            raise PatchError(f"{manifest_path} is not a neurodetox patch manifest (format={manifest.get('format')!r})")
        version = manifest.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise PatchError(f"{manifest_path}: format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise PatchError(
                f"{manifest_path} has format_version {manifest.get('format_version')}; this neurodetox "
                f"reads up to {FORMAT_VERSION}: upgrade neurodetox"
            )
        want = manifest.get("payload", {}).get("sha256")
        got = hashlib.sha256(payload.read_bytes()).hexdigest()
        if want and want != got:
            raise PatchError(
                f"{payload} has sha256 {got}, the manifest expects {want}: the patch file was changed "
                "or belongs to another manifest"
            )
        entries = manifest.get("tensors", {})
        if not isinstance(entries, dict):
            raise PatchError(f"{manifest_path}: 'tensors' must map tensor names to their entries")
        params = []
        try:
            with safe_open(str(payload), framework="pt") as f:
                keys = set(f.keys())
                for name, info in entries.items():
                    params.append(_load_param(f, keys, name, info, payload, manifest_path))
        except SafetensorError as e:
            raise PatchError(f"{payload} is not a readable safetensors file (truncated or corrupt: {e})") from None
        patch = cls(params, manifest)
        patch.source = payload.parent if payload.name == "patch.safetensors" else payload
        return patch

    #: Where :meth:`load` read the patch from (folder, or payload file); ``None`` for a patch built in memory.
    source: Optional[Path] = None

    def copy(self) -> PatchSet:
        return PatchSet([copy.deepcopy(p) for p in self.params], copy.deepcopy(self.manifest))

    def set_hashes(self, weights: dict[str, torch.Tensor]) -> None:
        """Record ``sha256_original`` / ``sha256_patched`` / ``dtype`` / ``shape``
        for each touched tensor from full ORIGINAL tensors ``weights`` (name ->
        tensor in its storage dtype). The patched hash is that of the tensor
        with the new values cast to its dtype."""
        for p in self.params:
            w = weights[p.name].detach().cpu()
            if p.state_of(w) != "original":
                raise PatchMismatchError(f"tensor {p.name!r} given to set_hashes is not in the patch's original state")
            patched = w.clone()
            p.write(patched, p.new)
            entry = self.manifest["tensors"].setdefault(p.name, {})
            entry.update(
                {
                    "shape": list(w.shape),
                    "dtype": str(w.dtype).replace("torch.", ""),
                    "sha256_original": tensor_sha256(w),
                    "sha256_patched": tensor_sha256(patched),
                    "cast_error": p.cast_error(w.dtype),
                }
            )
