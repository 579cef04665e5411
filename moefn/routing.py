"""`moefn.routing` moved to `moefn.train.routing` (training helpers); this path keeps working."""

from moefn.train.routing import global_expert_load, update_expert_bias

__all__ = ["global_expert_load", "update_expert_bias"]
