"""The dtypes a plan names (as torch spells them, without ``torch.``): one table for every package.

>>> DTYPE_BYTES["bfloat16"], DTYPE_BYTES["float8_e4m3fn"], CAST_DTYPES, SHORT_NAMES["bf16"]
(2, 1, ('bfloat16', 'float32', 'float16'), 'bfloat16')
"""

from __future__ import annotations

import torch

DTYPE_BYTES: dict[str, int] = {str(dtype).removeprefix("torch."): dtype.itemsize
                               for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)}
"""Bytes per element of every torch dtype (float8 and complex included: a model may hold them)."""

CAST_DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")
"""What an FSDP unit may gather parameters in or reduce gradients in (``FullyShard``'s
``param_dtype``/``reduce_dtype``; None keeps the parameter's dtype)."""

SHORT_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp32": "float32"}
"""The command line's ``--precision``/``--master-dtype`` names."""
