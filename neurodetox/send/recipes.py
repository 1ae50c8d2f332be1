"""``neurodetox train``'s settings: YAML recipes plus command-line overrides, parsed into dataclasses.

The flags are the fields of :class:`~neurodetox.core.settings.ModelArguments`,
:class:`DataArguments` (the shared :class:`~neurodetox.data.settings.FactDataArguments` plus
training-only fields), :class:`RunArguments` and :class:`~neurodetox.send.config.SeNDConfig`, in the
one dialect of :mod:`neurodetox.core.args`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from neurodetox.core.args import ArgumentParser, command_parser, load_recipe, parse_command
from neurodetox.core.checks import check_int
from neurodetox.core.errors import UserError
from neurodetox.core.settings import ModelArguments
from neurodetox.data.settings import FactDataArguments
from neurodetox.send.config import SeNDConfig

__all__ = [
    "ARG_CLASSES",
    "DataArguments",
    "ModelArguments",
    "RunArguments",
    "load_recipe",
    "make_parser",
    "parse_recipe",
]


@dataclass
class DataArguments(FactDataArguments):
    """Which facts to train on, track and probe: the shared fact split plus training-only fields.

    Attributes:
        max_length: maximum tokens per training statement (≥ 1).
        max_test_probes: cap on test-split probes scored before and after training (``None``: all).
        known_facts_file: a ``neurodetox data triage`` file; train only on the facts it labels with
            ``known_categories`` (``None``: all facts). See :mod:`neurodetox.data.triage`.
        known_categories: comma list of SliCK categories kept (default: the three known ones).
    """

    max_length: int = field(default=48, metadata={"help": "Maximum tokens per training statement."})
    max_test_probes: Optional[int] = field(
        default=None, metadata={"help": "Cap on test-split probes scored before and after training (default: all)."}
    )
    known_facts_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "A `neurodetox data triage` file of this run's facts: train only on the training facts it labels "
            "with known_categories (Gekhman et al., arXiv 2405.05904). Default: train on all."
        },
    )
    known_categories: str = field(
        default="HighlyKnown,MaybeKnown,WeaklyKnown",
        metadata={"help": "With known_facts_file: the SliCK categories trained on (comma list)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("max_length", self.max_length, minimum=1)
        if self.max_test_probes is not None:
            check_int("max_test_probes", self.max_test_probes, minimum=1)
        from neurodetox.data.triage import parse_categories

        parse_categories(self.known_categories)


@dataclass
class RunArguments:
    """Run-folder handling."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete an existing run folder first (otherwise a folder with checkpoints needs "
            "--resume_from_checkpoint). Only a folder that is recognisably a neurodetox run is deleted, after every "
            "input and setting has been checked; never the working folder, one of its parents, or a folder holding "
            "the model or data."
        },
    )
    force_overwrite: bool = field(
        default=False,
        metadata={
            "help": "With --overwrite_output_dir: also delete an output folder that is not a neurodetox run (the "
            "working folder, its parents and folders holding the model or data are still refused)."
        },
    )
    allow_resume_changes: bool = field(
        default=False,
        metadata={
            "help": "With --resume_from_checkpoint: continue even when the data split or optimisation settings "
            "differ from the ones the run recorded (run_config.json); otherwise the run is refused, naming each field."
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

DESCRIPTION = (
    "Fine-tune a causal LM with Sensitive Neuron Dropout (SeND, arXiv 2410.15460) on facts, scoring EigenScore "
    "and factual accuracy before, during and after. Fields come from --config RECIPE.yaml, overridden by "
    "--field value."
)


def make_parser() -> ArgumentParser:
    """The ``neurodetox train`` parser (every field of :data:`ARG_CLASSES`, plus ``--config``)."""
    return command_parser("neurodetox train", DESCRIPTION, ARG_CLASSES, config=True)


def parse_recipe(config: Optional[str], overrides: Sequence[str] = ()):
    """Recipe file plus ``--field value`` overrides → ``(model, data, run, training, peft)``.

    ``peft`` is the recipe's optional ``peft:`` mapping (``peft.LoraConfig`` fields, e.g. ``r``,
    ``lora_alpha``, ``target_modules``) or ``None``. Overrides win over the recipe.

    Raises:
        UserError: an unknown field (with the closest valid names), a bad value, a missing or
            malformed recipe.
    """
    recipe = load_recipe(config)
    peft_config = recipe.pop("peft", None)
    if peft_config is not None and not isinstance(peft_config, dict):
        raise UserError(f"the recipe's peft section must be a mapping of peft.LoraConfig fields, got {peft_config!r}")
    model_args, data_args, run_args, train_args, *_ = parse_command(make_parser(), overrides, recipe=recipe)
    return model_args, data_args, run_args, train_args, peft_config
