"""Threading of the fused kernels (csrc/common.h, "threading by work"): each parallel
piece decides by its own work whether it may use more than one thread, so

* the kernels' results do not depend on torch's thread count: the forward and backward
  ops of RNN (tanh, relu), LSTM (with and without a projection) and GRU give bit-identical
  results with 1 and 2 torch threads, float32 and float64, with and without lengths, at a
  small size (every piece on one thread) and at medium and large sizes (per-step GEMMs on
  MKL's threads, the LSTM's row split on). This holds because every threaded piece splits
  the rows or columns of its output, never a sum: MKL's GEMMs at these shapes, and the row
  split, which gives each thread whole rows;
* whole layers agree to 1e-6 (float32) and 1e-12 (float64) between 1 and 2 threads, not
  bitwise: the input projection ``x W_ih^T + b`` and its gradients are ATen GEMMs outside the
  ops, and MKL's own kernel choice there changes with the thread count (measured: a float64
  (14 x 24) x (24 x 16) ``addmm`` differs by 1.8e-15 between 1 and 2 threads);
* a small problem opens no multi-threaded parallel region inside the ops at all (counted
  in a subprocess with GOMP_parallel wrapped through LD_PRELOAD), while a large one still
  does (its multi-thread speed on an idle machine is kept);
* the per-thread MKL and OpenMP settings the kernels change are restored afterwards;
* forced serial (the under-load policy, ``RNNKIT_FUSED_UNDER_LOAD=serial``: what ``auto`` does on an
  oversubscribed machine), the large ops and an LSTM layer above every threshold, projection and
  autograd included, open no multi-threaded region either.
Every test here runs with the under-load policy forced to ``parallel`` (threading by work alone),
so that a loaded machine does not turn the 2-thread runs serial; tests/test_fused_under_load.py
covers the policy itself.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS

REASON = BACKENDS["fused"].unavailable()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")

# (batch, hidden, steps): small = every piece on one thread (batch < 4: the few-rows kernel, no
# MKL call); medium = per-step GEMMs of 262k to 1 Mi multiply-adds (on MKL's threads, above
# kSerialStepMacs) and 2048 LSTM units per step (row split on with 2 threads); large = above
# every threshold, the weight gradients included.
SIZES = {"small": (2, 16, 7), "medium": (16, 128, 6), "large": (64, 256, 3)}
OPS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]


@pytest.fixture(autouse=True)
def threading_by_work_alone():
    if REASON is not None:
        yield
        return
    from rnnkit.fused import _ops
    _ops.load_policy("parallel")
    yield
    _ops.load_policy("env")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _op_inputs(name, size, dtype, lengths):
    N, H, L = SIZES[size]
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    lens = None
    if lengths:
        lens = torch.randint(0, L + 1, (N,), generator=g)
        lens[0] = L
    G = {"lstm": 4, "lstm_proj": 4, "gru": 3}.get(name, 1) * H
    P = H // 2 if name == "lstm_proj" else H
    return dict(N=N, H=H, L=L, P=P, lens=lens, xp=r(L, N, G, scale=1.0), w_hh=r(G, P), w_hr=r(P, H), b_hh=r(G),
                h0=r(N, P), c0=r(N, H), gy=r(L, N, P, scale=1.0), gh=r(N, P, scale=1.0), gc=r(N, H, scale=1.0))


def _run_op(name, a):
    """The op's forward and backward outputs, every one of them."""
    ops = torch.ops.rnnkit_fused
    if name.startswith("rnn"):
        act = 0 if name == "rnn_tanh" else 1
        fwd = ops.rnn_fwd(a["xp"], a["w_hh"], a["h0"], a["lens"], act)
        bwd = ops.rnn_bwd(a["gy"], a["gh"], a["w_hh"], a["h0"], a["lens"], fwd[0], act)
    elif name.startswith("lstm"):
        w_hr = a["w_hr"] if name == "lstm_proj" else None
        fwd = ops.lstm_fwd(a["xp"], a["w_hh"], w_hr, a["h0"], a["c0"], a["lens"])
        bwd = ops.lstm_bwd(a["gy"], a["gh"], a["gc"], a["w_hh"], w_hr, a["h0"], a["c0"], a["lens"], *fwd[:1], *fwd[3:])
    else:
        fwd = ops.gru_fwd(a["xp"], a["w_hh"], a["b_hh"], a["h0"], a["lens"])
        bwd = ops.gru_bwd(a["gy"], a["gh"], a["w_hh"], a["h0"], a["lens"], fwd[0], fwd[2], fwd[3])
    return [*fwd, *bwd]


