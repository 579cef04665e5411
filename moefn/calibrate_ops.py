"""What an op of eager training code costs here, for `moefn.calibrate` (ranks already running).

The representative op is one of a small pre-norm SwiGLU model (`_Block`: RMSNorm, two
linears, SiLU, a residual; tiny tensors, so the time is the ops' own: Python modules,
dispatch, autograd), run forward and backward: seconds per op it dispatches (counted as
`moefn.opcount` counts). Checkpointing its blocks as ``plan_ac`` would (``full``,
``selective``) costs more per op each block dispatches forward: recompute, saved-tensor hooks
and, for ``selective``, the per-op policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from moefn.opcount import OpTally
from moefn.realize.activation_checkpointing import install_checkpoint

HIDDEN, TOKENS, BLOCKS = 16, 4, 8


def busy(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call of ``fn`` while every rank calls its own back to back for ``seconds``
    (after a warm-up and a barrier): what a rank gets while all local ranks compute."""
    fn()
    dist.barrier()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or not calls:
        fn()
        calls += 1
    return elapsed / calls


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(self.norm(x)).chunk(2, dim=-1)
        out: torch.Tensor = x + self.down(nn.functional.silu(gate) * up)
        return out


def _model(ac: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*(_Block() for _ in range(BLOCKS)))
    if ac != "none":
        for block in model:
            install_checkpoint(block, ac)
    return model


def op_costs(busy_s: float) -> dict[str, float]:
    """``op_overhead_s`` (per op, forward and backward) and, per op the checkpointed blocks
    dispatch forward, what ``full`` and ``selective`` checkpointing add (``checkpoint_op_s``,
    ``selective_op_s``)."""
    x = torch.ones(TOKENS, HIDDEN, requires_grad=True)
    seconds = {}
    for ac in ("none", "full", "selective"):
        model = _model(ac)
        seconds[ac] = busy(lambda m=model: m(x).sum().backward(), busy_s)  # type: ignore[misc]
    tally = OpTally({})
    with tally:
        loss = _model("none")(x).sum()
        tally.phase = "backward"
        loss.backward()
    ops = sum(v[0] for v in tally.counts.values())
    forward = sum(v[0] for k, v in tally.counts.items() if k[0] == "forward")
    return {"op_overhead_s": seconds["none"] / ops,
            "checkpoint_op_s": max(seconds["full"] - seconds["none"], 0.0) / forward,
            "selective_op_s": max(seconds["selective"] - seconds["none"], 0.0) / forward}
