"""Issue 19: hostile and careless input to checkpoint patching (apply/revert/save/load).

Every test builds a tiny random Llama checkpoint and a hand-made patch (two neurons of one
down projection, new = original + 1), so the expected bytes are known without MINT.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neurodetox.core.errors import UserError
from neurodetox.core.locks import LOCK_NAME, FolderLockedError, folder_lock
from neurodetox.core.paths import TEMP_PREFIX, PathExistsError, safe_member
from neurodetox.patching import checkpoint as ckpt
from neurodetox.patching.checkpoint import (
    CheckpointError,
    apply_to_checkpoint,
    bind_to_checkpoint,
    file_sha256,
    folder_sha256,
    inspect_checkpoint,
    revert_checkpoint,
    verify_checkpoint,
)
from neurodetox.patching.patchfile import ParamPatch, PatchError, PatchSet, check_patch_destination, patch_paths
from tests.conftest import make_tiny_llama, make_tokenizer

W0 = "model.layers.0.mlp.down_proj.weight"
W1 = "model.layers.1.mlp.down_proj.weight"


def _checkpoint(folder: Path) -> Path:
    tok = make_tokenizer()
    make_tiny_llama(len(tok), layers=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _patch(folder: Path, name: str = W0, idx=(1, 3)) -> PatchSet:
    """A patch adding 1 to neurons ``idx`` of ``name``, bound to ``folder``."""
    w = load_file(str(folder / "model.safetensors"))[name]
    i = torch.tensor(idx)
    orig = w.index_select(1, i)
    return bind_to_checkpoint(PatchSet([ParamPatch(name, 1, i, orig, orig + 1.0, layer=0)]), folder)


@pytest.fixture
def clean(tmp_path):
    return _checkpoint(tmp_path / "clean")


# ----------------------------------------------------------------------------- hostile index (item 2)


def _hostile(root: Path, clean: Path, shard_name: str, victim_state: PatchSet | None = None) -> tuple[Path, Path]:
    """A checkpoint whose index maps every tensor to ``shard_name`` (pointing at ``root/victim``)."""
    victim = root / "victim" / "model.safetensors"
    victim.parent.mkdir(parents=True)
    shutil.copyfile(clean / "model.safetensors", victim)
    ck = root / "ck"
    ck.mkdir()
    shutil.copyfile(clean / "config.json", ck / "config.json")
    (ck / "X").mkdir()
    (ck / ".X").mkdir()
    names = list(load_file(str(victim)))
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard_name for n in names}}))
    return ck, victim


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
@pytest.mark.parametrize("op", ["apply", "revert"])
def test_hostile_index_writes_nothing_outside_the_checkpoint(tmp_path, clean, kind, op):
    patch = _patch(clean)
    if op == "revert":  # the victim holds the patched state, which revert would rewrite
        apply_to_checkpoint(clean, patch)
    shard = "X/../../victim/model.safetensors" if kind == "dotdot" else str(tmp_path / "victim" / "model.safetensors")
    ck, victim = _hostile(tmp_path, clean, shard)
    before = victim.read_bytes()
    before_ck = folder_sha256(ck)
    fn = apply_to_checkpoint if op == "apply" else revert_checkpoint
    with pytest.raises(UserError, match="absolute path|'..'"):
        fn(ck, patch)
    assert victim.read_bytes() == before
    assert sorted(p.name for p in victim.parent.iterdir()) == ["model.safetensors"]  # no temp file there either
    assert folder_sha256(ck) == before_ck and not (ck / LOCK_NAME).exists()


def test_hostile_index_refused_before_any_read(tmp_path, clean):
    ck, _ = _hostile(tmp_path, clean, "X/../../victim/model.safetensors")
    with pytest.raises(UserError, match="shard name"):
        inspect_checkpoint(ck)


def test_symlinked_shard_leaving_the_folder_is_refused(tmp_path, clean):
    patch = _patch(clean)
    ck, victim = _hostile(tmp_path, clean, "model.safetensors")
    (ck / "model.safetensors").symlink_to(victim)
    before = victim.read_bytes()
    with pytest.raises(UserError, match="outside"):
        apply_to_checkpoint(ck, patch)
    assert victim.read_bytes() == before


def test_safe_member_accepts_plain_names_and_refuses_escapes(tmp_path):
    assert safe_member(tmp_path, "model-00001-of-00002.safetensors") == tmp_path / "model-00001-of-00002.safetensors"
    assert safe_member(tmp_path, "sub/x.safetensors") == tmp_path / "sub" / "x.safetensors"
    for bad in ["../x", "a/../../x", "/etc/passwd", "C:\\x", "\\\\server\\x", "", "a\x1b[31m", 3]:
        with pytest.raises(UserError):
            safe_member(tmp_path, bad)


# ----------------------------------------------------------------------------- apply --out (item 3)


def test_out_containing_or_inside_the_source_or_patch_is_refused(tmp_path, clean):
    patch = _patch(clean)
    patch.save(tmp_path / "patches" / "p")
    loaded = PatchSet.load(tmp_path / "patches" / "p")
    before = folder_sha256(tmp_path)
    for out in [tmp_path, clean, clean / "sub", tmp_path / "patches", tmp_path / "patches" / "p" / "x"]:
        with pytest.raises(UserError, match="contains|inside|itself"):
            apply_to_checkpoint(clean, loaded, out=out, overwrite=True)
        with pytest.raises(UserError, match="contains|inside|itself"):
            revert_checkpoint(clean, loaded, out=out, overwrite=True)
    assert folder_sha256(tmp_path) == before
    # a sibling folder is fine, and the source is untouched
    res = apply_to_checkpoint(clean, loaded, out=tmp_path / "patched")
    assert res.written == [W0]
    assert folder_sha256(clean) == {k.removeprefix("clean/"): v for k, v in before.items() if k.startswith("clean/")}
    verify_checkpoint(tmp_path / "patched", loaded, "patched")


def test_out_existing_without_overwrite_is_refused_before_copying(tmp_path, clean):
    patch = _patch(clean)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(PathExistsError, match="--overwrite"):
        apply_to_checkpoint(clean, patch, out=tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert isinstance(PathExistsError("x"), FileExistsError)


# ----------------------------------------------------------------------------- lock (item 4)


def test_concurrent_in_place_applies_are_serialised(tmp_path, clean, monkeypatch):
    p0, p1 = _patch(clean, W0), _patch(clean, W1)
    real = ckpt._write_shard

    def slow(src, tmp, updates):  # widen the read-modify-rename window so the race would show without the lock
        time.sleep(0.3)
        real(src, tmp, updates)

    monkeypatch.setattr(ckpt, "_write_shard", slow)
    errors = []

    def run(p):
        try:
            apply_to_checkpoint(clean, p, lock_timeout=30)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in (p0, p1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    verify_checkpoint(clean, p0, "patched")  # neither update was lost
    verify_checkpoint(clean, p1, "patched")
    assert not (clean / LOCK_NAME).exists()


def test_second_writer_is_refused_after_the_timeout(tmp_path, clean):
    patch = _patch(clean)
    before = folder_sha256(clean)
    with folder_lock(clean):
        t0 = time.monotonic()
        with pytest.raises(FolderLockedError, match="locked by another neurodetox process"):
            revert_checkpoint(clean, patch, lock_timeout=0.5)
        with pytest.raises(FolderLockedError):
            apply_to_checkpoint(clean, patch, lock_timeout=0.5)
        assert time.monotonic() - t0 >= 1.0  # it waited before refusing
    assert {k: v for k, v in folder_sha256(clean).items() if k != LOCK_NAME} == before
    apply_to_checkpoint(clean, patch, lock_timeout=0)  # free again
    verify_checkpoint(clean, patch, "patched")


def test_lock_across_processes(tmp_path, clean):
    import subprocess
    import sys

    patch = _patch(clean)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from neurodetox.core.locks import folder_lock\n"
            f"with folder_lock({str(clean)!r}):\n    print('held', flush=True); time.sleep(3)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError):
            apply_to_checkpoint(clean, patch, lock_timeout=0.3)
    finally:
        holder.wait(timeout=30)
    apply_to_checkpoint(clean, patch, lock_timeout=10)
    verify_checkpoint(clean, patch, "patched")


# ----------------------------------------------------------------------------- patch files (items 5, 7)


def test_save_refuses_an_existing_patch_unless_overwrite(tmp_path, clean):
    patch = _patch(clean)
    dest = tmp_path / "p"
    patch.save(dest)
    before = folder_sha256(dest)
    other = _patch(clean, W1)
    with pytest.raises(PathExistsError, match="already exists"):
        check_patch_destination(dest)
    with pytest.raises(PathExistsError, match="--overwrite"):
        other.save(dest)
    assert folder_sha256(dest) == before
    other.save(dest, overwrite=True)
    assert [p.name for p in PatchSet.load(dest).params] == [W1]
    # the file form too
    patch.save(tmp_path / "q.safetensors")
    with pytest.raises(PathExistsError):
        patch.save(tmp_path / "q.json")


def _rewrite(path: Path, tensors=None, manifest=None):
    """Replace a saved patch's payload and/or manifest, with a matching payload sha256 (as an attacker can)."""
    import hashlib

    payload, man = patch_paths(path)
    m = json.loads(man.read_text())
    if tensors is not None:
        save_file(tensors, str(payload))
    if manifest is not None:
        manifest(m)
    m["payload"]["sha256"] = hashlib.sha256(payload.read_bytes()).hexdigest()
    man.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "case, match",
    [
        ("negative", "negative neuron index"),
        ("huge", "allows at most"),
        ("wrong_shape", "does not fit|do not match"),
        ("axis", "axis"),
        ("not_json", "not valid JSON"),
        ("index_mismatch", "differ from the payload"),
        ("truncated", "truncated or corrupt"),
    ],
)
def test_hostile_manifest_is_refused(tmp_path, clean, case, match):
    patch = _patch(clean)
    dest = tmp_path / "p"
    patch.save(dest)
    payload, man = patch_paths(dest)
    t = load_file(str(payload))
    if case == "negative":
        t[f"{W0}::indices"] = torch.tensor([-1, 3])
        _rewrite(dest, t, lambda m: m["tensors"][W0].update(indices=[-1, 3]))
    elif case == "huge":
        t[f"{W0}::indices"] = torch.tensor([1, 10**12])
        _rewrite(dest, t, lambda m: m["tensors"][W0].update(indices=[1, 10**12]))
    elif case == "wrong_shape":
        t[f"{W0}::original"] = torch.zeros(7, 2)
        t[f"{W0}::new"] = torch.zeros(7, 2)
        _rewrite(dest, t)
    elif case == "axis":
        _rewrite(dest, None, lambda m: m["tensors"][W0].update(axis=5))
    elif case == "not_json":
        man.write_text("{not json")
    elif case == "index_mismatch":
        t[f"{W0}::indices"] = torch.tensor([2, 3])
        _rewrite(dest, t)
    elif case == "truncated":
        data = payload.read_bytes()
        payload.write_bytes(data[: len(data) // 2])
        _rewrite(dest)
    with pytest.raises(PatchError, match=match) as err:
        PatchSet.load(dest)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_truncated_checkpoint_is_a_user_error(tmp_path, clean):
    patch = _patch(clean)
    data = (clean / "model.safetensors").read_bytes()
    (clean / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        apply_to_checkpoint(clean, patch)
    assert isinstance(err.value, UserError) and "model.safetensors" in str(err.value)


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_read_only_or_full_checkpoint_is_a_user_error(tmp_path, clean, monkeypatch, err):
    """The OS refusal is simulated (tests may run as root, which ignores permissions)."""
    patch = _patch(clean)
    before = folder_sha256(clean)

    def refuse(src, tmp, updates):
        raise OSError(err, os.strerror(err), str(tmp))

    monkeypatch.setattr(ckpt, "_write_shard", refuse)
    with pytest.raises(UserError, match="cannot write the checkpoint .*nothing was changed") as e:
        apply_to_checkpoint(clean, patch)
    assert os.strerror(err) in str(e.value)
    assert folder_sha256(clean) == before


# ----------------------------------------------------------------------------- item 8: modes, temps


def test_in_place_apply_and_revert_keep_the_shard_mode(tmp_path, clean):
    patch = _patch(clean)
    shard = clean / "model.safetensors"
    shard.chmod(0o644)
    original = file_sha256(shard)
    apply_to_checkpoint(clean, patch)
    assert stat.S_IMODE(shard.stat().st_mode) == 0o644
    revert_checkpoint(clean, patch)
    assert stat.S_IMODE(shard.stat().st_mode) == 0o644
    assert file_sha256(shard) == original


def test_stale_temp_files_are_cleaned_by_the_next_write(tmp_path, clean):
    patch = _patch(clean)
    stale = [clean / f"{TEMP_PREFIX}model.safetensors.abc.tmp", clean / ".model.safetensors.xyz.neurodetox.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    keep = clean / ".hidden-user-file"
    keep.write_text("mine")
    apply_to_checkpoint(clean, patch)
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
    assert sorted(p.name for p in clean.iterdir() if p.name.startswith(".")) == [".hidden-user-file"]


def test_killed_apply_leaves_only_recognisable_temps(tmp_path, clean, monkeypatch):
    """A kill between writing the temp and the rename is simulated by a BaseException that skips cleanup."""
    patch = _patch(clean)
    before = folder_sha256(clean)

    def dying(src, tmp, updates):
        shutil.copyfile(src, tmp)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        apply_to_checkpoint(clean, patch)
    assert folder_sha256(clean) == before  # the temp was removed by the finally block
    monkeypatch.undo()
    apply_to_checkpoint(clean, patch)
    verify_checkpoint(clean, patch, "patched")


def test_sigkill_during_in_place_apply_then_next_apply_recovers(tmp_path, clean):
    """A real SIGKILL while the shard copy is being written: the checkpoint is byte-identical, the stale
    temp and lock file are recognisable, and the next apply (no waiting: the kernel dropped the lock)
    removes them and finishes."""
    import signal
    import subprocess
    import sys

    patch = _patch(clean)
    patch.save(tmp_path / "p")
    before = folder_sha256(clean)
    script = (
        "import sys, time\n"
        "from neurodetox.patching import checkpoint as ck\n"
        "from neurodetox.patching.patchfile import PatchSet\n"
        "real = ck._write_shard\n"
        "def slow(src, tmp, updates):\n"
        "    real(src, tmp, updates)\n"
        "    print('written', flush=True)\n"
        "    time.sleep(60)\n"
        "ck._write_shard = slow\n"
        f"ck.apply_to_checkpoint({str(clean)!r}, PatchSet.load({str(tmp_path / 'p')!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        left = [p.name for p in clean.iterdir() if p.name.startswith(TEMP_PREFIX)]
        assert len(left) == 1 and (clean / LOCK_NAME).exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    after_kill = {k: v for k, v in folder_sha256(clean).items() if not k.startswith((TEMP_PREFIX, LOCK_NAME))}
    assert after_kill == before
    t0 = time.monotonic()
    apply_to_checkpoint(clean, PatchSet.load(tmp_path / "p"), lock_timeout=5)
    assert time.monotonic() - t0 < 5
    verify_checkpoint(clean, patch, "patched")
    assert not [p for p in clean.iterdir() if p.name.startswith(TEMP_PREFIX) or p.name == LOCK_NAME]


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("[bold red]x[/]", "[bold red]x[/]"),  # markup printed literally, not interpreted
        ("[/]", "[/]"),  # a closing tag with no opening one used to crash rich
        ("\x1b[2J\x1b]0;pwned\x07hi", "hi"),  # clear-screen and set-title sequences removed
        ("a\tb\nc\x00\x9b", "a b c"),
        ("Curaçao", "Curaçao"),
    ],
)
def test_terminal_text_neutralises_markup_and_escape_codes(raw, shown):
    import io

    from rich.console import Console

    from neurodetox.patching.patchfile import terminal_text

    buf = io.StringIO()
    Console(file=buf, force_terminal=True, color_system="truecolor", highlight=False).print(terminal_text(raw))
    assert buf.getvalue() == shown + "\n"  # no style codes: nothing was interpreted as markup
