"""`moefn.checkpoint` moved to `moefn.train.dcp` (training helpers); this path keeps working."""

from moefn.train.dcp import full_state_dict, load_checkpoint, materialize_from_checkpoint, save_checkpoint

__all__ = ["full_state_dict", "load_checkpoint", "materialize_from_checkpoint", "save_checkpoint"]
