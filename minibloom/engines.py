"""``minibloom.engines`` is ``minibloom.oracle.engines``: the documented name of a module of the oracle subpackage."""

import sys

from .oracle import engines as _module

sys.modules[__name__] = _module
