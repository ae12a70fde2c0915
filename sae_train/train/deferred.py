"""Small device tensors read by the host later, without stalling the device now.

A training step must not make the host wait for the device: the host would stop queueing
work ahead of it. What the host has to act on (a non-finite loss, a stop signal agreed by
every rank) is therefore copied to host memory asynchronously at the end of a step and read
one step later, when the device has long finished that copy and the next step is queued.
"""

from __future__ import annotations

import torch


class DeferredRead:
    """A snapshot of a small tensor, copied to (pinned) host memory without blocking."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.detach().clone()
        self._values: list[float] | None = None

    def read(self) -> list[float]:
        """The values (waits for the copy, i.e. for the step that made them, on first read)."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._host.tolist()
        return self._values
