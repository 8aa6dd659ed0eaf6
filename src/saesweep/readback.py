"""Device values the host needs, read without waiting for the device: each is copied into host memory
with a non-blocking copy and an event recorded after it, and handed back once the event has passed.
A training step that read a value at once (`.item()`, `bool()`) would make the host wait for every
kernel queued before it, and a GPU would then idle while the host prepared the next step."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch


class DeviceReadback:
    """A queue of (payload, device tensor) pairs whose tensors travel to the host in the background;
    `ready` hands them back in the order they were put, each with its tensor on the host."""

    def __init__(self):
        self._pending: deque[tuple[Any, torch.Tensor, torch.cuda.Event | None]] = deque()

    def put(self, payload: Any, values: torch.Tensor) -> None:
        """Start copying `values` to the host; `payload` (host data) travels with them."""
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        host.copy_(values, non_blocking=values.is_cuda)
        copied = None
        if values.is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        self._pending.append((payload, host, copied))

    def ready(self, wait: bool) -> Iterator[tuple[Any, torch.Tensor]]:
        """The entries whose copies have reached the host, oldest first; all of them when `wait`
        (which waits for the last copy)."""
        while self._pending:
            payload, host, copied = self._pending[0]
            if copied is not None:
                if not wait and not copied.query():
                    return
                copied.synchronize()
            self._pending.popleft()
            yield payload, host
