"""CPU kernels (sae_kernels.c), compiled on first use and called through ctypes.

Why C and not torch ops: a TopK step is one dense GEMM plus work on k of d_sae latents per
token; `torch.topk`, dense decoding and the elementwise passes of the ReLU family each cost a
sizeable fraction of that GEMM on CPU. The C file has no torch headers, so it builds with the
system compiler in about a second, on first use (`build.py`: where the library is cached,
the fallbacks when the cache cannot be written or `-march=native` is refused, rebuilding a
broken cached library). ctypes releases the GIL. The C code splits work over `torch.get_num_threads()`
threads of torch's own OpenMP team: the loader finds the OpenMP runtime torch already loaded
and hands its `GOMP_parallel` entry point to the library (nothing links a second runtime, and
no extra threads fight torch's spinning workers for cores); plain pthreads otherwise.

Where they are used: `SAE_TRAIN_KERNELS` is "auto" (default), "c" or "torch". "auto" takes the
C path only on builds with vectors of at least 8 floats (AVX2+FMA or AVX-512), the builds
measured to beat PyTorch (benchmarks/sae_kernels.py); narrower builds (SSE-only x86, Arm
NEON, plain C) keep to PyTorch, whose own kernels are vectorised there. "c" takes the C path
on any build (to test or measure it); "torch" never (the slow, obviously-correct path); a
missing compiler also means PyTorch (one warning). `describe()` says which path runs and why.
CUDA tensors always take the PyTorch path.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from sae_train.errors import UserError
from sae_train.sae.kernels import build

ENV_VAR = "SAE_TRAIN_KERNELS"
_MODES = ("auto", "c", "torch")
MIN_WIDTH = 8  # floats per vector below which "auto" keeps to PyTorch
_DT = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_failed = False
_width = 0  # floats per vector of the loaded build (sae_vector_width)


def keep_freed_memory() -> bool:
    """Make glibc recycle freed large buffers instead of unmapping them (process-wide).

    By default glibc returns every buffer above 32 MB to the OS on free, so the next tensor
    of that size is page-faulted in again: ~10-15 ms per 38 MB activation-sized buffer on a
    2-core EPYC, a third of the encoder GEMM. Raising the mmap and trim thresholds keeps the
    memory in the heap for reuse (the process keeps its peak footprint). For the trainer to
    call once at start-up; returns False where glibc's mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


