"""Plan and run the arms of the SeND study: one training subprocess per (arm, seed), then measurements.

Every run trains from the same recipe with only ``send_mode`` (and, for a
variant arm, the variant's fields) and ``seed`` changed, so data, steps,
learning rate and trainable layers are identical across arms. A run is
complete when its ``result.json`` exists (written atomically after the
measurements); rerunning a study skips complete runs, so a killed study loses
at most the run in progress.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from neurodetox.core.io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "ARMS",
    "PAPER_VARIANTS",
    "PROBE_SPLITS",
    "VARIANTS",
    "VARIANT_MODES",
    "Arm",
    "StudyPlan",
    "ensure_triage",
    "plan_study",
    "run_study",
    "run_one",
]

#: The three arms of the controlled comparison (``send_mode`` values).
ARMS = ("send", "random", "off")

#: The SeND paper's other settings (arXiv 2410.15460): drop fraction 0.3, the FFN (``mlp``) site.
PAPER_VARIANTS: dict[str, dict[str, str]] = {
    "drop0.3": {"send_drop_fraction": "0.3"},
    "mlp": {"send_site": "mlp"},
}

#: The massive-dimension factor of the ``nomassive`` variants (``send_massive_factor``; see
#: :func:`neurodetox.send.sensitivity.massive_indices` and ``docs/results/send.md``).
MASSIVE_FACTOR = "10"

#: Named variants (``--variants NAME``): the paper's, and the issue-17 directions (``docs/methods.md`` §1, §7).
#: ``known`` trains on the facts the base model knows (:mod:`neurodetox.data.triage`; the study writes
#: ``triage.json`` once, see :func:`ensure_triage`), with SeND off.
VARIANTS: dict[str, dict[str, str]] = {
    **PAPER_VARIANTS,
    "normalized": {"send_score": "normalized"},
    "standardized": {"send_score": "standardized"},
    "nomassive": {"send_massive_factor": MASSIVE_FACTOR},
    "normalized-nomassive": {"send_score": "normalized", "send_massive_factor": MASSIVE_FACTOR},
    "released": {"send_procedure": "released"},
    "released-nofreeze": {"send_procedure": "released", "send_freeze_blocks": "0"},
    "mlp-second-half": {"send_site": "mlp", "send_layers": "second_half"},
    "known": {"known_facts_file": "{triage}"},
}
#: Variants that run with fixed modes instead of ``variant_modes`` (``known`` is a data choice, not a dropout).
VARIANT_MODES: dict[str, tuple[str, ...]] = {"known": ("off",)}
#: Which split's facts are scored as the held-out set: ``test`` (the final arms, once) or ``tracking``
#: (the selection step: variants are compared there, the test split is not looked at).
PROBE_SPLITS = ("test", "tracking")
#: Where a study keeps its triage file (relative to the study folder).
TRIAGE_FILE = "triage.json"
#: The study's triage asks each training fact in 2 phrasings with 4 samples each (8 sampled answers per
#: fact; Gekhman et al. draw 16 per exemplar set): labelling ~600 facts costs about 4× one run's
#: measurements on 2 CPU cores instead of ~12× with the ``TriageSettings`` defaults (3 phrasings, 10 samples).
STUDY_TRIAGE = {"phrasings": 2, "k": 4}

#: Fields the study sets on every run: evaluation every 50 steps for the curves, no Trainer checkpoints
#: (a run is redone whole if killed; checkpoints would cost ~1.6 GB and seconds per save per run), and no
#: separate before/after scoring of the test split (:func:`measure_run` measures every run, and the base model once).
STUDY_DEFAULTS: dict[str, str] = {"eval_steps": "50", "save_strategy": "no", "score_test_probes": "false"}


@dataclass(frozen=True)
class Arm:
    """One arm: a name, the ``send_mode`` it trains with, and extra recipe fields (a variant's)."""

    name: str
    send_mode: str
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def variant(self) -> Optional[str]:
        return self.name.split("@", 1)[1] if "@" in self.name else None


@dataclass
class StudyPlan:
    """What a study runs.

    Attributes:
        recipe: the YAML recipe every run starts from.
        seeds: training seeds (each arm runs every seed; differences are paired by seed).
        arms: the :class:`Arm` list (the three modes, then variant arms).
        out: the study folder (``runs/<arm>/seed-<s>/``, ``study.json``, figures).
        fields: recipe overrides applied to every run (``--model``, ``--data``, ``--set``).
        paraphrase_probes: training facts whose first paraphrase prompt is scored.
        n_boot: bootstrap resamples for each run's AUROC interval.
        keep_models: keep each run's ``final/`` checkpoint (540 MB for SmolLM2-135M).
        probe_split: the split scored as the held-out set (:data:`PROBE_SPLITS`); the metric keys
            stay ``test_*`` and each run records the split in ``details["probe_split"]``.
    """

    recipe: str
    seeds: list[int]
    arms: list[Arm]
    out: Path
    fields: dict[str, str] = field(default_factory=dict)
    paraphrase_probes: int = 75
    n_boot: int = 500
    keep_models: bool = False
    probe_split: str = "test"

    @property
    def triage_path(self) -> Path:
        """The study's triage file (written by :func:`ensure_triage` when an arm trains on known facts)."""
        return self.out / TRIAGE_FILE

    def needs_triage(self) -> bool:
        return any(dict(a.fields).get("known_facts_file") == str(self.triage_path) for a in self.arms)

    def run_dir(self, arm: Arm, seed: int) -> Path:
        return self.out / "runs" / arm.name / f"seed-{seed}"

    def train_fields(self, arm: Arm, seed: int) -> dict[str, str]:
        """Every recipe override of one run, in the order they are applied (later wins)."""
        f = {**STUDY_DEFAULTS, **self.fields, **dict(arm.fields)}
        f.update(
            send_mode=arm.send_mode,
            seed=str(seed),
            output_dir=str(self.run_dir(arm, seed) / "train"),
            overwrite_output_dir="true",
        )
        return f


def _parse_fields(pairs: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"{what} {p!r} must look like field=value (e.g. send_drop_fraction=0.3)")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def plan_study(
    recipe: str,
    seeds: Sequence[int],
    out,
    *,
    arms: Sequence[str] = ARMS,
    variants: Sequence[str] = (),
    variant_modes: Sequence[str] = ("send",),
    model: Optional[str] = None,
    data: Optional[str] = None,
    fields: Sequence[str] = (),
    paraphrase_probes: int = 75,
    n_boot: int = 500,
    keep_models: bool = False,
    probe_split: str = "test",
) -> StudyPlan:
    """Build and validate a :class:`StudyPlan` (every run's recipe is parsed before anything trains).

    Args:
        recipe: YAML recipe path.
        seeds: at least one training seed; duplicates are refused.
        out: study folder.
        arms: subset of :data:`ARMS`.
        variants: names of :data:`VARIANTS` or ``NAME:field=value[,field=value]``;
            each adds an arm ``<mode>@NAME`` for every mode in ``variant_modes`` (or in
            :data:`VARIANT_MODES` for the variants listed there: ``known`` runs as ``off@known``).
        model, data: override ``model_name_or_path`` / ``data`` of the recipe.
        fields: extra ``field=value`` overrides for every run.
        paraphrase_probes: training facts whose paraphrase prompt is scored (≥ 1).
        probe_split: ``test`` (default) or ``tracking`` (the selection step, see ``docs/results/send.md``).

    Raises:
        ValueError: no seeds, duplicate seeds, an unknown arm or variant, a bad
            ``field=value``, or a run whose recipe does not parse (unknown field, bad value).
        FileNotFoundError: the recipe does not exist.
    """
    from neurodetox.send.recipes import parse_recipe

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("a study needs at least one seed (e.g. --seeds 0,1,2)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds in {seeds}")
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"unknown arm(s) {bad or arms}; valid arms: {', '.join(ARMS)}")
    bad = [m for m in variant_modes if m not in ARMS]
    if bad:
        raise ValueError(f"unknown variant mode(s) {bad}; valid: {', '.join(ARMS)}")
    if paraphrase_probes < 1:
        raise ValueError(f"paraphrase_probes must be >= 1, got {paraphrase_probes}")
    if probe_split not in PROBE_SPLITS:
        raise ValueError(f"probe_split {probe_split!r} is invalid: must be one of {', '.join(PROBE_SPLITS)}")
    triage = str(Path(out) / TRIAGE_FILE)
    plan_arms = [Arm(a, a) for a in arms]
    for spec in variants:
        if ":" in spec:
            name, rest = spec.split(":", 1)
            vf = _parse_fields([p for p in rest.split(",") if p.strip()], "variant field")
        elif spec in VARIANTS:
            name, vf = spec, {k: v.replace("{triage}", triage) for k, v in VARIANTS[spec].items()}
        else:
            raise ValueError(
                f"unknown variant {spec!r}; use one of {', '.join(VARIANTS)} or NAME:field=value[,field=value]"
            )
        if not name or "@" in name or "/" in name:
            raise ValueError(f"bad variant name {name!r}")
        for mode in VARIANT_MODES.get(spec, variant_modes):
            plan_arms.append(Arm(f"{mode}@{name}", mode, tuple(sorted(vf.items()))))
    common = _parse_fields(fields, "--set")
    if model:
        common["model_name_or_path"] = model
    if data:
        common["data"] = data
    plan = StudyPlan(
        recipe=recipe,
        seeds=seeds,
        arms=plan_arms,
        out=Path(out),
        fields=common,
        paraphrase_probes=paraphrase_probes,
        n_boot=n_boot,
        keep_models=keep_models,
        probe_split=probe_split,
    )
    for arm in plan.arms:  # fail on a bad field now, not after an hour of training
        parse_recipe(recipe, _argv(plan.train_fields(arm, seeds[0])))
    return plan


