"""An ordered, bounded parallel map: results come back in input order, memory stays flat.

``Pool.imap`` reads its whole input eagerly and buffers results without limit; converting a
1.28M-image dataset needs the opposite: at most ``max_chunks_in_flight`` chunks exist at once.

Workers never outlive the process that started them: on Linux each asks the kernel for SIGKILL
when its parent dies (``PR_SET_PDEATHSIG``), which covers a parent killed with SIGKILL; a map left
early (an error, an interrupt, SIGTERM turned into an exception by the command line) kills them
at once instead of waiting for their queued work. With the workers gone, multiprocessing's
resource tracker sees its pipe close and exits too.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: be killed when the parent dies (Linux), and exit if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between our start and the prctl: then we were re-parented already.
    if os.getppid() != parent_pid:
        os._exit(1)


def _apply_chunk(fn: Callable[[In], Out], chunk: list[In]) -> list[Out]:
    return [fn(item) for item in chunk]


def _chunks(items: Iterable[In], size: int) -> Iterator[list[In]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def ordered_map(fn: Callable[[In], Out], items: Iterable[In], workers: int, chunk_size: int = 16) -> Iterator[Out]:
    """``map(fn, items)`` over ``workers`` processes (in-process when workers <= 1)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold threads (progress bars, torch) that fork would copy locked.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
    )
    finished = False
    try:
        yield from _bounded_map(pool, fn, items, workers, chunk_size)
        finished = True
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            _stop_now(pool)


def _bounded_map(
    pool: ProcessPoolExecutor, fn: Callable[[In], Out], items: Iterable[In], workers: int, chunk_size: int
) -> Iterator[Out]:
    max_chunks_in_flight = 4 * workers
    pending: deque[Future] = deque()
    for chunk in _chunks(items, chunk_size):
        pending.append(pool.submit(_apply_chunk, fn, chunk))
        if len(pending) >= max_chunks_in_flight:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Kill the workers now: ``shutdown`` alone would let them finish every queued chunk first."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # private, but there since 3.3
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=5)
