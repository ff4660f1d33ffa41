"""``python -m dsformer``: the command line (what the ``dsformer`` script runs)."""

import sys

from dsformer.cli import main

sys.exit(main())
