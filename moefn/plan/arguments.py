"""Argument checks at the public entry points: wrong types and values raise moefn's errors.

A wrong type raises `ArgumentTypeError` (a PlanError and a TypeError), a wrong value a
`PlanError`; both name the argument, the value and the fix.

>>> int_at_least(0, "tokens_per_rank")
Traceback (most recent call last):
...
moefn.plan.errors.PlanError: 1 problem:
  tokens_per_rank: must be at least 1 (value: 0) -- fix: pass tokens_per_rank=1 or larger
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from returns.result import Result

from moefn.plan.errors import ArgumentTypeError, PlanError


def shown(value: object) -> str:
    """A short repr of ``value`` for an error message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _type_fix(value: object, expected: str, fix: str) -> str:
    """The fix, or a better one for the two usual slips: a Result and an uncalled factory."""
    if isinstance(value, Result):
        return "call .unwrap() on the Result (or moefn.plan_or_raise(result)) and pass the plan"
    if inspect.isfunction(value) and value.__module__.startswith("moefn."):
        return f"call it: {value.__name__}(...) returns {expected}"
    return fix


def expect_type(value: object, types: type | tuple[type, ...], path: str, expected: str,
                fix: str) -> None:
    """Raise ArgumentTypeError unless ``value`` is an instance of ``types``."""
    if not isinstance(value, types):
        raise ArgumentTypeError.single(path, f"expected {expected}, got {type(value).__name__}",
                                       shown(value), _type_fix(value, expected, fix))


def int_at_least(value: object, path: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; raises otherwise."""
    if type(value) is not int:
        raise ArgumentTypeError.single(path, f"expected an int, got {type(value).__name__}",
                                       shown(value), f"pass a whole number {path}={minimum} or larger")
    if value < minimum:
        raise PlanError.single(path, f"must be at least {minimum}", shown(value),
                               f"pass {path}={minimum} or larger")
    return value


def finite_number(value: object, path: str, minimum: float = 0.0) -> float:
    """``value`` as a float if it is a real number (not a bool) from ``minimum`` to the largest
    float32 (tensors hold it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentTypeError.single(path, f"expected a number, got {type(value).__name__}",
                                       shown(value), f"pass a number such as {path}=1.0")
    if not math.isfinite(value) or not minimum <= value <= torch.finfo(torch.float32).max:
        raise PlanError.single(path, f"must be a float32 number of at least {minimum}",
                               shown(value), f"pass {path}={max(minimum, 1.0)} or another")
    return float(value)


def one_of(value: Any, choices: tuple[str, ...], path: str) -> None:
    """Raise unless ``value`` is one of the text ``choices``."""
    if not isinstance(value, str):
        raise ArgumentTypeError.single(path, f"expected a str, got {type(value).__name__}",
                                       shown(value), f"use one of {choices}")
    if value not in choices:
        raise PlanError.single(path, "unknown choice", shown(value), f"use one of {choices}")


def device_arg(value: str | torch.device, path: str = "device") -> torch.device:
    """``value`` as a torch.device (a str such as "cuda:0", or a torch.device)."""
    expect_type(value, (str, torch.device), path, "a str or torch.device", f'pass {path}="cpu"')
    try:
        return torch.device(value)
    except RuntimeError as err:
        raise PlanError.single(path, "not a device", shown(value),
                               'pass "cpu", "cuda" or "cuda:0"') from err
