"""Shared helpers of the Triton backend: interpreter detection, the block-size rules of
``tl.dot``, the dot itself (upcast in the interpreter), driver choice and custom-op registration.

Nothing here imports triton at module import: :func:`triton_missing` does, on first call, so
``import rnnkit`` stays free of triton and of its environment (``TRITON_INTERPRET`` is read by
``triton.jit`` when a kernel is *defined*; the kernel modules are imported on first use).
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from ..fused.backend import _bias_sum as bias_sum  # noqa: F401 - ``b_ih + b_hh`` (either may be absent), or None: one definition for both backends

INTERPRET_ENV = "TRITON_INTERPRET"
DRIVER_ENV = "RNNKIT_TRITON_DRIVER"
"""``persistent`` or ``alternating`` forces a driver (tests, benchmarks); unset: by size."""

PERSISTENT_MAX_HIDDEN = 64
"""Largest hidden (and projection) size the persistent driver takes: its program holds the
whole padded ``W_hh`` (``gates * BH * BP`` values) on chip for the whole sequence."""

MIN_DOT = 16
"""Smallest block edge the kernels give ``tl.dot``: NVIDIA GPUs need M, N, K >= 16 for 16-bit
operands (K >= 8 for float32); the interpreter accepts anything, so the rule is checked in code."""

OP_NAMESPACE = "rnnkit_triton"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"triton is not installed or fails to import ({type(err).__name__}: {err})"
    return None


def triton_missing() -> Optional[str]:
    """Why triton cannot be imported, or None."""
    return _import_error()


def block(n: int, lo: int = MIN_DOT) -> int:
    """The power-of-two block edge covering ``n`` (at least ``lo``)."""
    b = lo
    while b < n:
        b *= 2
    return b


def check_dot_block(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    """Assert the ``tl.dot`` shape rule the GPU needs (the interpreter would accept anything):
    every edge a power of two, M and N >= 16, K >= 16 for 16-bit operands and >= 8 for float32."""
    k_min = 16 if dtype in (torch.float16, torch.bfloat16) else 8
    for edge, what in ((m, "M"), (n, "N"), (k, "K")):
        if edge & (edge - 1):
            raise AssertionError(f"tl.dot block {what}={edge} is not a power of two")
    if m < 16 or n < 16 or k < k_min:
        raise AssertionError(f"tl.dot block (M={m}, N={n}, K={k}) for {dtype} breaks the GPU's rule: "
                             f"M, N >= 16 and K >= {k_min}")


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether the kernels must give ``tl.dot`` float32 operands instead of ``dtype`` ones: in the
    interpreter a bfloat16 dot multiplies raw bit patterns (triton-lang/triton#11584), so every
    16-bit dot is upcast there (exact: float32 holds their products)."""
    return interpreting() and dtype in (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype):
    """The Triton dtype of the gate math and the state: float64 for float64 storage, else float32."""
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the kernels keep states and saved activations in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def driver_for(hidden: int, other: int = 0) -> int:
    """0 (persistent) or 1 (alternating): ``RNNKIT_TRITON_DRIVER`` if set, else persistent up to
    :data:`PERSISTENT_MAX_HIDDEN` (hidden and projection size)."""
    forced = os.environ.get(DRIVER_ENV, "").strip().lower()
    if forced in ("persistent", "0"):
        return 0
    if forced in ("alternating", "1"):
        return 1
    if forced:
        raise ValueError(f"{DRIVER_ENV} must be 'persistent' or 'alternating', got {forced!r}")
    return 0 if max(hidden, other) <= PERSISTENT_MAX_HIDDEN else 1


DRIVERS = {0: "persistent", 1: "alternating"}


