"""`FSDPMemTracker` for fake tensors: leaves out DTensor's sharding propagation, and knows what the
token dispatchers hold at the peak.

torch 2.13's tracker skips the ops DTensor runs to propagate shapes only when they run under a
*different* fake mode than the one active at the tracker's entry. Under `FakeTensorMode` they do
not: ``ShardingPropagator._propagate_tensor_meta_non_cached`` runs the op on global-shape fake
tensors in the active mode (``detect_fake_mode()``), and the tracker counts those global-size
storages — e.g. AdamW's ``zeros_like`` states of every expert weight at its full, unsharded size.
`FakeTracker` (``skip_propagation=True``) lets every op dispatched inside that method through
uncounted; it is the only place DTensor runs ops for propagation.

Storages first allocated while a `tests.fake_scale.BalancedDispatch` runs (forward) are the
dispatcher's; ``dispatcher_at_peak`` is the bytes of those alive when the peak was reached.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from tests.fake_scale import BalancedDispatch

_CPU = torch.device("cpu")


class FakeTracker(FSDPMemTracker):
    def __init__(self, mod: torch.nn.Module, optm: torch.optim.Optimizer,
                 skip_propagation: bool) -> None:
        super().__init__(mod, optm)
        self.skip_propagation = skip_propagation
        self.propagated = 0  # ops left uncounted
        self.dispatcher_at_peak = 0
        self.peak_where = ""
        self._propagating = 0
        self._known: WeakIdKeyDictionary | None = None  # storages alive when a dispatch began
        self._dispatched = WeakIdKeyDictionary()  # storages a dispatcher allocated
        self._patches = ExitStack()

    def __enter__(self) -> FakeTracker:
        propagate = ShardingPropagator._propagate_tensor_meta_non_cached
        dispatch = BalancedDispatch.__call__
        tracker = self

        def propagating(self: ShardingPropagator, *args: Any) -> Any:
            tracker._propagating += 1
            try:
                return propagate(self, *args)
            finally:
                tracker._propagating -= 1

        def dispatching(self: BalancedDispatch, *args: Any) -> Any:
            tracker._known = WeakIdKeyDictionary(dict.fromkeys(tracker._WINFO.keys()))
            try:
                return dispatch(self, *args)
            finally:
                tracker._known = None

        self._patches.enter_context(mock.patch.object(
            ShardingPropagator, "_propagate_tensor_meta_non_cached", propagating))
        self._patches.enter_context(mock.patch.object(BalancedDispatch, "__call__", dispatching))
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        self._patches.close()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if self._propagating and self.skip_propagation:
            self.propagated += 1
            return func(*args, **(kwargs or {}))
        res = super().__torch_dispatch__(func, types, args, kwargs)
        if self._known is not None and not self._mod_tracker.is_bw:
            for t in tree_leaves(res):
                if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._known:
                    self._dispatched[t.untyped_storage()] = None
        return res

    def _update_peak_stats(self, peak_state: Any) -> None:
        before = self._peak_mem.get(_CPU, 0)
        super()._update_peak_stats(peak_state)
        if self._peak_mem.get(_CPU, 0) > before:
            self.dispatcher_at_peak = sum(self._WINFO[st][0].mem_consumed
                                          for st in self._dispatched.keys() if st in self._WINFO)
            inner = max(self._mod_tracker.parents, key=len)
            self.peak_where = ("backward " if self._mod_tracker.is_bw else "forward ") + inner
