"""``neurodetox patch``: MINT neuron patches of saved checkpoints.

    neurodetox patch find   --model CKPT --prompt TEXT --target TEXT [--edits FILE.jsonl] --out PATCH
    neurodetox patch apply  CKPT PATCH (--out DIR | --in-place)
    neurodetox patch revert CKPT PATCH (--out DIR | --in-place)
    neurodetox patch verify CKPT PATCH
    neurodetox patch show   PATCH [--model CKPT]
    neurodetox patch eval   CKPT PATCH [--unrelated 250] [--json FILE]
    neurodetox patch demo   --run runs/demo [--n 5]

Method: Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model
Repair for Code Generation", arXiv 2312.05356 (``shared/docs/methods.md`` §4).
Exit status: 0 success; 1 some edit could not be fixed (the patch holds the
fixed ones) or a verification failed; 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["cmd_patch", "run_demo"]


def _fail(message: str) -> int:
    print(f"neurodetox patch: error: {message}", file=sys.stderr)
    return 2


def set_threads(spec: str = "auto") -> int:
    """Set torch's intra-op threads: an integer, or ``"auto"`` = the cores not
    already busy (``cpu_count − 1-min load average``, at least 1, at most
    torch's default). On a shared machine this avoids oversubscription, which
    made a forward pass several times slower in our measurements."""
    import torch

    if str(spec) != "auto":
        n = int(spec)
        if n < 1:
            raise ValueError(f"--threads must be 'auto' or an integer >= 1, got {spec!r}")
    else:
        cpus = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
        n = max(1, min(torch.get_num_threads(), int(cpus - load + 0.5)))
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- helpers


def _read_edits(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"edits file not found: {p}")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(
                f'{p}:{n} is not a JSON object ({e}); each line must be {{"prompt": ..., "target": ...}}'
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}:{n} must be a JSON object with 'prompt' and 'target', got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f'{p} holds no edits (one JSON object per line: {{"prompt": ..., "target": ...}})')
    return rows


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            row = json.loads(line)
            line = row.get("prompt") or row.get("text") or row.get("statement") or ""
        if line:
            out.append(line)
    return out


def _checkpoint_path(name: str) -> Path:
    from neurodetox.core.models import resolve_model_path

    path, gguf = resolve_model_path(name)
    if gguf:
        raise ValueError(
            f"{name} is a GGUF file; patches apply to safetensors checkpoints. Load and save it once "
            "as safetensors (neurodetox's default model is converted automatically)"
        )
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint folder not found: {name} (hub ids cannot be patched in place; "
            "download the checkpoint to a folder first)"
        )
    return p


def _console():
    from rich.console import Console

    return Console()


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "n/a"
        return f"{100 * x:.1f}%" if pct else f"{x:.4g}"
    return str(x)


def _edit_table(report) -> Any:
    from rich.table import Table

    t = Table(title="MINT repair")
    for col in ("#", "prompt", "target", "status", "failures", "neurons (layer:index)", "ref. changed", "s"):
        t.add_column(col)
    for e in report.edits:
        t.add_row(
            str(e.index),
            e.edit.prompt,
            e.edit.target,
            e.status,
            str(sum(f.status == "fixed" for f in e.failures)) + "/" + str(len(e.failures)),
            " ".join(f"{a}:{b}" for a, b in e.neurons) or "-",
            "-" if e.reference_flips is None else f"{e.reference_flips} ({e.attempts} tries)",
            f"{e.seconds:.1f}",
        )
    return t


def _settings_from_args(a) -> Any:
    from neurodetox.patching.mint import MintSettings

    steps = tuple(float(x) for x in a.alpha_steps.split(",")) if a.alpha_steps else (1.0,)
    return MintSettings(
        update=a.update,
        alpha=a.alpha,
        alpha_steps=steps,
        locator=a.locator,
        candidates=a.candidates,
        max_patches=a.max_patches,
        layers=a.layers,
        fold_norm=not a.no_fold_norm,
        orthogonalize=a.orthogonalize,
        signed=not a.unsigned,
        entropy_guard=not a.no_entropy_guard,
        guard=a.guard,
        relocate=a.relocate,
        relocate_fallback=a.relocate_fallback,
        prune=a.prune,
        verify_reference=a.verify_reference,
        max_reference_flips=a.max_reference_flips,
        reference_retries=a.reference_retries,
        protect=a.protect,
    )


def _add_setting_args(p: argparse.ArgumentParser) -> None:
    from neurodetox.patching.locate import LOCATORS
    from neurodetox.patching.mint import UPDATE_RULES

    g = p.add_argument_group("MINT settings")
    g.add_argument("--locator", default="grad_x_act", choices=LOCATORS, help="Neuron locator (default grad_x_act).")
    g.add_argument(
        "--update",
        default="additive",
        choices=UPDATE_RULES,
        help="Value-vector update: 'additive' w <- w + α τ (default) or 'interpolate', MINT's "
        "w <- (w + α τ)/(1 + α), which also scales the neuron's existing output by 1/(1 + α).",
    )
    g.add_argument("--alpha", type=float, default=0.1, help="Update step α (default 0.1).")
    g.add_argument(
        "--alpha-steps",
        default="1,2.5,5,10",
        help="Multipliers of α the planner may use, comma list (default 1,2.5,5,10; '1' = fixed step).",
    )
    g.add_argument("--candidates", type=int, default=10, help="Candidate pool size (default 10).")
    g.add_argument("--max-patches", type=int, default=10, help="Patches per failure before skipping (default 10).")
    g.add_argument(
        "--layers",
        default="last_sixth",
        help="Layers searched: 'last_sixth' (default, the last L//6 blocks), 'second_half' (methods.md), "
        "a range '20-29' or a comma list.",
    )
    g.add_argument("--no-fold-norm", action="store_true", help="Do not fold the final norm gain into W_U.")
    g.add_argument("--orthogonalize", action="store_true", help="Project τ off directions used in the same layer.")
    g.add_argument("--unsigned", action="store_true", help="Paper's unsigned update (ignore activation sign).")
    g.add_argument("--no-entropy-guard", action="store_true", help="Allow patching last-layer entropy neurons.")
    g.add_argument(
        "--guard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Prefer patches predicted not to flip the reference prompts' next token, falling back to "
        "gain alone for a failure the guard cannot fix (default on; --no-guard: gain alone).",
    )
    g.add_argument(
        "--relocate",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Locate neurons again before every patch of a failure (slower). Default off: locate once "
        "per failure, then plan and patch repeat over that candidate pool.",
    )
    g.add_argument(
        "--relocate-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Without --relocate: a failure its candidate pool cannot fix is repaired again locating "
        "before every patch (default on).",
    )
    g.add_argument(
        "--protect",
        type=float,
        default=0.0,
        metavar="LAMBDA",
        help="Reference protection strength λ: replace each value-vector change by the nearest one that "
        "keeps the reference prompts' top-token gaps (direct path); 0 = off (default). 1e4 raised "
        "specificity with 20 edits in one call at some cost in facts fixed.",
    )
    g.add_argument("--prune", action="store_true", help="Undo neurons a fixed edit does not need (slower).")
    g.add_argument(
        "--verify-reference",
        action="store_true",
        help="Reference check: after each fixed edit, count the reference prompts whose next token "
        "changed; above --max-reference-flips, repair the edit again without its neurons.",
    )
    g.add_argument(
        "--max-reference-flips",
        type=int,
        default=0,
        help="Reference predictions an edit may change without a retry (default 0).",
    )
    g.add_argument("--reference-retries", type=int, default=2, help="Extra attempts per edit (default 2).")
    g.add_argument(
        "--reference",
        default="facts+default",
        help="Prompts that define neurons' background activation (what should not change): "
        "'facts+default' (default: 96 built-in fact prompts and the generic built-in prompts), "
        "'facts', 'default', or a file (one prompt per line, or JSONL with 'prompt').",
    )


def _reference_prompts(spec: str, exclude: Sequence[str] = ()) -> Optional[list[str]]:
    from neurodetox.patching.locate import DEFAULT_REFERENCE_PROMPTS

    if spec == "default":
        return None
    if spec in ("facts", "facts+default"):
        ref, _, _ = _fact_pools("facts", 0, exclude, (), 0, 128, 0)
        return ref if spec == "facts" else ref[:96] + list(DEFAULT_REFERENCE_PROMPTS)
    return _read_lines(spec)


# ----------------------------------------------------------------------------- subcommands


def cmd_find(a) -> int:
    from neurodetox.core.models import load_model
    from neurodetox.patching.checkpoint import bind_to_checkpoint, checkpoint_dtype, inspect_checkpoint
    from neurodetox.patching.mint import repair

    edits: list[dict] = []
    if a.prompt is not None or a.target is not None:
        if not a.prompt or not a.target:
            return _fail("--prompt and --target go together (both non-empty)")
        edits.append({"prompt": a.prompt, "target": a.target})
    if a.edits:
        edits.extend(_read_edits(a.edits))
    if not edits:
        return _fail("nothing to repair: give --prompt TEXT --target TEXT and/or --edits FILE.jsonl")
    folder = _checkpoint_path(a.model)
    info = inspect_checkpoint(folder)
    settings = _settings_from_args(a)
    settings.validate()
    model, tok = load_model(str(folder))
    from neurodetox.core.sites import resolve_sites, value_vector_parameter

    names = {id(p): n for n, p in model.named_parameters()}
    touched_names = [names[id(value_vector_parameter(s)[0])] for s in resolve_sites(model, "mlp", settings.layers)]
    dtype = checkpoint_dtype(info, touched_names[:1])
    if dtype is not None and dtype != model.dtype:
        settings.storage_dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(str(dtype))
    patch, report = repair(
        model,
        tok,
        edits,
        settings,
        show_progress=not a.quiet,
        base={"name_or_path": a.model},
        reference_prompts=_reference_prompts(a.reference, [e["prompt"] for e in edits]),
    )
    console = _console()
    console.print(_edit_table(report))
    s = report.summary()
    if not report.needing_fix:
        console.print("nothing to fix: the model already produces every target; no patch written")
        return 0
    if len(patch) == 0:
        console.print(f"no failure could be fixed ({s['skipped']} skipped); no patch written")
        return 1
    bind_to_checkpoint(patch, folder)
    patch.manifest["base"]["name_or_path"] = a.model
    manifest = patch.save(a.out)
    console.print(
        f"fixed {s['fixed']}/{s['needing_fix']} edits with {len(patch.neurons)} neurons "
        f"({patch.num_values} values) in {s['seconds']:.1f}s; cast error {s['cast_error']:.3g}; "
        f"patch: {manifest.parent if manifest.name == 'manifest.json' else manifest}"
    )
    return 0 if s["fixed"] == s["needing_fix"] else 1


def _write_cmd(a, revert: bool) -> int:
    from neurodetox.patching.checkpoint import apply_to_checkpoint, revert_checkpoint
    from neurodetox.patching.patchfile import PatchSet

    if bool(a.out) == bool(a.in_place):
        return _fail("give exactly one of --out DIR (write a patched copy) or --in-place")
    folder = _checkpoint_path(a.checkpoint)
    patch = PatchSet.load(a.patch)
    fn = revert_checkpoint if revert else apply_to_checkpoint
    res = fn(folder, patch, out=a.out, overwrite=a.overwrite)
    verb = "reverted" if revert else "applied"
    done = [n for n, st in res.tensors.items() if st == ("patched" if revert else "original")]
    if not res.written:
        print(f"nothing to do: every touched tensor of {res.folder} is already {'original' if revert else 'patched'}")
        return 0
    print(f"{verb} {len(done)} tensor(s) in {res.folder}; rewrote {len(res.shards)} shard(s): {', '.join(res.shards)}")
    if not revert:
        print(
            f"stored dtype: {', '.join(sorted(set(res.dtype.values())))}; "
            f"max cast error {max(res.cast_error.values(), default=0.0):.3g}"
        )
    return 0


def cmd_verify(a) -> int:
    from neurodetox.patching.checkpoint import checkpoint_states
    from neurodetox.patching.patchfile import PatchSet

    patch = PatchSet.load(a.patch)
    states = checkpoint_states(_checkpoint_path(a.checkpoint), patch)
    for name, st in states.items():
        print(f"{st:9s} {name}")
    kinds = set(states.values())
    if kinds == {"original"}:
        print("checkpoint is the patch's base (not patched)")
        return 0
    if kinds == {"patched"}:
        print("checkpoint is patched")
        return 0
    print(
        "checkpoint does not match the patch"
        if "mismatch" in kinds
        else "checkpoint is partly patched: run apply or revert again to finish"
    )
    return 1


def _head_from_checkpoint(folder: Path):
    """(W_U, final norm gain or None) read from a checkpoint (only those tensors)."""
    from neurodetox.patching.checkpoint import inspect_checkpoint, read_tensors

    info = inspect_checkpoint(folder)
    keys = list(info.weight_map)
    head = next((k for k in keys if k.endswith("lm_head.weight")), None) or next(
        (k for k in keys if k.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight"))), None
    )
    norm = next(
        (
            k
            for k in keys
            if k.endswith(("model.norm.weight", "ln_f.weight", "final_layer_norm.weight", "final_layernorm.weight"))
        ),
        None,
    )
    ts = read_tensors(info, [k for k in (head, norm) if k])
    return ts.get(head), ts.get(norm)


def cmd_show(a) -> int:
    from rich.table import Table

    from neurodetox.patching.neurons import decode_vector
    from neurodetox.patching.patchfile import PatchSet

    patch = PatchSet.load(a.patch)
    m = patch.manifest
    console = _console()
    s = m.get("summary", {})
    base = m.get("base", {})
    console.print(
        f"patch {a.patch}: base {base.get('name_or_path')} ({base.get('path', '?')}, {base.get('dtype', '?')}); "
        f"{len(patch)} tensor(s), {len(patch.neurons)} neuron(s), {patch.num_values} values; "
        f"fixed {s.get('fixed', '?')}/{s.get('needing_fix', '?')} edits"
    )
    et = Table(title="edits")
    for col in ("#", "prompt", "target", "status", "failures fixed", "neurons"):
        et.add_column(col)
    for i, e in enumerate(m.get("edits", [])):
        fx = [f for f in e.get("failures", []) if f.get("status") == "fixed"]
        et.add_row(
            str(i),
            e["prompt"],
            e["target"],
            e.get("status", "?"),
            ", ".join(f"{f['target_token']!r}<-{f['argmax_token']!r}" for f in fx) or "-",
            " ".join(f"{x[0]}:{x[1]}" for x in e.get("neurons", [])) or "-",
        )
    console.print(et)
    folder = Path(a.model) if a.model else (Path(base["path"]) if base.get("path") else None)
    W = gain = tok = None
    if folder is not None and folder.exists():
        try:
            from transformers import AutoTokenizer

            W, gain = _head_from_checkpoint(folder)
            tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            console.print(f"(no LM-head decoding: {e})")
            W = None
    else:
        console.print("(no LM-head decoding: base checkpoint not found; pass --model CKPT)")
    nt = Table(title="neurons: top tokens promoted by the value vector (LM-head decoding)")
    for col in ("layer", "neuron", "tensor", "before", "after"):
        nt.add_column(col)
    for p in patch.params:
        for k, idx in enumerate(p.indices.tolist()):
            before = after = "-"
            if W is not None:
                dec = lambda v: " ".join(repr(t) for t, _ in decode_vector(v, W.float(), tok, a.top, gain))
                before = dec(p.original.select(p.axis, k))
                after = dec(p.new.select(p.axis, k))
            nt.add_row(str(p.layer), str(idx), p.name, before, after)
    console.print(nt)
    return 0


def _fact_pools(
    source: str,
    seed: int,
    exclude_prompts: Sequence[str],
    exclude_ids: Sequence[str],
    n_unrelated: int,
    n_reference_prompts: int,
    n_texts: int,
    shuffle_seed: int = 0,
):
    """(reference prompts, unrelated facts, reference texts) from a fact source, disjoint and without the edits.

    Reference prompts and texts are taken from the train split with the
    relations interleaved (:func:`neurodetox.data.interleave_relations`).

    Unrelated facts are ``{"prompt", "aliases"}`` dicts (the aliases let the
    evaluation tell a broken known fact from a changed wrong answer).
    """
    from neurodetox.data import interleave_relations, load_facts

    ds = load_facts(source, seed=seed)
    skip_p, skip_id = set(exclude_prompts), {i for i in exclude_ids if i}
    rows = [
        r
        for split in ("train", "tracking", "test")
        for r in ds[split]
        if r["prompt"] not in skip_p and r["fact_id"] not in skip_id
    ]
    # every relation in turn: the built-in train split is sorted by relation, and reference prompts
    # of one relation only (all capitals) cannot tell which neurons the other relations use
    train = interleave_relations([r for r in ds["train"] if r["prompt"] not in skip_p and r["fact_id"] not in skip_id])
    ref = [r["prompt"] for r in train[:n_reference_prompts]]
    texts = [r["statement"] for r in train[n_reference_prompts : n_reference_prompts + n_texts]]
    used = set(ref)
    rest = [{"prompt": r["prompt"], "aliases": list(r["aliases"])} for r in rows if r["prompt"] not in used]
    random.Random(shuffle_seed).shuffle(rest)
    if len(rest) < n_unrelated:  # a small fact file: top up with the reference prompts rather than fall short
        have = {u["prompt"] for u in rest}
        rest += [
            {"prompt": r["prompt"], "aliases": list(r["aliases"])}
            for r in train[:n_reference_prompts]
            if r["prompt"] not in have
        ][: n_unrelated - len(rest)]
    return ref, rest[:n_unrelated], texts


def _eval_table(res: dict, title: str = "MINT patch evaluation") -> Any:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value")
    rows = [
        ("edits", res.get("edits")),
        ("success (teacher-forced target)", _fmt(res.get("success"), True)),
        ("success (greedy answer correct)", _fmt(res.get("success_greedy"), True)),
        (
            "generalisation (paraphrases correct)",
            f"{_fmt(res.get('generalisation'), True)} (before {_fmt(res.get('generalisation_before'), True)}, "
            f"n={res.get('paraphrases')})",
        ),
        ("specificity (answer unchanged)", f"{_fmt(res.get('specificity'), True)} (n={res.get('unrelated_prompts')})"),
        ("specificity (next token unchanged)", _fmt(res.get("specificity_next_token"), True)),
        ("specificity (all greedy tokens unchanged)", _fmt(res.get("specificity_exact"), True)),
        (
            "known facts kept (unrelated answered right before)",
            f"{_fmt(res.get('known_facts_kept'), True)} (n={res.get('known_facts', '-')})",
        ),
        (
            "changed answers: right->wrong / wrong->right / wrong->wrong",
            " / ".join(
                str(res.get("changes", {}).get(k, "-")) for k in ("right_to_wrong", "wrong_to_right", "wrong_to_wrong")
            ),
        ),
        (
            "perplexity before -> after",
            f"{_fmt(res.get('perplexity_before'))} -> {_fmt(res.get('perplexity_after'))} "
            f"(drift {_fmt(res.get('perplexity_drift'), True)})",
        ),
    ]
    if "neurons_per_fix" in res:
        rows.append(("neurons per fixed fact", " ".join(map(str, res["neurons_per_fix"])) or "-"))
    if "neurons_per_failure" in res:
        rows.append(("neurons per fixed failure (median)", _fmt(res.get("median_neurons_per_failure"))))
    if "parameters_changed" in res:
        rows.append(("parameters changed", res["parameters_changed"]))
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def cmd_eval(a) -> int:
    from neurodetox.core.io import atomic_write_json
    from neurodetox.core.models import load_model
    from neurodetox.patching.edit_metrics import evaluate_patch
    from neurodetox.patching.patchfile import PatchSet

    patch = PatchSet.load(a.patch)
    folder = _checkpoint_path(a.checkpoint)
    model, tok = load_model(str(folder))
    edits = patch.manifest.get("edits", [])
    # skip the first 128 train prompts: `find --reference facts` may have used them to judge neurons
    _, unrelated, texts = _fact_pools(
        a.facts,
        a.facts_seed,
        [e["prompt"] for e in edits],
        [e.get("fact_id") for e in edits],
        a.unrelated,
        128,
        a.reference_texts,
    )
    if a.reference_text:
        texts = _read_lines(a.reference_text)
    res = evaluate_patch(
        model, tok, patch, None, unrelated, texts, max_new_tokens=a.max_new_tokens, show_progress=not a.quiet
    )
    res["neurons_per_failure"] = patch.manifest.get("summary", {}).get("neurons_per_failure", [])
    res["median_neurons_per_failure"] = patch.manifest.get("summary", {}).get("median_neurons_per_failure")
    _console().print(_eval_table(res))
    if a.json:
        atomic_write_json(a.json, res)
    return 0


# ----------------------------------------------------------------------------- demo


def run_demo(
    run: str, n: int = 5, show_progress: bool = True, n_unrelated: int = 250, max_new_tokens: int = 8
) -> dict[str, Any]:
    """The ``make demo`` patch step: fix test facts the fine-tuned model still gets wrong.

    Loads ``RUN/final``, finds the first ``n`` test-split facts (same fact data
    and split seed as the run, from ``RUN/summary.json``) whose greedy answer is
    wrong, repairs them with MINT (target = the gold answer), writes the patch
    to ``RUN/patch/``, applies it to a copy ``RUN/final-patched/``, reloads that
    copy from disk and compares it with ``RUN/final``: success, generalisation
    (paraphrases), specificity (``n_unrelated`` other fact prompts, none of
    them used to locate neurons), neurons per fix and perplexity drift (train
    statements). Writes ``RUN/patch_summary.json`` atomically.

    Raises:
        FileNotFoundError: no ``RUN/final`` or ``RUN/summary.json``.
        ValueError: fewer than ``n`` wrong test facts.
    """
    import torch

    from neurodetox.core.io import atomic_write_json
    from neurodetox.core.models import load_model
    from neurodetox.data import load_facts
    from neurodetox.metrics.factual import is_correct
    from neurodetox.metrics.sampling import greedy_answers
    from neurodetox.patching.checkpoint import (
        apply_to_checkpoint,
        bind_to_checkpoint,
        checkpoint_dtype,
        inspect_checkpoint,
    )
    from neurodetox.patching.edit_metrics import compare, measure_model
    from neurodetox.patching.failures import coerce_edits, encode_edit, find_failures
    from neurodetox.patching.mint import MintSettings, repair

    t_start = time.perf_counter()
    run_dir = Path(run)
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"no trained model at {final}: run `neurodetox train` first (make demo does)")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    data = summary.get("data", "facts")
    seed = int(summary.get("facts_seed", summary.get("data_seed", 0)) or 0)
    model, tok = load_model(str(final))
    model.eval()
    ds = load_facts(data, seed=seed)
    test = list(ds["test"])
    wrong: list[dict] = []
    for start in range(0, len(test), 16):
        batch = test[start : start + 16]
        answers = greedy_answers(model, tok, [r["prompt"] for r in batch], max_new_tokens=max_new_tokens)
        for r, ans in zip(batch, answers):
            if not is_correct(ans, r["aliases"]):
                e = encode_edit(tok, coerce_edits([{**r, "target": r["answer"]}])[0])
                if find_failures(model, e):
                    wrong.append(r)
        if len(wrong) >= n:
            break
    if len(wrong) < n:
        raise ValueError(f"only {len(wrong)} of {len(test)} test facts are wrong in {final}; asked for --n {n}")
    wrong = wrong[:n]
    edits = [
        {
            "prompt": r["prompt"],
            "target": r["answer"],
            "fact_id": r["fact_id"],
            "aliases": r["aliases"],
            "paraphrases": r["paraphrases"],
        }
        for r in wrong
    ]
    ref, unrelated, texts = _fact_pools(
        data, seed, [r["prompt"] for r in wrong], [r["fact_id"] for r in wrong], n_unrelated, 128, 64
    )
    info = inspect_checkpoint(final)
    settings = MintSettings()
    dtype = checkpoint_dtype(info, [k for k in info.weight_map if k.endswith("mlp.down_proj.weight")][:1])
    if dtype is not None and dtype != torch.float32:
        settings.storage_dtype = str(dtype).replace("torch.", "")
    patch, report = repair(
        model,
        tok,
        edits,
        settings,
        show_progress=show_progress,
        base={"name_or_path": str(final)},
        reference_prompts=ref,
    )
    patch_dir = run_dir / "patch"
    patched_dir = run_dir / "final-patched"
    result: dict[str, Any] = {
        "run": str(run_dir),
        "checkpoint": str(final),
        "facts": data,
        "facts_seed": seed,
        "repair": report.summary(),
    }
    if len(patch):
        bind_to_checkpoint(patch, final)
        patch.save(patch_dir)
        write = apply_to_checkpoint(final, patch, out=patched_dir, overwrite=True)
        result["apply"] = write.to_json()
        after_model, _ = load_model(str(patched_dir))  # the fix must survive a reload from disk
    else:
        after_model = model
    coerced = [encode_edit(tok, e) for e in coerce_edits(edits)]
    before = measure_model(
        model, tok, coerced, unrelated, texts, max_new_tokens=max_new_tokens, show_progress=show_progress
    )
    after = measure_model(
        after_model, tok, coerced, unrelated, texts, max_new_tokens=max_new_tokens, show_progress=show_progress
    )
    ev = compare(before, after, coerced, unrelated)
    ev["neurons_per_fix"] = report.neurons_per_fix
    ev["median_neurons_per_fix"] = report.median_neurons_per_fix
    ev["neurons_per_failure"] = report.neurons_per_failure
    ev["median_neurons_per_failure"] = _median(report.neurons_per_failure)
    ev["parameters_changed"] = patch.num_values
    result["evaluation"] = ev
    result["patch"] = str(patch_dir) if len(patch) else None
    result["patched_checkpoint"] = str(patched_dir) if len(patch) else None
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(run_dir / "patch_summary.json", result)
    return result


def _median(v: Sequence[float]) -> float:
    v = sorted(v)
    if not v:
        return float("nan")
    m = len(v) // 2
    return float(v[m]) if len(v) % 2 else (v[m - 1] + v[m]) / 2


def cmd_demo(a) -> int:
    res = run_demo(a.run, a.n, show_progress=not a.quiet, n_unrelated=a.unrelated)
    console = _console()
    console.print(
        _eval_table(
            res["evaluation"],
            title=f"MINT patches of {res['checkpoint']} "
            f"({res['repair']['fixed']}/{res['repair']['needing_fix']} "
            "wrong test facts fixed)",
        )
    )
    print(
        f"patch: {res['patch']}  patched copy: {res['patched_checkpoint']}  summary: "
        f"{Path(a.run) / 'patch_summary.json'}  ({res['seconds']}s)"
    )
    return 0


# ----------------------------------------------------------------------------- parser


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neurodetox patch", description="MINT neuron patching (Gu et al., arXiv 2312.05356) of saved checkpoints."
    )
    p.add_argument("--threads", default="auto", help="torch threads: 'auto' (idle cores) or an integer.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("find", help="Repair wrong continuations and write a patch.")
    f.add_argument("--model", required=True, help="Checkpoint folder (or the default model name).")
    f.add_argument("--prompt", help="Prompt text.")
    f.add_argument("--target", help="Desired continuation (a leading space is added when tokenising).")
    f.add_argument(
        "--edits", help='JSONL file: one {"prompt", "target", ["paraphrases", "aliases", "fact_id"]} per line.'
    )
    f.add_argument("--out", required=True, help="Patch folder to write (patch.safetensors + manifest.json).")
    _add_setting_args(f)

    for name, helptext in (
        ("apply", "Apply a patch to a checkpoint."),
        ("revert", "Restore a checkpoint's originals."),
    ):
        w = sub.add_parser(name, help=helptext)
        w.add_argument("checkpoint")
        w.add_argument("patch")
        w.add_argument("--out", help="Write a patched copy to this folder.")
        w.add_argument("--in-place", action="store_true", help="Rewrite the checkpoint's touched shards atomically.")
        w.add_argument("--overwrite", action="store_true", help="Replace an existing --out folder.")

    v = sub.add_parser("verify", help="Say whether a checkpoint is the patch's base, patched, or neither.")
    v.add_argument("checkpoint")
    v.add_argument("patch")

    s = sub.add_parser("show", help="Layers, neurons, failures fixed, top tokens before/after.")
    s.add_argument("patch")
    s.add_argument("--model", help="Checkpoint for LM-head decoding (default: the manifest's base path).")
    s.add_argument("--top", type=int, default=6, help="Tokens per neuron (default 6).")

    e = sub.add_parser("eval", help="Success, generalisation, specificity, perplexity drift.")
    e.add_argument("checkpoint", help="The base checkpoint (or its patched copy).")
    e.add_argument("patch")
    e.add_argument("--facts", default="facts", help="Fact source for unrelated prompts (default built-in facts).")
    e.add_argument("--facts-seed", type=int, default=0)
    e.add_argument("--unrelated", type=int, default=250, help="Unrelated prompts for specificity (default 250).")
    e.add_argument("--reference-texts", type=int, default=64, help="Fact statements for perplexity (default 64).")
    e.add_argument("--reference-text", help="File of reference texts for perplexity instead.")
    e.add_argument("--max-new-tokens", type=int, default=8)
    e.add_argument("--json", help="Also write the results here.")

    d = sub.add_parser("demo", help="make demo's patch step on a training run folder.")
    d.add_argument("--run", default="runs/demo")
    d.add_argument("--n", type=int, default=5, help="Wrong test facts to fix (default 5).")
    d.add_argument("--unrelated", type=int, default=250)
    return p


def cmd_patch(argv: Sequence[str]) -> int:
    """Entry point of ``neurodetox patch``; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = make_parser()
    a = parser.parse_args(list(argv))
    from neurodetox.patching.checkpoint import CheckpointError
    from neurodetox.patching.patchfile import PatchError, PatchMismatchError

    try:
        set_threads(a.threads)
        if a.cmd == "find":
            return cmd_find(a)
        if a.cmd in ("apply", "revert"):
            return _write_cmd(a, revert=a.cmd == "revert")
        if a.cmd == "verify":
            return cmd_verify(a)
        if a.cmd == "show":
            return cmd_show(a)
        if a.cmd == "eval":
            return cmd_eval(a)
        if a.cmd == "demo":
            return cmd_demo(a)
    except PatchMismatchError as e:
        print(f"neurodetox patch: refused: {e}", file=sys.stderr)
        return 1
    except (PatchError, CheckpointError, ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        return _fail(str(e))
    return _fail(f"unknown subcommand {a.cmd!r}")  # pragma: no cover
