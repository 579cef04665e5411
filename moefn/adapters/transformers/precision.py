"""Parameters a transformers model keeps in float32 when it is stored in a lower precision.

transformers builds a bf16 model with every parameter in bf16 except its
``_keep_in_fp32_modules``; the reference training of hybrid models keeps the mixers' ``A_log``,
``D`` and ``dt_bias`` (and fp32 routers) in float32 too. `keep_fp32` does that to a model, so
moefn's plan keeps them outside bf16 FSDP units (see ``moefn.plan.stages.dtypes``).
"""

from __future__ import annotations

import torch
from torch import nn

from moefn.plan.spec import inspect_model


def keep_fp32(model: nn.Module) -> tuple[str, ...]:
    """Store in float32 the parameters held directly by the modules the recogniser tags
    ``keep_fp32``; the names of those it cast (state-dict keys unchanged)."""
    cast = []
    for path in inspect_model(model).paths_with("keep_fp32"):
        for name, param in model.get_submodule(path).named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
                cast.append(f"{path}.{name}")
    return tuple(cast)
