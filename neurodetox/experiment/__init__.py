"""A controlled SeND study: ``send`` vs ``random`` vs ``off`` (and variants) over seeds, with intervals.

``neurodetox experiment`` (see :mod:`neurodetox.cli.experiment`) runs it and
writes ``docs/results/send.md``-style pages. Flow: plan (:mod:`.runs`) →
train + measure each run (:mod:`.runs`, :mod:`.measure`) → intervals
(:mod:`.stats`) → page and figures (:mod:`neurodetox.reports.study`).

Method: Sensitive Neuron Dropout, Mohammadzadeh et al., "Hallucination
Detox: Sensitivity Dropout (SenD) for Large Language Model Training",
arXiv 2410.15460.
"""

from neurodetox.experiment.runs import ARMS, PAPER_VARIANTS, Arm, StudyPlan, plan_study, run_one, run_study
from neurodetox.experiment.stats import METRICS, arm_table, interval, paired_difference, verdict

__all__ = [
    "ARMS",
    "PAPER_VARIANTS",
    "METRICS",
    "Arm",
    "StudyPlan",
    "arm_table",
    "interval",
    "paired_difference",
    "plan_study",
    "run_one",
    "run_study",
    "verdict",
]
