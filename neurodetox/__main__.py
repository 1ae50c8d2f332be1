"""``python -m neurodetox …`` is the ``neurodetox`` command (handy under ``accelerate launch -m``)."""

import sys

from neurodetox.cli.main import main

sys.exit(main())
