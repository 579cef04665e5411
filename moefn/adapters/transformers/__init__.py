"""Hugging Face transformers (>= 5) MoE causal-LM models under moefn (optional: ``moefn[hf]``).

Planning works on a transformers model as on the reference model: a recogniser tags its decoder
layers, attention, routers, fused experts, embeddings and lm_head. ``realize`` then reaches the
model only through transformers' own extension points:

- EP registers an experts implementation ``"moefn"`` (``ExpertsInterface``) that sends tokens
  through moefn's dispatcher and runs this rank's experts in the HF layout, and switches the
  model's config to it;
- CP registers an attention implementation ``"moefn"`` (``AttentionInterface``) that keeps the
  local queries and all-gathers K/V over ``cp`` (causal mask from global ``position_ids``);
- router-saving AC records each router's top-k in forward and replays it on recompute (forward
  hooks on the router modules; see `moefn.adapters.transformers.experts.install_router_replay`).

Nothing here imports transformers at import time, so ``import moefn`` works without it.
"""
