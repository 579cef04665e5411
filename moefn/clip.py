"""`moefn.clip` moved to `moefn.train.clip` (training helpers); this path keeps working."""

from moefn.train.clip import clip_grad_norm, global_grad_norm

__all__ = ["clip_grad_norm", "global_grad_norm"]
