"""Build script for the one optional C extension (all metadata stays in setup.cfg).

``minibloom.formats._widen`` (``minibloom/formats/_widen.c``) widens 16-bit floats with the CPU's conversion
instructions where it has them. It is optional in both senses: ``optional=True`` turns a failed build (no compiler, no
Python headers) into a warning, and without the module ``minibloom.formats.widen`` runs its NumPy passes.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("minibloom.formats._widen", ["minibloom/formats/_widen.c"], optional=True)])
