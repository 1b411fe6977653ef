"""``python -m ellsjax`` runs the command line (same as the ``ellsjax`` console script)."""

import sys

from ellsjax.cli import main

sys.exit(main())