@needs_fused
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", OPS)
def test_ops_bit_identical_for_1_and_2_threads(restore_threads, name, size, dtype, lengths):
    a = _op_inputs(name, size, dtype, lengths)
    torch.set_num_threads(1)
    one = _run_op(name, a)
    torch.set_num_threads(2)
    two = _run_op(name, a)
    assert len(one) == len(two)
    for i, (x, y) in enumerate(zip(one, two)):
        assert torch.equal(x, y), f"{name} {size} output {i}: max diff {(x - y).abs().max().item():.3g}"


LAYERS = {
    "rnn_tanh": (rnnkit.RNN, {}),
    "lstm": (rnnkit.LSTM, {}),
    "lstm_proj": (rnnkit.LSTM, {"proj_size": 8}),
    "gru": (rnnkit.GRU, {}),
}


def _run_layer(name, size, dtype, threads, lengths):
    cls, kw = LAYERS[name]
    batch, hidden, steps = SIZES[size]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = cls(24, hidden, num_layers=2, backend="fused", dtype=dtype, **kw)
    x = torch.randn(steps, batch, 24, dtype=dtype, requires_grad=True)
    lens = None
    if lengths:
        lens = torch.randint(0, steps + 1, (batch,), generator=torch.Generator().manual_seed(1))
        lens[0] = steps
    out, state = m(x, lengths=lens) if lens is not None else m(x)
    states = list(state) if isinstance(state, tuple) else [state]
    g = torch.Generator().manual_seed(2)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=dtype)).sum() for t in [out, *states])
    loss.backward()
    assert m.last_backend == "fused"
    return [out.detach(), *[s.detach() for s in states], x.grad] + [p.grad for p in m.parameters()]