def _argv(fields: dict[str, str]) -> list[str]:
    return [x for k, v in fields.items() for x in (f"--{k}", v)]


def _train(plan: StudyPlan, arm: Arm, seed: int, log_path: Path) -> None:
    cmd = [sys.executable, "-m", "neurodetox", "train", "--config", plan.recipe, *_argv(plan.train_fields(arm, seed))]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise RuntimeError(
            f"training run {arm.name} seed {seed} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}"
        )


def run_one(plan: StudyPlan, arm: Arm, seed: int) -> dict:
    """Train one run (unless its ``result.json`` exists with the same settings) and measure it.

    Returns:
        the run's result dict (``arm``, ``seed``, ``fields``, ``metrics``, ``curves``, ...).

    Raises:
        RuntimeError: the training subprocess failed (with the end of its log).
    """
    from neurodetox.experiment.measure import measure_run

    rd = plan.run_dir(arm, seed)
    result_path = rd / "result.json"
    fields = plan.train_fields(arm, seed)
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if (
            cached.get("fields") == fields
            and cached.get("paraphrase_probes") == plan.paraphrase_probes
            and cached.get("probe_split", "test") == plan.probe_split
        ):
            return cached
        logger.info("%s: settings changed since the last study, running it again", rd)
    train_dir = Path(fields["output_dir"])
    t0 = time.time()
    _train(plan, arm, seed, rd / "train.log")
    summary = json.loads((train_dir / "summary.json").read_text())
    measured = measure_run(
        plan.recipe,
        fields,
        Path(summary["final_checkpoint"]),
        paraphrase_probes=plan.paraphrase_probes,
        n_boot=plan.n_boot,
        probe_split=plan.probe_split,
    )
    run_wall = time.time() - t0
    result = {
        "arm": arm.name,
        "send_mode": arm.send_mode,
        "variant": arm.variant,
        "seed": seed,
        "fields": fields,
        "paraphrase_probes": plan.paraphrase_probes,
        "probe_split": plan.probe_split,
        "metrics": {**measured["metrics"], "train_seconds": summary["train_seconds"]},
        "train_facts": summary["splits"]["train"],
        "sensitive_neurons": [
            {"step": s["step"], "dropped": {k: len(v) for k, v in s["neurons"].items()}}
            for s in summary.get("sensitive_neurons", [])
        ],
        # what each selection picked, for the mechanism figure (reports: neurodetox.experiment.mechanism)
        "selections": [
            {k: s.get(k) for k in ("step", "neurons", "massive", "mean_abs")}
            for s in summary.get("sensitive_neurons", [])
        ],
        "curves": measured["curves"],
        "details": measured["details"],
        "global_steps": summary["global_steps"],
        "run_wall_seconds": round(run_wall, 1),  # training subprocess + measurements
    }
    atomic_write_json(result_path, result)
    if not plan.keep_models:
        shutil.rmtree(summary["final_checkpoint"], ignore_errors=True)
    return result


