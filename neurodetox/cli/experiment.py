"""``neurodetox experiment``: the SeND study from one recipe, over arms and seeds, to a results page.

    neurodetox experiment --config recipes/smollm2-facts-send.yaml --seeds 0,1,2 \\
        --variants drop0.3,mlp --out runs/study --report docs/results/send.md
    neurodetox experiment --quick            # one seed of the three arms, 100 steps (under 20 min on 2 CPU cores)
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from neurodetox.core.args import command_parser, parse_command, user_errors_exit_2
from neurodetox.core.checks import check_int
from neurodetox.core.errors import UserError

DEFAULT_RECIPE = "recipes/smollm2-facts-send.yaml"
#: --quick: 100 steps (one SeND selection, at step 50), no activation statistics (they cost every arm alike).
QUICK_FIELDS = {"max_steps": "100", "activation_stats_site": "none"}
QUICK_PARAPHRASE_PROBES = 40


@dataclass
class StudyArguments:
    """Settings of ``neurodetox experiment`` (the SeND study): which runs, how many seeds, where results go.

    Attributes:
        recipe: the YAML recipe every run starts from (flag alias ``--config``).
        model_name_or_path, data: overrides of the recipe's model and fact source (``None``: the recipe's).
        seeds: comma list of training seeds.
        arms: comma list of ``send_mode`` arms.
        variants: comma list of extra SeND settings run as their own arms (``drop0.3``, ``mlp`` or
            ``NAME:field=value[;field=value]``).
        variant_modes: modes each variant runs with.
        set_fields: recipe overrides for every run, ``FIELD=VALUE`` (flag alias ``--set``).
        quick: first seed only, no variants, :data:`QUICK_FIELDS` and fewer paraphrase probes.
        paraphrase_probes: training facts whose first paraphrase prompt is scored (≥ 1).
        bootstrap: bootstrap resamples per AUROC interval (≥ 1).
        output_dir: study folder (default ``runs/study``, or ``runs/study-quick`` with ``quick``; alias ``--out``).
        report: Markdown page to write (default ``OUTPUT_DIR/send.md``).
        keep_models: keep each run's ``final/`` checkpoint.
        progress: show progress bars (``--no_progress`` turns them off).
    """

    recipe: str = field(
        default=DEFAULT_RECIPE, metadata={"help": "Recipe every run starts from.", "aliases": ["--config"]}
    )
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Override the recipe's model (a folder, a .gguf, a hub id).", "aliases": ["--model"]},
    )
    data: Optional[str] = field(default=None, metadata={"help": "Override the recipe's data: 'facts' or a fact file."})
    seeds: str = field(default="0,1,2", metadata={"help": "Comma list of training seeds."})
    arms: str = field(default="send,random,off", metadata={"help": "Comma list of send_mode arms."})
    variants: str = field(
        default="",
        metadata={
            "help": "Comma list of extra settings, each run as its own arm for every seed: drop0.3, mlp (the "
            "paper's), normalized, standardized, nomassive, normalized-nomassive, released, released-nofreeze, "
            "mlp-second-half, known (off@known: train on the facts the base model knows), or "
            "NAME:field=value[;field=value]. See neurodetox.experiment.runs.VARIANTS."
        },
    )
    variant_modes: str = field(default="send", metadata={"help": "Modes each variant runs with."})
    set_fields: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Recipe overrides for every run, FIELD=VALUE (several allowed), e.g. --set max_steps=100.",
            "aliases": ["--set"],
            "action": "extend",
        },
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "A first look in under 20 min on 2 CPU cores: the first seed, no variants, "
            + ", ".join(f"{k}={v}" for k, v in QUICK_FIELDS.items())
            + f" and {QUICK_PARAPHRASE_PROBES} paraphrase probes (--set still wins)."
        },
    )
    paraphrase_probes: int = field(
        default=75,
        metadata={"help": "Training facts whose first paraphrase prompt is scored (75 = the size of the test split)."},
    )
    bootstrap: int = field(default=500, metadata={"help": "Bootstrap resamples per AUROC interval."})
    output_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Study folder (default runs/study, or runs/study-quick with --quick, so a quick look never "
            "replaces runs of the full study).",
            "aliases": ["--out"],
        },
    )
    report: Optional[str] = field(
        default=None,
        metadata={
            "help": "Markdown page to write (default OUTPUT_DIR/send.md); figures go to a folder named after it "
            "(e.g. docs/results/send/)."
        },
    )
    keep_models: bool = field(default=False, metadata={"help": "Keep each run's final/ checkpoint."})
    probe_split: str = field(
        default="test",
        metadata={
            "help": "Split scored as the held-out set: test (the final arms, once) or tracking (the selection "
            "step: compare variants without looking at the test split; docs/results/send.md)."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        check_int("paraphrase_probes", self.paraphrase_probes, minimum=1)
        check_int("bootstrap", self.bootstrap, minimum=1)


DESCRIPTION = (
    "Controlled SeND study (arXiv 2410.15460): send_mode send / random / off × seeds from one recipe (identical "
    "data, steps, learning rate and trainable layers), measured on the test split and on training-fact "
    "paraphrases; writes study.json, curve PNGs and a markdown page with per-arm intervals and paired "
    "differences. Complete runs are reused on rerun."
)


def build_parser():
    """The ``neurodetox experiment`` parser (the fields of :class:`StudyArguments`)."""
    return command_parser("neurodetox experiment", DESCRIPTION, (StudyArguments,))


def parse_args(argv: Sequence[str]) -> StudyArguments:
    """``neurodetox experiment`` arguments → :class:`StudyArguments`.

    Raises:
        UserError: an unknown flag or a bad value.
    """
    (a,) = parse_command(build_parser(), argv)
    return a


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


@user_errors_exit_2("neurodetox experiment")
def cmd_experiment(argv: Sequence[str]) -> int:
    """Entry point; returns 0, or 2 with a message on bad input or a failed run."""
    from rich.console import Console

    from neurodetox.core.io import atomic_write_json, atomic_write_text
    from neurodetox.experiment.runs import run_study
    from neurodetox.experiment.stats import headline
    from neurodetox.reports.study import nan_to_none, plot_curves, render_markdown

    a = parse_args(argv)
    console = Console(stderr=True)
    plan = plan_from_args(a)
    console.print(
        f"[bold]neurodetox experiment[/]: {len(plan.arms)} arms × {len(plan.seeds)} seeds = "
        f"{len(plan.arms) * len(plan.seeds)} runs into {plan.out}"
    )
    t0 = time.time()
    try:
        base, results = run_study(plan, progress=a.progress)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    wall = (time.time() - t0) / 60
    page = Path(a.report) if a.report else plan.out / "send.md"
    fig_dir = page.parent / page.stem
    figures = plot_curves(results, fig_dir)
    arms = [arm.name for arm in plan.arms]
    comparisons = [
        (x, y) for x, y in (("send", "off"), ("send", "random"), ("random", "off")) if x in arms and y in arms
    ]
    comparisons += [(v, "off") for v in arms if "@" in v and "off" in arms]
    comparisons += [(v, "send") for v in arms if "@" in v and "send" in arms]
    model = plan.fields.get("model_name_or_path") or _recipe_model(a.recipe)
    h = headline(results)
    statement = []
    if h is not None and h["n"]:
        from neurodetox.experiment.stats import fmt_interval, verdict

        statement.append(
            f"- **Main result:** test-split factual accuracy, SeND − off = "
            f"{fmt_interval(h, True, True)} over {h['n']} paired seeds "
            f"({verdict(h, +1)})."
        )
    if plan.probe_split != "test":
        statement.insert(
            0,
            f"- **Selection step: every 'test' number on this page is the {plan.probe_split} split** "
            f"(`--probe_split {plan.probe_split}`); the test split was not scored.",
        )
    info = {
        "recipe": a.recipe,
        "seeds": plan.seeds,
        "model": model,
        "comparisons": comparisons,
        "command": "neurodetox experiment " + " ".join(shlex.quote(x) for x in argv),
        "wall_minutes": (base["run_wall_seconds"] + sum(r["run_wall_seconds"] for r in results)) / 60,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "statement_lines": statement,
    }
    md = render_markdown(results, info, figures, page, base=base)
    from neurodetox.experiment.mechanism import mechanism_markdown, plot_mechanism

    md += mechanism_markdown(results, plot_mechanism(results, fig_dir), page)
    atomic_write_text(page, md)
    atomic_write_json(plan.out / "study.json", nan_to_none({"info": info, "base": base, "results": results}))
    if page.parent.resolve() != plan.out.resolve():
        shutil.copy2(page, plan.out / page.name)
    print(md)
    console.print(f"wrote {page}, {fig_dir}/*.png and {plan.out / 'study.json'} ({wall:.1f} min)")
    return 0


def plan_from_args(a: StudyArguments):
    """The :class:`~neurodetox.experiment.runs.StudyPlan` of parsed ``neurodetox experiment`` arguments
    (``--quick`` applied: first seed, no variants, :data:`QUICK_FIELDS` under the user's ``--set``).

    Raises:
        ValueError: bad ``--seeds`` or anything :func:`~neurodetox.experiment.runs.plan_study` refuses.
        FileNotFoundError: missing recipe.
    """
    from neurodetox.experiment.runs import plan_study

    try:
        seeds = [int(s) for s in _split(a.seeds)]
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, got {a.seeds!r}") from None
    variants = [] if a.quick else [v.replace(";", ",") if ":" in v else v for v in _variant_specs(a.variants)]
    out = a.output_dir or ("runs/study-quick" if a.quick else "runs/study")
    fields, probes = list(a.set_fields), a.paraphrase_probes
    if a.quick:
        seeds = seeds[:1]
        fields = [f"{k}={v}" for k, v in QUICK_FIELDS.items()] + fields
        if probes == StudyArguments.paraphrase_probes:
            probes = QUICK_PARAPHRASE_PROBES
    return plan_study(
        a.recipe,
        seeds,
        out,
        arms=_split(a.arms),
        variants=variants,
        variant_modes=_split(a.variant_modes),
        model=a.model_name_or_path,
        data=a.data,
        fields=fields,
        paraphrase_probes=probes,
        n_boot=a.bootstrap,
        keep_models=a.keep_models,
        probe_split=a.probe_split,
    )


def _variant_specs(s: str) -> list[str]:
    """Split ``--variants``: commas separate variants; a custom one uses ``;`` between its fields."""
    return [x.strip() for x in s.split(",") if x.strip()]


def _recipe_model(recipe: str) -> str:
    from neurodetox.send.recipes import load_recipe

    try:
        return str(load_recipe(recipe).get("model_name_or_path", "smollm2-135m-instruct"))
    except (FileNotFoundError, ValueError):
        return "?"


def main(argv=None) -> int:  # pragma: no cover - thin wrapper
    return cmd_experiment(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
