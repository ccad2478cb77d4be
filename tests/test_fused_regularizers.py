"""Zoneout and recurrent dropout inside the fused LSTM kernels (lstm_reg_fwd / lstm_reg_bwd):
the fused backend against the reference backend (the oracle) with the masks fixed (the runner's
bernoulli_mask patched) and with the real masks under one seed, in training and eval, with
lengths, bidirectional 2-layer stacks and proj_size; gradcheck, opcheck, torch.compile, the
twin, what auto picks, and every error path."""

from __future__ import annotations

import pytest
import torch

import rnnkit
import rnnkit.runner as runner
from rnnkit.backends import BACKENDS
from rnnkit.fused import _ops, twins
from helpers import assert_close, weighted_sum
from test_regularizers import FixedMasks

FUSED = BACKENDS["fused"]
REASON = FUSED.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
F64, F32 = torch.float64, torch.float32
TOL32 = dict(rtol=2e-5, atol=2e-5)  # float32: the fused gate math (fast exp) against ATen's, over a few steps

# (kwargs, lengths): every combination of the three masks, lengths with a zero and a full row
CONFIGS = {
    "all": dict(zoneout=0.3, zoneout_cell=0.2, recurrent_dropout=0.25),
    "rd": dict(recurrent_dropout=0.4),
    "zoneout_h": dict(zoneout=0.5, zoneout_cell=0.0),
    "zoneout_c": dict(zoneout_cell=0.5),
}


def _layer(dtype, proj=0, **kw):
    torch.manual_seed(0)
    return rnnkit.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=proj, dtype=dtype, **kw)


def _run(layer, backend, x, hx, lengths, monkeypatch=None, masks=None):
    """Output, final states and the gradients of the input, the initial states and every parameter."""
    if masks is not None:
        monkeypatch.setattr(runner, "bernoulli_mask", masks)
    layer.backend = backend
    xi, hi = x.clone().requires_grad_(), tuple(s.clone().requires_grad_() for s in hx)
    out, (h, c) = layer(xi, hi, lengths=lengths)
    assert layer.last_backend == backend
    grads = torch.autograd.grad(weighted_sum([out, h, c]), [xi, *hi, *layer.parameters()])
    return (out, h, c, *grads)


def _inputs(layer, dtype, L=6, N=4):
    g = torch.Generator().manual_seed(7)
    D = 2 * layer.num_layers
    x = torch.randn(L, N, 3, generator=g, dtype=dtype)
    hx = (torch.randn(D, N, layer.proj_size or 5, generator=g, dtype=dtype),
          torch.randn(D, N, 5, generator=g, dtype=dtype))
    return x, hx, torch.tensor([L, 0, 3, 1])[:N]


def _compare(a, b, dtype):
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"] + [f"grad param {i}" for i in range(len(a) - 6)]
    for u, v, what in zip(a, b, names):
        if dtype == F32:
            torch.testing.assert_close(u, v, **TOL32, msg=lambda m: f"{what}: {m}")
        else:
            assert_close(u, v, dtype, what)


@pytest.mark.parametrize("dtype,config", [(F64, c) for c in CONFIGS] + [(F32, "all")],
                         ids=[f"f64-{c}" for c in CONFIGS] + ["f32-all"])
@pytest.mark.parametrize("proj", [0, 2], ids=["noproj", "proj"])
def test_training_matches_reference_with_fixed_masks(monkeypatch, dtype, config, proj):
    """Training: the same masks (patched bernoulli_mask) give the same outputs, final states
    and gradients on both backends, and both draw the same masks in the same order."""
    layer = _layer(dtype, proj, **CONFIGS[config])
    x, hx, lengths = _inputs(layer, dtype)
    drawn = {}
    results = {}
    for backend in ("fused", "reference"):
        drawn[backend] = FixedMasks(seed=11)
        results[backend] = _run(layer, backend, x, hx, lengths, monkeypatch, drawn[backend])
    _compare(results["fused"], results["reference"], dtype)
    fused_calls, ref_calls = drawn["fused"].calls, drawn["reference"].calls
    assert [w for w, _ in fused_calls] == [w for w, _ in ref_calls]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fused_calls, ref_calls))
    expected = {"all": 4 * 3, "rd": 4, "zoneout_h": 4, "zoneout_c": 4}[config]
    assert len(fused_calls) == expected  # per layer-direction: rd once, zoneout once per state (all steps)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("proj", [0, 2], ids=["noproj", "proj"])