def rows_per_program(bh: int) -> int:
    """Batch rows per program of an alternating pointwise kernel (the whole padded gate row
    of each, so LayerNorm can reduce over it): about 4096 values a program."""
    return max(1, min(16, 4096 // (4 * bh)))


def lengths_arg(lengths: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``lengths`` as the kernels read it (int32 on ``like``'s device), or a 1-element dummy."""
    if lengths is None:
        return torch.zeros(1, dtype=torch.int32, device=like.device)
    return lengths.to(device=like.device, dtype=torch.int32)


_OPS = {}


def custom_op(name: str, fake: Callable, **kwargs):
    """``torch.library.custom_op`` under :data:`OP_NAMESPACE` with its fake (meta) implementation;
    decorate the real implementation. Defined once per process."""

    def wrap(fn):
        if name in _OPS:
            return _OPS[name]
        op = torch.library.custom_op(f"{OP_NAMESPACE}::{name}", fn, mutates_args=(), **kwargs)
        op.register_fake(fake)
        _OPS[name] = op
        return op

    return wrap


def zeros_if_none(g, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def hprev(h0: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``(L, N, H_out)``: the state each step read, ``h0`` then ``out[:-1]``, in the state dtype."""
    dt = state_dtype(out.dtype)
    return torch.cat([h0.to(dt).unsqueeze(0), out[:-1].to(dt)], 0)


def run_steps(step_loop: Callable[[], None], device: torch.device) -> None:
    """Run an alternating driver's Python step loop (one GEMM and one pointwise kernel a step).

    On CUDA with ``RNNKIT_TRITON_GRAPHS=1`` the loop is captured in a CUDA graph and replayed, so
    the GPU runs the steps back to back without a Python round trip between launches (a capture
    is only worth it when replayed: the benchmark sets it; see docs/gpu.md). In the interpreter,
    and by default, the loop just runs."""
    if device.type == "cuda" and os.environ.get("RNNKIT_TRITON_GRAPHS", "0") == "1" and \
            not torch.cuda.is_current_stream_capturing():
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                step_loop()
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        return
    step_loop()


def project(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``x (L, N, H_in) -> (L, N, G)`` in one GEMM (autograd covers ``W_ih``, the bias and ``x``)."""
    L, N = x.shape[0], x.shape[1]
    x2 = x.reshape(L * N, x.shape[2])
    xp = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
    return xp.view(L, N, w.shape[0])


_MM_DTYPE = {"ok": None}


def rec_weight(w: torch.Tensor) -> torch.Tensor:
    """The alternating driver's forward GEMM operand: ``w`` itself, except 16-bit weights off CUDA
    (the interpreter), given as float32 (exact: float32 holds their products)."""
    if w.dtype in (torch.float16, torch.bfloat16) and w.device.type != "cuda":
        return w.float()
    return w


def rec_mm(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """``out = h W^T`` for the alternating driver, ``out`` in the state dtype: ``h`` rounded to the
    weights' dtype (as the persistent driver's ``tl.dot`` operands), products accumulated and kept in
    float32 (``torch.mm(..., out_dtype=float32)`` on CUDA for 16-bit weights, so no bf16 rounding of the
    recurrent term; a float32 copy of the weights elsewhere, see :func:`rec_weight`)."""
    if w.dtype == out.dtype:
        torch.mm(h.to(w.dtype), w.t(), out=out)
        return
    if w.dtype in (torch.float16, torch.bfloat16):  # CUDA, 16-bit weights
        if _MM_DTYPE["ok"] is not False:
            try:
                out.copy_(torch.mm(h.to(w.dtype), w.t(), out_dtype=out.dtype))
                _MM_DTYPE["ok"] = True
                return
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_DTYPE["ok"] = False
        out.copy_(torch.mm(h.to(w.dtype), w.t()))
        return
    torch.mm(h.to(w.dtype).to(out.dtype) if w.dtype != h.dtype else h, w.t(), out=out)


def twin_backward(twin, inputs, wanted, grads):
    """A differentiable backward (``create_graph=True``, ``torch.func`` transforms): the vector-Jacobian
    product of the op's reference twin (plain PyTorch ops, :mod:`rnnkit.fused.twins`) on the saved
    inputs, taken with ``torch.func.vjp`` so that it can be differentiated again. ``twin(*inputs)``
    returns the op's visible outputs; ``wanted`` are the positions of the inputs to differentiate."""
    result = [None] * len(inputs)
    if not wanted:
        return result

    def visible(*diff):
        args = list(inputs)
        for i, t in zip(wanted, diff):
            args[i] = t
        return twin(*args)

    with torch.enable_grad():
        outs, pullback = torch.func.vjp(visible, *[inputs[i] for i in wanted])
        found = pullback(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)))
    for i, g in zip(wanted, found):
        result[i] = g
    return result
