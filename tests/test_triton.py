"""The triton backend (rnnkit/triton/): every layer it covers against the reference backend
(outputs, final states, every gradient), both drivers, in float32 (tight) and bfloat16 (loose),
opcheck and gradcheck of its ops in float64, and every reason it declines with.

Without a GPU the kernels run on CPU tensors through Triton's interpreter: ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is *defined*, and rnnkit defines them on first use, so the
module-scoped fixture below sets it for these tests only (restored afterwards, so that no other
test sees a runnable triton backend). With CUDA and ``TRITON_INTERPRET`` unset, they run on the GPU.
Interpreted kernels are slow (a few ms per op): sizes are tiny, each case covers several axes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from helpers import flatten_states, weighted_sum

pytest.importorskip("triton", reason="triton is not installed")

from rnnkit.triton import _common as C  # noqa: E402

TRITON = BACKENDS["triton"]
ON_GPU = torch.cuda.is_available() and not C.interpreting()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module", autouse=True)
def interpret():
    """TRITON_INTERPRET=1 for this module (the CPU run), restored afterwards."""
    if ON_GPU:
        yield
        return
    old = os.environ.get(C.INTERPRET_ENV)
    os.environ[C.INTERPRET_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[C.INTERPRET_ENV]
        else:
            os.environ[C.INTERPRET_ENV] = old


def _perturb_ln(module):
    """LayerNorm gains and shifts off their 1 / 0 init, so that they matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("ln_"):
                p.add_((torch.rand(p.shape, generator=g, dtype=torch.float64) - 0.5).to(p.dtype))


def _run(module, x, hx, lengths):
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    out, h_n = module(x, hx if len(hx) > 1 else hx[0], lengths=lengths)
    states = flatten_states(h_n)
    # the loss in float64 on the CPU: weighted_sum draws its weights in the tensors' dtype
    grads = torch.autograd.grad(weighted_sum([t.double().cpu() for t in (out, *states)]), [x, *hx, *module.parameters()])
    names = ["input"] + [f"state{i}" for i in range(len(hx))] + [n for n, _ in module.named_parameters()]
    return [("output", out), *[(f"final state {i}", s) for i, s in enumerate(states)],
            *[(f"grad {n}", g) for n, g in zip(names, grads)]]


def _compare(cls, dtype, batch, hidden, layers=1, bidir=False, lengths=True, seq=3, **kw):
    """``cls`` on backend 'triton' in ``dtype`` against the reference backend in float64 on the same
    parameters, input, initial state and lengths (one of them 0, one full)."""
    torch.manual_seed(0)
    ref = cls(5, hidden, num_layers=layers, bidirectional=bidir, backend="reference", dtype=torch.float64, **kw)
    _perturb_ln(ref)
    tri = cls(5, hidden, num_layers=layers, bidirectional=bidir, backend="triton", dtype=dtype, device=DEVICE, **kw)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(seq, batch, 5, dtype=torch.float64)
    n_states = len(ref.cell_spec.state_names)
    d = 2 if bidir else 1
    sizes = [getattr(ref, "proj_size", 0) or hidden] + [hidden] * (n_states - 1)
    hx = tuple(0.5 * torch.randn(d * layers, batch, s, dtype=torch.float64) for s in sizes)
    lens = None
    if lengths:
        lens = torch.randint(1, seq + 1, (batch,))
        lens[0], lens[-1] = seq, 0
    want = _run(ref, x, hx, lens)
    got = _run(tri, x.to(DEVICE, dtype), tuple(h.to(DEVICE, dtype) for h in hx),
               None if lens is None else lens.to(DEVICE))
    assert tri.last_backend == "triton"
    for (what, a), (_, b) in zip(got, want):
        a = a.double().cpu()
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")
        else:  # 16-bit storage, float32 math and states: relative to the tensor's scale
            scale = b.abs().max().item() + 1e-3
            err = (a - b).abs().max().item()
            assert err <= 0.05 * scale, f"{what}: max error {err:.3g} for scale {scale:.3g}"


# (class, kwargs): every layer of this backend's part
LAYERS = {
    "rnn_tanh": (rnnkit.RNN, {}),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}),
    "lstm": (rnnkit.LSTM, {}),
    "lstm_proj": (rnnkit.LSTM, {"proj_size": 7}),
    "gru": (rnnkit.GRU, {}),
    "peephole_lstm": (rnnkit.PeepholeLSTM, {}),
    "layernorm_lstm": (rnnkit.LayerNormLSTM, {}),
    "layernorm_gru": (rnnkit.LayerNormGRU, {}),
}
DRIVERS = ["persistent", "alternating"]
# each layer runs its large case on one driver and its small case on the other (alternating by layer),
# so both drivers see every layer; the interpreter is slow, so no case is run twice
BIG = {name: DRIVERS[i % 2] for i, name in enumerate(LAYERS)}
SMALL = {name: DRIVERS[1 - i % 2] for i, name in enumerate(LAYERS)}
NO_BIAS = {"lstm", "gru", "layernorm_gru"}  # also without biases (and without lengths) in their small case


