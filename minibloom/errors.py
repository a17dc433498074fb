"""The one exception type minibloom raises for bad files, configs and arguments, and how its messages show values."""

import numpy as np


class MinibloomError(ValueError):
    """A checkpoint, config, tokenizer or argument that minibloom cannot use.

    The message always names the offending file, tensor or argument.
    """


def shown(v, width: int = 60) -> str:
    """An untrusted value for a message: plain Python numbers (never ``np.int64(5)``), cut to ``width`` characters."""
    if isinstance(v, np.generic):
        v = v.item()
    elif isinstance(v, (list, tuple)) and any(isinstance(x, np.generic) for x in v[:20]):
        v = [x.item() if isinstance(x, np.generic) else x for x in v[:20]] + (["..."] if len(v) > 20 else [])
    try:
        s = repr(v)
    except (ValueError, RecursionError):  # an int past sys.get_int_max_str_digits, a self-nesting list
        s = (f"<an integer of {v.bit_length()} bits>" if isinstance(v, int)
             else f"<a {type(v).__name__} too big to show>")
    return s if len(s) <= width else s[:width - 3] + "..."