def test_eval_expectation_matches_reference(dtype, proj):
    """Eval: zoneout is the expectation (constant rates), recurrent dropout off; no mask drawn."""
    layer = _layer(dtype, proj, **CONFIGS["all"]).eval()
    x, hx, lengths = _inputs(layer, dtype)
    results = [_run(layer, backend, x, hx, lengths) for backend in ("fused", "reference")]
    _compare(results[0], results[1], dtype)


def test_same_seed_same_masks_on_both_backends():
    """Unpatched: the fused scan draws its masks with bernoulli_mask in the reference's order
    and shapes, so one seed gives both backends the same result (inter-layer dropout included)."""
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 5, num_layers=2, dropout=0.3, dtype=F64, **CONFIGS["all"])
    x, hx, _ = _inputs(rnnkit.LSTM(3, 5, num_layers=1, bidirectional=True), F64)
    hx = tuple(s[:2] for s in hx)
    assert_one_seed_one_result(lambda backend: _run(layer, backend, x, hx, None), _compare)


def assert_one_seed_one_result(run, compare):
    """``run(backend)`` (results, output first) under one seed gives fused and reference the same results, and
    another seed another output (the masks do depend on the seed)."""
    results = []
    for backend in ("fused", "reference"):
        torch.manual_seed(42)
        results.append(run(backend))
    compare(results[0], results[1], F64)
    torch.manual_seed(43)
    assert not torch.allclose(run("fused")[0], results[0][0])


def test_gradcheck_fused_training_and_eval(monkeypatch):
    """gradcheck (float64) through the fused layer: fixed masks in training, rates in eval."""
    from zoo_oracles import check_gradcheck
    monkeypatch.setattr(runner, "bernoulli_mask", FixedMasks(stable=True))
    for train in (True, False):
        layer = rnnkit.LSTM(2, 3, proj_size=2, backend="fused", dtype=F64, **CONFIGS["all"]).train(train)
        check_gradcheck(layer, 2, seq_len=4, batch=3, lengths=torch.tensor([4, 0, 2]))
        assert layer.last_backend == "fused"


def _reg_args(L=3, N=2, H=4, P=0, lengths=True, masks=True, grad=True, seed=5):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, grad=grad):
        return (torch.rand(*shape, generator=g, dtype=F64) - 0.5).requires_grad_(grad)

    def bern(*shape, p):
        return (torch.rand(*shape, generator=g, dtype=F64) < p).to(F64)
    Ho = P or H
    rd = bern(N, Ho, p=0.7) / 0.7
    zh, zc = (bern(L, N, Ho, p=0.4), bern(L, N, H, p=0.3)) if masks else (None, None)
    rates = (0.0, 0.0) if masks else (0.4, 0.3)
    return (r(L, N, 4 * H), r(4 * H, Ho), r(P, H) if P else None, r(N, Ho), r(N, H),
            torch.tensor([L, 1])[:N] if lengths else None, rd, zh, zc, *rates)


def test_op_matches_twin_and_opcheck():
    """The op's visible results equal its reference twin's; opcheck (schema, fakes, autograd
    registration) of lstm_reg_fwd and lstm_reg_bwd with masks, with rates, with a projection."""
    ops = torch.ops.rnnkit_fused
    cases = [_reg_args(), _reg_args(P=2, masks=False)]
    for k, args in enumerate(cases):
        got = ops.lstm_reg_fwd(*args)
        want = twins.lstm_reg_fwd(*args)
        for a, b, what in zip(got[:3], want, ("out", "h_n", "c_n")):
            assert_close(a, b, F64, what)
        torch.library.opcheck(ops.lstm_reg_fwd.default, args)
        if k:
            continue  # the backward's opcheck once (with masks and lengths)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out, h_n, c_n, gates, cs, cn, ms = ops.lstm_reg_fwd(*plain)
        bwd = (torch.rand_like(out), torch.rand_like(h_n), torch.rand_like(c_n), plain[1], plain[2], plain[3],
               plain[4], plain[5], out, gates, cs, cn, ms, *plain[6:])
        torch.library.opcheck(ops.lstm_reg_bwd.default, bwd)


