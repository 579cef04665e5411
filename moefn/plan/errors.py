"""Typed errors: every problem names the module path, what is wrong, the value and the fix.

>>> err = PlanError.single("layers.0.mlp.experts", "experts not divisible by ep", "8 vs 3",
...                        "use ep in (1, 2, 4, 8)")
>>> print(err)  # doctest: +NORMALIZE_WHITESPACE
1 problem:
  layers.0.mlp.experts: experts not divisible by ep (value: 8 vs 3) -- fix: use ep in (1, 2, 4, 8)

A problem repeated over layers (same message, value and fix) is printed once, with its count
and the paths' pattern (`group_problems`); ``PlanError.problems`` keeps every path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from attrs import frozen

_INDEX = re.compile(r"(?<![^.])\d+(?=\.|$)")


def path_pattern(path: str) -> str:
    """``path`` with its numeric parts replaced by ``*``.

    >>> path_pattern("layers.12.mlp.experts")
    'layers.*.mlp.experts'
    """
    return _INDEX.sub("*", path)


@frozen(kw_only=True)
class Problem:
    path: str
    message: str
    value: str
    fix: str

    def __str__(self) -> str:
        where = self.path or "(model)"
        return f"{where}: {self.message} (value: {self.value}) -- fix: {self.fix}"


@frozen(kw_only=True)
class ProblemGroup:
    """Problems that differ only in the layer indices of their paths."""

    pattern: str
    paths: tuple[str, ...]
    message: str
    value: str
    fix: str

    @property
    def count(self) -> int:
        return len(self.paths)

    def __str__(self) -> str:
        where = (self.paths[0] if self.count == 1 else f"{self.pattern} ×{self.count}") or "(model)"
        return f"{where}: {self.message} (value: {self.value}) -- fix: {self.fix}"


def group_problems(problems: Iterable[Problem]) -> tuple[ProblemGroup, ...]:
    """Group by (path pattern, message, value, fix), in order of first appearance.

    >>> same = [Problem(path=f"layers.{i}.mlp.experts", message="m", value="v", fix="f")
    ...         for i in range(3)]
    >>> [str(g) for g in group_problems(same)]
    ['layers.*.mlp.experts ×3: m (value: v) -- fix: f']
    """
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for p in problems:
        groups.setdefault((path_pattern(p.path), p.message, p.value, p.fix), []).append(p.path)
    return tuple(ProblemGroup(pattern=pattern, paths=tuple(paths), message=message, value=value,
                              fix=fix)
                 for (pattern, message, value, fix), paths in groups.items())


class PlanError(ValueError):
    """One or more problems found while planning or checking a plan; lists all of them."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("PlanError needs at least one problem")
        super().__init__(self._text())

    @classmethod
    def single(cls, path: str, message: str, value: object, fix: str) -> PlanError:
        return cls([Problem(path=path, message=message, value=str(value), fix=fix)])

    def _text(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''}:"
        return "\n".join([head, *(f"  {g}" for g in group_problems(self.problems))])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlanError) and other.problems == self.problems

    def __hash__(self) -> int:
        return hash(self.problems)

    def __reduce__(self) -> tuple[type[PlanError], tuple[tuple[Problem, ...]]]:
        return (type(self), (self.problems,))


class PlanFormatError(PlanError):
    """A plan file that is malformed, from a newer format version, or carries unexpected types."""


class RealizeError(PlanError):
    """A plan that does not fit the model or mesh it is realized on (nothing was changed)."""


class ArgumentTypeError(PlanError, TypeError):
    """An argument of the wrong type passed to a public function (also a TypeError)."""


class InputError(PlanError):
    """Runtime inputs of a realized model that disagree across the ranks that must share them."""
