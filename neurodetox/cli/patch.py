"""``neurodetox patch``: MINT neuron patches of saved checkpoints.

    neurodetox patch find   --model CKPT --prompt TEXT --target TEXT [--edits FILE.jsonl] --out PATCH
    neurodetox patch apply  CKPT PATCH (--out DIR | --in-place)
    neurodetox patch revert CKPT PATCH (--out DIR | --in-place)
    neurodetox patch verify CKPT PATCH
    neurodetox patch show   PATCH [--model CKPT]
    neurodetox patch eval   CKPT PATCH [--unrelated 250] [--json FILE]
    neurodetox patch demo   --run runs/demo [--n 5]

Method: Gu et al., "Neuron Patching: Semantic-based Neuron-level Language Model
Repair for Code Generation", arXiv 2312.05356 (``docs/methods.md`` §4).
Exit status: 0 success; 1 some edit could not be fixed (the patch holds the
fixed ones) or a verification failed; 2 bad input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Optional, Sequence

from neurodetox.core.args import command_parser, parse_command, user_errors_exit_2
from neurodetox.core.checks import check_int
from neurodetox.core.errors import UserError
from neurodetox.patching.pools import fact_pools, read_edits, read_lines, reference_prompts

__all__ = ["cmd_patch", "fact_pools", "parse_args", "reference_prompts", "run_demo", "set_threads"]


def set_threads(spec: str = "auto") -> int:
    """Set torch's intra-op threads: an integer, or ``"auto"`` = the cores not
    already busy (``cpu_count − 1-min load average``, at least 1, at most
    torch's default). On a shared machine this avoids oversubscription, which
    made a forward pass several times slower in our measurements."""
    import torch

    if str(spec) != "auto":
        try:
            n = int(spec)
        except ValueError:
            raise UserError(f"--threads must be 'auto' or an integer >= 1, got {spec!r}") from None
        if n < 1:
            raise UserError(f"--threads must be 'auto' or an integer >= 1, got {spec!r}")
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


def _edit_table(report, title: str = "MINT repair", caption: str | None = None) -> Any:
    from neurodetox.reports.tables import fitted_table

    cols = ("#", "prompt", "target", "status", "failures", "neurons (layer:index)", "ref. changed", "s")
    rows = [
        (
            str(e.index),
            e.edit.prompt,
            e.edit.target,
            e.status,
            str(sum(f.status == "fixed" for f in e.failures)) + "/" + str(len(e.failures)),
            " ".join(f"{a}:{b}" for a, b in e.neurons) or "-",
            "-" if e.reference_flips is None else f"{e.reference_flips} ({e.attempts} tries)",
            f"{e.seconds:.1f}",
        )
        for e in report.edits
    ]
    return fitted_table(title, cols, rows, wide=("prompt", "target", "neurons (layer:index)"), caption=caption)


# ----------------------------------------------------------------------------- subcommands


def cmd_find(a) -> int:
    from neurodetox.core.models import load_model
    from neurodetox.patching.checkpoint import bind_to_checkpoint, checkpoint_dtype, inspect_checkpoint
    from neurodetox.patching.mint import repair

    edits: list[dict] = []
    if a.prompt is not None or a.target is not None:
        if not a.prompt or not a.target:
            raise UserError("--prompt and --target go together (both non-empty)")
        edits.append({"prompt": a.prompt, "target": a.target, **({"subject": a.subject} if a.subject else {})})
    if a.edits:
        edits.extend(read_edits(a.edits))
    if not edits:
        raise UserError("nothing to repair: give --prompt TEXT --target TEXT and/or --edits FILE.jsonl")
    from neurodetox.core.models import check_prompt_lengths, check_prompts
    from neurodetox.patching.patchfile import check_patch_destination

    check_prompts([e.get("prompt") for e in edits], what="edit prompt")  # a JSON list as prompt: one line
    if not a.output_dir:
        raise UserError("patch find needs --output_dir DIR (alias --out): the folder the patch is written to")
    check_patch_destination(a.output_dir, a.overwrite)  # before the repair, not after it
    if a.covariance_cache and (a.method != "rome" or a.rome_settings.covariance != "model_text"):
        raise UserError(
            f"--covariance_cache {a.covariance_cache} is used only with --method rome --covariance model_text "
            f"(got --method {a.method}"
            + (f" --covariance {a.rome_settings.covariance})" if a.method == "rome" else ")")
        )
    folder = _checkpoint_path(a.model_name_or_path)
    info = inspect_checkpoint(folder)
    settings = a.settings
    model, tok = load_model(str(folder), tokenizer=a.tokenizer)
    check_prompt_lengths(model, tok, [e["prompt"] for e in edits], max_new_tokens=1, what="edit prompt")
    from neurodetox.core.sites import resolve_sites, value_vector_parameter

    names = {id(p): n for n, p in model.named_parameters()}
    if a.method == "rome":
        from neurodetox.patching.rome import check_edit_layer

        check_edit_layer(model, a.rome_settings)
    layers = [a.rome_settings.edit_layer] if a.method == "rome" else settings.layers
    touched_names = [names[id(value_vector_parameter(s)[0])] for s in resolve_sites(model, "mlp", layers)]
    dtype = checkpoint_dtype(info, touched_names[:1])
    if dtype is not None and dtype != model.dtype:
        settings.storage_dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(str(dtype))
    if a.method == "rome":
        from neurodetox.patching.rome import edit_rank_one

        patch, report = edit_rank_one(
            model,
            tok,
            edits,
            a.rome_settings,
            show_progress=not a.quiet,
            base={"name_or_path": a.model_name_or_path},
            use_paraphrases=settings.use_paraphrases,
            storage_dtype=settings.storage_dtype,
            covariance_cache=a.covariance_cache,
        )
    else:
        patch, report = repair(
            model,
            tok,
            edits,
            settings,
            show_progress=not a.quiet,
            base={"name_or_path": a.model_name_or_path},
            reference_prompts=reference_prompts(
                a.reference, [e["prompt"] for e in edits], model=model, tokenizer=tok, edits=edits
            ),
        )
    console = _console()
    console.print(
        _edit_table(
            report,
            "MINT repair" if a.method == "mint" else f"rank-one edit ({patch.manifest['method']['name']})",
            caption=f"long cells cut to fit the terminal; full text: {a.output_dir} (manifest.json)",
        )
    )
    s = report.summary()
    if not report.needing_fix:
        console.print("nothing to fix: the model already produces every target; no patch written")
        return 0
    if len(patch) == 0:
        console.print(f"no failure could be fixed ({s['skipped']} skipped); no patch written")
        return 1
    bind_to_checkpoint(patch, folder)
    patch.manifest["base"]["name_or_path"] = a.model_name_or_path
    manifest = patch.save(a.output_dir, overwrite=a.overwrite)
    console.print(
        f"fixed {s['fixed']}/{s['needing_fix']} edits with {len(patch.neurons)} "
        + ("neurons" if a.method == "mint" else f"value vectors in {len(patch.params)} blocks")
        + f" ({patch.num_values} values) in {s['seconds']:.1f}s; cast error {s['cast_error']:.3g}; "
        f"patch: {manifest.parent if manifest.name == 'manifest.json' else manifest}"
    )
    return 0 if s["fixed"] == s["needing_fix"] else 1


def _write_cmd(a, revert: bool) -> int:
    from neurodetox.patching.checkpoint import apply_to_checkpoint, revert_checkpoint
    from neurodetox.patching.patchfile import PatchSet

    if bool(a.output_dir) == bool(a.in_place):
        raise UserError("give exactly one of --output_dir DIR (write a patched copy) or --in_place")
    folder = _checkpoint_path(a.checkpoint)
    patch = PatchSet.load(a.patch)
    fn = revert_checkpoint if revert else apply_to_checkpoint
    res = fn(folder, patch, out=a.output_dir, overwrite=a.overwrite, patch_path=a.patch)
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
    from neurodetox.patching.neurons import decode_vector
    from neurodetox.patching.patchfile import PatchSet
    from neurodetox.patching.patchfile import terminal_text as T
    from neurodetox.reports.tables import fitted_table

    patch = PatchSet.load(a.patch)
    m = patch.manifest
    console = _console()
    s = m.get("summary", {})
    base = m.get("base", {})
    console.print(
        f"patch {T(a.patch)}: base {T(base.get('name_or_path'))} ({T(base.get('path', '?'))}, "
        f"{T(base.get('dtype', '?'))}); "
        f"{len(patch)} tensor(s), {len(patch.neurons)} neuron(s), {patch.num_values} values; "
        f"fixed {T(s.get('fixed', '?'))}/{T(s.get('needing_fix', '?'))} edits"
    )
    et_rows = []
    for i, e in enumerate(m.get("edits", [])):
        fx = [f for f in e.get("failures", []) if f.get("status") == "fixed"]
        et_rows.append(
            (
                str(i),
                T(e.get("prompt")),
                T(e.get("target")),
                T(e.get("status", "?")),
                T(", ".join(f"{f.get('target_token')!r}<-{f.get('argmax_token')!r}" for f in fx) or "-"),
                T(" ".join(f"{x[0]}:{x[1]}" for x in e.get("neurons", [])) or "-"),
            )
        )
    et = fitted_table(
        "edits",
        ("#", "prompt", "target", "status", "failures fixed", "neurons"),
        et_rows,
        wide=("prompt", "target", "failures fixed", "neurons"),
        caption="long cells cut to fit the terminal; full text in the patch's manifest.json",
    )
    console.print(et)
    folder = Path(a.checkpoint) if a.checkpoint else (Path(base["path"]) if base.get("path") else None)
    W = gain = tok = None
    if folder is not None and folder.exists():
        try:
            from transformers import AutoTokenizer

            W, gain = _head_from_checkpoint(folder)
            tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            console.print(f"(no LM-head decoding: {T(e)})")
            W = None
    else:
        console.print("(no LM-head decoding: base checkpoint not found; pass --model CKPT)")
    nt_rows = []
    for p in patch.params:
        for k, idx in enumerate(p.indices.tolist()):
            before = after = "-"
            if W is not None:
                dec = lambda v: " ".join(repr(t) for t, _ in decode_vector(v, W.float(), tok, a.top, gain))
                before = dec(p.original.select(p.axis, k))
                after = dec(p.new.select(p.axis, k))
            nt_rows.append((str(p.layer), str(idx), T(p.name), T(before), T(after)))
    nt = fitted_table(
        "neurons: top tokens promoted by the value vector (LM-head decoding)",
        ("layer", "neuron", "tensor", "before", "after"),
        nt_rows,
        wide=("tensor", "before", "after"),
    )
    console.print(nt)
    return 0


def _eval_table(res: dict, title: str = "MINT patch evaluation") -> Any:
    from neurodetox.reports.tables import fitted_table

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
            "known facts kept (were right before)",
            f"{_fmt(res.get('known_facts_kept'), True)} (n={res.get('known_facts', '-')})",
        ),
        (
            "changed answers: R→W / W→R / W→W",
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
    return fitted_table(
        title,
        ("metric", "value"),
        [(k, str(v)) for k, v in rows],
        wide=("metric", "value"),
        caption="R right, W wrong; cut cells are whole in the JSON output",
    )


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
    _, unrelated, texts = fact_pools(
        a.data,
        a.split_seed,
        [e["prompt"] for e in edits],
        [e.get("fact_id") for e in edits],
        a.unrelated,
        128,
        a.reference_texts,
    )
    if a.reference_text:
        texts = read_lines(a.reference_text)
    res = evaluate_patch(
        model, tok, patch, None, unrelated, texts, max_new_tokens=a.max_new_tokens, show_progress=not a.quiet
    )
    method = str(patch.manifest.get("method", {}).get("name", "MINT"))
    if method.startswith("MINT"):
        res["neurons_per_failure"] = patch.manifest.get("summary", {}).get("neurons_per_failure", [])
        res["median_neurons_per_failure"] = patch.manifest.get("summary", {}).get("median_neurons_per_failure")
    else:  # a rank-one edit has no neurons per fix
        res.pop("neurons_per_fix", None)
    _console().print(_eval_table(res, f"{method.split(' ')[0]} patch evaluation"))
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
    wrong, repairs them with MINT (target = the gold answer; the fact's first
    paraphrase is repaired with the prompt), writes the patch
    to ``RUN/patch/``, applies it to a copy ``RUN/final-patched/``, reloads that
    copy from disk and compares it with ``RUN/final``: success, generalisation
    (the other paraphrases, unseen by the repair), specificity (``n_unrelated`` other fact prompts, none of
    them used to locate neurons), neurons per fix and perplexity drift (train
    statements). Writes ``RUN/patch_summary.json`` atomically.

    Raises:
        FileNotFoundError: no ``RUN/final`` or ``RUN/summary.json``.
        ValueError: fewer than ``n`` wrong test facts.
    """
    import torch

    from neurodetox.core.io import atomic_write_json
    from neurodetox.core.models import load_model
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
    from neurodetox.send.run import rebuild_split

    t_start = time.perf_counter()
    run_dir = Path(run)
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"no trained model at {final}: run `neurodetox train` first (make demo does)")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"no {summary_path}: patch demo needs the run's summary to rebuild its data split")
    summary = json.loads(summary_path.read_text())
    # the exact split the run trained on: a non-default seed or fraction must not put training facts in the test pool
    ds = rebuild_split(summary)
    split = summary["split"]
    data, seed = split["data"], split["split_seed"]
    model, tok = load_model(str(final))
    model.eval()
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
            "subject": r.get("subject"),
            # the repair may use the first paraphrase; generalisation is measured on the others (unseen)
            "paraphrases": r["paraphrases"][:1],
            "eval_paraphrases": r["paraphrases"][1:],
        }
        for r in wrong
    ]
    ref, unrelated, texts = fact_pools(
        ds, seed, [r["prompt"] for r in wrong], [r["fact_id"] for r in wrong], n_unrelated, 128, 64
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
        "split": split,
        "repair": report.summary(),
    }
    if len(patch):
        bind_to_checkpoint(patch, final)
        patch.save(patch_dir, overwrite=True)  # the demo's own folder, rewritten on every run
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


