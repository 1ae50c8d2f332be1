"""Compatibility alias: ``neurodetox.sites`` is :mod:`neurodetox.core.sites`."""

import sys

from neurodetox.core import sites as _sites

sys.modules[__name__] = _sites
