"""Record the ops that would make the host wait for a GPU, on any device (the CPU twin of
`torch.cuda.set_sync_debug_mode("error")`).

`with record_sync_ops() as ops: ...` lists, in call order, every dispatched op that on CUDA
reads a device value back to the host (`.item()`, `float()`, `bool()`: `_local_scalar_dense`),
has an output size that depends on the data (`nonzero`, `masked_select`, boolean-mask
indexing, `repeat_interleave` without `output_size`, `bincount`, `unique`), or copies Python
data to the device with a blocking copy (`torch.tensor(...)`: `lift_fresh`). `.tolist()`
bypasses the dispatcher: keep it out of the code under test by construction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::masked_select",
    "aten::bincount",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::lift_fresh",
}
_BOOL_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _bool_index(indices: object) -> bool:
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = func._schema.name
        if (
            name in _ALWAYS
            or (name in _BOOL_INDEXED and len(args) > 1 and _bool_index(args[1]))
            or (
                name == "aten::repeat_interleave"
                and isinstance(args[0] if args else None, torch.Tensor)
                and kwargs.get("output_size") is None
                and (len(args) < 4 or args[3] is None)
                and func._overloadname != "self_int"
            )
        ):
            self.ops.append(name)
        return func(*args, **kwargs)


@contextmanager
def record_sync_ops() -> Iterator[list[str]]:
    """Context manager yielding the list of sync-forcing op names recorded inside it."""
    recorder = _Recorder()
    with recorder:
        yield recorder.ops
