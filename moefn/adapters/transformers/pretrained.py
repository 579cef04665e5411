"""Pretrained transformers weights at scale: fill a realized model straight from the checkpoint's
safetensors files, each rank reading only the slices of its own shards.

Realize the model on the meta device first (no rank ever allocates the full model); then
`load_pretrained` allocates each rank's shards on ``device`` and reads them. Checkpoint layouts
are converted where transformers converts them on load: per-expert ``experts.{e}.gate_proj /
up_proj / down_proj`` (Mixtral: ``block_sparse_moe.experts.{e}.w1 / w3 / w2``) become the fused
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``; keys already fused (GPT-OSS) load as is.
Non-persistent buffers (rotary ``inv_freq``) are rebuilt from the module's config.

>>> import tempfile
>>> from transformers import AutoModelForCausalLM, Qwen3MoeConfig
>>> config = Qwen3MoeConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
...                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
...                         vocab_size=32)
>>> path = tempfile.mkdtemp()
>>> AutoModelForCausalLM.from_config(config).save_pretrained(path)
>>> with torch.device("meta"):
...     model = AutoModelForCausalLM.from_config(config)
>>> model = load_pretrained(model, path, device="cpu")  # realize(plan, model, meshes) first
>>> any(p.is_meta for p in model.parameters())
False
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moefn.plan.arguments import device_arg, expect_type
from moefn.plan.errors import PlanError, Problem
from moefn.plan.hf_roles import is_fused_experts
from moefn.train.dcp import restore_non_persistent_buffers

EXPERT_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
MODULE_RENAMES = ((".mlp.", ".block_sparse_moe."),)  # model path piece → checkpoint path piece
Region = tuple[slice, ...]


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory (sharded with an index file, or single-file)."""

    def __init__(self, path: str | Path, files: ExitStack) -> None:
        from safetensors import safe_open

        root = Path(path)
        index = root / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(p.name for p in root.glob("*.safetensors"))
        if not names:
            raise PlanError.single(str(root), "no safetensors files", str(root),
                                   "pass a directory written by save_pretrained")
        handles = {n: files.enter_context(safe_open(str(root / n), framework="pt")) for n in names}
        self._where = {key: handle for handle in handles.values() for key in handle.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def read(self, key: str, region: Region) -> Tensor:
        """The ``region`` of tensor ``key`` (only those bytes are read)."""
        part: Tensor = self._where[key].get_slice(key)[region]
        return part


def local_region(param: Tensor) -> Region:
    """The global index ranges this rank holds of ``param`` (all of it unless a DTensor)."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def _candidates(path: str) -> Iterator[str]:
    yield path
    for ours, theirs in MODULE_RENAMES:
        if ours in path:
            yield path.replace(ours, theirs)


def _expert_key(ckpt: SafetensorsCheckpoint, experts_path: str, expert: int, role: str) -> str:
    for base in _candidates(experts_path):
        for name in EXPERT_NAMES[role]:
            key = f"{base}.{expert}.{name}.weight"
            if key in ckpt:
                return key
    raise KeyError(f"{experts_path}.{expert}.{'/'.join(EXPERT_NAMES[role])}.weight")


def _read_fused(ckpt: SafetensorsCheckpoint, experts_path: str, name: str, region: Region,
                rows: int) -> Tensor:
    """Rows of fused ``gate_up_proj`` ([gate; up] per expert) or ``down_proj`` from per-expert keys."""
    experts, out_rows, cols = region
    stacked = []
    for e in range(experts.start, experts.stop):
        if name == "down_proj":
            stacked.append(ckpt.read(_expert_key(ckpt, experts_path, e, "down"), (out_rows, cols)))
            continue
        half = rows // 2
        pieces = [ckpt.read(_expert_key(ckpt, experts_path, e, role), (slice(lo, hi), cols))
                  for role, lo, hi in (("gate", max(out_rows.start, 0), min(out_rows.stop, half)),
                                       ("up", max(out_rows.start - half, 0), out_rows.stop - half))
                  if hi > lo]
        stacked.append(torch.cat(pieces))
    return torch.stack(stacked)


def _direct_key(ckpt: SafetensorsCheckpoint, key: str) -> str | None:
    return next((c for c in _candidates(key) if c in ckpt), None)


def _fused_shape(ckpt: SafetensorsCheckpoint, module_path: str, name: str,
                 num_experts: int) -> tuple[int, ...] | None:
    """The fused shape the per-expert tensors of ``module_path`` make (None if absent)."""
    try:
        roles = ("down",) if name == "down_proj" else ("gate", "up")
        shapes = [ckpt.shape(_expert_key(ckpt, module_path, e, role))
                  for e in (0, num_experts - 1) for role in roles]
    except KeyError:
        return None
    rows = sum(shape[0] for shape in shapes[:len(roles)])
    return (num_experts, rows, shapes[0][1])


def _problem(ckpt: SafetensorsCheckpoint, model: nn.Module, key: str, tensor: Tensor) -> str | None:
    """Why the checkpoint cannot fill ``key`` (None when it can)."""
    direct = _direct_key(ckpt, key)
    module_path, _, name = key.rpartition(".")
    if direct is not None:
        found: tuple[int, ...] | None = ckpt.shape(direct)
    elif name in ("gate_up_proj", "down_proj") and is_fused_experts(model.get_submodule(module_path)):
        found = _fused_shape(ckpt, module_path, name, tensor.shape[0])
    else:
        found = None
    if found is None:
        return "not in the checkpoint"
    return None if found == tuple(tensor.shape) else f"shape {list(found)} in the checkpoint"


def _read(ckpt: SafetensorsCheckpoint, key: str, tensor: Tensor) -> Tensor:
    region = local_region(tensor)
    direct = _direct_key(ckpt, key)
    if direct is not None:
        return ckpt.read(direct, region)
    module_path, _, name = key.rpartition(".")
    return _read_fused(ckpt, module_path, name, region, tensor.shape[1])


def load_pretrained(model: nn.Module, path: str | Path, device: torch.device | str) -> nn.Module:
    """Allocate ``model`` (realized, usually on meta) on ``device`` and read this rank's shards of
    every parameter and persistent buffer from the safetensors checkpoint at ``path``.

    Raises PlanError listing the model keys the checkpoint lacks (the model is left untouched).
    """
    expect_type(model, nn.Module, "model", "an nn.Module", "pass the realized model")
    expect_type(path, (str, Path), "path", "a str or Path",
                'pass the checkpoint directory, e.g. "path/to/checkpoint"')
    device = device_arg(device)
    with ExitStack() as files:
        ckpt = SafetensorsCheckpoint(path, files)
        problems = [Problem(path=key, message=why, value=f"model {list(t.shape)}, {path}",
                            fix="pass the checkpoint written for this model's config")
                    for key, t in _stored(model) if (why := _problem(ckpt, model, key, t))]
        if problems:
            raise PlanError(problems)
        model.to_empty(device=device)
        with torch.no_grad():
            for key, tensor in _stored(model):
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                local.copy_(_read(ckpt, key, tensor).to(local.dtype))
    restore_non_persistent_buffers(model, device)
    return model


def _stored(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Parameters and persistent buffers: what a checkpoint holds."""
    modules = dict(model.named_modules())
    buffers = [(key, b) for key, b in model.named_buffers()
               if key.rpartition(".")[2] not in modules[key.rpartition(".")[0]]._non_persistent_buffers_set]
    return [*model.named_parameters(), *buffers]
