"""``minibloom.gguf`` is ``minibloom.formats.gguf`` (the documented name, and ``python -m minibloom.gguf``)."""

import sys

from .formats import gguf as _module

if __name__ == "__main__":
    from .formats.gguf.__main__ import main

    raise SystemExit(main())
sys.modules[__name__] = _module
