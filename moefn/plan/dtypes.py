"""The dtypes a plan names (as torch spells them, without ``torch.``): one table for every package.

>>> DTYPE_BYTES["bfloat16"], DTYPE_BYTES["float8_e4m3fn"], CAST_DTYPES, SHORT_NAMES["bf16"]
(2, 1, ('bfloat16', 'float32', 'float16'), 'bfloat16')

The table is written out, not read from torch, so the command line starts without importing
torch; it is every dtype torch 2.13 has:

>>> import torch
>>> DTYPE_BYTES == {str(dtype).removeprefix("torch."): dtype.itemsize
...                 for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)}
True
"""

from __future__ import annotations

_NAMES_BY_SIZE: dict[int, str] = {
    1: ("uint8 int8 bool qint8 quint8 quint4x2 quint2x4 bits1x8 bits2x4 bits4x2 bits8"
         " float8_e5m2 float8_e4m3fn float8_e5m2fnuz float8_e4m3fnuz uint1 uint2 uint3"
         " uint4 uint5 uint6 uint7 int1 int2 int3 int4 int5 int6 int7 float8_e8m0fnu"
         " float4_e2m1fn_x2"),
    2: "int16 float16 bfloat16 bits16 uint16",
    4: "int32 float32 complex32 qint32 uint32",
    8: "int64 float64 complex64 uint64",
    16: "complex128",
}
DTYPE_BYTES: dict[str, int] = {name: size for size, names in _NAMES_BY_SIZE.items()
                               for name in names.split()}
"""Bytes per element of every torch dtype (float8 and complex included: a model may hold them)."""

CAST_DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")
"""What an FSDP unit may gather parameters in or reduce gradients in (``FullyShard``'s
``param_dtype``/``reduce_dtype``; None keeps the parameter's dtype)."""

SHORT_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp32": "float32"}
"""The command line's ``--precision``/``--master-dtype`` names."""
