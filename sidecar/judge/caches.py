"""Resizing a bounded cache without losing what it holds.

cachetools fixes a cache's `maxsize` at construction; a new size (an operator changing
`--cache-size` while the sidecar runs) means a new cache. Building an empty one forgot every
verdict, the deny-list and ops-API entries included, so names judged gone were dialled again
until the next restart; these helpers carry the entries over instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from cachetools import TLRUCache

K = TypeVar("K")
V = TypeVar("V")


def resized(
    cache: TLRUCache[K, V],
    maxsize: int,
    ttu: Callable[[K, V, float], float],
    timer: Callable[[], float],
    keep_last: Callable[[V], bool] = lambda _value: False,
) -> TLRUCache[K, V]:
    """A cache of `maxsize` holding `cache`'s live entries, each with its own deadline again.

    When the new size cannot hold them all, the entries `keep_last` picks are inserted last,
    so the cache's own least-recently-used eviction drops the others first."""
    cache.expire()
    items = list(cache.items())
    ordered: Iterable[tuple[K, V]] = [
        *(item for item in items if not keep_last(item[1])),
        *(item for item in items if keep_last(item[1])),
    ]
    fresh: TLRUCache[K, V] = TLRUCache(maxsize=maxsize, ttu=ttu, timer=timer)
    for key, value in ordered:
        fresh[key] = value
    return fresh
