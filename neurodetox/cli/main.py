"""``neurodetox`` command line.

neurodetox train --config recipes/smollm2-facts-send.yaml [--field value ...]
neurodetox data facts --out DIR [--seed N] [--relations ...]
neurodetox eval --model PATH --data facts|FILE
neurodetox patch find|apply|revert|show|eval ...
neurodetox experiment [--config R.yaml] [--seeds 0,1,2] [--variants drop0.3,mlp] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> int:
    print(f"neurodetox: error: {message}", file=sys.stderr)
    return 2


def cmd_train(argv: Sequence[str]) -> int:
    from neurodetox.send.recipes import make_parser, parse_recipe

    if any(a in ("-h", "--help") for a in argv):
        parser = make_parser()
        parser.prog = "neurodetox train"
        parser.description = (
            "Fine-tune a causal LM with Sensitive Neuron Dropout (SeND, arXiv 2410.15460) on "
            "facts, scoring EigenScore and factual accuracy before, during and after. "
            "Fields come from --config RECIPE.yaml, overridden by --field value."
        )
        parser.add_argument("--config", help="YAML recipe whose keys are any of the fields below.")
        parser.print_help()
        return 0
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(list(argv))
    try:
        model_args, data_args, run_args, train_args, peft_config = parse_recipe(known.config, rest)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    _setup_logging()
    from rich.console import Console

    from neurodetox.reports.training import summary_table
    from neurodetox.send.run import run_training

    try:
        summary = run_training(model_args, data_args, run_args, train_args, peft_config)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        return _fail(str(e))
    if train_args.process_index == 0:
        Console().print(summary_table(summary))
        print(f"run folder: {train_args.output_dir}  (summary.json, metrics.jsonl, training_curves.png, final/)")
    return 0


def cmd_data(argv: Sequence[str]) -> int:
    from neurodetox.data import RELATIONS

    p = argparse.ArgumentParser(prog="neurodetox data", description="Build datasets.")
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("facts", help="Write the GeoNames fact dataset (train/tracking/test) to a folder.")
    f.add_argument("--out", required=True, help="Output folder (written atomically).")
    f.add_argument("--seed", type=int, default=0, help="Split seed (default 0).")
    f.add_argument("--relations", default=",".join(RELATIONS), help=f"Comma list of {', '.join(RELATIONS)}.")
    f.add_argument("--tracking-fraction", type=float, default=0.1)
    f.add_argument("--test-fraction", type=float, default=0.1)
    f.add_argument("--max-facts-per-relation", type=int, default=None)
    f.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty folder.")
    a = p.parse_args(list(argv))
    from neurodetox.data import build_fact_dataset, write_fact_dataset

    try:
        ds = build_fact_dataset(
            relations=tuple(r.strip() for r in a.relations.split(",") if r.strip()),
            seed=a.seed,
            tracking_fraction=a.tracking_fraction,
            test_fraction=a.test_fraction,
            max_facts_per_relation=a.max_facts_per_relation,
        )
        write_fact_dataset(ds, a.out, overwrite=a.overwrite)
    except (ValueError, FileExistsError) as e:
        return _fail(str(e))
    print(f"wrote {', '.join(f'{k}: {len(v)}' for k, v in ds.items())} facts to {a.out}")
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


COMMANDS = {"train": cmd_train, "data": cmd_data, "eval": cmd_eval, "patch": cmd_patch, "experiment": cmd_experiment}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        return _fail(f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
    return cmd(argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