@dataclass
class PatchRunArguments:
    """Run-time options of every ``neurodetox patch`` subcommand."""

    threads: str = field(default="auto", metadata={"help": "torch threads: 'auto' (idle cores) or an integer >= 1."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})


@dataclass
class FindArguments:
    """What ``patch find`` repairs and where it writes the patch.

    Attributes:
        prompt, target: one edit (both non-empty), in addition to ``edits``.
        edits: JSONL file, one ``{"prompt", "target", ["paraphrases", "aliases", "fact_id"]}`` per line.
        output_dir: the patch folder to write (``patch.safetensors`` + ``manifest.json``; alias ``--out``).
        overwrite: replace an existing patch there.
        covariance_cache: rome: folder for the key covariance files (``None``: sample every run).
        reference: reference prompts, see :func:`neurodetox.patching.pools.reference_prompts`.
    """

    method: Literal["mint", "rome"] = field(
        default="mint",
        metadata={
            "help": "Edit method: 'mint' (neuron patches, default) or 'rome' (rank-one edit at the subject's "
            "last token; every edit needs a 'subject')."
        },
    )
    prompt: Optional[str] = field(default=None, metadata={"help": "Prompt text."})
    subject: Optional[str] = field(
        default=None, metadata={"help": "Subject of --prompt (a substring of it; needed by --method rome)."}
    )
    target: Optional[str] = field(
        default=None, metadata={"help": "Desired continuation (a leading space is added when tokenising)."}
    )
    edits: Optional[str] = field(
        default=None,
        metadata={
            "help": 'JSONL file: one {"prompt", "target", ["subject", "paraphrases", "eval_paraphrases", "aliases", '
            '"fact_id"]} per line; paraphrases are repaired with the prompt, eval_paraphrases only evaluated.'
        },
    )
    output_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Patch folder to write (patch.safetensors + manifest.json).", "aliases": ["--out"]},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing patch in --output_dir."})
    covariance_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "rome with --covariance model_text: a folder that keeps the sampled key covariance between runs "
            "(one file per block, named by the weights' SHA-256); default: sample it every run."
        },
    )
    reference: str = field(
        default="facts+default",
        metadata={
            "help": "MINT: prompts that define neurons' background activation (what should not change): parts "
            "joined by '+': 'edits' (built from the model and the edits: the edits' prompts with other subjects "
            "the model names, other relations, the model's own text), 'facts' (built-in fact prompts), 'default' "
            "(generic built-in prompts); or a file (one prompt per line, or JSONL with 'prompt')."
        },
    )