@pytest.mark.parametrize("name", list(LAYERS))
def test_float32_bidirectional_two_layers_lengths(name, monkeypatch):
    """Batch 17 (two 16-row programs of the persistent driver), hidden 33 (a 64 block, half padding)."""
    monkeypatch.setenv(C.DRIVER_ENV, BIG[name])
    cls, kw = LAYERS[name]
    _compare(cls, torch.float32, batch=17, hidden=33, layers=2, bidir=True, **kw)


@pytest.mark.parametrize("name", list(LAYERS))
def test_float32_small(name, monkeypatch):
    """Batch 3, hidden 20, one layer, on the other driver; lengths, or no bias and no lengths."""
    monkeypatch.setenv(C.DRIVER_ENV, SMALL[name])
    cls, kw = LAYERS[name]
    if name in NO_BIAS:
        kw = {**kw, "bias": False, "lengths": False}
    _compare(cls, torch.float32, batch=3, hidden=20, **kw)


@pytest.mark.parametrize("name", list(LAYERS))
def test_bfloat16(name, monkeypatch):
    monkeypatch.setenv(C.DRIVER_ENV, SMALL[name])
    cls, kw = LAYERS[name]
    _compare(cls, torch.bfloat16, batch=3, hidden=20, **kw)


def test_float16_lstm(monkeypatch):
    monkeypatch.setenv(C.DRIVER_ENV, "persistent")
    _compare(rnnkit.LSTM, torch.float16, batch=3, hidden=20, proj_size=4)


def test_empty_sequence_and_default_driver(monkeypatch):
    """L = 0 (the ops; the layers refuse it): no kernel runs, the states pass through; the default
    driver is chosen by size."""
    from rnnkit.triton import lstm
    monkeypatch.delenv(C.DRIVER_ENV, raising=False)
    assert C.driver_for(64) == 0 and C.driver_for(65) == 1 and C.driver_for(20, 80) == 1
    h0 = torch.randn(2, 4, device=DEVICE, requires_grad=True)
    c0 = torch.randn(2, 4, device=DEVICE)
    out, h, c = lstm.lstm_sequence(torch.zeros(0, 2, 16, device=DEVICE), torch.randn(16, 4, device=DEVICE), h0, c0,
                                   None)
    assert out.shape == (0, 2, 4)
    torch.testing.assert_close(h, h0)
    torch.testing.assert_close(c, c0)
    (g,) = torch.autograd.grad(h.sum(), h0)
    torch.testing.assert_close(g, torch.ones_like(g))


# ------------------------------------------------------------------ the ops: opcheck, gradcheck (float64)


def _op_cases():
    from rnnkit.triton import gru, lstm, rnn
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return (0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_(grad)

    L, N, H, P = 2, 2, 3, 2
    lens = torch.tensor([2, 1], device=DEVICE)
    return {
        # projection, peepholes and LayerNorm at once (the kernel's flags are independent), each driver
        "lstm_all": (lstm.lstm_fwd, [r(L, N, 4 * H), r(4 * H, P), r(P, H), r(H), r(H), r(H), r(4 * H) + 1, r(H) + 1,
                                     r(H), r(N, P), r(N, H), lens, 1e-5, 0], 3),
        "lstm_all_alt": (lstm.lstm_fwd, [r(L, N, 4 * H), r(4 * H, P), r(P, H), r(H), r(H), r(H), r(4 * H) + 1,
                                         r(H) + 1, r(H), r(N, P), r(N, H), lens, 1e-5, 1], 3),
        "gru": (gru.gru_fwd, [r(L, N, 3 * H), r(3 * H, H), r(3 * H), None, r(N, H), lens, 1e-5, 0], 2),
        "ln_gru_alt": (gru.gru_fwd, [r(L, N, 3 * H), r(3 * H, H), r(3 * H), r(3 * H) + 1, r(N, H), lens, 1e-5, 1], 2),
        "rnn_relu": (rnn.rnn_fwd, [r(L, N, H), r(H, H), r(N, H), lens, 1, 0], 2),
        "rnn_tanh_alt": (rnn.rnn_fwd, [r(L, N, H), r(H, H), r(N, H), None, 0, 1], 2),
    }


@pytest.mark.parametrize("case", ["lstm_all", "lstm_all_alt", "gru", "ln_gru_alt", "rnn_relu", "rnn_tanh_alt"])
def test_gradcheck_float64(case):
    op, args, visible = _op_cases()[case]
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    wrt = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*diff):
        full = list(args)
        for i, t in zip(wrt, diff):
            full[i] = t
        return op(*full)[:visible]

    assert torch.autograd.gradcheck(f, [args[i] for i in wrt], fast_mode=True, atol=1e-6)


