"""EigenScore as an ``evaluate`` metric module: ``evaluate.load(METRIC_PATH)``.

The module file (``eigenscore_metric.py``) imports ``evaluate``; this package
file does not, so ``neurodetox`` works without ``evaluate`` installed.
"""

import os

METRIC_PATH = os.path.dirname(os.path.abspath(__file__))

__all__ = ["METRIC_PATH"]
