"""``python -m minibloom`` = the ``minibloom`` command."""

import sys

from .cli import main

sys.exit(main())
