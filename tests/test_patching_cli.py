"""Tests for ``neurodetox patch`` (``neurodetox.cli.patch``) on tiny offline checkpoints."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from conftest import make_tokenizer
from patching_helpers import FIX_EDIT, make_model, one_thread, save_checkpoint, tiny_facts

from neurodetox.patching import folder_sha256


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def test_cli_find_apply_show_eval_revert(tmp_path, capsys):
    from neurodetox.cli.patch import cmd_patch

    tok = make_tokenizer()
    folder = save_checkpoint(make_model(), tok, tmp_path / "base")
    before = folder_sha256(folder)
    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        json.dumps({"prompt": "the capital of germany is", "target": "berlin", "paraphrases": ["germany capital is"]})
        + "\n"
    )
    rc = cmd_patch(
        [
            "--threads",
            "1",
            "--quiet",
            "find",
            "--model",
            str(folder),
            "--prompt",
            FIX_EDIT["prompt"],
            "--target",
            FIX_EDIT["target"],
            "--edits",
            str(edits),
            "--out",
            str(tmp_path / "patch"),
        ]
    )
    assert rc in (0, 1)  # 1: some edit skipped, the patch holds the fixed ones
    assert (tmp_path / "patch" / "manifest.json").is_file()
    assert cmd_patch(["apply", str(folder), str(tmp_path / "patch"), "--in-place"]) == 0
    assert cmd_patch(["verify", str(folder), str(tmp_path / "patch")]) == 0
    assert "checkpoint is patched" in capsys.readouterr().out
    assert cmd_patch(["show", str(tmp_path / "patch")]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "before" in out and "after" in out
    assert (
        cmd_patch(
            [
                "--quiet",
                "eval",
                str(folder),
                str(tmp_path / "patch"),
                "--data",
                str(tiny_facts(tmp_path)),
                "--unrelated",
                "5",
                "--reference-texts",
                "3",
                "--max-new-tokens",
                "2",
                "--json",
                str(tmp_path / "ev.json"),
            ]
        )
        == 0
    )
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["success"] > 0 and ev["unrelated_prompts"] == 5
    assert cmd_patch(["revert", str(folder), str(tmp_path / "patch"), "--in-place"]) == 0
    assert folder_sha256(folder) == before
    # a different model is refused, naming the tensor, exit status 1
    other = save_checkpoint(make_model(seed=5), tok, tmp_path / "other")
    assert cmd_patch(["apply", str(other), str(tmp_path / "patch"), "--in-place"]) == 1
    assert "mlp.down_proj.weight" in capsys.readouterr().err
    # bad usage: exit status 2 with a message
    assert cmd_patch(["apply", str(folder), str(tmp_path / "patch")]) == 2
    assert "--output_dir DIR" in capsys.readouterr().err  # the output flag of every command (was --out)


def test_cli_update_rule_reaches_the_manifest(tmp_path, capsys):
    from neurodetox.cli.patch import cmd_patch

    folder = save_checkpoint(make_model(), make_tokenizer(), tmp_path / "base")
    for rule in ("interpolate", "additive"):
        out = tmp_path / rule
        rc = cmd_patch(
            [
                "--threads",
                "1",
                "--quiet",
                "find",
                "--model",
                str(folder),
                "--prompt",
                FIX_EDIT["prompt"],
                "--target",
                FIX_EDIT["target"],
                "--update",
                rule,
                "--out",
                str(out),
            ]
        )
        assert rc in (0, 1)
        assert json.loads((out / "manifest.json").read_text())["settings"]["update"] == rule
    # a bad choice is a user error: one line on stderr and exit status 2 (argparse's SystemExit(2) before the
    # one-dialect command line)
    assert (
        cmd_patch(
            [
                "find",
                "--model",
                str(folder),
                "--prompt",
                "x",
                "--target",
                "y",
                "--update",
                "shrink",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "invalid choice: 'shrink'" in capsys.readouterr().err
