"""``python -m neurodetox …`` is the ``neurodetox`` command (handy under ``accelerate launch -m``)."""

import sys

from .cli import main

sys.exit(main())