@pytest.mark.parametrize("case", ["lstm_all_alt", "ln_gru_alt", "rnn_relu"])
def test_opcheck(case):
    op, args, _ = _op_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_block_rule_is_checked():
    """The interpreter takes any dot shape; the GPU's rule is asserted in code."""
    C.check_dot_block(16, 32, 16, torch.bfloat16)
    C.check_dot_block(16, 16, 8, torch.float32)
    with pytest.raises(AssertionError, match="K >= 16"):
        C.check_dot_block(16, 16, 8, torch.bfloat16)
    with pytest.raises(AssertionError, match="not a power of two"):
        C.check_dot_block(16, 24, 16, torch.float32)
    assert C.block(20) == 32 and C.block(3) == 16 and C.block(33) == 64


def test_driver_env_is_checked(monkeypatch):
    monkeypatch.setenv(C.DRIVER_ENV, "fastest")
    with pytest.raises(ValueError, match="RNNKIT_TRITON_DRIVER must be 'persistent' or 'alternating', got 'fastest'"):
        C.driver_for(8)


# ------------------------------------------------------------------ availability and what it declines


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(C, "triton_missing", lambda: "triton is not installed (test)")
    assert TRITON.unavailable() == "triton is not installed (test)"
    monkeypatch.undo()
    monkeypatch.delenv(C.INTERPRET_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = TRITON.unavailable()
    assert reason.startswith("no CUDA device, and TRITON_INTERPRET is not set")
    with pytest.raises(ValueError, match="backend='triton' cannot run this configuration: no CUDA device"):
        rnnkit.LSTM(3, 4, backend="triton")
    assert rnnkit.describe_backends()["triton"] == reason


def test_declines_with_reasons():
    with pytest.raises(ValueError, match="no triton kernel for the 'rnn_gelu' cell"):
        rnnkit.RNN(3, 4, nonlinearity="gelu", backend="triton")
    with pytest.raises(ValueError, match="the triton kernels have no recurrent dropout"):
        rnnkit.LSTM(3, 4, recurrent_dropout=0.2, backend="triton")
    with pytest.raises(ValueError, match="the triton kernels run float32, float16, bfloat16 and float64, got "
                                         "parameters of dtype torch.complex64"):
        rnnkit.GRU(3, 4, backend="triton", dtype=torch.complex64)
    lstm = rnnkit.LSTM(3, 4, backend="triton")
    assert TRITON.unsupported(lstm, torch.randn(2, 3, device=DEVICE)) == \
        "the triton kernels take (L, N, H_in) inputs, got 2-D"
    if not ON_GPU:
        assert TRITON.unsupported(lstm, torch.randn(2, 1, 3, device="meta")) == \
            "the triton kernels run on CUDA or the CPU, got input on meta"


@pytest.mark.skipif(importlib.util.find_spec("rnnkit.triton.elementwise") is not None,
                    reason="the elementwise kernels are written (part B)")
def test_part_b_families_declined_until_written():
    with pytest.raises(ValueError, match="the triton kernels for the 'min_gru' cell are not written yet"):
        rnnkit.MinGRU(3, 4, backend="triton")


def test_auto_never_picks_triton_on_cpu():
    lstm = rnnkit.LayerNormLSTM(3, 4)
    out, _ = lstm(torch.randn(2, 1, 3))
    assert lstm.last_backend != "triton"
    assert "triton" not in rnnkit.backends.auto_order(lstm, torch.randn(2, 1, 3))


class _CudaLike:
    """Stands in for a CUDA input where there is none: auto_order reads its device and shape only."""
    device = torch.device("cuda")
    shape = (10, 16, 3)

    def dim(self):
        return 3


def test_auto_order_on_cuda_follows_the_table(monkeypatch):
    monkeypatch.setattr(type(TRITON), "unavailable", lambda self: None)
    lstm = rnnkit.LSTM(3, 64)
    x = _CudaLike()
    # unmeasured: torch (cuDNN) first, then triton before the reference loop
    assert TRITON.auto_order(lstm, x, ["torch", "reference"]) == ["torch", "triton", "reference"]
    monkeypatch.setattr(TRITON, "_table", {"gpus": {"Fake GPU": {"lstm_lengths": {"b16_h64": "triton"}}}})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert TRITON.table_choice(lstm, x, torch.ones(16)) == "triton"
    assert TRITON.auto_order(lstm, x, ["torch", "reference"], torch.ones(16))[0] == "triton"
    assert TRITON.auto_order(lstm, x, ["torch", "reference"]) == ["torch", "triton", "reference"]
    # the CPU never gets it
    assert TRITON.auto_order(lstm, torch.randn(10, 16, 3), ["torch", "reference"]) == ["torch", "reference"]


def test_gpu_bench_dry_run(tmp_path):
    """benchmarks/gpu_bench.py --dry-run: the GPU benchmark's code on CPU tensors through the
    interpreter (its own process: it sets TRITON_INTERPRET before importing triton)."""
    import json
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "dry.json"
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(C.DRIVER_ENV, None)
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_bench.py"), "--dry-run", "--cells",
                           "lstm", "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["dry_run"] is True
    ran = {(r["label"], r["lengths"], r["backend"]) for r in result["rows"]}
    assert ran == {("flashrnn", False, "triton"), ("flashrnn", False, "torch"), ("flashrnn", False, "reference"),
                   ("grid", False, "triton"), ("grid", False, "torch"), ("grid", False, "reference"),
                   ("grid", True, "triton"), ("grid", True, "torch"), ("grid", True, "reference")}
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in result["rows"])
    assert result["skipped"] == []


