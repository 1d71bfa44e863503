"""The thread policy: how many compute threads a fold (or an emit) may use, and torch's share.

One number, the *budget* (``--threads``, ``Merger(threads=...)``), bounds the compute threads of
a fold at every moment: our fold threads × torch's intra-op threads ≤ budget.

- Work we spread ourselves (elementwise chunks, OPCM's whole tensors on ``per_tensor_parallel``
  rules) runs on ``budget`` threads of ours, torch single-threaded inside each.
- Work we do not spread (a serial rule's whole-tensor fold, an emit) runs on the caller's thread
  with torch's intra-op pool set to ``budget``.

Our threads take the next piece of work when they finish one, so a thread that the machine
deschedules delays only its own piece; torch's OpenMP teams split work evenly and wait for the
slowest member at every barrier, which is what made folds 7× slower on a busy machine. Torch's
thread count is set for the fold only and restored afterwards: a library user's
``torch.set_num_threads`` is not changed for good.

Default budget: ``$CONTMERGE_THREADS``, else ``$OMP_NUM_THREADS``, else the cores this process may
run on (``os.sched_getaffinity``: a container's or ``taskset``'s limit), at most
``DEFAULT_MAX_THREADS`` (memory bandwidth, not arithmetic, bounds most folds).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import SettingError

THREADS_ENV = "CONTMERGE_THREADS"
#: more threads than this rarely help a fold (bandwidth-bound), and crowd a shared machine
DEFAULT_MAX_THREADS = 4


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The budget when none is given: the environment's, else the cores we may use, capped."""
    for variable in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(variable, "").strip()
        if text:
            # OMP_NUM_THREADS may be a list per nesting level ("4,2"): the outer level counts
            return parse_threads(text.split(",")[0], f"${variable}")
    return min(DEFAULT_MAX_THREADS, available_cores())


def parse_threads(text: str, what: str = "--threads") -> int:
    """A thread count from text: a whole number of at least 1, else a SettingError."""
    try:
        value = int(text)
    except ValueError:
        raise SettingError(f"{what} must be a whole number of threads, got {text!r}") from None
    return check_threads(value, what)


def check_threads(value: object, what: str = "threads") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"{what} must be a whole number of threads >= 1, got {value!r}")
    return value


def resolve_threads(threads: int | None, workers: int | None = None) -> int:
    """The budget from ``threads`` or its older name ``workers`` (the same meaning)."""
    if threads is not None and workers is not None and threads != workers:
        raise SettingError(
            f"threads={threads} and workers={workers} disagree: workers is the older name of "
            "threads; give one"
        )
    given = threads if threads is not None else workers
    return default_threads() if given is None else check_threads(given)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block, restored afterwards. Threads
    started inside take ``count`` on at their first torch op."""
    import torch  # here: the CLI parses --threads without importing torch

    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
