"""``python -m how_met.cli``: the ``how-met`` command."""
import sys

from . import main

sys.exit(main())