def test_op_gradcheck_and_second_derivative():
    """gradcheck of the op's hand-written backward; gradgradcheck through the twin (create_graph)."""
    args = _reg_args(P=2)
    tensors = [0, 1, 2, 3, 4]

    def fn(*t):
        a = list(args)
        for i, v in zip(tensors, t):
            a[i] = v
        return _ops.lstm_reg_sequence(*a)
    inputs = tuple(args[i] for i in tensors)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_torch_compile_traces_the_op():
    """torch.compile (fullgraph, aot_eager) of the op with masks: the eager value and gradients."""
    from helpers import assert_compiled_matches_eager
    torch._dynamo.reset()
    args = _reg_args(P=2, grad=False)
    w_hh = args[1].clone().requires_grad_()

    def f(xp):
        out, h, c = _ops.lstm_reg_sequence(xp, w_hh, *args[2:])
        return (out * out).sum() + h.sum() + c.sum()
    assert_compiled_matches_eager(f, args[0], [w_hh], F64)


def test_auto_picks_fused_for_a_regularized_lstm():
    x = torch.randn(5, 2, 3)
    for kw in (CONFIGS["all"], CONFIGS["rd"], dict(zoneout=0.1)):
        layer = rnnkit.LSTM(3, 8, **kw)
        assert layer.which_backend(x) == "fused"
        layer(x)[0].sum().backward()
        assert layer.last_backend == "fused"
    assert rnnkit.LSTM(3, 8, zoneout=0.1).eval().which_backend(x) == "fused"


def test_declined_where_not_fused():
    """bfloat16 with zoneout or recurrent dropout is declined (the zoo's regularized layers:
    tests/test_fused_zoo_regularizers.py)."""
    bf = rnnkit.LSTM(3, 4, zoneout=0.1, dtype=torch.bfloat16)
    assert FUSED.unsupported(bf, torch.randn(2, 1, 3, dtype=torch.bfloat16)) == (
        "the fused kernels run zoneout (zoneout=0.1; it changes the function in eval mode too) in float32 and "
        "float64 only, got parameters of dtype torch.bfloat16")
    assert bf.which_backend(torch.randn(2, 1, 3, dtype=torch.bfloat16)) == "reference"
    with pytest.raises(ValueError, match=r"backend='fused' cannot run this configuration: the fused kernels run "
                                         r"zoneout \(zoneout=0.1"):
        rnnkit.LSTM(3, 4, zoneout=0.1, dtype=torch.bfloat16, backend="fused")(torch.randn(2, 1, 3,
                                                                                            dtype=torch.bfloat16))


def test_op_errors_name_what_was_received():
    ops = torch.ops.rnnkit_fused
    args = list(_reg_args(grad=False))
    bad = list(args)
    bad[7] = torch.zeros(3, 2, 5, dtype=F64)
    with pytest.raises(RuntimeError, match=r"zo_h has shape \[3, 2, 5\], expected \[3, 2, 4\]"):
        ops.lstm_reg_fwd(*bad)
    bad = list(args)
    bad[6] = torch.ones(2, 4, dtype=F32)
    with pytest.raises(RuntimeError, match=r"rd_mask has dtype Float, expected Double"):
        ops.lstm_reg_fwd(*bad)
    bad = list(args)
    bad[8] = torch.zeros(3, 1, 4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"zo_c has shape \[3, 1, 4\], expected \[3, 2, 4\]"):
        ops.lstm_reg_fwd(*bad)
    bad = list(args)
    bad[7], bad[9] = None, 1.0
    with pytest.raises(RuntimeError, match=r"lstm_reg_fwd: zoneout rates must be in \[0, 1\), got 1 and 0"):
        ops.lstm_reg_fwd(*bad)
    bf = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with pytest.raises(RuntimeError, match=r"lstm_reg_fwd: float32 or float64 only, got BFloat16"):
        ops.lstm_reg_fwd(*bf)
    out, h_n, c_n, gates, cs, cn, ms = ops.lstm_reg_fwd(*args)
    with pytest.raises(RuntimeError, match=r"lstm_reg_bwd: zoneout rates must be in \[0, 1\), got -0.5 and 0"):
        ops.lstm_reg_bwd(out, h_n, c_n, args[1], None, args[3], args[4], args[5], out, gates, cs, cn, ms,
                         args[6], None, args[8], -0.5, 0.0)
    with pytest.raises(RuntimeError, match=r"cn has shape \[0\], expected \[3, 2, 4\]"):
        ops.lstm_reg_bwd(out, h_n, c_n, args[1], None, args[3], args[4], args[5], out, gates, cs,
                         torch.zeros(0, dtype=F64), ms, *args[6:])
    bf = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
          for a in (out, h_n, c_n, args[1], args[3], args[4], out, gates, cs, cn, ms, args[6], args[7], args[8])]
    with pytest.raises(RuntimeError, match=r"lstm_reg_bwd: zoneout and recurrent dropout run in float32 and float64 "
                                           r"only, got BFloat16"):
        ops.lstm_reg_bwd(*bf[:4], None, *bf[4:6], args[5], *bf[6:], 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"lstm_reg_fwd: w_hh must be \(4H, H_out\), got \[3, 4\]"):
        ops.lstm_reg_fwd(args[0], torch.zeros(3, 4, dtype=F64), *args[2:])
    with pytest.raises(RuntimeError, match=r"lstm_reg_fwd: without w_hr, w_hh must be \(4H, H\), got \[16, 3\]"):
        ops.lstm_reg_fwd(args[0], torch.zeros(16, 3, dtype=F64), None, torch.zeros(2, 3, dtype=F64), *args[4:])


