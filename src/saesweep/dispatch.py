"""Counting the aten operators that a piece of code dispatches, and the host syncs among them (the
benchmarks' and tests' measure of a training step's host cost)."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

# operators that make the host wait for the device's result (`.item()`/`bool()` are `_local_scalar_dense`)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2", "unique_consecutive"}


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while it is active, by name. Operators of other namespaces
    pass uncounted: the profiler's `record_function` markers (`profiler::_record_function_enter_new`,
    two per optimizer call) reach the dispatcher too, but launch no work."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.counts[func._schema.name.removeprefix("aten::")] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> dict[str, int]:
        """The host syncs among the counted operators, by name."""
        return {op: n for op, n in self.counts.items() if op in SYNC_OPS}
