"""`moefn.hf` moved to `moefn.adapters.transformers`; `moefn.hf.pretrained` keeps working."""
