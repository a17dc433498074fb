"""``minibloom.trace`` is ``minibloom.oracle.trace``: the documented name of a module of the oracle subpackage."""

import sys

from .oracle import trace as _module

sys.modules[__name__] = _module
