"""``python -m megarl``: the same as the ``megarl`` command."""

import sys

from megarl.cli import main

sys.exit(main())
