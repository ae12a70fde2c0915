"""Batches onto the training device: one copy per site per step, the next one in flight.

On a GPU each batch (pinned host memory, from the source's prefetch thread) is copied on a
side stream while the previous step computes; the step's stream waits on the copy's event,
not the host. Conversion to fp32 and scaling happen on the device, in the step. On a CPU the
source's tensors are the batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sae_train.train.sources import ActivationSource


def device_batches(
    source: ActivationSource, position: int, device: torch.device
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """(batch on `device`, the source's position after it) from `source.batches(position)`.

    The position is read when the batch is taken, since on a GPU the next batch is taken (and
    its copy started) before this one is handed out."""
    batches = source.batches(position)
    if device.type != "cuda":
        for batch in batches:
            yield batch, source.position
        return
    copies = torch.cuda.Stream(device)

    def start(host: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event, int]:
        with torch.cuda.stream(copies):
            on_device = {name: t.to(device, non_blocking=True) for name, t in host.items()}
        done = torch.cuda.Event()
        done.record(copies)
        return on_device, done, source.position

    ahead = start(next(batches))
    for host in batches:
        batch, done, after = ahead
        ahead = start(host)
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)
        for t in batch.values():
            t.record_stream(compute)  # made on the copy stream, used (and freed) on this one
        yield batch, after
