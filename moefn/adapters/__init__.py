"""Models moefn brings or reaches: the reference MoE transformer (`reference`) and what
transformers models need at run time (`transformers`: experts and attention implementations,
pretrained loading, full-size presets)."""