def measure_base(plan: StudyPlan) -> dict:
    """Measure the untrained model once (same probes and sampling seed as every run); cached like a run."""
    from neurodetox.experiment.measure import measure_run
    from neurodetox.send.recipes import parse_recipe

    path = plan.out / "runs" / "base" / "result.json"
    fields = {k: v for k, v in plan.train_fields(plan.arms[0], plan.seeds[0]).items() if k != "output_dir"}
    fields.pop("send_mode", None)
    fields.pop("seed", None)
    if path.is_file():
        cached = json.loads(path.read_text())
        if (
            cached.get("fields") == fields
            and cached.get("paraphrase_probes") == plan.paraphrase_probes
            and cached.get("probe_split", "test") == plan.probe_split
        ):
            return cached
    model_args = parse_recipe(plan.recipe, _argv(fields))[0]
    t0 = time.time()
    measured = measure_run(
        plan.recipe,
        fields,
        model_args.model_name_or_path,
        paraphrase_probes=plan.paraphrase_probes,
        n_boot=plan.n_boot,
        probe_split=plan.probe_split,
    )
    result = {
        "arm": "base",
        "fields": fields,
        "paraphrase_probes": plan.paraphrase_probes,
        "probe_split": plan.probe_split,
        "metrics": measured["metrics"],
        "details": measured["details"],
        "run_wall_seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(path, result)
    return result


def ensure_triage(plan: StudyPlan) -> Optional[dict]:
    """Write the study's triage file once, if an arm trains on known facts (``known`` variant).

    The base model of the recipe (with the study's overrides) labels the training split
    (:func:`neurodetox.data.triage.run_triage`) with the recipe's answer boundary and prompt
    format (``eigenscore_stop``, ``eigenscore_prompt_format``) and :data:`STUDY_TRIAGE`. A file made for the same model,
    split and settings is reused, so a rerun costs nothing.

    Returns:
        The triage file's content, or ``None`` when no arm needs it.

    Raises:
        UserError: the base model knows none of the training facts.
    """
    if not plan.needs_triage():
        return None
    from neurodetox.data.triage import TriageOutputArguments, TriageSettings, read_triage, run_triage
    from neurodetox.send.recipes import parse_recipe

    arm = next(a for a in plan.arms if dict(a.fields).get("known_facts_file") == str(plan.triage_path))
    model_args, data_args, _, args, _ = parse_recipe(plan.recipe, _argv(plan.train_fields(arm, plan.seeds[0])))
    settings = TriageSettings(
        **STUDY_TRIAGE,
        stop=args.eigenscore_stop,
        prompt_format=args.eigenscore_prompt_format,
        max_new_tokens=args.eigenscore_max_new_tokens,
    )
    if plan.triage_path.is_file():
        old = read_triage(plan.triage_path)
        if (
            old.get("model") == model_args.model_name_or_path
            and old.get("split") == data_args.split_record()
            and old.get("settings") == asdict(settings)
        ):
            return old
    logger.info("labelling the training facts known/unknown for %s (once per study)", model_args.model_name_or_path)
    return run_triage(
        model_args, data_args, settings, TriageOutputArguments(output=str(plan.triage_path), overwrite=True), False
    )


def run_study(plan: StudyPlan, progress: bool = True) -> tuple[dict, list[dict]]:
    """Measure the base model, then run every (arm, seed) of ``plan`` in seed-major order.

    Seed-major order means a study cut short still has complete seeds of every arm.

    Returns:
        ``(base result, run results)``.
    """
    from tqdm.auto import tqdm

    ensure_triage(plan)
    base = measure_base(plan)
    jobs = [(arm, s) for s in plan.seeds for arm in plan.arms]
    results = []
    bar = tqdm(jobs, desc="study runs", unit="run", disable=not progress)
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm.name} seed {seed}")
        results.append(run_one(plan, arm, seed))
    return base, results
