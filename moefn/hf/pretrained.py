"""`moefn.hf.pretrained` moved to `moefn.adapters.transformers.pretrained`; this path keeps working."""

from moefn.adapters.transformers.pretrained import load_pretrained

__all__ = ["load_pretrained"]
