"""The triton backend's ELEMENTWISE driver (IndRNN relu/tanh, MinGRU, MinLSTM) and its
ConvLSTM/ConvGRU gate kernels (rnnkit/triton/elementwise.py, rnnkit/triton/conv.py).

Each scan runs through the runner (:func:`rnnkit.runner.run_stack`: layers,
directions, lengths) and is compared with the reference backend in float64 on
outputs, final states and every gradient (input, initial states, every
parameter): float32 storage tightly, bfloat16 loosely; batch 3 and 17, hidden 20
and 33 (conv: tiny spatial sizes), with lengths (0 and full included). The ops
get ``torch.library.opcheck`` and float64 ``gradcheck`` on tiny cases, and every
error path a test.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton
decides interpreter or compiler when a kernel is *defined* (``@triton.jit`` reads
``TRITON_INTERPRET``), so this module sets ``TRITON_INTERPRET=1`` only around its
own import of rnnkit.triton's kernel modules (plus the triton module a first
launch would import lazily, which checks the variable too) and then restores the
environment: other test files see it unchanged. ``test_interpreter_is_used``
checks that the kernels really are interpreted. If rnnkit.triton was imported
earlier in the session without the variable (compiled kernels, no GPU), the
module skips with that reason; run ``TRITON_INTERPRET=1 python -m pytest ...``.
"""