@dataclass
class WriteArguments:
    """Where ``patch apply`` / ``patch revert`` write."""

    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Write a patched copy to this folder.", "aliases": ["--out"]}
    )
    in_place: bool = field(default=False, metadata={"help": "Rewrite the checkpoint's touched shards atomically."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir folder."})


@dataclass
class ShowArguments:
    """What ``patch show`` decodes."""

    checkpoint: Optional[str] = field(
        default=None,
        metadata={
            "help": "Checkpoint for LM-head decoding (default: the manifest's base path).",
            "aliases": ["--model"],
        },
    )
    top: int = field(default=6, metadata={"help": "Tokens per neuron, >= 1."})

    def __post_init__(self) -> None:
        check_int("top", self.top, minimum=1)


@dataclass
class PatchEvalArguments:
    """How ``patch eval`` measures a patch (the fact source is ``--data`` / ``--split_seed``)."""

    unrelated: int = field(default=250, metadata={"help": "Unrelated prompts for specificity, >= 1."})
    reference_texts: int = field(default=64, metadata={"help": "Fact statements for perplexity, >= 1."})
    reference_text: Optional[str] = field(
        default=None, metadata={"help": "File of reference texts for perplexity instead."}
    )
    max_new_tokens: int = field(default=8, metadata={"help": "Greedy answer length in tokens, >= 1."})
    json: Optional[str] = field(default=None, metadata={"help": "Also write the results to this JSON file."})

    def __post_init__(self) -> None:
        check_int("unrelated", self.unrelated, minimum=1)
        check_int("reference_texts", self.reference_texts, minimum=1)
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)


@dataclass
class DemoArguments:
    """``patch demo``: the ``make demo`` patch step on a training run folder."""

    run: str = field(default="runs/demo", metadata={"help": "Run folder written by `neurodetox train`."})
    n: int = field(default=5, metadata={"help": "Wrong test facts to fix, >= 1."})
    unrelated: int = field(default=250, metadata={"help": "Unrelated prompts for specificity, >= 1."})

    def __post_init__(self) -> None:
        check_int("n", self.n, minimum=1)
        check_int("unrelated", self.unrelated, minimum=1)


SUBCOMMANDS = {
    "find": "Repair wrong continuations and write a patch.",
    "apply": "Apply a patch to a checkpoint.",
    "revert": "Restore a checkpoint's originals.",
    "verify": "Say whether a checkpoint is the patch's base, patched, or neither.",
    "show": "Layers, neurons, failures fixed, top tokens before/after.",
    "eval": "Success, generalisation, specificity, perplexity drift.",
    "demo": "make demo's patch step on a training run folder.",
}


def make_parser(cmd: str):
    """The parser of ``neurodetox patch CMD`` (flags from its settings dataclasses; positionals added)."""
    from neurodetox.core.settings import ModelArguments
    from neurodetox.data.settings import FactDataArguments
    from neurodetox.patching.mint import MintSettings
    from neurodetox.patching.rome import RomeSettings

    if cmd not in SUBCOMMANDS:
        raise UserError(f"unknown subcommand {cmd!r}; valid: {', '.join(SUBCOMMANDS)}")
    classes = {
        "find": (ModelArguments, FindArguments, MintSettings, RomeSettings, PatchRunArguments),
        "apply": (WriteArguments, PatchRunArguments),
        "revert": (WriteArguments, PatchRunArguments),
        "verify": (PatchRunArguments,),
        "show": (ShowArguments, PatchRunArguments),
        "eval": (FactDataArguments, PatchEvalArguments, PatchRunArguments),
        "demo": (DemoArguments, PatchRunArguments),
    }[cmd]
    parser = command_parser(
        f"neurodetox patch {cmd}",
        SUBCOMMANDS[cmd] + " MINT neuron patching (Gu et al., arXiv 2312.05356).",
        classes,
    )
    if cmd in ("apply", "revert", "verify", "eval"):
        parser.add_argument("checkpoint", help="Checkpoint folder (safetensors, single or sharded).")
    if cmd in ("apply", "revert", "verify", "eval", "show"):
        parser.add_argument("patch", help="Patch folder (patch.safetensors + manifest.json).")
    return parser


def parse_args(argv: Sequence[str]) -> SimpleNamespace:
    """``neurodetox patch CMD ...`` → one namespace with every field of the subcommand's dataclasses.

    ``--threads``/``--quiet`` may also come before ``CMD`` (as in earlier versions). MINT settings
    are gathered in ``.settings`` (a :class:`~neurodetox.patching.mint.MintSettings`).

    Raises:
        UserError: no or an unknown subcommand, an unknown flag, or a bad value.
    """
    from neurodetox.patching.mint import MintSettings
    from neurodetox.patching.rome import RomeSettings

    argv = list(argv)
    head: list[str] = []
    while argv and argv[0].startswith("--"):
        head.append(argv.pop(0))
        if head[-1] in ("--threads",) and argv:
            head.append(argv.pop(0))
    if not argv:
        raise UserError(f"give a subcommand: {', '.join(SUBCOMMANDS)} (see `neurodetox patch --help`)")
    cmd, rest = argv[0], argv[1:]
    parsed = parse_command(make_parser(cmd), rest + head)  # a bare --quiet must not take a positional as its value
    ns = SimpleNamespace(cmd=cmd)
    for part in parsed:
        if isinstance(part, MintSettings):
            ns.settings = part
        elif isinstance(part, RomeSettings):
            ns.rome_settings = part
        else:
            ns.__dict__.update(vars(part) if not dataclasses.is_dataclass(part) else dataclasses.asdict(part))
    return ns


def _usage() -> str:
    lines = ["usage: neurodetox patch {" + ",".join(SUBCOMMANDS) + "} ...", ""]
    lines += [f"  {k:7s} {v}" for k, v in SUBCOMMANDS.items()]
    lines += ["", "`neurodetox patch CMD --help` lists every flag of CMD (MINT settings under find)."]
    return "\n".join(lines)


@user_errors_exit_2("neurodetox patch")
def cmd_patch(argv: Sequence[str]) -> int:
    """Entry point of ``neurodetox patch``; returns the exit status (0 ok, 1 not all fixed or refused, 2 bad input)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = parse_args(argv)
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
        return cmd_demo(a)
    except PatchMismatchError as e:
        print(f"neurodetox patch: refused: {e}", file=sys.stderr)
        return 1
    except (PatchError, CheckpointError, ValueError, ModuleNotFoundError) as e:
        raise UserError(str(e)) from None
