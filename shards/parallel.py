"""An ordered, bounded parallel map: results come back in input order, memory stays flat.

``Pool.imap`` reads its whole input eagerly and buffers results without limit; converting a
1.28M-image dataset needs the opposite: at most ``max_chunks_in_flight`` chunks exist at once.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


def _apply_chunk(fn: Callable[[In], Out], chunk: list[In]) -> list[Out]:
    return [fn(item) for item in chunk]


def _chunks(items: Iterable[In], size: int) -> Iterator[list[In]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def ordered_map(
    fn: Callable[[In], Out], items: Iterable[In], workers: int, chunk_size: int = 16
) -> Iterator[Out]:
    """``map(fn, items)`` over ``workers`` processes (in-process when workers <= 1)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    max_chunks_in_flight = 4 * workers
    # spawn, not fork: the parent may hold threads (progress bars, torch) that fork would copy locked.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[Future] = deque()
        for chunk in _chunks(items, chunk_size):
            pending.append(pool.submit(_apply_chunk, fn, chunk))
            if len(pending) >= max_chunks_in_flight:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
