"""Compatibility alias: ``neurodetox.models`` is :mod:`neurodetox.core.models`."""

import sys

from neurodetox.core import models as _models

sys.modules[__name__] = _models