@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU, rnnkit.RNN])
def test_second_derivatives_match_reference(cls):
    """create_graph=True: the backward runs the op's reference twin, so it can be differentiated again."""
    torch.manual_seed(0)
    ref = cls(3, 4, backend="reference", dtype=torch.float64)
    tri = cls(3, 4, backend="triton", dtype=torch.float64, device=DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    results = []
    for m, xx in ((ref, x.clone().requires_grad_()), (tri, x.to(DEVICE).requires_grad_())):
        out, _ = m(xx, lengths=torch.tensor([2, 1]))
        (gx,) = torch.autograd.grad((out ** 2).sum(), xx, create_graph=True)
        results.append([g.cpu() for g in torch.autograd.grad((gx ** 2).sum(), [xx, m.weight_hh_l0])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls, kw", [(rnnkit.IndRNN, {}), (rnnkit.IndRNN, {"nonlinearity": "tanh"}),
                                     (rnnkit.MinGRU, {}), (rnnkit.MinLSTM, {})],
                         ids=["indrnn_relu", "indrnn_tanh", "mingru", "minlstm"])
def test_elementwise_second_derivatives_match_reference(cls, kw):
    """The elementwise driver (IndRNN, the Min cells) under create_graph=True: its backward runs the op's
    reference twin, so the gradient can be differentiated again (gradient penalties, Hessian-vector products),
    with lengths; equal to the reference backend's."""
    torch.manual_seed(0)
    ref = cls(3, 4, backend="reference", dtype=torch.float64, **kw)
    tri = cls(3, 4, backend="triton", dtype=torch.float64, device=DEVICE, **kw)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    results = []
    for m, xx in ((ref, x.clone().requires_grad_()), (tri, x.to(DEVICE).requires_grad_())):
        out, _ = m(xx, lengths=torch.tensor([3, 2]))
        assert m.last_backend == ("reference" if m is ref else "triton")
        params = [p for p in m.parameters()]
        (gx,) = torch.autograd.grad((out ** 2).sum(), xx, create_graph=True)
        results.append([g.cpu() for g in torch.autograd.grad((gx ** 2).sum(), [xx, *params])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_second_derivatives_of_combined_flags_are_refused():
    from rnnkit.triton import lstm
    op, args, _ = _op_cases()["lstm_all"]
    out = op(*args)[0]
    with pytest.raises(NotImplementedError, match="second derivatives with more than one of proj_size"):
        torch.autograd.grad(out.sum(), args[0], create_graph=True)
    assert lstm.lstm_fwd is op


# ----------------------------------------------------------------------------- the compiler's view (no GPU needed)

_MATRIX_COMPILE_CHECK = r'''
import itertools, os, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rnnkit.triton import _common as C, gru as TG, lstm as TL, rnn as TR

assert not C.interpreting(), "the kernels must be compiled ones here"
target = GPUTarget("cuda", 90, 32)  # H100 / H200
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
         torch.int32: "i32", torch.int64: "i64"}
launched = []


class Record:  # stands in for a kernel: records what the driver launches (nothing runs)
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launched.append((self.fn, args, kwargs))


for mod, names in ((TL, ("_lstm_fwd_kernel", "_lstm_bwd_kernel")), (TG, ("_gru_fwd_kernel", "_gru_bwd_kernel")),
                   (TR, ("_rnn_fwd_kernel", "_rnn_bwd_kernel"))):
    for name in names:
        setattr(mod, name, Record(getattr(mod, name)))

L, N, H = 3, 5, 20
for dt, driver, has_len in itertools.product((torch.float32, torch.bfloat16), (0, 1), (False, True)):
    lengths = torch.tensor([3, 1, 2, 3, 0]) if has_len else None
    r = lambda *s: torch.randn(*s, dtype=dt)
    for variant in ("plain", "proj", "peep", "ln"):
        P, G = 16 if variant == "proj" else H, 4 * H
        w_hr = r(P, H) if variant == "proj" else None
        pe = [r(H) for _ in range(3)] if variant == "peep" else [None] * 3
        lw = [r(G), r(H), r(H)] if variant == "ln" else [None] * 3
        xp, w_hh, h0, c0 = r(L, N, G), r(G, P), r(N, P), r(N, H)
        saved = TL.lstm_forward(xp, w_hh, w_hr, *pe, *lw, h0, c0, lengths, 1e-5, driver)
        TL.lstm_backward(r(L, N, P), r(N, P), r(N, H), xp, w_hh, w_hr, *pe, *lw, h0, c0, lengths, driver, saved[0],
                         *saved[3:])
    for ln in (False, True):
        xp, w_hh, h0 = r(L, N, 3 * H), r(3 * H, H), r(N, H)
        saved = TG.gru_forward(xp, w_hh, r(3 * H), r(3 * H) if ln else None, h0, lengths, 1e-5, driver)
        TG.gru_backward(r(L, N, H), r(N, H), xp, w_hh, r(3 * H), r(3 * H) if ln else None, h0, lengths, driver,
                        saved[0], *saved[2:6])
    for act in (0, 1):
        xp, w_hh, h0 = r(L, N, H), r(H, H), r(N, H)
        saved = TR.rnn_forward(xp, w_hh, h0, lengths, act, driver)
        TR.rnn_backward(r(L, N, H), r(N, H), xp, w_hh, h0, lengths, act, driver, saved[0], saved[2])

jobs, seen = [], set()
for fn, args, kwargs in launched:
    values = dict(zip(fn.arg_names, args), **kwargs)
    consts = {p.name for p in fn.params if p.is_constexpr}
    sig = {n: "constexpr" if n in consts else "*" + TYPES[values[n].dtype] if isinstance(values[n], torch.Tensor)
           else "fp32" if isinstance(values[n], float) else "i32" for n in fn.arg_names}
    const = {n: values[n] for n in consts}
    key = (fn.__name__, tuple(sig.items()), tuple((k, str(v)) for k, v in sorted(const.items())))
    if key not in seen:
        seen.add(key)
        jobs.append((fn, sig, const))
failed, running = [], {}


def reap():
    pid, status = os.wait()
    what = running.pop(pid)
    if status:
        failed.append(f"{what}: exit status {status} (a compiler crash aborts the process)")


for fn, sig, const in jobs:  # each compile in a child process: an LLVM assertion aborts the process
    while len(running) >= 2:
        reap()
    what = f"{fn.__name__} {dict((k, str(v)) for k, v in const.items())}"
    pid = os.fork()
    if pid == 0:
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target)
            os._exit(0)
        except Exception as err:
            print(f"{what}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            os._exit(3)
    running[pid] = what
while running:
    reap()
print(f"compiled {len(jobs) - len(failed)} of {len(jobs)}")
sys.exit("\n".join(failed) if failed else 0)
'''


@pytest.mark.slow
def test_matrix_kernels_compile_for_sm90():
    """Every variant of the RNN/LSTM/GRU kernels that the drivers launch (persistent and alternating, lengths or
    not, projection, peepholes, LayerNorm; float32 and bfloat16), recorded from the drivers themselves, through
    Triton's compiler and ptxas for sm_90 without a GPU. It found the persistent LSTM backward with lengths
    crashing LLVM (now run by the alternating step loop). Run with -m slow (several minutes)."""
    import re
    from helpers import run_compile_check
    result = run_compile_check(_MATRIX_COMPILE_CHECK, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    done = re.search(r"compiled (\d+) of (\d+)", result.stdout)
    assert done and done.group(1) == done.group(2) and int(done.group(1)) > 0, result.stdout[-3000:]
