"""Record the ops that would force a host-device sync on a GPU, on any device (CPU included).

    with SyncRecorder() as rec:
        step()
    assert not rec.ops, rec.ops

The CPU twin of `torch.cuda.set_sync_debug_mode("error")`: a TorchDispatchMode that sees every
aten call and keeps the names of those whose result the host must wait for -- a scalar read
(`aten::_local_scalar_dense`, what `.item()`, `float()`, `int()`, `bool()` call), outputs whose
size depends on the data (`nonzero`, `masked_select`, boolean-mask indexing, `unique`,
`bincount`, `repeat_interleave` without `output_size`). `.tolist()` and `.numpy()` bypass the
dispatcher: keep them out of the code under test by construction.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "bincount", "nonzero_numpy", "argwhere", "masked_scatter",
}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class SyncRecorder(TorchDispatchMode):
    """Collects `ops`: the names of sync-forcing aten calls made while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _ALWAYS:
            self.ops.append(name)
        elif name in _INDEX_OPS and _has_bool_index(args):
            self.ops.append(f"{name} (boolean mask)")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and not _output_size_arg(func, args):
            self.ops.append("repeat_interleave (no output_size)")
        return func(*args, **kwargs)


def _output_size_arg(func, args) -> bool:
    """Whether output_size was passed positionally (the last argument of every overload)."""
    names = [a.name for a in func._schema.arguments]
    return "output_size" in names and len(args) > names.index("output_size") and args[names.index("output_size")] is not None