@needs_fused
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("size", ["small", "medium"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_agree_for_1_and_2_threads(restore_threads, name, size, dtype, lengths):
    one = _run_layer(name, size, dtype, 1, lengths)
    two = _run_layer(name, size, dtype, 2, lengths)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert len(one) == len(two)
    for i, (a, b) in enumerate(zip(one, two)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name} {size} tensor {i}: {m}")


def _lib_symbol(name):
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    return getattr(lib, name, None)


@needs_fused
def test_thread_settings_restored(restore_threads):
    """After ops that ran their pieces on one thread (small sizes) and on all of torch's
    (large), this thread's torch / OpenMP and MKL counts are what they were."""
    mkl_max = _lib_symbol("MKL_Get_Max_Threads")
    torch.set_num_threads(2)
    before_mkl = mkl_max() if mkl_max else None
    for size in ("small", "large"):
        for name in ("lstm", "gru"):
            _run_layer(name, size, torch.float32, 2, lengths=False)
            assert torch.get_num_threads() == 2
            if mkl_max:
                assert mkl_max() == before_mkl
    conv = rnnkit.ConvLSTM2d(2, 3, 3, backend="fused")  # per-step at::convolution under the OpenMP guard
    out, _ = conv(torch.randn(3, 1, 2, 5, 5))
    out.sum().backward()
    assert conv.last_backend == "fused"
    assert torch.get_num_threads() == 2
    if mkl_max:
        assert mkl_max() == before_mkl


# A shim counting libgomp's GOMP_parallel calls whose team is larger than one thread (MKL's
# GEMMs and the LSTM's row split both open their regions through it).
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
int omp_get_max_threads(void);
static long multi = 0;
long shim_multi(void) { return multi; }
typedef void (*gp_t)(void (*)(void*), void*, unsigned, unsigned);
void GOMP_parallel(void (*fn)(void*), void* data, unsigned nt, unsigned flags) {
  static gp_t real = 0;
  if (!real) real = (gp_t)dlsym(RTLD_NEXT, "GOMP_parallel");
  if ((nt ? (int)nt : omp_get_max_threads()) > 1) __sync_fetch_and_add(&multi, 1);
  real(fn, data, nt, flags);
}
"""

# Calls the ops themselves (not the layers, whose input projection and its autograd are
# ATen's business), forward and backward, and prints the regions each opened.
PROBE = textwrap.dedent("""
    import ctypes, sys
    import torch
    from rnnkit.fused import _build
    assert _build.load() is None
    shim = ctypes.CDLL(sys.argv[1])
    torch.set_num_threads(2)
    ops = torch.ops.rnnkit_fused

    def regions(fn):
        fn()  # warm-up
        before = shim.shim_multi()
        fn()
        return shim.shim_multi() - before

    def cases(N, H, L):
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g) * 0.1
        h0, c0 = r(N, H), r(N, H)
        xr, wr = r(L, N, H), r(H, H)
        xl, wl = r(L, N, 4 * H), r(4 * H, H)
        xg, wg, bg = r(L, N, 3 * H), r(3 * H, H), r(3 * H)
        g_out, g_h = torch.ones(L, N, H), torch.ones(N, H)  # made here: filling them may open a region
        def rnn():
            out, hn = ops.rnn_fwd(xr, wr, h0, None, 0)
            ops.rnn_bwd(g_out, g_h, wr, h0, None, out, 0)
        def lstm():
            out, hn, cn, gates, cs, ms = ops.lstm_fwd(xl, wl, None, h0, c0, None)
            ops.lstm_bwd(g_out, g_h, g_h, wl, None, h0, c0, None, out, gates, cs, ms)
        def gru():
            out, hn, rzn, hns = ops.gru_fwd(xg, wg, bg, h0, None)
            ops.gru_bwd(g_out, g_h, wg, h0, None, out, rzn, hns)
        return {"rnn": rnn, "lstm": lstm, "gru": gru}

    for size, (N, H, L) in {"small": (4, 32, 10), "large": (64, 256, 4)}.items():
        for name, fn in cases(N, H, L).items():
            print(size, name, regions(fn))

    # a whole layer, forward+backward, input projection (the project op) and autograd included
    import rnnkit
    torch.manual_seed(0)
    layer = rnnkit.RNN(32, 32, backend="fused")
    x = torch.randn(10, 1, 32, requires_grad=True)
    def layer_call():
        out, h = layer(x)
        out.sum().backward()
    print("small", "rnn_layer", regions(layer_call))

    # forced serial (what the under-load policy does on an oversubscribed machine): the large ops, and an
    # LSTM layer whose every piece is above its threshold (per-step GEMMs of 1 Mi multiply-adds, the row
    # split, an 8 Mi multiply-add projection), forward and backward; its output (16k elements) is below
    # ATen's grain, so the loss's own sum opens none
    lstm = rnnkit.LSTM(128, 128, backend="fused")
    xm = torch.randn(8, 16, 128, requires_grad=True)
    def lstm_layer_call():
        lstm.zero_grad(set_to_none=True)  # accumulating into a 64k-element .grad would be a region of autograd's
        xm.grad = None
        out, _ = lstm(xm)
        out.sum().backward()
    for mode in ("parallel", "serial"):
        ops.load_policy(mode, -1.0, 0)
        for name, fn in cases(64, 256, 4).items():
            print(mode, name, regions(fn))
        print(mode, "lstm_layer", regions(lstm_layer_call))
""")


@needs_fused
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD shim: Linux only")
def test_small_problems_open_no_parallel_region(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the counting shim")
    libdir = Path(torch.__file__).parent / "lib"
    gomp = next(iter(sorted(libdir.glob("libgomp*.so*"))), None)
    if gomp is None:
        pytest.skip("this torch does not ship libgomp (not an OpenMP build)")
    src, so = tmp_path / "shim.c", tmp_path / "shim.so"
    src.write_text(SHIM)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(so), str(src), "-ldl", f"-L{libdir}", f"-l:{gomp.name}",
                    f"-Wl,-rpath,{libdir}"], check=True, capture_output=True)
    env = dict(os.environ, LD_PRELOAD=str(so), RNNKIT_FUSED_UNDER_LOAD="parallel", PYTHONPATH=os.pathsep.join(
        [str(Path(rnnkit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", PROBE, str(so)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = {}
    for line in run.stdout.splitlines():
        size, name, n = line.split()
        got[(size, name)] = int(n)
    # the batch-1 hidden-32 length-10 RNN layer of issue 13: its projection and backward run on one thread too
    assert got[("small", "rnn_layer")] == 0, f"the RNN layer opened {got[('small', 'rnn_layer')]} regions"
    for name in ("rnn", "lstm", "gru"):
        assert got[("small", name)] == 0, f"{name} at batch 4, hidden 32 opened {got[('small', name)]} regions"
        # large: every step's GEMM (forward and backward) keeps MKL's threads
        assert got[("large", name)] >= 2 * 4, f"{name} at batch 64, hidden 256 opened {got[('large', name)]} regions"
        # forced serial: none, where the same call opened them when parallel
        assert got[("parallel", name)] >= 2 * 4 and got[("serial", name)] == 0, (name, got)
    assert got[("parallel", "lstm_layer")] >= 2 * 8 and got[("serial", "lstm_layer")] == 0, got
