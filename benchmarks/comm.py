"""Count collectives as the process group sees them: every c10d / functional collective op that
passes the dispatcher (forward and backward), with its payload (bytes of the op's output)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_NAMESPACES = ("c10d", "_c10d_functional")
_SKIP = ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier")


class CommCounter(TorchDispatchMode):
    """``with CommCounter() as c: step()`` → ``c.calls`` and ``c.bytes`` per collective kind."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace in _NAMESPACES and not any(s in name for s in _SKIP):
            kind = name.strip("_").removesuffix("_").replace("_base", "")
            self.calls[kind] += 1
            tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if func.namespace == "c10d":  # in-place ops: the output buffer is the first arg
                tensors = [t for t in tree_leaves(args[:1]) if isinstance(t, torch.Tensor)]
            self.bytes[kind] += sum(t.numel() * t.element_size() for t in tensors)
        return out

    def summary(self) -> dict[str, dict[str, int]]:
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k]} for k in sorted(self.calls)}