def mode() -> str:
    """The kernel mode requested by the environment: "auto" (default), "c" or "torch"."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise UserError(
            f"{ENV_VAR}={value!r} is not a kernel mode; expected one of {', '.join(_MODES)}. "
            f"Unset it (or set 'auto') to use the compiled CPU kernels where they beat PyTorch, "
            f"'c' to use them on any CPU, 'torch' for plain PyTorch."
        )
    return value


def available() -> bool:
    """True when the compiled kernels are to be used: mode "c" with the library built, or
    mode "auto" with a build whose vectors hold at least MIN_WIDTH floats."""
    requested = mode()
    if requested == "torch" or _library() is None:
        return False
    return requested == "c" or _width >= MIN_WIDTH


def describe() -> str:
    """Which path CPU tensors take, and why (for logs and benchmarks)."""
    requested = mode()
    if requested == "torch":
        return f"PyTorch ({ENV_VAR}=torch)"
    if _library() is None:
        return "PyTorch (the C kernels could not be built)"
    vectors = f"{_width}-float vectors" if _width > 1 else "scalar code"
    if available():
        return f"C kernels ({vectors})"
    return f"PyTorch (the C build has {vectors}; 'auto' takes it from {MIN_WIDTH} floats, {ENV_VAR}=c forces it)"


def supports(t: Tensor) -> bool:
    """Whether a [B, N] matrix can go through the kernels (CPU, fp32/bf16)."""
    return t.device.type == "cpu" and t.dtype in _DT


_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "sae_vector_width": (_I32, []),
    "sae_set_openmp": (None, [_P, _P, _P]),
    "sae_topk_rows": (_I32, [_P, _I32, _I64, _I64, _I64, _P, _P, _I64, _P, _P, _I32]),
    "sae_batch_topk_guess": (_F32, [_P, _I32, _I64, _I64, _I64, _P, _I64]),
    "sae_batch_topk": (_I64, [_P, _I32, _I64, _I64, _I64, _P, _F32, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _I32]),
    "sae_csr_spmm": (None, [_I64, _P, _P, _P, _P, _P, _I32, _I64, _I64, _P, _I64, _I32, _I32, _P, _I32]),
    "sae_gemv": (None, [_P, _P, _P, _I64, _I64, _I32]),
    "sae_csr_decode": (None, [_I64, _P, _P, _P, _P, _I32, _I64, _P, _P, _P, _P, _I32]),
    "sae_decode_backward": (None, [_I64, _P, _P, _P, _I64, _P, _P, _F32, _P, _I32, _I64, _P, _P, _I32, _P, _I32]),
    "sae_decode_train": (None, [_I64, _P, _P, _P, _P, _I32, _I64, _P, _P, _P, _P, _P, _P, _I32, _P, _I32]),
    "sae_csr_transpose": (None, [_I64, _I64, _P, _P, _P, _P, _P, _P, _I32]),
    "sae_auxk_residual": (None, [_P, _P, _P, _P, _I32, _I64, _I64, _P, _I32]),
    "sae_scale_moments": (None, [_P, _F32, _P, _I64, _I64, _P, _P, _P, _I32]),
    "sae_center_cast": (None, [_P, _P, _P, _I32, _I64, _I64, _I32]),
    "sae_rows_sqnorm": (None, [_I64, _I64, _P, _P, _P, _P, _I32]),
    "sae_adam_rows": (None, [_I64, _I64, _P, _P, _P, _P, _P, _F32, _F32, _F32, _F32, _F32, _F32, _F32, _I32, _P, _I32]),
    "sae_act_fwd": (None, [_P, _P, _I32, _I64, _I64, _P, _P, _P, _P, _P, _P, _I32]),
    "sae_act_bwd": (None, [_P, _P, _I32, _I64, _I64, _P, _P, _F32, _P, _P, _P, _P, _P, _P, _I32]),
}


def _torch_openmp() -> tuple[int, int, int] | None:
    """Addresses of GOMP_parallel, omp_get_thread_num and omp_get_num_threads in the OpenMP
    runtime torch loaded (libgomp, or libiomp/libomp, which export the GOMP entry points)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.count("/") else ""
        if os.path.basename(path).startswith(("libgomp", "libiomp", "libomp")) and ".so" in path:
            try:
                rt = ctypes.CDLL(path)  # already loaded: dlopen returns that instance
                fns = (rt.GOMP_parallel, rt.omp_get_thread_num, rt.omp_get_num_threads)
            except (OSError, AttributeError):
                continue
            return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in fns)  # type: ignore[return-value]
    return None


