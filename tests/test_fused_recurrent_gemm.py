"""The fused ops' per-step recurrent product (csrc/common.h, ``Recurrent``): the panel GEMM, the BLAS
path and the rule that picks one, through the test op ``rnnkit_fused::recurrent_mm``.

Oracle: torch.mm in float64 (float64 to 1e-12, float32 to 1e-5, both relative to the size of the
sum, sum |a| |w|). The sizes cross every block edge of the panel GEMM: rows 1 to 70 around its
4-row blocks, columns that are and are not a multiple of the panel (24 float32 / 12 float64
columns under AVX2), k of 1, 3 and odd; beta 0 and 1; row strides on a and c (the columns
beside c's must stay untouched); forward (trans, h W^T) and backward (dG W); 1 and 2 threads
(a product above the serial threshold splits its panels over the threads, bit-identically).
Then the process-wide kernel switch on whole layers against the reference backend, and every
error of the two test ops."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS

REASON = BACKENDS["fused"].unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")

KERNELS = {"rule": 0, "blas": 1, "panel": 2}
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 17, 33, 64, 65, 70]
COLS_K = [(80, 33), (99, 3), (259, 1), (7, 64), (24, 24), (12, 5), (48, 130)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture
def ops():
    from rnnkit.fused import _ops
    _ops.load_policy("parallel")  # 2 threads mean 2 threads on a loaded machine too
    before = torch.get_num_threads()
    yield _ops
    torch.set_num_threads(before)
    _ops.load_policy("env")
    _ops.recurrent_kernel("rule")


def _case(rows, cols, k, trans, dtype, g):
    a_full = torch.randn(rows, k + 3, generator=g, dtype=torch.float64)
    w = torch.randn(cols, k, generator=g, dtype=torch.float64) if trans else \
        torch.randn(k, cols, generator=g, dtype=torch.float64)
    c_full = torch.randn(rows, cols + 5, generator=g, dtype=torch.float64)
    return a_full.to(dtype), w.to(dtype), c_full.to(dtype)


def _check(ops, rows, cols, k, trans, beta, kernel, dtype, g):
    a_full, w, c_full = _case(rows, cols, k, trans, dtype, g)
    a = a_full[:, :k]  # row stride k + 3
    out = c_full.clone()
    c = out[:, :cols]  # row stride cols + 5
    ops.recurrent_mm(a, w, c, trans, beta, kernel, 1)
    a64, w64, c64 = a.double(), (w.t() if trans else w).double(), c_full[:, :cols].double()
    want = beta * c64 + a64 @ w64
    scale = (beta * c64.abs() + a64.abs() @ w64.abs()).clamp_min(1.0)
    err = ((c.double() - want).abs() / scale).max().item()
    assert err <= TOL[dtype], f"rows={rows} cols={cols} k={k} trans={trans} beta={beta}: rel err {err:.3g}"
    assert torch.equal(out[:, cols:], c_full[:, cols:]), "the columns beside c changed"


@pytest.mark.parametrize("trans", [True, False], ids=["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_product_against_mm(ops, kernel, dtype, trans):
    """On one thread: every product here but the largest is below the serial threshold (2 threads:
    the next test)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(sum(map(ord, kernel)) + 2 * (dtype == torch.float64) + trans)
    for rows in ROWS:
        for cols, k in COLS_K:
            for beta in (0.0, 1.0):
                _check(ops, rows, cols, k, trans, beta, KERNELS[kernel], dtype, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("trans", [True, False], ids=["fwd", "bwd"])
def test_panel_threads_bit_identical_and_correct(ops, trans, dtype):
    """Above the serial threshold (2^17 multiply-adds) the panels are split over the threads: each
    output element is still one sum in one order, so 1 and 2 threads agree bitwise."""
    g = torch.Generator().manual_seed(3)
    for rows, cols, k in [(9, 4 * 128 + 8, 130), (2, 1000, 131), (65, 3 * 33, 33)]:
        a_full, w, c_full = _case(rows, cols, k, trans, dtype, g)
        a = a_full[:, :k]
        res = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            c = c_full[:, :cols].clone()
            ops.recurrent_mm(a, w, c, trans, 1.0, KERNELS["panel"], 3)  # beta 1, 3 steps: c + 3 a op(w)
            res.append(c)
        assert torch.equal(res[0], res[1])
        want = c_full[:, :cols].double() + 3 * (a.double() @ (w.t() if trans else w).double())
        torch.testing.assert_close(res[0].double(), want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10 * k)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_layers_with_each_kernel_against_reference(ops, cls):
    """The process-wide switch reaches the ops' step loops (forward trans, backward not), and every
    kernel gives the reference backend's results, batch 3 (few rows) and 6."""
    torch.manual_seed(0)
    ref = getattr(rnnkit, cls)(5, 30, backend="reference", dtype=torch.float64)
    fused = getattr(rnnkit, cls)(5, 30, backend="fused", dtype=torch.float64)
    fused.load_state_dict(ref.state_dict())
    for n in (3, 6):
        x = torch.randn(4, n, 5, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        out_r = ref(xr)[0]
        out_r.square().sum().backward()
        for kernel in KERNELS:
            assert ops.recurrent_kernel(kernel) in KERNELS
            xf = x.clone().requires_grad_()
            fused.zero_grad()
            out_f = fused(xf)[0]
            out_f.square().sum().backward()
            torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-10, atol=1e-10)
            for (name, p_r), p_f in zip(ref.named_parameters(), fused.parameters()):
                torch.testing.assert_close(p_f.grad, p_r.grad, rtol=1e-10, atol=1e-10, msg=name)
        ref.zero_grad()
    assert ops.recurrent_kernel("") == "panel"  # "" reads
    assert ops.recurrent_kernel("rule") == "panel"


def test_recurrent_kernel_invalid_mode(ops):
    with pytest.raises(ValueError, match=r"recurrent_kernel: mode='mkl', expected '', 'rule', 'blas' or 'panel'"):
        ops.recurrent_kernel("mkl")
    assert ops.recurrent_kernel("") == "rule"


def _args(**kw):
    a, w, c = torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, 5)
    args = dict(a=a, w=w, c=c, trans=True, beta=0.0, kernel=-1, steps=1)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(a=torch.zeros(4, 3, 1)), RuntimeError, r"a, w and c must be 2-D, got a \[4, 3, 1\]"),
    (dict(w=torch.zeros(5, 3, dtype=torch.float64)), RuntimeError,
     r"a, w and c must all be float32 or all float64, got Float, Double, Float"),
    (dict(a=torch.zeros(4, 3, dtype=torch.int32), w=torch.zeros(5, 3, dtype=torch.int32),
          c=torch.zeros(4, 5, dtype=torch.int32)), RuntimeError, r"must all be float32 or all float64, got Int"),
    (dict(w=torch.zeros(3, 5)), RuntimeError, r"\(trans=1\), w must be \[5, 3\], got \[3, 5\]"),
    (dict(w=torch.zeros(5, 3), trans=False), RuntimeError, r"\(trans=0\), w must be \[3, 5\], got \[5, 3\]"),
    (dict(c=torch.zeros(2, 5)), RuntimeError, r"\(and c must have a's rows\)"),
    (dict(a=torch.zeros(3, 4).t()), RuntimeError, r"a and c need unit column stride .* got strides a \[1, 4\]"),
    (dict(w=torch.zeros(3, 5).t()), RuntimeError, r"w must be contiguous"),
    (dict(beta=0.5), ValueError, r"recurrent_mm: beta=0.5, expected 0 or 1"),
    (dict(kernel=3), ValueError, r"recurrent_mm: kernel=3, expected -1 \(the process-wide setting\)"),
    (dict(steps=0), ValueError, r"recurrent_mm: steps=0, expected at least 1"),
], ids=["dim", "dtype-mixed", "dtype-int", "w-shape-trans", "w-shape", "c-rows", "a-stride", "w-stride", "beta",
        "kernel", "steps"])
def test_recurrent_mm_errors(ops, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        ops.recurrent_mm(**_args(**kw))
