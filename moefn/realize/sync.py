"""Whether realize's gradient all-reduce hooks reduce now (`moefn.train.accumulate` pauses them).

>>> gradient_sync_enabled()
True
>>> with sync_hooks_paused():
...     gradient_sync_enabled()
False
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_sync_enabled = True


def gradient_sync_enabled() -> bool:
    """Whether gradient hooks should reduce now (False inside `sync_hooks_paused`)."""
    return _sync_enabled


@contextmanager
def sync_hooks_paused() -> Iterator[None]:
    """Hooks keep gradients aside instead of reducing them; the previous setting returns at exit."""
    global _sync_enabled
    previous = _sync_enabled
    _sync_enabled = False
    try:
        yield
    finally:
        _sync_enabled = previous
