"""``minibloom.testing`` is ``minibloom.oracle.testing``: the documented name of a module of the oracle subpackage."""

import sys

from .oracle import testing as _module

sys.modules[__name__] = _module
