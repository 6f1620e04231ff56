"""A dict of at most `size` entries, for caches of facts that never change once
known (a run's owner, lineage, mode; a hold's pricing): forgetting one costs a
read, never a wrong answer, and the process's memory stays bounded."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(OrderedDict[K, V]):
    """Forgets the least recently written entry once it holds more than `size`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)
