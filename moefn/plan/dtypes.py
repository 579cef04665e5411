"""The dtypes a plan names (as torch spells them, without ``torch.``): one table for every package.

>>> DTYPE_BYTES["bfloat16"], CAST_DTYPES, SHORT_NAMES["bf16"]
(2, ('bfloat16', 'float32', 'float16'), 'bfloat16')
"""

from __future__ import annotations

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8,
                               "int64": 8, "int32": 4, "int8": 1, "uint8": 1}
"""Bytes per element of each dtype a model's tensors may have."""

CAST_DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")
"""What an FSDP unit may gather parameters in or reduce gradients in (``FullyShard``'s
``param_dtype``/``reduce_dtype``; None keeps the parameter's dtype)."""

SHORT_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp32": "float32"}
"""The command line's ``--precision``/``--master-dtype`` names."""