# ------------------------------------------------------------------ GRU

GRU_CONFIGS = {"both": dict(zoneout=0.3, recurrent_dropout=0.25), "rd": dict(recurrent_dropout=0.4),
               "zoneout": dict(zoneout=0.5)}


def _gru_run(layer, backend, x, h0, lengths, monkeypatch=None, masks=None):
    if masks is not None:
        monkeypatch.setattr(runner, "bernoulli_mask", masks)
    layer.backend = backend
    xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
    out, h = layer(xi, hi, lengths=lengths)
    assert layer.last_backend == backend
    grads = torch.autograd.grad(weighted_sum([out, h]), [xi, hi, *layer.parameters()])
    return (out, h, *grads)


def _gru_compare(a, b, dtype):
    for i, (u, v) in enumerate(zip(a, b)):
        if dtype == F32:
            torch.testing.assert_close(u, v, **TOL32, msg=lambda m: f"result {i}: {m}")
        else:
            assert_close(u, v, dtype, f"result {i}")


@pytest.mark.parametrize("dtype,config,train", [(F64, c, True) for c in GRU_CONFIGS] + [(F32, "both", True),
                                                                                      (F64, "both", False)])
def test_gru_matches_reference(monkeypatch, dtype, config, train):
    """GRU, 2-layer bidirectional with lengths (a zero and a full one): fixed masks in training,
    the expectation in eval; outputs, final state and every gradient; the same masks drawn."""
    torch.manual_seed(0)
    layer = rnnkit.GRU(3, 5, num_layers=2, bidirectional=True, dtype=dtype, **GRU_CONFIGS[config]).train(train)
    g = torch.Generator().manual_seed(7)
    x, h0 = torch.randn(6, 4, 3, generator=g, dtype=dtype), torch.randn(4, 4, 5, generator=g, dtype=dtype)
    lengths = torch.tensor([6, 0, 3, 1])
    drawn, results = {}, {}
    for backend in ("fused", "reference"):
        drawn[backend] = FixedMasks(seed=11)
        results[backend] = _gru_run(layer, backend, x, h0, lengths, monkeypatch, drawn[backend])
    _gru_compare(results["fused"], results["reference"], dtype)
    assert [w for w, _ in drawn["fused"].calls] == [w for w, _ in drawn["reference"].calls]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(drawn["fused"].calls, drawn["reference"].calls))


