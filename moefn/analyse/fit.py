"""Will it fit? Device sizes from the command line and the fit problem with its fixes (pure).

>>> parse_size("80GiB"), parse_size("1.5 GB")
(85899345920, 1500000000)
>>> reserve_bytes(None, parse_size("80GiB")) == parse_size("8GiB")
True
"""

from __future__ import annotations

import re

from attrs import frozen

from moefn.analyse.render import format_bytes
from moefn.plan.errors import Problem

UNITS: dict[str, int] = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
# What the allocator and framework take beyond the tensors the estimate counts: the CUDA
# context and NCCL's buffers (a few hundred MiB to ~2 GiB) and the caching allocator's
# fragmentation, which grows with the memory in use — hence a share of the device, not a constant
DEFAULT_RESERVE = 0.10


def parse_size(text: str) -> int:
    """Bytes of ``NUMBER UNIT`` (units: `UNITS`); ValueError naming the value and the units.

    >>> try:
    ...     parse_size("80XB")
    ... except ValueError as err:
    ...     print(err)
    '80XB' is not a size: use a number and one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 80GiB)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", text)
    if not match or match.group(2) not in UNITS:
        raise ValueError(f"{text!r} is not a size: use a number and one of "
                         f"{', '.join(UNITS)} (e.g. 80GiB)")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def parse_reserve(text: str) -> int | float:
    """``--reserve``: a size (bytes) or a share of the device such as ``10%`` (a fraction).

    >>> parse_reserve("10%"), parse_reserve("2GiB")
    (0.1, 2147483648)
    """
    share = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", text)
    if share:
        if float(share.group(1)) >= 100:
            raise ValueError(f"--reserve {text!r} leaves nothing: use a share below 100%")
        return float(share.group(1)) / 100
    return parse_size(text)


def reserve_bytes(reserve: int | float | None, device: int) -> int:
    """Bytes set aside on a ``device``-byte GPU (`DEFAULT_RESERVE` of it unless given)."""
    if reserve is None:
        reserve = DEFAULT_RESERVE
    return int(device * reserve) if isinstance(reserve, float) else reserve


@frozen(kw_only=True)
class Alternative:
    """Another layout, re-estimated: what changes and its worst rank's predicted peak."""

    change: str
    peak: int


def fit_problem(peak: int, rank: int, parts: dict[str, int], device: int, reserve: int,
                alternatives: list[Alternative]) -> Problem | None:
    """The problem of a peak above ``device - reserve``, naming the three biggest parts and
    the alternatives that fit (in the given order: cheapest first), else the lowest ones.

    >>> p = fit_problem(90, 0, {"saved": 50, "logits": 30, "params": 10}, 100, 20,
    ...                 [Alternative(change="ac=full", peak=60)])
    >>> p.fix
    'biggest parts: saved 50 B, logits 30 B, params 10 B; fixes that fit: ac=full (60 B)'
    """
    budget = device - reserve
    if peak <= budget:
        return None
    biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
    fitting = [a for a in alternatives if a.peak <= budget][:3]
    shown = fitting or sorted(alternatives, key=lambda a: a.peak)[:3]
    listed = ", ".join(f"{a.change} ({format_bytes(a.peak)})" for a in shown)
    advice = (f"fixes that fit: {listed}" if fitting
              else f"no single change fits; closest: {listed}" if shown
              else "no alternative layout to try")
    return Problem(path="", message="predicted peak exceeds the GPU memory",
                   value=(f"rank {rank}: peak {format_bytes(peak)} > {format_bytes(device)} "
                          f"- reserve {format_bytes(reserve)}"),
                   fix=f"biggest parts: {', '.join(f'{k} {format_bytes(v)}' for k, v in biggest)}; "
                       + advice)
