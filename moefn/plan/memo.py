"""Pure analyses of one frozen object, computed once per object (pure).

Planning asks the same question of one spec or plan thousands of times (which modules have a
role, where each parameter lives). `per_object` keeps each answer by the object's identity —
equal specs compare field by field, far slower than the question — and drops it with the
object. The answer is shared: callers must not change it (return immutable types or
``Mapping``).

>>> calls = []
>>> @per_object
... def size(xs: frozenset[int]) -> int:
...     calls.append(1)
...     return len(xs)
>>> s = frozenset({1, 2})
>>> size(s), size(s), len(calls)
(2, 2, 1)
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def per_object(fn: Callable[[T], R]) -> Callable[[T], R]:
    """``fn`` memoized by its argument's identity, each answer dropped with its argument."""
    answers: dict[int, R] = {}

    @functools.wraps(fn)
    def once(obj: T) -> R:
        key = id(obj)
        if key not in answers:
            answers[key] = fn(obj)
            weakref.finalize(obj, answers.pop, key, None)
        return answers[key]

    return once