def test_gru_op_twin_opcheck_gradcheck():
    g = torch.Generator().manual_seed(5)
    L, N, H = 3, 2, 4

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=F64) - 0.5).requires_grad_()
    bern = lambda *shape, p: (torch.rand(*shape, generator=g, dtype=F64) < p).to(F64)  # noqa: E731
    ops = torch.ops.rnnkit_fused
    lengths = torch.tensor([3, 1])
    cases = [(r(L, N, 3 * H), r(3 * H, H), r(3 * H), r(N, H), lengths, bern(N, H, p=0.7) / 0.7, bern(L, N, H, p=0.4),
              0.0),
             (r(L, N, 3 * H), r(3 * H, H), None, r(N, H), None, None, None, 0.3)]
    for k, args in enumerate(cases):
        got = ops.gru_reg_fwd(*args)
        for a, b, what in zip(got[:2], twins.gru_reg_fwd(*args), ("out", "h_n")):
            assert_close(a, b, F64, what)
        torch.library.opcheck(ops.gru_reg_fwd.default, args)
        idx = [i for i in (0, 1, 2, 3) if args[i] is not None]

        def fn(*t, args=args, idx=idx):
            a = list(args)
            for i, v in zip(idx, t):
                a[i] = v
            return _ops.gru_reg_sequence(*a)
        assert torch.autograd.gradcheck(fn, tuple(args[i] for i in idx))
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in cases[0])
    out, h_n, rzn, hn = ops.gru_reg_fwd(*plain)
    torch.library.opcheck(ops.gru_reg_bwd.default, (torch.rand_like(out), torch.rand_like(h_n), plain[1], plain[3],
                                                    plain[4], out, rzn, hn, *plain[5:]))


def test_gru_auto_picks_fused_and_errors():
    x = torch.randn(5, 2, 3)
    for kw in GRU_CONFIGS.values():
        layer = rnnkit.GRU(3, 8, **kw)
        assert layer.which_backend(x) == "fused"
    ops = torch.ops.rnnkit_fused
    xp, w, h0 = torch.zeros(3, 2, 12, dtype=F64), torch.zeros(12, 4, dtype=F64), torch.zeros(2, 4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"zo_h has shape \[3, 2, 5\], expected \[3, 2, 4\]"):
        ops.gru_reg_fwd(xp, w, None, h0, None, None, torch.zeros(3, 2, 5, dtype=F64), 0.0)
    with pytest.raises(RuntimeError, match=r"rd_mask has shape \[2, 3\], expected \[2, 4\]"):
        ops.gru_reg_fwd(xp, w, None, h0, None, torch.zeros(2, 3, dtype=F64), None, 0.0)
    with pytest.raises(RuntimeError, match=r"gru_reg_fwd: the zoneout rate must be in \[0, 1\), got 1"):
        ops.gru_reg_fwd(xp, w, None, h0, None, None, None, 1.0)
    with pytest.raises(RuntimeError, match=r"gru_reg_fwd: w_hh must be \(3H, H\), got \[12, 5\]"):
        ops.gru_reg_fwd(xp, torch.zeros(12, 5, dtype=F64), None, h0, None, None, None, 0.0)
    out, h_n, rzn, hn = ops.gru_reg_fwd(xp, w, None, h0, None, None, None, 0.0)
    bf = [t.to(torch.bfloat16) for t in (out, h_n, w, h0, out, rzn, hn)]
    with pytest.raises(RuntimeError, match=r"gru_reg_bwd: zoneout and recurrent dropout run in float32 and float64 "
                                           r"only, got BFloat16"):
        ops.gru_reg_bwd(*bf[:4], None, *bf[4:], None, None, 0.0)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU], ids=["lstm", "gru"])
def test_torch_compile_fullgraph_in_training(backend, cls):
    """torch.compile (fullgraph, aot_eager) traces the regularized layer in training, masks
    included: under one seed it draws the masks eager draws, so the output and every gradient match."""
    torch._dynamo.reset()
    rates = CONFIGS["all"] if cls is rnnkit.LSTM else GRU_CONFIGS["both"]
    layer = cls(3, 5, bidirectional=True, backend=backend, dtype=F64, **rates)
    x = torch.randn(6, 2, 3, dtype=F64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    with torch._dynamo.config.patch(allow_rnn=True):  # rnnkit.LSTM is a torch.nn.LSTM: dynamo asks for this
        for f in (layer, compiled):
            torch.manual_seed(7)
            xi = x.clone().requires_grad_()
            out, _ = f(xi)
            results.append((out, *torch.autograd.grad(out.square().sum(), [xi, *layer.parameters()])))
    for a, b in zip(*results):
        assert_close(a, b, F64, "compiled")
    assert layer.last_backend == backend
