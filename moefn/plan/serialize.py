"""Plan JSON: data only (no pickle, no eval), with a format version and strict type checks.

>>> from moefn.plan.mesh import MeshSpec
>>> from moefn.plan.spec import ModelSpec
>>> model = ModelSpec(family="demo", root_class="Demo", modules=(), tensors=(), tied=())
>>> plan = ShardPlan.empty(model, MeshSpec(dp_shard=2))
>>> from_json(to_json(plan)) == plan
True
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import attrs

from moefn.plan.arguments import expect_type
from moefn.plan.errors import PlanError, PlanFormatError, Problem
from moefn.plan.records import STAGE_ORDER, ActivationCheckpoint, ShardPlan

FORMAT = "moefn.plan"
VERSION = 3  # 2: the plan records its stages' options (``options``); 3: the mesh's ``tp``
# fields a file may lack (each has a default), by record: field → the newest version whose
# files may lack it (ranks_per_node and comm came within version 1; options with version 2;
# tp with version 3; kv_heads within version 3)
ADDED_FIELDS: dict[str, dict[str, int]] = {"InstallDispatch": {"ranks_per_node": 1},
                                           "ContextParallelAttention": {"comm": 1},
                                           "ShardPlan": {"options": 1},
                                           "MeshSpec": {"tp": 2},
                                           "TensorParallel": {"kv_heads": 3}}
# a record's "record" name where it is not its class name: plans keep the names they were
# first written with
RECORD_NAMES: dict[type, str] = {ActivationCheckpoint: "Checkpoint"}


def _name(cls: type) -> str:
    return RECORD_NAMES.get(cls, cls.__name__)


def _encode(value: Any) -> Any:
    if attrs.has(type(value)):
        out: dict[str, Any] = {"record": _name(type(value))}
        for f in attrs.fields(type(value)):
            out[f.name] = _encode(getattr(value, f.name))
        return out
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} in a plan")


def to_json(plan: ShardPlan, indent: int | None = None) -> str:
    """The plan as JSON text (format "moefn.plan", version `VERSION`)."""
    expect_type(plan, ShardPlan, "plan", "a ShardPlan", "pass the plan (result.unwrap())")
    return json.dumps({"format": FORMAT, "version": VERSION, "plan": _encode(plan)},
                      indent=indent, sort_keys=False)


class _Bad(Exception):
    def __init__(self, where: str, message: str, value: object) -> None:
        super().__init__(message)
        self.where, self.message, self.value = where, message, value


def _decode(tp: Any, data: Any, where: str, version: int) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if data not in typing.get_args(tp) or isinstance(data, bool) != any(
                isinstance(a, bool) for a in typing.get_args(tp)):
            raise _Bad(where, f"expected one of {typing.get_args(tp)}", data)
        return data
    if origin in (typing.Union, types.UnionType):
        named = [o for o in typing.get_args(tp) if isinstance(o, type) and attrs.has(o)
                 and isinstance(data, dict) and data.get("record") == _name(o)]
        if named:  # the record names its type: report errors inside it, not "matches none"
            return _decode(named[0], data, where, version)
        errors = []
        for option in typing.get_args(tp):
            try:
                return _decode(option, data, where, version)
            except _Bad as err:
                errors.append(err.message)
        raise _Bad(where, "matches none of: " + "; ".join(errors), _short(data))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(data, list):
            raise _Bad(where, "expected a list", _short(data))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]", version) for i, v in enumerate(data))
        if len(args) != len(data):
            raise _Bad(where, f"expected {len(args)} items", _short(data))
        return tuple(_decode(a, v, f"{where}[{i}]", version) for i, (a, v) in
                     enumerate(zip(args, data, strict=True)))
    if tp is type(None):
        if data is not None:
            raise _Bad(where, "expected null", _short(data))
        return None
    if tp in (int, str, bool):
        if type(data) is not tp:
            raise _Bad(where, f"expected {tp.__name__}", _short(data))
        return data
    if isinstance(tp, type) and attrs.has(tp):
        return _decode_record(tp, data, where, version)
    raise _Bad(where, f"unsupported type {tp}", _short(data))


def _decode_record(cls: type, data: Any, where: str, version: int) -> Any:
    if not isinstance(data, dict) or data.get("record") != _name(cls):
        raise _Bad(where, f"expected a {_name(cls)} object", _short(data))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in attrs.fields(cls)}
    extra = set(data) - names - {"record"}
    optional = {n for n, last in ADDED_FIELDS.get(_name(cls), {}).items() if version <= last}
    missing = names - set(data) - optional
    if extra or missing:
        raise _Bad(where, f"fields differ (unexpected {sorted(extra)}, missing {sorted(missing)})",
                   _name(cls))
    kwargs = {n: _decode(hints[n], data[n], f"{where}.{n}", version) for n in names & set(data)}
    try:
        return cls(**kwargs)
    except PlanError as err:
        raise _Bad(where, "invalid values: " + "; ".join(p.message for p in err.problems),
                   _short(data)) from err


def _short(data: Any) -> str:
    text = json.dumps(data) if not isinstance(data, str) else repr(data)
    return text if len(text) <= 80 else text[:77] + "..."


def from_json(text: str) -> ShardPlan:
    """Parse a plan; raises PlanFormatError naming the offending field on any deviation."""
    try:
        doc = json.loads(text)
    except (ValueError, TypeError, RecursionError) as err:
        raise PlanFormatError([Problem(path="(plan file)", message="not valid JSON",
                                       value=str(err), fix="pass the output of to_json(plan)")]
                              ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlanFormatError([Problem(path="(plan file)", message="not a moefn plan",
                                       value=_short(doc), fix=f'expected "format": "{FORMAT}"')])
    version = doc.get("version")
    if type(version) is not int or version > VERSION or version < 1:
        raise PlanFormatError([Problem(
            path="(plan file).version", message="unsupported plan format version",
            value=repr(version), fix=f"this moefn reads versions 1..{VERSION}; upgrade moefn")])
    try:
        plan: ShardPlan = _decode(ShardPlan, doc.get("plan"), "plan", version)
    except _Bad as bad:
        raise PlanFormatError([Problem(path=bad.where, message=bad.message, value=str(bad.value),
                                       fix="regenerate the plan with moefn")]) from None
    if list(plan.stages) != sorted(set(plan.stages), key=STAGE_ORDER.index):
        raise PlanFormatError([Problem(path="plan.stages", message="stages repeated or out of order",
                                       value=repr(list(plan.stages)), fix="regenerate the plan with moefn")])
    if version > 1 and tuple(o.stage for o in plan.options) != plan.stages:
        raise PlanFormatError([Problem(
            path="plan.options", message="options do not match the stages (one record each, "
            "in order)", value=repr([_name(type(o)) for o in plan.options]),
            fix="regenerate the plan with moefn")])
    return plan

