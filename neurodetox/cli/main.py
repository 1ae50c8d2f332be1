"""``neurodetox`` command line.

neurodetox train --config recipes/smollm2-facts-send.yaml [--field value ...]
neurodetox data facts --output_dir DIR [--split_seed N] [--relations ...]
neurodetox data triage --out FILE.json [--model M] [--split_seed N] [--k 10] ...
neurodetox eval --model PATH --data facts|FILE
neurodetox patch find|apply|revert|show|eval ...
neurodetox experiment [--recipe R.yaml] [--seeds 0,1,2] [--variants drop0.3,mlp] [--quick]

Every command takes --field_name or --field-name; NEURODETOX_DEBUG=1 shows tracebacks of user errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from neurodetox.core.errors import UserError

# ``neurodetox.core.args`` (HfArgumentParser) imports transformers, huggingface_hub and tqdm, which read
# their progress-bar settings from the environment at import: it is imported in the functions below,
# after ``main`` has called ``_quiet_third_party``.


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: seconds between progress-bar lines when stderr is a log file, not a terminal
LOG_PROGRESS_INTERVAL = "30"


def _quiet_third_party() -> None:
    """Command line only: quiet third-party noise without hiding our own progress and warnings.

    * ``accelerate`` imports DeepSpeed when it is installed, and DeepSpeed's auto-detection logs
      "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
      it." on every machine without CUDA. ``DS_ACCELERATOR=cpu`` says the same thing up front;
      a value set by the user is kept.
    * When stderr is not a terminal (a log file, CI, ``nohup``), a tqdm bar cannot redraw in place and
      leaves a line per refresh: bars then refresh at most every :data:`LOG_PROGRESS_INTERVAL` seconds
      (``TQDM_MININTERVAL``, kept if the user set it), and the sub-second "Loading weights" bar of
      ``transformers`` is switched off.
    """
    if not sys.stderr.isatty():  # first: tqdm reads TQDM_* once, when imported (torch imports it)
        os.environ.setdefault("TQDM_MININTERVAL", LOG_PROGRESS_INTERVAL)
        # read by huggingface_hub, and by transformers when it is first imported (its weight-loading bar)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def cmd_train(argv: Sequence[str]) -> int:
    from neurodetox.send.recipes import make_parser, parse_recipe

    if any(a in ("-h", "--help") for a in argv):
        make_parser().print_help()
        return 0
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(list(argv))
    model_args, data_args, run_args, train_args, peft_config = parse_recipe(known.config, rest)
    _setup_logging()
    from rich.console import Console

    from neurodetox.reports.training import summary_table
    from neurodetox.send.run import run_training

    try:
        summary = run_training(model_args, data_args, run_args, train_args, peft_config)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        # run_training validates model, data and settings before any step and raises ValueError
        raise UserError(str(e)) from None
    if train_args.process_index == 0:
        Console().print(summary_table(summary))
        print(f"run folder: {train_args.output_dir}  (summary.json, metrics.jsonl, training_curves.png, final/)")
    return 0


@dataclass
class FactsOutputArguments:
    """Where ``neurodetox data facts`` writes the dataset.

    Attributes:
        output_dir: output folder (written atomically; alias ``--out``).
        overwrite: replace an existing non-empty folder.
    """

    output_dir: str = field(metadata={"help": "Output folder (written atomically).", "aliases": ["--out"]})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing non-empty folder."})


def cmd_data(argv: Sequence[str]) -> int:
    from neurodetox.data import build_fact_dataset, write_fact_dataset
    from neurodetox.data.settings import FactDataArguments

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: neurodetox data facts --output_dir DIR [--split_seed N] [--relations ...]\n")
        print("usage: neurodetox data triage --out FILE.json [--model M] [data and sampling flags]\n")
        print("  facts   write the GeoNames fact dataset (train/tracking/test) to a folder")
        print("  triage  label each training fact HighlyKnown/MaybeKnown/WeaklyKnown/Unknown for a model")
        return 0 if argv else 2
    if argv[0] == "triage":
        return cmd_data_triage(argv[1:])
    if argv[0] != "facts":
        raise UserError(f"unknown data command {argv[0]!r}; valid: facts, triage")
    from neurodetox.core.args import command_parser, parse_command

    parser = command_parser(
        "neurodetox data facts",
        "Write the GeoNames fact dataset (train/tracking/test jsonl per split + a datasets folder).",
        (FactDataArguments, FactsOutputArguments),
    )
    data, out = parse_command(parser, argv[1:])
    if data.data != "facts":
        raise UserError(f"neurodetox data facts builds the built-in facts; --data must be 'facts', got {data.data!r}")
    try:
        ds = build_fact_dataset(
            relations=tuple(data.relation_list),
            seed=data.split_seed,
            tracking_fraction=data.tracking_fraction,
            test_fraction=data.test_fraction,
            max_facts_per_relation=data.max_facts_per_relation,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        write_fact_dataset(ds, out.output_dir, overwrite=out.overwrite)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    print(f"wrote {', '.join(f'{k}: {len(v)}' for k, v in ds.items())} facts to {out.output_dir}")
    return 0


def cmd_data_triage(argv: Sequence[str]) -> int:
    """``neurodetox data triage``: SliCK categories of a split's facts (:mod:`neurodetox.data.triage`)."""
    from neurodetox.core.args import command_parser, parse_command
    from neurodetox.core.settings import ModelArguments
    from neurodetox.data.settings import FactDataArguments
    from neurodetox.data.triage import TriageOutputArguments, TriageSettings, run_triage

    parser = command_parser(
        "neurodetox data triage",
        "Label each fact of a split HighlyKnown / MaybeKnown / WeaklyKnown / Unknown for a model, from its greedy "
        "and sampled answers (Gekhman et al., arXiv 2405.05904), and write a JSON file that a recipe's "
        "known_facts_file trains on.",
        (ModelArguments, FactDataArguments, TriageSettings, TriageOutputArguments),
    )
    model_args, data_args, settings, out = parse_command(parser, argv)
    _setup_logging()
    content = run_triage(model_args, data_args, settings, out)
    counts = content["counts"]
    total = sum(counts.values())
    print(", ".join(f"{c}: {n}" for c, n in counts.items()) + f" (of {total} {out.split} facts)")
    print(f"wrote {out.output}")
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    from neurodetox.cli.eval import cmd_eval as run

    return run(argv)


def cmd_experiment(argv: Sequence[str]) -> int:
    from neurodetox.cli.experiment import cmd_experiment as run

    _setup_logging()
    return run(argv)


def cmd_patch(argv: Sequence[str]) -> int:
    from neurodetox.cli.patch import cmd_patch as run

    return run(argv)


COMMANDS = {
    "train": cmd_train,
    "data": cmd_data,
    "eval": cmd_eval,
    "patch": cmd_patch,
    "experiment": cmd_experiment,
}


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``neurodetox`` command; returns its exit code.

    A user error (:class:`~neurodetox.core.errors.UserError`, a missing or existing file) is printed
    as one line ``neurodetox COMMAND: error: MESSAGE`` and returns 2; ``NEURODETOX_DEBUG=1`` re-raises
    it with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_third_party()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands: " + ", ".join(COMMANDS) + "   (neurodetox COMMAND --help)")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from neurodetox import __version__

        print(__version__)
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        return _fail("neurodetox", f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
    from neurodetox.core.args import user_errors_exit_2

    return user_errors_exit_2(f"neurodetox {argv[0]}")(cmd)(argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
