"""`moefn.opcount` counts on a meta copy what a real forward and backward dispatch."""

from __future__ import annotations

import pytest
import torch

from moefn.adapters.reference import MoETransformer, causal_lm_loss, get_preset
from moefn.opcount import OpTally, count_ops
from moefn.realize.activation_checkpointing import install_checkpoint


def _real(model: torch.nn.Module, ids: torch.Tensor) -> OpTally:
    real = OpTally({})
    with real:
        loss = causal_lm_loss(model(ids, torch.arange(ids.shape[1])[None]), ids, ids.numel())
        real.phase = "backward"
        loss.backward()
    return real


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_counts_on_meta_are_a_real_runs(preset: str) -> None:
    torch.manual_seed(0)
    model = MoETransformer(get_preset(preset)).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    real = _real(model, ids)
    counted = count_ops(model, 16)
    for phase, ops in (("forward", counted.forward), ("backward", counted.backward)):
        n, elements = (sum(v[i] for k, v in real.counts.items() if k[0] == phase)
                       for i in (0, 1))
        # meta dispatches one more op per MoE layer (its expert counts' copy to the CPU); a
        # block counted as the first of its kind moves what the first moves (a copy more)
        assert n <= ops.ops <= n + model.config.n_layers, phase
        assert ops.elements == pytest.approx(elements, rel=0.05), phase
    assert 0 < counted.saved.ops < counted.checkpointed.ops < counted.forward.ops
    # full AC's backward dispatches the blocks' forward again, and a detach or so per tensor
    # it saves (the cost `moefn.calibrate_ops` measures per such op)
    for block in model.layers:
        install_checkpoint(block, "full")
    again = (sum(v[0] for k, v in _real(model, ids).counts.items() if k[0] == "backward")
             - sum(v[0] for k, v in real.counts.items() if k[0] == "backward"))
    assert counted.checkpointed.ops <= again <= 2 * counted.checkpointed.ops
    assert count_ops(model, 16) is counted  # memoised


def test_a_transformers_model_is_counted_with_its_positions() -> None:
    """transformers' causal LMs take ``attention_mask`` second and return a ModelOutput: the
    count calls them as training does (`moefn.train.loop.causal_lm_outputs`); positionally,
    the search crashed on every transformers model."""
    pytest.importorskip("transformers")
    from moefn.adapters.transformers.catalogue import build_tiny

    ops = count_ops(build_tiny("qwen3_moe"), seq_len=16)
    assert ops.backward.ops > ops.forward.ops > ops.checkpointed.ops > ops.saved.ops > 0
