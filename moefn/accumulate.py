"""`moefn.accumulate` moved to `moefn.train.accumulate` (training helpers); this path keeps working."""

from moefn.train.accumulate import gradient_sync_enabled, no_gradient_sync

__all__ = ["gradient_sync_enabled", "no_gradient_sync"]
