"""Run a piece of a test under a time and memory bound, in this process.

``with bounded(seconds=5, megabytes=512): parse(hostile_file)`` fails the test with ``BoundExceeded`` when the code
runs longer than ``seconds`` (a ``SIGALRM`` timer interrupts it) and makes any allocation beyond ``megabytes`` more
address space than the process has now fail with ``MemoryError`` (the soft ``RLIMIT_AS``, restored on exit). A hostile
input that would allocate gigabytes or loop for minutes therefore fails fast instead of passing silently or hanging
CI. POSIX only; elsewhere the bound is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading


class BoundExceeded(AssertionError):
    """The bounded code ran past its time limit."""


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def bounded(seconds: float = 10.0, megabytes: int = 1024):
    try:
        import resource
    except ImportError:  # not POSIX
        yield
        return
    main = threading.current_thread() is threading.main_thread()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + megabytes * 2**20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def timeout(signum, frame):
        raise BoundExceeded(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout) if main else None
    if main:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
