"""Tests for ``neurodetox.patching.checkpoint``: checkpoint folders patched and reverted, checked by sha256 of
every file on disk; sharded and bf16 checkpoints; messages for folders that are not a checkpoint."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import make_tokenizer
from patching_helpers import FIX_EDIT, fixed_patch, make_model, one_thread, save_checkpoint

from neurodetox.patching import (
    CheckpointError,
    MintSettings,
    ParamPatch,
    PatchMismatchError,
    apply_to_checkpoint,
    bind_to_checkpoint,
    checkpoint_states,
    coerce_edits,
    encode_edit,
    find_failures,
    folder_sha256,
    inspect_checkpoint,
    repair,
    revert_checkpoint,
    tensor_sha256,
    verify_checkpoint,
)
from neurodetox.patching import checkpoint as ckpt_mod


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """A checkpoint, a model loaded from it and a bound patch that fixes FIX_EDIT (see ``fixed_patch``)."""
    return fixed_patch(tmp_path_factory)


def test_apply_revert_checkpoint_bit_exact(fixed, tmp_path):
    folder, _, _, patch, _ = fixed
    import shutil

    work = tmp_path / "c"
    shutil.copytree(folder, work)
    before = folder_sha256(work)
    res = apply_to_checkpoint(work, patch)
    assert res.shards == ["model.safetensors"] and res.written
    assert set(checkpoint_states(work, patch).values()) == {"patched"}
    assert folder_sha256(work)["config.json"] == before["config.json"]
    assert apply_to_checkpoint(work, patch).written == []  # idempotent
    revert_checkpoint(work, patch)
    assert folder_sha256(work) == before
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_fixed_failure_stays_fixed_after_reload(fixed, tmp_path):
    from neurodetox.core.models import load_model

    folder, _, _, patch, report = fixed
    out = tmp_path / "patched"
    apply_to_checkpoint(folder, patch, out=out)
    model, tok = load_model(str(out))
    edit = encode_edit(tok, coerce_edits([FIX_EDIT])[0])
    assert not find_failures(model, edit)
    assert edit.target_ids == report.edits[0].edit.target_ids


def test_hash_mismatch_refused_naming_tensor(fixed, tmp_path):
    folder, _, tok, patch, _ = fixed
    other = save_checkpoint(make_model(seed=3), tok, tmp_path / "other")
    before = folder_sha256(other)
    with pytest.raises(PatchMismatchError) as err:
        apply_to_checkpoint(other, patch)
    assert patch.params[0].name in str(err.value) and "model.safetensors" in str(err.value)
    assert folder_sha256(other) == before
    with pytest.raises(PatchMismatchError, match="already 'original'|not the checkpoint"):
        verify_checkpoint(folder, patch, expect="patched")


def test_killed_apply_leaves_checkpoint_unchanged(fixed, tmp_path, monkeypatch):
    folder, _, _, patch, _ = fixed
    import shutil

    work = tmp_path / "c"
    shutil.copytree(folder, work)
    before = folder_sha256(work)
    real = ckpt_mod._write_shard

    def dying(src, tmp, updates):
        real(src, tmp, updates)
        with open(tmp, "r+b") as f:  # half-written garbage, then the "kill"
            f.truncate(os.path.getsize(tmp) // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        apply_to_checkpoint(work, patch)
    assert folder_sha256(work) == before
    assert sorted(p.name for p in work.iterdir()) == sorted(before)


def test_sharded_checkpoint_touches_only_touched_shards(fixed, tmp_path):
    folder, model, tok, patch, _ = fixed
    sharded = save_checkpoint(model, tok, tmp_path / "sharded", max_shard_size="60KB")
    info = inspect_checkpoint(sharded)
    assert info.index_file is not None and len(info.shards) >= 3
    touched = {info.shard_of(p.name) for p in patch.params}
    before = folder_sha256(sharded)
    mtimes = {p.name: p.stat().st_mtime_ns for p in sharded.iterdir()}
    res = apply_to_checkpoint(sharded, patch)
    assert set(res.shards) == touched
    after = folder_sha256(sharded)
    for p in sharded.iterdir():
        if p.name not in touched:
            assert after[p.name] == before[p.name] and p.stat().st_mtime_ns == mtimes[p.name], p.name
        else:
            assert after[p.name] != before[p.name]
    revert_checkpoint(sharded, patch)
    assert folder_sha256(sharded) == before


def test_bf16_checkpoint_roundtrip_reports_cast_error(tmp_path):
    from neurodetox.core.models import load_model

    tok = make_tokenizer()
    folder = save_checkpoint(make_model(dtype=torch.bfloat16), tok, tmp_path / "bf16", max_shard_size="80KB")
    model, tok = load_model(str(folder))  # computes in float32
    assert model.dtype == torch.float32
    settings = MintSettings(storage_dtype="bfloat16")
    patch, report = repair(model, tok, [FIX_EDIT], settings, show_progress=False)
    assert len(patch), "the bf16 tiny model could not be fixed"
    bind_to_checkpoint(patch, folder)
    assert {v["dtype"] for v in patch.manifest["tensors"].values()} == {"bfloat16"}
    # updates were rounded to bf16 while repairing: storing them loses nothing more
    res = apply_to_checkpoint(folder, patch, out=tmp_path / "bf16-patched")
    assert res.dtype and set(res.dtype.values()) == {"bfloat16"}
    assert max(res.cast_error.values()) == 0.0
    # an unrounded float32 patch gets a non-zero, reported cast error
    p0 = patch.params[0]
    assert p0.cast_error(torch.bfloat16) == 0.0
    assert ParamPatch(p0.name, p0.axis, p0.indices, p0.original, p0.new + 1e-4).cast_error(torch.bfloat16) > 0
    reloaded, _ = load_model(str(tmp_path / "bf16-patched"))
    assert not find_failures(reloaded, report.edits[0].edit)
    before = folder_sha256(folder)
    revert_checkpoint(tmp_path / "bf16-patched", patch)
    after = folder_sha256(tmp_path / "bf16-patched")
    for name in before:
        assert after[name] == before[name], name


def test_peft_adapter_only_folder_message(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"merge_and_unload\(\).*save_pretrained"):
        inspect_checkpoint(tmp_path)


def test_zero_folder_message(tmp_path):
    (tmp_path / "global_step10").mkdir()
    (tmp_path / "latest").write_text("global_step10")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"deepspeed\.utils\.zero_to_fp32.*convert_zero_checkpoint_to_fp32"):
        inspect_checkpoint(tmp_path)


def test_missing_and_bin_only_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        inspect_checkpoint(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        inspect_checkpoint(tmp_path)


def test_tensor_sha256_is_the_stored_bytes(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": t}, tmp_path / "x.safetensors")
    start, header = ckpt_mod._header(tmp_path / "x.safetensors")
    lo, hi = header["w"]["data_offsets"]
    raw = (tmp_path / "x.safetensors").read_bytes()[start + lo : start + hi]
    import hashlib

    assert tensor_sha256(t) == hashlib.sha256(raw).hexdigest()
