"""BoundedDict: the replicas' caches of facts that never change stay bounded."""

from __future__ import annotations

from runcap_server.bounded import BoundedDict


def test_it_forgets_the_least_recently_written_past_its_size() -> None:
    cache: BoundedDict[str, int] = BoundedDict(2)
    cache["a"] = 1
    cache["b"] = 2
    cache["a"] = 3  # written again: now the newest
    cache["c"] = 4
    assert dict(cache) == {"a": 3, "c": 4}
    assert cache.get("b") is None
