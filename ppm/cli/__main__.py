"""``python -m ppm.cli``: the ``ppm`` command."""

import sys

from ppm.cli import main

sys.exit(main())
