"""Fact data: the built-in geonames facts and user fact files, in one schema."""

from neurodetox.data.facts import (
    CONTINENT_NAMES,
    FACT_FEATURES,
    RELATION_TEMPLATES,
    RELATIONS,
    SPLITS,
    RelationTemplate,
    ascii_fold,
    build_fact_dataset,
    expand_aliases,
    interleave_relations,
    write_fact_dataset,
)
from neurodetox.data.files import SUPPORTED_EXTENSIONS, load_fact_file, load_facts

__all__ = [
    "CONTINENT_NAMES",
    "FACT_FEATURES",
    "RELATIONS",
    "RELATION_TEMPLATES",
    "RelationTemplate",
    "SPLITS",
    "SUPPORTED_EXTENSIONS",
    "ascii_fold",
    "build_fact_dataset",
    "expand_aliases",
    "interleave_relations",
    "load_fact_file",
    "load_facts",
    "write_fact_dataset",
]
