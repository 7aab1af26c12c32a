"""A dict with a size bound, for memos on hot paths: when full, the next insert starts it afresh.

Why not an LRU: the memos this serves (decided Checks, canonical hosts) are re-filled by the next requests
at the cost of one slow-path decision each, while an LRU's bookkeeping would be paid on every hit of the hot
path. Lookups are the plain ``dict.get`` (C, atomic under the GIL), so readers on several threads need no
lock; an insert racing a reset loses at most that one entry.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["BoundedDict"]

_K = TypeVar("_K")
_V = TypeVar("_V")


class BoundedDict(dict[_K, _V]):
    """A dict that holds at most `limit` entries (0: holds nothing).

    Args:
        limit: the bound.
    """

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: _K, value: _V) -> None:
        """Insert `key`, emptying the dict first when it is full."""
        if len(self) >= self.limit:
            if self.limit <= 0:
                return
            self.clear()
        self[key] = value