from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (the triton backend's kernels need it)")

import rnnkit  # noqa: E402
from rnnkit.runner import mask_padding, reference_scan, run_stack  # noqa: E402


def _import_kernels():
    """Import the kernel modules with TRITON_INTERPRET=1 when there is no GPU; restore the environment."""
    want_interpreter = not torch.cuda.is_available()
    previous = os.environ.get("TRITON_INTERPRET")
    if want_interpreter:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        elementwise = importlib.import_module("rnnkit.triton.elementwise")
        conv = importlib.import_module("rnnkit.triton.conv")
        if want_interpreter:
            importlib.import_module("triton.experimental.gluon")  # a first launch imports it; it asserts the knob
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return elementwise, conv, previous, want_interpreter


E, C, _PREVIOUS_ENV, _WANT_INTERPRETER = _import_kernels()
INTERPRETED = E.interpreting()
if _WANT_INTERPRETER and not INTERPRETED:
    pytest.skip("rnnkit.triton was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
                "run with TRITON_INTERPRET=1 in the environment", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
F64 = torch.float64


def test_interpreter_is_used_and_environment_restored():
    assert INTERPRETED == _WANT_INTERPRETER
    kernels = [E._elementwise_fwd_kernel, E._elementwise_bwd_kernel, C._conv_lstm_fwd_kernel,
               C._conv_lstm_bwd_kernel, C._conv_gru_fwd_kernel, C._conv_gru_bwd_kernel]
    interpreted = [not isinstance(k, triton.runtime.JITFunction) for k in kernels]
    assert interpreted == [INTERPRETED] * len(kernels)
    assert os.environ.get("TRITON_INTERPRET") == _PREVIOUS_ENV


# ----------------------------------------------------------------------------- the harness


def triton_scan(spec, p, x, state, lengths):
    family = E.family(spec)
    if family is not None:
        return E.SCANS[family](spec, p, x, state, lengths)
    return C.SCANS[spec.fusable](spec, p, x, state, lengths)


def _run(module, x, states, lengths, scan, cotangent):
    """Outputs (padding masked), final states and the gradients of a fixed weighted sum of both
    with respect to the input, the initial states and every parameter."""
    x = x.detach().requires_grad_(True)
    states = tuple(s.detach().requires_grad_(True) for s in states)
    out, finals = run_stack(module, x, states, lengths, scan)
    out = mask_padding(out, lengths, 0.0)
    loss = (out.double() * cotangent[0]).sum()
    for f, w in zip(finals, cotangent[1:]):
        loss = loss + (f.double() * w).sum()
    wrt = [x, *states, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt)
    return [out, *finals], list(grads)


def _compare(module64, x64, states64, lengths, dtype, tol):
    """Run the triton scans on ``module64`` cast to ``dtype`` and the reference scan in float64; each
    result's max error, relative to its max magnitude (at least 1), must be at most ``tol``. In a 16-bit
    dtype the bound is also at least twice the reference backend's own error in that dtype (rounding the
    inputs moves some gradients that much: MinLSTM's by ~0.3 in bfloat16)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        out_ref, fin_ref = run_stack(module64, x64, states64, lengths, reference_scan)
    cot = [torch.randn(out_ref.shape, generator=g, dtype=F64)] + \
        [torch.randn(f.shape, generator=g, dtype=F64) for f in fin_ref]
    cot = [c.to(DEVICE) for c in cot]
    want = sum(_run(module64, x64, states64, lengths, reference_scan, cot), [])
    module = copy.deepcopy(module64).to(dtype)
    args = (module, x64.to(dtype), tuple(s.to(dtype) for s in states64), lengths)
    got = sum(_run(*args, triton_scan, cot), [])
    bounds = [tol] * len(want)
    if dtype not in (torch.float32, F64):
        same_dtype_ref = sum(_run(*args, reference_scan, cot), [])
        bounds = [max(tol, 2 * _rel_err(r, w)) for r, w in zip(same_dtype_ref, want)]
    names = ["output"] + [f"final state {i}" for i in range(len(states64))]
    names += ["grad input"] + [f"grad initial state {i}" for i in range(len(states64))]
    names += [f"grad {n}" for n, _ in module64.named_parameters()]
    assert len(names) == len(want) == len(got)
    for name, a, w, bound in zip(names, got, want, bounds):
        assert a.dtype == dtype, name
        err = _rel_err(a, w)
        assert err <= bound, f"{name}: max error {err:.3g} (relative to max(|reference|, 1)) > {bound:.3g}"


def _rel_err(a, want):
    if not want.numel():
        return 0.0
    return (a.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)


def _lengths(batch, seq_len, seed):
    """Random lengths in [0, L], with a full one and an empty one."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len
    lengths[-1] = 0
    return lengths.to(DEVICE)


def _states(module, batch, feature_shape, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = module._state_shapes(batch, feature_shape)
    return tuple((torch.randn(s, generator=g, dtype=F64) * 0.5).to(DEVICE) for s in shapes)


# ----------------------------------------------------------------------------- elementwise cells


def _indrnn_clamped(h_in, hidden, **kw):
    """tanh IndRNN with recurrent_max_abs=0.7 and u spread over (-1.2, 1.2): the clamp bites both ways."""
    m = rnnkit.IndRNN(h_in, hidden, nonlinearity="tanh", recurrent_max_abs=0.7, **kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2.4 - 1.2)
    return m


ELEMENTWISE = {
    "indrnn_relu": lambda h_in, hidden, **kw: rnnkit.IndRNN(h_in, hidden, **kw),
    "indrnn_tanh": _indrnn_clamped,
    "mingru": lambda h_in, hidden, **kw: rnnkit.MinGRU(h_in, hidden, **kw),
    "minlstm": lambda h_in, hidden, **kw: rnnkit.MinLSTM(h_in, hidden, **kw),
}

# (batch, hidden, num_layers, bidirectional, lengths, dtype, tol, block); "blocks16" splits 60 columns over
# 4 programs of 16 (the interpreter's default is one program for up to 2048 columns)
ELEMENTWISE_CASES = {
    "b17_h33_lengths_f32": (17, 33, 1, False, True, torch.float32, 2e-5, None),
    "b3_h20_lengths_blocks16_f32": (3, 20, 1, False, True, torch.float32, 2e-5, 16),
    "b3_h33_lengths_bf16": (3, 33, 1, False, True, torch.bfloat16, 2e-2, None),
    "b3_h20_2layers_bidir_lengths_f32": (3, 20, 2, True, True, torch.float32, 2e-5, None),
    "b3_h20_lengths_f16": (3, 20, 1, False, True, torch.float16, 2e-3, None),
}
# the runner's layers and directions once per kind of kernel (with and without u)
ELEMENTWISE_PARAMS = [(cell, case) for case in ELEMENTWISE_CASES for cell in ELEMENTWISE
                      if not case.startswith("b3_h20_2layers") or cell in ("indrnn_relu", "minlstm")
                      if not case.endswith("f16") or cell in ("indrnn_tanh", "mingru")]


@pytest.mark.parametrize("cell, case", ELEMENTWISE_PARAMS)
def test_elementwise_matches_reference(cell, case, monkeypatch):
    batch, hidden, layers, bidir, with_lengths, dtype, tol, block = ELEMENTWISE_CASES[case]
    monkeypatch.setattr(E, "BLOCK", block)
    torch.manual_seed(0)
    seq_len, h_in = 4, 3
    module = ELEMENTWISE[cell](h_in, hidden, num_layers=layers, bidirectional=bidir).to(DEVICE, F64)
    assert E.family(module.cell_spec) is not None
    x = torch.randn(seq_len, batch, h_in, dtype=F64, device=DEVICE)
    states = _states(module, batch, (h_in,), 1)
    lengths = _lengths(batch, seq_len, 2) if with_lengths else None
    _compare(module, x, states, lengths, dtype, tol)


def test_elementwise_families():
    """Which specs the elementwise driver takes: IndRNN relu/tanh, both Min cells (parallel or not)."""
    assert E.family(rnnkit.IndRNN(2, 3).cell_spec) == "indrnn_relu"
    assert E.family(rnnkit.IndRNN(2, 3, nonlinearity="tanh").cell_spec) == "indrnn_tanh"
    assert E.family(rnnkit.IndRNN(2, 3, nonlinearity="gelu").cell_spec) is None
    assert E.family(rnnkit.MinGRU(2, 3, parallel=False).cell_spec) == "min_gru"
    assert E.family(rnnkit.MinLSTM(2, 3).cell_spec) == "min_lstm"
    assert E.family(rnnkit.LSTM(2, 3).cell_spec) is None
    assert E.SCANS["min_gru"] is E.scan_mingru and E.SCANS["min_lstm"] is E.scan_minlstm


# ----------------------------------------------------------------------------- convolutional cells


CONV = {
    "convlstm2d_peephole": lambda c, hidden, **kw: rnnkit.ConvLSTM2d(c, hidden, 3, peephole=True, **kw),
    "convlstm1d_per_position_peephole": lambda c, hidden, **kw: rnnkit.ConvLSTM1d(
        c, hidden, 2, peephole=True, peephole_shape=(3,), stride=2, **kw),
    "convgru2d": lambda c, hidden, **kw: rnnkit.ConvGRU2d(c, hidden, 3, **kw),
    "convgru1d": lambda c, hidden, **kw: rnnkit.ConvGRU1d(c, hidden, 2, **kw),
}
CONV_SPATIAL = {"convlstm2d_peephole": (3, 4), "convlstm1d_per_position_peephole": (5,), "convgru2d": (3, 4),
                "convgru1d": (5,)}

# (batch, hidden, num_layers, bidirectional, lengths, dtype, tol)
CONV_CASES = {
    "b3_h4_2layers_bidir_lengths_f32": (3, 4, 2, True, True, torch.float32, 2e-5),
    "b17_h20_lengths_f32": (17, 20, 1, False, True, torch.float32, 2e-5),
    "b3_h33_bf16": (3, 33, 1, False, False, torch.bfloat16, 2e-2),
    "b3_h20_lengths_f32": (3, 20, 1, False, True, torch.float32, 2e-5),
    "b3_h20_f16": (3, 20, 1, False, False, torch.float16, 2e-3),
}
# each kernel (LSTM with peepholes, GRU) in 1d on bfloat16, and once in 2d; the runner's layers and directions
# on ConvLSTM, batch 17 and float16 on ConvGRU (the same per-step code paths)
CONV_PARAMS = [("convlstm1d_per_position_peephole", "b3_h4_2layers_bidir_lengths_f32"),
               ("convgru1d", "b17_h20_lengths_f32"),
               ("convlstm1d_per_position_peephole", "b3_h33_bf16"), ("convgru1d", "b3_h33_bf16"),
               ("convgru1d", "b3_h20_f16"),
               ("convlstm2d_peephole", "b3_h20_lengths_f32"), ("convgru2d", "b3_h20_lengths_f32")]


@pytest.mark.parametrize("cell, case", CONV_PARAMS)
def test_conv_matches_reference(cell, case):
    batch, hidden, layers, bidir, with_lengths, dtype, tol = CONV_CASES[case]
    torch.manual_seed(0)
    seq_len, channels = 3, 2
    module = CONV[cell](channels, hidden, num_layers=layers, bidirectional=bidir).to(DEVICE, F64)
    if module.peephole:  # move the peepholes off 0 so they matter
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.startswith(("weight_ci", "weight_cf", "weight_co")):
                    p.uniform_(-0.8, 0.8)
    spatial = CONV_SPATIAL[cell]
    x = torch.randn(seq_len, batch, channels, *spatial, dtype=F64, device=DEVICE)
    states = _states(module, batch, (channels, *spatial), 1)
    lengths = _lengths(batch, seq_len, 2) if with_lengths else None
    _compare(module, x, states, lengths, dtype, tol)


# ----------------------------------------------------------------------------- opcheck and gradcheck


def _t(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(DEVICE)


def _elementwise_args(cell, L=3, N=2, H=2, lengths=True):
    G = E.GATES[cell]
    u = _t(H, seed=3) if cell < 2 else None
    lens = torch.tensor([L, 1][:N], device=DEVICE) if lengths else None
    return _t(L, N, G * H, seed=1), u, _t(N, H, seed=2), lens, cell


FULL_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
BWD_OPCHECK = FULL_OPCHECK[:3]
"""The backward ops' opcheck: the forward ops' test_aot_dispatch_dynamic already traces them (it differentiates)."""


@pytest.mark.parametrize("cell", [E.CELL_INDRNN_RELU, E.CELL_MINLSTM], ids=["with_u", "without_u"])
def test_elementwise_opcheck(cell):
    xp, u, h0, lens, cell = _elementwise_args(cell)
    args = (xp.float().requires_grad_(), None if u is None else u.float().requires_grad_(),
            h0.float().requires_grad_(), lens, cell)
    torch.library.opcheck(torch.ops.rnnkit_triton.elementwise_fwd.default, args)
    out, hn = E.elementwise_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    torch.library.opcheck(torch.ops.rnnkit_triton.elementwise_bwd.default,
                          (torch.ones_like(out), torch.ones_like(hn), args[0].detach(),
                           None if u is None else args[1].detach(), args[2].detach(), lens, out, cell),
                          test_utils=BWD_OPCHECK)


@pytest.mark.parametrize("cell", sorted(E.GATES))
def test_elementwise_gradcheck(cell):
    xp, u, h0, lens, cell = _elementwise_args(cell, L=2)
    inputs = [xp.requires_grad_(), h0.requires_grad_()] + ([u.requires_grad_()] if u is not None else [])

    def f(xp, h0, *rest):
        return E.elementwise_fwd(xp, rest[0] if rest else None, h0, lens, cell)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def _conv_lstm_args(peep, lengths=True, N=2, hid=1, S=(2,)):
    ws = [_t(hid, *S, seed=10 + k, scale=0.8) for k in range(3)] if peep else [None] * 3
    lens = torch.tensor([1, 0][:N], device=DEVICE) if lengths else None
    return (_t(N, 4 * hid, *S, seed=1), _t(N, 4 * hid, *S, seed=2), _t(N, hid, *S, seed=3), _t(N, hid, *S, seed=4),
            *ws, lens, 0)


def _conv_gru_args(lengths=True, N=2, hid=1, S=(2,)):
    lens = torch.tensor([1, 0][:N], device=DEVICE) if lengths else None
    return (_t(N, 3 * hid, *S, seed=1), _t(N, 3 * hid, *S, seed=2), _t(N, hid, *S, seed=3), lens, 0)


@pytest.mark.parametrize("peep", [True, False], ids=["peephole", "plain"])
def test_conv_lstm_step_opcheck_and_gradcheck(peep):
    args = _conv_lstm_args(peep)
    f32 = tuple(a.float().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args)
    # the full opcheck (with torch.compile's test_aot_dispatch_dynamic) once, with the optional peepholes given
    torch.library.opcheck(torch.ops.rnnkit_triton.conv_lstm_step.default, f32,
                          test_utils=FULL_OPCHECK if peep else BWD_OPCHECK)
    d = [a.detach() if isinstance(a, torch.Tensor) else a for a in f32]
    h, c = C.conv_lstm_step(*d)
    torch.library.opcheck(torch.ops.rnnkit_triton.conv_lstm_step_bwd.default,
                          (torch.ones_like(h), torch.ones_like(c), d[0], d[1], d[3], *d[4:7], d[7], d[8]),
                          test_utils=BWD_OPCHECK)
    tensors = [a.requires_grad_() for a in args[:7] if a is not None]
    lens, t = args[7], args[8]

    def f(*ts):
        xp, hc, h, c, *ws = ts
        ws = ws if ws else [None] * 3
        return C.conv_lstm_step(xp, hc, h, c, *ws, lens, t)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7, fast_mode=True)


def test_conv_gru_step_opcheck_and_gradcheck():
    args = _conv_gru_args()
    f32 = tuple(a.float().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args)
    torch.library.opcheck(torch.ops.rnnkit_triton.conv_gru_step.default, f32)
    d = [a.detach() if isinstance(a, torch.Tensor) else a for a in f32]
    h = C.conv_gru_step(*d)
    torch.library.opcheck(torch.ops.rnnkit_triton.conv_gru_step_bwd.default, (torch.ones_like(h), *d),
                          test_utils=BWD_OPCHECK)
    tensors = [a.requires_grad_() for a in args[:3]]
    lens, t = args[3], args[4]
    assert torch.autograd.gradcheck(lambda xp, hc, h: C.conv_gru_step(xp, hc, h, lens, t), tensors, eps=1e-6,
                                    atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("peep", [True, False], ids=["peephole", "plain"])
def test_conv_lstm_step_second_derivatives(peep):
    """create_graph=True: the step op's backward runs its reference twin (the cell's own gate math,
    rnnkit.zoo.conv.conv_lstm_update), so it can be differentiated again: gradgradcheck in float64,
    with a row held past its length."""
    args = _conv_lstm_args(peep)
    tensors = [a.requires_grad_() for a in args[:7] if a is not None]
    lens, t = args[7], args[8]

    def f(*ts):
        xp, hc, h, c, *ws = ts
        return C.conv_lstm_step(xp, hc, h, c, *(ws or [None] * 3), lens, t)

    assert torch.autograd.gradgradcheck(f, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


def test_conv_gru_step_second_derivatives():
    args = _conv_gru_args()
    tensors = [a.requires_grad_() for a in args[:3]]
    lens, t = args[3], args[4]
    assert torch.autograd.gradgradcheck(lambda xp, hc, h: C.conv_gru_step(xp, hc, h, lens, t), tensors, eps=1e-6,
                                        atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("cell", ["convlstm1d_per_position_peephole", "convgru1d"])
def test_conv_layer_second_derivatives_match_reference(cell):
    """A gradient penalty through a ConvLSTM / ConvGRU layer run by the triton scans (the convolutions
    torch's, the step op differentiable through its twin) equals the reference scan's, with lengths."""
    torch.manual_seed(0)
    module = CONV[cell](2, 2).to(DEVICE, F64)
    if module.peephole:
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.startswith(("weight_ci", "weight_cf", "weight_co")):
                    p.uniform_(-0.8, 0.8)
    x = torch.randn(3, 2, 2, *CONV_SPATIAL[cell], dtype=F64, device=DEVICE)
    states = _states(module, 2, (2, *CONV_SPATIAL[cell]), 1)
    lengths = torch.tensor([3, 2], device=DEVICE)
    results = []
    for scan in (reference_scan, triton_scan):
        xx = x.clone().requires_grad_()
        out, _ = run_stack(module, xx, states, lengths, scan)
        out = mask_padding(out, lengths, 0.0)
        (gx,) = torch.autograd.grad((out ** 2).sum(), xx, create_graph=True)
        results.append(torch.autograd.grad((gx ** 2).sum(), [xx, *module.parameters()]))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)


# ----------------------------------------------------------------------------- error paths


def test_elementwise_rejects_unknown_cell():
    xp, u, h0, lens, _ = _elementwise_args(0)
    with pytest.raises(ValueError, match=r"cell must be one of \[0, 1, 2, 3\].*got 7"):
        E.elementwise_fwd(xp, u, h0, lens, 7)


def test_elementwise_indrnn_needs_u():
    xp, _, h0, lens, _ = _elementwise_args(E.CELL_INDRNN_RELU)
    with pytest.raises(ValueError, match=r"IndRNN needs its recurrent weight u \(H,\), got None"):
        E.elementwise_fwd(xp, None, h0, lens, E.CELL_INDRNN_RELU)


def test_elementwise_checks_shapes():
    xp, u, h0, lens, cell = _elementwise_args(E.CELL_MINLSTM)  # xp (3, 2, 6), h0 (2, 2)
    with pytest.raises(ValueError, match=r"elementwise_fwd: xp must have shape \(L, N=2, 3\*H=6\) for MinLSTM with "
                                         r"h0 of shape \(2, 2\), got \(3, 2, 4\)"):
        E.elementwise_fwd(xp[..., :4], None, h0, lens, cell)
    with pytest.raises(ValueError, match=r"elementwise_fwd: h0 must be 2-D \(N, H\), got shape \(1, 2, 2\)"):
        E.elementwise_fwd(xp, None, h0[None], lens, cell)
    with pytest.raises(ValueError, match=r"elementwise_bwd: lengths must have shape \(N=2,\), got \(3,\)"):
        E.elementwise_bwd(xp[..., :2], h0, xp, None, h0, torch.tensor([1, 2, 3]), xp[..., :2], cell)
    xp, u, h0, lens, cell = _elementwise_args(E.CELL_INDRNN_TANH)
    with pytest.raises(ValueError, match=r"elementwise_fwd: u must have shape \(H=2,\), got \(3,\)"):
        E.elementwise_fwd(xp, torch.ones(3, dtype=F64, device=DEVICE), h0, lens, cell)
    with pytest.raises(ValueError, match=r"elementwise_fwd: xp, u and h0 must be on one device, got \[.*'meta'\]"):
        E.elementwise_fwd(xp, u.to("meta"), h0, lens, cell)


def test_scans_reject_other_cells():
    x = torch.randn(2, 1, 3, dtype=F64, device=DEVICE)
    gelu = rnnkit.IndRNN(3, 2, nonlinearity="gelu").to(DEVICE, F64)
    with pytest.raises(ValueError, match=r"IndRNN with nonlinearity 'relu' or 'tanh', got the 'indrnn_gelu' cell"):
        E.scan_indrnn(gelu.cell_spec, gelu._layer_params(0), x, (torch.zeros(1, 2, dtype=F64, device=DEVICE),), None)
    lstm = rnnkit.MinLSTM(3, 2).to(DEVICE, F64)
    with pytest.raises(ValueError, match=r"scan_mingru: expected the 'min_gru' cell, got the 'min_lstm' cell"):
        E.scan_mingru(lstm.cell_spec, lstm._layer_params(0), x, (torch.zeros(1, 2, dtype=F64, device=DEVICE),), None)
    with pytest.raises(ValueError, match=r"scan_minlstm: expected the 'min_lstm' cell, got the 'indrnn_gelu'"):
        E.scan_minlstm(gelu.cell_spec, gelu._layer_params(0), x, (torch.zeros(1, 2, dtype=F64, device=DEVICE),),
                       None)
    gru = rnnkit.ConvGRU1d(3, 2, 3).to(DEVICE, F64)
    xc = torch.randn(2, 1, 3, 4, dtype=F64, device=DEVICE)
    h = torch.zeros(1, 2, 4, dtype=F64, device=DEVICE)
    with pytest.raises(ValueError, match=r"scan_conv_lstm: expected the 'conv_lstm' cell, got the 'conv_gru' cell"):
        C.scan_conv_lstm(gru.cell_spec, gru._layer_params(0), xc, (h, h), None)
    with pytest.raises(ValueError, match=r"scan_conv_gru: expected the 'conv_gru' cell, got the 'min_lstm' cell"):
        C.scan_conv_gru(lstm.cell_spec, lstm._layer_params(0), xc, (h,), None)


def test_conv_steps_check_shapes_and_peepholes():
    xp, hc, h, c, w_ci, w_cf, w_co, lens, t = _conv_lstm_args(True)
    with pytest.raises(ValueError, match=r"conv_lstm_step: hc must have shape \(2, 4, 2\).*got \(2, 3, 2\)"):
        C.conv_lstm_step(xp, hc[:, :3], h, c, w_ci, w_cf, w_co, lens, t)
    with pytest.raises(ValueError, match=r"w_ci, w_cf and w_co must be given together or all None"):
        C.conv_lstm_step(xp, hc, h, c, w_ci, None, w_co, lens, t)
    with pytest.raises(ValueError, match=r"w_cf must have the state's per-sample shape \(1, 2\).*got \(1, 1\)"):
        C.conv_lstm_step(xp, hc, h, c, w_ci, w_cf[:, :1], w_co, lens, t)
    with pytest.raises(ValueError, match=r"conv_lstm_step: c \(or the gradient\) must have h's shape \(2, 1, 2\), "
                                         r"got \(2, 1, 1\)"):
        C.conv_lstm_step(xp, hc, h, c[..., :1], w_ci, w_cf, w_co, lens, t)
    with pytest.raises(ValueError, match=r"conv_lstm_step_bwd: lengths must have shape \(N=2,\), got \(1,\)"):
        C.conv_lstm_step_bwd(h, c, xp, hc, c, w_ci, w_cf, w_co, lens[:1], t)
    gxp, ghc, gh, glens, gt = _conv_gru_args()
    with pytest.raises(ValueError, match=r"conv_gru_step: xp_t must have shape \(2, 3, 2\).*got \(2, 4, 2\)"):
        C.conv_gru_step(xp, ghc, gh, glens, gt)
    with pytest.raises(ValueError, match=r"conv_gru_step_bwd: h must be \(N, hidden, \*S'\) with 1 to 3 spatial "
                                         r"dims, got shape \(2, 2\)"):
        C.conv_gru_step_bwd(gh[:, 0], gxp[:, :, 0], ghc[:, :, 0], gh[:, 0], glens, gt)


# ----------------------------------------------------------------------------- the compiler's view (no GPU needed)

_COMPILE_CHECK = r'''
import itertools, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rnnkit.triton import conv as C, elementwise as E

assert not E.interpreting(), "the kernels must be compiled ones here"
target = GPUTarget("cuda", 90, 32)  # H100 / H200
failed = []


def comp(fn, sig, const, what):
    try:
        triton.compile(ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const),
                       target=target)
    except Exception as err:
        failed.append(f"{what}: {type(err).__name__}: {str(err)[:500]}")


count = 0
for st, cd in (("fp32", tl.float32), ("bf16", tl.float32), ("fp16", tl.float32), ("fp64", tl.float64)):
    ptr, acc = "*" + st, "*fp64" if st == "fp64" else "*fp32"
    for has_len in (False, True):
        lp = "*i32" if has_len else ptr
        for cell, G in E.GATES.items():
            comp(E._elementwise_fwd_kernel,
                 dict(xp_ptr=ptr, u_ptr=ptr, h0_ptr=ptr, len_ptr=lp, out_ptr=ptr, hn_ptr=ptr, L="i32", NH="i32",
                      H="i32"), dict(CELL=cell, G=G, HAS_LEN=has_len, BLOCK=128, COMPUTE=cd), f"fwd {st} {cell}")
            comp(E._elementwise_bwd_kernel,
                 dict(gout_ptr=ptr, ghn_ptr=ptr, xp_ptr=ptr, u_ptr=ptr, h0_ptr=ptr, len_ptr=lp, out_ptr=ptr,
                      dxp_ptr=ptr, du_ptr=acc, dh0_ptr=ptr, L="i32", NH="i32", H="i32", last_x="i64", last_o="i64"),
                 dict(CELL=cell, G=G, HAS_LEN=has_len, BLOCK=128, COMPUTE=cd), f"bwd {st} {cell}")
            count += 2
        for peep in (False, True):
            const = dict(PEEP=peep, HAS_LEN=has_len, BLOCK=128, COMPUTE=cd)
            comp(C._conv_lstm_fwd_kernel,
                 dict(xp_ptr=ptr, hc_ptr=ptr, h_ptr=ptr, c_ptr=ptr, wci_ptr=ptr, wcf_ptr=ptr, wco_ptr=ptr, len_ptr=lp,
                      h_out_ptr=ptr, c_out_ptr=ptr, t="i32", NHP="i32", HP="i32"), const, f"conv lstm fwd {st}")
            comp(C._conv_lstm_bwd_kernel,
                 dict(dh_ptr=ptr, dc_ptr=ptr, xp_ptr=ptr, hc_ptr=ptr, c_ptr=ptr, wci_ptr=ptr, wcf_ptr=ptr,
                      wco_ptr=ptr, len_ptr=lp, dgates_ptr=ptr, dh_prev_ptr=ptr, dc_prev_ptr=ptr, dwci_ptr=acc,
                      dwcf_ptr=acc, dwco_ptr=acc, t="i32", NHP="i32", HP="i32"), const, f"conv lstm bwd {st}")
            count += 2
        const = dict(HAS_LEN=has_len, BLOCK=128, COMPUTE=cd)
        comp(C._conv_gru_fwd_kernel, dict(xp_ptr=ptr, hc_ptr=ptr, h_ptr=ptr, len_ptr=lp, h_out_ptr=ptr, t="i32",
                                          NHP="i32", HP="i32"), const, f"conv gru fwd {st}")
        comp(C._conv_gru_bwd_kernel, dict(dh_ptr=ptr, xp_ptr=ptr, hc_ptr=ptr, h_ptr=ptr, len_ptr=lp, dxp_ptr=ptr,
                                          dhc_ptr=ptr, dh_prev_ptr=ptr, t="i32", NHP="i32", HP="i32"), const,
             f"conv gru bwd {st}")
        count += 2
print(f"compiled {count - len(failed)} of {count}")
sys.exit("\n".join(failed) if failed else 0)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel variant (cells, dtypes, lengths, peepholes) through Triton's compiler and ptxas for sm_90,
    without a GPU: catches what the interpreter accepts and the compiler would not (~2 min; run with -m slow)."""
    from helpers import run_compile_check
    result = run_compile_check(_COMPILE_CHECK, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled 112 of 112" in result.stdout
