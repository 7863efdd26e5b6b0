"""``python -m ppm.cli``: the ``ppm`` command."""

import sys

from ppm.cli.main import main

sys.exit(main())
