"""The sliding windows of corpus evaluation, as transformers' guide "Perplexity of fixed-length models" lays them
out (https://huggingface.co/docs/transformers/perplexity): windows of up to ``context`` tokens begin at 0, stride,
2 stride, ... (the last one ends at the text's end); each scores only the tokens no earlier window scored, and never
its first token. ``minibloom.evaluate.corpus`` runs them; an external engine lists them with ``windows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MinibloomError, shown

MAX_TOKENS = 1 << 40  # ids in one text (far beyond any corpus a process tokenizes whole)
MAX_WINDOWS = 1 << 24  # windows of one run: each is a task (and a Dask future) of its own
MAX_CONTEXT = 1 << 16  # tokens in one window: attention alone holds H x context^2 scores


@dataclass(frozen=True)
class Window:
    """One window over the token ids: it runs on ``ids[begin:end]`` and scores ``ids[first:end]``."""

    begin: int
    end: int
    first: int

    @property
    def scored(self) -> int:
        return self.end - self.first

    @property
    def skip(self) -> int:
        """Leading tokens of the window that are context only (at least 1: position 0 has nothing before it)."""
        return self.first - self.begin


def check_integer(v, name: str) -> int:
    """``v`` as an int if it is an integer (not a bool); a MinibloomError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise MinibloomError(f"{name}: must be an integer, got {shown(v)}")
    return int(v)


def check_window_args(context, stride=None) -> tuple[int, int]:
    """(context, stride) checked: 2 <= context <= MAX_CONTEXT, 1 <= stride <= context (default: context // 2)."""
    context = check_integer(context, "context")
    if not 2 <= context <= MAX_CONTEXT:
        raise MinibloomError(f"context: must be from 2 to {MAX_CONTEXT} tokens (a window needs one token of context "
                             f"and one to score), got {context}")
    stride = context // 2 if stride is None else check_integer(stride, "stride")
    if not 1 <= stride <= context:
        raise MinibloomError(f"stride: must be from 1 to the context ({context}), got {stride} (a stride above the "
                             "context would skip tokens)")
    return context, stride


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The guide's windows over ``n_tokens`` ids: begins 0, stride, ..., until one reaches the end."""
    context, stride = check_window_args(context, stride)
    n_tokens = check_integer(n_tokens, "n_tokens")
    if not 0 <= n_tokens <= MAX_TOKENS:
        raise MinibloomError(f"n_tokens: must be from 0 to {MAX_TOKENS}, got {n_tokens}")
    if n_tokens // stride > MAX_WINDOWS:
        raise MinibloomError(f"stride: {n_tokens} tokens in steps of {stride} make more than {MAX_WINDOWS} windows; "
                             "use a larger stride")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))  # targets: the last end - prev_end labels
        prev_end = end
        if end == n_tokens:
            break
    return out