def _library() -> ctypes.CDLL | None:
    global _lib, _load_failed, _width
    if _lib is not None or _load_failed:
        return _lib
    with _lock:
        if _lib is None and not _load_failed:
            try:
                lib = build.load(_SIGNATURES)
                for name, (restype, argtypes) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = restype, argtypes
                omp = _torch_openmp() if torch.backends.openmp.is_available() else None
                if omp is not None:
                    lib.sae_set_openmp(*omp)
                _width = lib.sae_vector_width()
                _lib = lib
            except Exception as exc:  # no compiler, no writable directory, odd platform...
                _load_failed = True
                warnings.warn(
                    f"sae_train: could not build the CPU kernels ({exc}); falling back to plain "
                    f"PyTorch, which is correct but slower. Fix the cause above or set {ENV_VAR}=torch "
                    f"to silence this warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def _lib_or_raise() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("sae_train CPU kernels are not available")
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(t: Tensor, dtype: torch.dtype | tuple[torch.dtype, ...], name: str, *, rows: bool = False) -> None:
    """A CPU tensor of one of `dtypes`, contiguous (rows=True: a matrix whose rows are, at any
    row stride, e.g. a column slice)."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    laid_out = t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1] if rows else t.is_contiguous()
    if t.device.type != "cpu" or t.dtype not in dtypes or not laid_out:
        what = "a CPU matrix with contiguous rows" if rows else "a contiguous CPU tensor"
        raise ValueError(f"{name}: expected {what} of {dtypes}, got {t.dtype} {t.device} {tuple(t.stride())}")


def _threads() -> int:
    return max(1, torch.get_num_threads())


# ----------------------------------------------------------------------------- selection


def topk_rows(z: Tensor, bias: Tensor, k: int, colmask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row, the k largest of z + bias (only columns with colmask set, when given).

    Returns (indices int64 [B, k] ascending within a row, values fp32 [B, k]). Order: value
    descending, NaN first, ties to the lower column index — same as `ops.topk_rows_torch`.
    """
    _check(z, tuple(_DT), "z")
    _check(bias, torch.float32, "bias")
    if colmask is not None:
        _check(colmask, torch.bool, "colmask")
    B, N = z.shape
    if k == N and colmask is None:  # everything is selected
        return torch.arange(N).expand(B, N).contiguous(), z.float() + bias
    idx = torch.empty(B, k, dtype=torch.int64)
    val = torch.empty(B, k, dtype=torch.float32)
    cm = None if colmask is None else colmask.view(torch.uint8)
    err = _lib_or_raise().sae_topk_rows(
        _ptr(z), _DT[z.dtype], B, N, N, _ptr(bias), _ptr(cm), k, _ptr(idx), _ptr(val), _threads()
    )
    if err:
        raise MemoryError("sae_topk_rows: out of memory")
    return idx, val


def batch_topk_guess(z: Tensor, bias: Tensor, expected: int) -> float:
    """A cut (>= 0) that about `expected` entries of z + bias exceed, estimated from a ~64k-entry
    sample (runs of consecutive columns in evenly spaced rows): `batch_topk`'s starting guess."""
    _check(z, tuple(_DT), "z")
    _check(bias, torch.float32, "bias")
    B, N = z.shape
    return float(_lib_or_raise().sae_batch_topk_guess(_ptr(z), _DT[z.dtype], B, N, N, _ptr(bias), expected))


def batch_topk(z: Tensor, bias: Tensor, n_keep: int, guess: float, expected: int) -> tuple[Tensor, Tensor, Tensor]:
    """The n_keep largest positive entries of z + bias over the batch, as CSR (row-major).

    guess: a value (>= 0) expected to leave about `expected` >= n_keep entries above it; a
    guess that leaves too few, or more than the scratch holds, is retried (at 0 / with room
    for everything). Returns (offsets [B+1], column ids [nnz], values [nnz]) — the same
    tensors as `ops.batch_topk_torch(z.float() + bias, n_keep)`.
    """
    _check(z, tuple(_DT), "z")
    _check(bias, torch.float32, "bias")
    B, N = z.shape
    nt = _threads()
    cap = expected + N + 4096  # one thread may hold every expected candidate
    while True:
        cidx = torch.empty(nt * cap, dtype=torch.int32)
        cval = torch.empty(nt * cap, dtype=torch.float32)
        keys = torch.empty(nt * cap, dtype=torch.int32)
        row_cnt = torch.empty(B, dtype=torch.int64)
        offsets = torch.empty(B + 1, dtype=torch.int64)
        idx = torch.empty(n_keep, dtype=torch.int64)
        val = torch.empty(n_keep, dtype=torch.float32)
        nnz = _lib_or_raise().sae_batch_topk(
            _ptr(z), _DT[z.dtype], B, N, N, _ptr(bias), max(0.0, guess), n_keep, cap, _ptr(cidx), _ptr(cval),
            _ptr(keys), _ptr(row_cnt), _ptr(offsets), _ptr(idx), _ptr(val), nt,
        )  # fmt: skip
        if nnz >= 0:
            return offsets, idx[:nnz], val[:nnz]
        if nnz == -3:
            raise MemoryError("sae_batch_topk: out of memory")
        if nnz == -1:
            guess = 0.0
        cap = (B + nt - 1) // nt * N + 16  # room for every entry of a thread's rows


# ----------------------------------------------------------------------------- sparse products


def csr_spmm(
    offsets: Tensor,
    idx: Tensor,
    val: Tensor,
    table: Tensor,
    *,
    perm: Tensor | None = None,
    out: Tensor | None = None,
    transpose_out: bool = False,
    accumulate: bool = False,
    val_sum: Tensor | None = None,
) -> Tensor:
    """out[r] = sum_{e in row r} val[perm[e] or e] * table[idx[e]]: CSR [R, T] times table [T, D].

    table may be fp32 or bf16 (accumulation is fp32); table and out (without transpose_out) may
    be column slices of wider matrices (rows at any stride). With transpose_out the result is
    written as out[:, r] of a [D, R] matrix (no extra pass); with accumulate it is added to
    `out` instead of overwriting it. val_sum [R] fp32, when given, receives each row's sum of
    values in entry order (for a CSC from `csr_transpose`, exactly what index_add_ over the
    CSR entries computes).
    """
    for t, n in ((offsets, "offsets"), (idx, "idx")):
        _check(t, torch.int64, n)
    _check(val, torch.float32, "val")
    _check(table, tuple(_DT), "table", rows=True)
    R, D = offsets.numel() - 1, table.shape[1]
    if out is None:
        out = (torch.zeros if accumulate else torch.empty)((D, R) if transpose_out else (R, D))
    _check(out, torch.float32, "out", rows=not transpose_out)
    if perm is not None:
        _check(perm, torch.int64, "perm")
    if val_sum is not None:
        _check(val_sum, torch.float32, "val_sum")
        if val_sum.numel() != R:
            raise ValueError(f"val_sum: expected {R} values, got {val_sum.numel()}")
    _lib_or_raise().sae_csr_spmm(
        R, _ptr(offsets), _ptr(idx), _ptr(val), _ptr(perm), _ptr(table), _DT[table.dtype], D, table.stride(0),
        _ptr(out), out.stride(0), int(transpose_out), int(accumulate), _ptr(val_sum), _threads(),
    )  # fmt: skip
    return out


def gemv(A: Tensor, x: Tensor) -> Tensor:
    """A @ x for A [R, C] and x [C], fp32: one streaming pass over A."""
    _check(A, torch.float32, "A")
    _check(x, torch.float32, "x")
    if A.dim() != 2 or x.shape != (A.shape[1],):
        raise ValueError(f"gemv: A {tuple(A.shape)} and x {tuple(x.shape)} do not match")
    y = torch.empty(A.shape[0])
    _lib_or_raise().sae_gemv(_ptr(A), _ptr(x), _ptr(y), A.shape[0], A.shape[1], _threads())
    return y


def csr_decode(
    offsets: Tensor, idx: Tensor, val: Tensor, table: Tensor, bias: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """x_hat = CSR @ table + bias and the per-row squared error ||x_hat - target||^2, in one pass."""
    _check(val, torch.float32, "val")
    _check(table, tuple(_DT), "table")
    _check(bias, torch.float32, "bias")
    _check(target, torch.float32, "target")
    R, D = offsets.numel() - 1, table.shape[1]
    out = torch.empty(R, D)
    sse = torch.empty(R)
    _lib_or_raise().sae_csr_decode(
        R, _ptr(offsets), _ptr(idx), _ptr(val), _ptr(table), _DT[table.dtype], D, _ptr(bias), _ptr(target),
        _ptr(out), _ptr(sse), _threads(),
    )  # fmt: skip
    return out, sse


def decode_backward(
    offsets: Tensor,
    idx: Tensor,
    grad: Tensor | None,
    x_hat: Tensor | None,
    target: Tensor | None,
    scale: float,
    table: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of `csr_decode` plus scale * ||x_hat - target||^2 / 2 (the MSE).

    With g = grad + scale * (x_hat - target) (grad, or x_hat and target, may be None), returns
    (<g[r], table[idx[e]]> per entry [nnz], g in table's dtype [R, D], column sums of g in fp32 [D]).
    """
    rows = x_hat if x_hat is not None else grad
    if rows is None or (x_hat is None) != (target is None):
        raise ValueError("decode_backward: give grad, or x_hat and target, or all three")
    if x_hat is not None and target is not None:
        _check(x_hat, torch.float32, "x_hat")
        _check(target, torch.float32, "target")
    _check(table, tuple(_DT), "table")
    if grad is not None:
        _check(grad, torch.float32, "grad")
    R, D = rows.shape
    nt = _threads()
    out = torch.empty(idx.numel(), dtype=torch.float32)
    g = torch.empty(R, D, dtype=table.dtype)
    col = torch.zeros(nt, D, dtype=torch.float32)
    _lib_or_raise().sae_decode_backward(
        R, _ptr(offsets), _ptr(idx), _ptr(grad), D, _ptr(x_hat), _ptr(target), scale, _ptr(table), _DT[table.dtype], D,
        _ptr(out), _ptr(g), _DT[g.dtype], _ptr(col), nt,
    )  # fmt: skip
    return out, g, col.sum(0)


def csr_sddmm(offsets: Tensor, idx: Tensor, grad: Tensor, table: Tensor) -> Tensor:
    """<grad[r], table[idx[e]]> for every entry e of row r [nnz]: the values' gradient of a CSR
    product (`csr_spmm`) whose output has gradient grad [R, D] (fp32; rows at any stride)."""
    _check(grad, torch.float32, "grad", rows=True)
    _check(table, tuple(_DT), "table")
    R, D = grad.shape
    out = torch.empty(idx.numel(), dtype=torch.float32)
    _lib_or_raise().sae_decode_backward(
        R, _ptr(offsets), _ptr(idx), _ptr(grad), grad.stride(0), None, None, 0.0, _ptr(table), _DT[table.dtype], D,
        _ptr(out), None, _DT[table.dtype], None, _threads(),
    )  # fmt: skip
    return out


def scale_moments(x: Tensor, scale: float) -> tuple[Tensor, float]:
    """`(x * scale, var)` for x [B, D] fp32, var = sum_b ||y_b - mean(y)||^2 of y = x * scale,
    in one pass (the product rounds as torch's `x * scale` does; the sums are in double)."""
    _check(x, torch.float32, "x")
    if x.dim() != 2:
        raise ValueError(f"x: expected [B, D], got {tuple(x.shape)}")
    B, D = x.shape
    nt = _threads()
    out = torch.empty_like(x)
    partial = torch.empty(nt, dtype=torch.float64)
    colsum = torch.empty(nt, D, dtype=torch.float64)
    scratch = torch.empty(nt, D, dtype=torch.float32)
    _lib_or_raise().sae_scale_moments(_ptr(x), scale, _ptr(out), B, D, _ptr(partial), _ptr(colsum), _ptr(scratch), nt)
    col = colsum.sum(0)
    return out, float(partial.sum()) - float(col.dot(col)) / max(B, 1)


def center_cast(x: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """`(x - bias).to(dtype)` in one pass (x [B, D] fp32, bias [D] fp32; dtype fp32 or bf16)."""
    _check(x, torch.float32, "x")
    _check(bias, torch.float32, "bias")
    if x.dim() != 2 or bias.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)} and bias {tuple(bias.shape)}: expected [B, D] and [D]")
    out = torch.empty(x.shape, dtype=dtype)
    _check(out, tuple(_DT), "out")
    _lib_or_raise().sae_center_cast(_ptr(x), _ptr(bias), _ptr(out), _DT[dtype], x.shape[0], x.shape[1], _threads())
    return out


def auxk_residual(ehat: Tensor, x: Tensor, x_hat: Tensor) -> tuple[Tensor, float]:
    """AuxK's `(ehat.float() - x + x_hat)` in ehat's dtype (fp32 or bf16), and its squared norm
    (of the fp32 values, summed in double), in one pass. ehat, x, x_hat: [B, D]."""
    _check(ehat, tuple(_DT), "ehat")
    _check(x, torch.float32, "x")
    _check(x_hat, torch.float32, "x_hat")
    if not (ehat.shape == x.shape == x_hat.shape) or ehat.dim() != 2:
        raise ValueError(f"auxk_residual: shapes {tuple(ehat.shape)}, {tuple(x.shape)}, {tuple(x_hat.shape)} differ")
    out = torch.empty_like(ehat)
    nt = _threads()
    partial = torch.empty(nt, dtype=torch.float64)
    _lib_or_raise().sae_auxk_residual(
        _ptr(ehat), _ptr(x), _ptr(x_hat), _ptr(out), _DT[ehat.dtype], x.shape[0], x.shape[1], _ptr(partial), nt
    )
    return out, float(partial.sum())


def decode_train(
    offsets: Tensor, idx: Tensor, val: Tensor, table: Tensor, bias: Tensor, target: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`csr_decode` plus the residual-side work of `decode_backward`, done while each token's
    table rows are still in cache. With res = x_hat - target, returns (x_hat, per-row
    ||res||^2, <res[r], table[idx[e]]> per entry [nnz], res in table's dtype [R, D], column
    sums of res in fp32 [D]): `decode_backward(..., grad=None, scale=s)` is then (s * dots,
    s * res, s * colsum) up to rounding, with no second pass over the table.
    """
    _check(val, torch.float32, "val")
    _check(table, tuple(_DT), "table")
    _check(bias, torch.float32, "bias")
    _check(target, torch.float32, "target")
    R, D = offsets.numel() - 1, table.shape[1]
    nt = _threads()
    out = torch.empty(R, D)
    sse = torch.empty(R)
    dots = torch.empty(idx.numel(), dtype=torch.float32)
    res = torch.empty(R, D, dtype=table.dtype)
    col = torch.zeros(nt, D, dtype=torch.float32)
    _lib_or_raise().sae_decode_train(
        R, _ptr(offsets), _ptr(idx), _ptr(val), _ptr(table), _DT[table.dtype], D, _ptr(bias), _ptr(target),
        _ptr(out), _ptr(sse), _ptr(dots), _ptr(res), _DT[res.dtype], _ptr(col), nt,
    )  # fmt: skip
    return out, sse, dots, res, col.sum(0)


def csr_transpose(offsets: Tensor, idx: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR -> CSC: (column offsets [n_cols+1], row ids [nnz], perm [nnz] into the CSR arrays)."""
    _check(offsets, torch.int64, "offsets")
    _check(idx, torch.int64, "idx")
    nnz = idx.numel()
    coff = torch.empty(n_cols + 1, dtype=torch.int64)
    crow = torch.empty(nnz, dtype=torch.int64)
    perm = torch.empty(nnz, dtype=torch.int64)
    nt = _threads()
    counts = torch.empty(nt, n_cols, dtype=torch.int64)  # scratch: per-thread column counts
    _lib_or_raise().sae_csr_transpose(
        offsets.numel() - 1, n_cols, _ptr(offsets), _ptr(idx), _ptr(coff), _ptr(crow), _ptr(perm), _ptr(counts), nt
    )
    return coff, crow, perm


# ----------------------------------------------------------------------------- dense activations


def act_fwd(
    z: Tensor, out: Tensor, bias: Tensor, thr: Tensor | None, colw: Tensor | None, *, row_sums: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """f = relu(z + bias) (thr None) or JumpReLU (z + bias)*[z + bias > thr], into `out`.

    `out` may be `z` itself. Returns (per-row sum of colw*f or None, per-row count of nonzero
    f as fp32, per-column count of rows where f != 0 as int32).
    """
    _check(z, tuple(_DT), "z")
    _check(out, z.dtype, "out")
    B, N = z.shape
    nt = _threads()
    wsum = torch.empty(B, dtype=torch.float32) if row_sums else None
    cnt = torch.empty(B, dtype=torch.float32)
    col = torch.zeros(nt, N, dtype=torch.int32)
    _lib_or_raise().sae_act_fwd(
        _ptr(z), _ptr(out), _DT[z.dtype], B, N, _ptr(bias), _ptr(thr), _ptr(colw), _ptr(wsum), _ptr(cnt), _ptr(col), nt
    )
    return wsum, cnt, col.sum(0)


def act_bwd(
    g: Tensor,
    ref: Tensor,
    bias: Tensor,
    *,
    thr: Tensor | None = None,
    eps: float = 0.0,
    row_g: Tensor | None = None,
    colw: Tensor | None = None,
    want_colw_grad: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """In place on g: the backward of `act_fwd` (see sae_kernels.c for the formulas).

    Returns per-column sums: (sum of the output gradient, sum of row_g*f (ReLU: grad of colw)
    or None, sum of K*g and sum of K*row_g (JumpReLU, K the rectangle window) or None).
    """
    _check(g, tuple(_DT), "g")
    _check(ref, g.dtype, "ref")
    B, N = g.shape
    nt = _threads()
    jump = thr is not None

    def acc(flag: bool) -> Tensor | None:
        return torch.zeros(nt, N, dtype=torch.float32) if flag else None

    col_g = torch.zeros(nt, N, dtype=torch.float32)
    col_w, col_wg, col_wr = acc(want_colw_grad), acc(jump), acc(jump and row_g is not None)
    _lib_or_raise().sae_act_bwd(
        _ptr(g), _ptr(ref), _DT[g.dtype], B, N, _ptr(bias), _ptr(thr), eps, _ptr(row_g), _ptr(colw),
        _ptr(col_g), _ptr(col_w), _ptr(col_wg), _ptr(col_wr), nt,
    )  # fmt: skip

    def total(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.sum(0)

    return col_g.sum(0), total(col_w), total(col_wg), total(col_wr)


# ----------------------------------------------------------------------------- optimizer step


def _rows(t: Tensor) -> tuple[int, int]:
    """A parameter as [R, D] rows (1-D: one row)."""
    return (1, t.numel()) if t.dim() < 2 else (t.shape[0], t[0].numel())


def rows_sqnorm(g: Tensor, w: Tensor | None = None) -> tuple[float, Tensor | None]:
    """Squared norm of a gradient, with w: of its projection off the rows of w.

    With w [R, D] (same shape as g) returns (sum_r ||g_r - c_r w_r||^2, c) where c_r =
    <g_r, w_r> / max(||w_r||^2, 1e-12) is what `SAE.project_grads_` removes; without w,
    (||g||^2, None). Accumulated in fp32 per row, in double across rows.
    """
    _check(g, torch.float32, "g")
    R, D = _rows(g)
    coef = None
    if w is not None:
        _check(w, torch.float32, "w")
        if w.shape != g.shape:
            raise ValueError(f"w {tuple(w.shape)} and g {tuple(g.shape)} differ")
        coef = torch.empty(R, dtype=torch.float32)
    nt = _threads()
    partial = torch.empty(nt, dtype=torch.float64)
    _lib_or_raise().sae_rows_sqnorm(R, D, _ptr(g), _ptr(w), _ptr(coef), _ptr(partial), nt)
    return float(partial.sum()), coef


def adam_rows(
    p: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    clip: float = 1.0,
    coef: Tensor | None = None,
    normalize: bool = False,
    shadow: Tensor | None = None,
) -> None:
    """One Adam step on p in place, as `torch._fused_adam_` computes it (amsgrad, maximize and
    weight decay off; `step` already incremented), on the gradient clip * (g - coef[:, None] *
    p) (coef None: clip * g); then, with normalize, every row of p divided by its norm
    (clamped at 1e-12), and with shadow, p rounded to bf16 written there. g is not modified.
    """
    for t, n in ((p, "p"), (g, "g"), (exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
        _check(t, torch.float32, n)
        if t.shape != p.shape:
            raise ValueError(f"{n}: shape {tuple(t.shape)} differs from the parameter's {tuple(p.shape)}")
    R, D = _rows(p)
    if coef is not None:
        _check(coef, torch.float32, "coef")
        if coef.numel() != R:
            raise ValueError(f"coef: expected {R} values, got {coef.numel()}")
    if shadow is not None:
        _check(shadow, torch.bfloat16, "shadow")
        if shadow.shape != p.shape:
            raise ValueError(f"shadow: shape {tuple(shadow.shape)} differs from the parameter's {tuple(p.shape)}")
    # the constants exactly as torch's fused CPU Adam forms them (double, then float)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    _lib_or_raise().sae_adam_rows(
        R, D, _ptr(p), _ptr(g), _ptr(exp_avg), _ptr(exp_avg_sq), _ptr(coef), clip, -(lr / bias_correction1),
        1 - beta1, beta2, 1 - beta2, math.sqrt(bias_correction2), eps, int(normalize), _ptr(shadow), _threads(),
    )  # fmt: skip
