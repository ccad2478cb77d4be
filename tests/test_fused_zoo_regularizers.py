"""Zoneout and recurrent dropout inside the fused kernels of the zoo's LSTM/GRU variants (PeepholeLSTM,
LayerNormLSTM, LayerNormGRU: peephole_reg_*, ln_lstm_reg_*, ln_gru_reg_*, csrc/regularize.h): the fused
backend against the reference backend (the oracle) with the masks fixed (the runner's bernoulli_mask
patched) and with the real masks under one seed, in training and eval, with lengths (a zero and a full
row) and bidirectional 2-layer stacks; the ops against their reference twins, opcheck, gradcheck and
second derivatives, torch.compile, what auto picks, and the ops' errors."""

from __future__ import annotations

import pytest
import torch

import rnnkit
import rnnkit.runner as runner
from rnnkit.backends import BACKENDS
from rnnkit.fused import _ops, twins
from rnnkit.fused import backend as fb
from helpers import assert_close, weighted_sum
from test_fused_regularizers import _gru_compare as _compare  # float64 tight, float32 within 2e-5
from test_fused_regularizers import assert_one_seed_one_result
from test_regularizers import FixedMasks

FUSED = BACKENDS["fused"]
REASON = FUSED.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
F64, F32 = torch.float64, torch.float32

LAYERS = {"peephole": rnnkit.PeepholeLSTM, "ln_lstm": rnnkit.LayerNormLSTM, "ln_gru": rnnkit.LayerNormGRU}
CONFIGS = {
    "all": dict(zoneout=0.3, zoneout_cell=0.2, recurrent_dropout=0.25),
    "rd": dict(recurrent_dropout=0.4),
    "zoneout_h": dict(zoneout=0.5, zoneout_cell=0.0),
    "zoneout_c": dict(zoneout_cell=0.5),
}


def _kwargs(family, config):
    kw = dict(CONFIGS[config])
    if family == "ln_gru":  # one state: no zoneout_cell
        kw.pop("zoneout_cell", None)
        if config == "zoneout_c":
            kw = dict(zoneout=0.5)
    return kw


def _layer(family, config, dtype, **extra):
    torch.manual_seed(0)
    return LAYERS[family](3, 5, num_layers=2, bidirectional=True, dtype=dtype, **_kwargs(family, config), **extra)


def _inputs(layer, dtype, L=6, N=4):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(L, N, 3, generator=g, dtype=dtype)
    hx = tuple(torch.randn(4, N, 5, generator=g, dtype=dtype) for _ in layer.cell_spec.state_names)
    return x, hx, torch.tensor([L, 0, 3, 1])[:N]


def _run(layer, backend, x, hx, lengths):
    """Output, final states and the gradients of the input, the initial states and every parameter."""
    layer.backend = backend
    xi, hi = x.clone().requires_grad_(), tuple(s.clone().requires_grad_() for s in hx)
    out, h = layer(xi, hi if len(hi) > 1 else hi[0], lengths=lengths)
    assert layer.last_backend == backend
    states = list(h) if isinstance(h, tuple) else [h]
    grads = torch.autograd.grad(weighted_sum([out, *states]), [xi, *hi, *layer.parameters()])
    return (out, *states, *grads)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,config", [(F64, c) for c in CONFIGS] + [(F32, "all")],
                         ids=[f"f64-{c}" for c in CONFIGS] + ["f32-all"])
@pytest.mark.parametrize("family", list(LAYERS))
def test_fused_matches_reference_with_fixed_masks(monkeypatch, family, dtype, config, train):
    """Outputs, final states and every gradient (input, initial states, parameters) of a bidirectional
    2-layer stack with lengths: fused == reference, on the same fixed masks (training) or the rates (eval)."""
    layer = _layer(family, config, dtype).train(train)
    x, hx, lengths = _inputs(layer, dtype)
    results = []
    for backend in ("fused", "reference"):
        monkeypatch.setattr(runner, "bernoulli_mask", FixedMasks(stable=True))
        results.append(_run(layer, backend, x, hx, lengths))
    _compare(results[0], results[1], dtype)


@pytest.mark.parametrize("family", list(LAYERS))
def test_same_seed_same_masks_on_both_backends(family):
    """Unpatched: one seed gives both backends the same masks, so the same result (and another seed another)."""
    layer = _layer(family, "all", F64, dropout=0.3)
    x, hx, _ = _inputs(layer, F64)
    assert_one_seed_one_result(lambda backend: _run(layer, backend, x, hx, None), _compare)


@pytest.mark.parametrize("family", list(LAYERS))
def test_gradcheck_through_the_fused_layer(monkeypatch, family):
    from zoo_oracles import check_gradcheck
    monkeypatch.setattr(runner, "bernoulli_mask", FixedMasks(stable=True))
    for train in (True, False):
        layer = LAYERS[family](2, 3, backend="fused", dtype=F64, **_kwargs(family, "all")).train(train)
        check_gradcheck(layer, 2, seq_len=4, batch=3, lengths=torch.tensor([4, 0, 2]))
        assert layer.last_backend == "fused"


# ------------------------------------------------------------------ the ops

def _args(family, L=3, N=2, H=4, masks=True, grad=True, seed=5):
    """A reg op's arguments: tensors (requiring grad where differentiable), lengths [L, 1], the masks
    (training) or the rates (eval)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.5):
        return ((torch.rand(*shape, generator=g, dtype=F64) - 0.5) * 2 * scale).requires_grad_(grad)

    def bern(*shape, p):
        return (torch.rand(*shape, generator=g, dtype=F64) < p).to(F64)
    lengths = torch.tensor([L, 1])[:N]
    rd = bern(N, H, p=0.7) / 0.7
    zh, zc = (bern(L, N, H, p=0.4), bern(L, N, H, p=0.3)) if masks else (None, None)
    rates = (0.0, 0.0) if masks else (0.4, 0.3)
    if family == "peephole":
        return (r(L, N, 4 * H), r(4 * H, H), r(H), r(H), r(H), r(N, H), r(N, H), lengths, rd, zh, zc, *rates)
    if family == "ln_lstm":
        return (r(L, N, 4 * H), r(4 * H, H), 1 + r(4 * H, scale=0.2), 1 + r(H, scale=0.2), r(H), r(N, H), r(N, H),
                lengths, 1e-5, rd, zh, zc, *rates)
    return (r(L, N, 3 * H), r(3 * H, H), 1 + r(3 * H, scale=0.2), r(3 * H), r(N, H), lengths, 1e-5, rd, zh,
            rates[0])


OPS = {"peephole": "peephole_reg_fwd", "ln_lstm": "ln_lstm_reg_fwd", "ln_gru": "ln_gru_reg_fwd"}
SEQUENCES = {"peephole": _ops.peephole_reg_sequence, "ln_lstm": _ops.ln_lstm_reg_sequence,
             "ln_gru": _ops.ln_gru_reg_sequence}
STATES = {"peephole": 2, "ln_lstm": 2, "ln_gru": 1}


def _backward_args(family, args, outputs, grads):
    """The reg backward op's arguments after a forward on ``args`` with ``outputs``."""
    n = STATES[family]
    reg = args[-5:] if n == 2 else args[-3:]
    if family == "peephole":
        out, h_n, c_n, gates, cs, cn = outputs
        return (*grads, *args[1:8], out, gates, cs, cn, *reg)
    if family == "ln_lstm":
        out, h_n, c_n, gates, cs, nz, nc, rstd = outputs
        return (*grads, *args[1:8], out, gates, cs, nz, nc, rstd, *reg)
    out, h_n, gates, nz, rstd = outputs
    return (*grads, *args[1:6], out, gates, nz, rstd, *reg)


@pytest.mark.parametrize("masks", [True, False], ids=["masks", "rates"])
@pytest.mark.parametrize("family", list(OPS))
def test_op_matches_twin_and_opcheck(family, masks):
    """The op's visible results equal its reference twin's; opcheck (schema, fakes, autograd registration)
    of the forward and the backward op."""
    ops = torch.ops.rnnkit_fused
    name = OPS[family]
    args = _args(family, masks=masks)
    got = getattr(ops, name)(*args)
    want = twins.TWINS[name](*args)
    for i, (a, b) in enumerate(zip(got[:1 + STATES[family]], want)):
        assert_close(a, b, F64, f"{name} result {i}")
    torch.library.opcheck(getattr(ops, name).default, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    outputs = getattr(ops, name)(*plain)
    grads = [torch.rand_like(t) for t in outputs[:1 + STATES[family]]]
    bwd = getattr(ops, name.replace("_fwd", "_bwd"))
    torch.library.opcheck(bwd.default, _backward_args(family, plain, outputs, grads))


@pytest.mark.parametrize("family", list(OPS))
def test_op_gradcheck_and_second_derivative(family):
    """gradcheck of the hand-written backward (masks and lengths); gradgradcheck through the twin."""
    args = _args(family)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*t):
        a = list(args)
        for i, v in zip(tensors, t):
            a[i] = v
        return SEQUENCES[family](*a)
    inputs = tuple(args[i] for i in tensors)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_torch_compile_traces_the_op():
    """torch.compile (fullgraph, aot_eager) of a LayerNorm LSTM op with masks: the eager value and gradients."""
    from helpers import assert_compiled_matches_eager
    torch._dynamo.reset()
    args = _args("ln_lstm", grad=False)
    w_hh = args[1].clone().requires_grad_()

    def f(xp):
        out, h, c = _ops.ln_lstm_reg_sequence(xp, w_hh, *args[2:])
        return (out * out).sum() + h.sum() + c.sum()
    assert_compiled_matches_eager(f, args[0], [w_hh], F64)


@pytest.mark.parametrize("family", list(LAYERS))
def test_auto_picks_fused(family):
    """A regularized zoo layer runs fused under auto, in training and in eval (zoneout's expectation)."""
    x = torch.randn(5, 2, 3)
    for config in CONFIGS:
        layer = LAYERS[family](3, 8, **_kwargs(family, config))
        assert layer.which_backend(x) == "fused"
        layer(x)[0].sum().backward()
        assert layer.last_backend == "fused"
    layer = LAYERS[family](3, 8, zoneout=0.1).eval()
    assert layer.which_backend(x) == "fused"


def test_fused_scan_refuses_a_regularized_spec_it_has_no_kernel_for():
    """A family without regularized kernels (IndRNN) is refused by the scan itself (unsupported() declines
    such a layer before; no layer of the zoo offers it)."""
    ind = rnnkit.IndRNN(3, 4)
    p = ind._layer_params(0)
    s0 = (torch.zeros(1, 4),)
    rates = runner.RegularizerRates(zoneout=(0.1,))
    spec, p = runner.apply_regularizers(ind.cell_spec, p, s0, rates, True, 2)
    with pytest.raises(RuntimeError, match=r"no fused kernel for the 'indrnn_relu' cell with these regularizers"):
        fb.fused_scan(spec, p, torch.zeros(2, 1, 3), s0, None)


def test_bfloat16_is_declined():
    bf = rnnkit.LayerNormLSTM(3, 4, zoneout=0.1, dtype=torch.bfloat16)
    assert FUSED.unsupported(bf, torch.randn(2, 1, 3, dtype=torch.bfloat16)) is not None
    assert bf.which_backend(torch.randn(2, 1, 3, dtype=torch.bfloat16)) == "reference"


@pytest.mark.parametrize("family", list(OPS))
def test_op_errors_name_what_was_received(family):
    ops = torch.ops.rnnkit_fused
    name = OPS[family]
    op = getattr(ops, name)
    args = list(_args(family, grad=False))
    n = STATES[family]
    i_rd, i_zh = len(args) - (5 if n == 2 else 3), len(args) - (4 if n == 2 else 2)
    bad = list(args)
    bad[i_zh] = torch.zeros(3, 2, 5, dtype=F64)
    with pytest.raises(RuntimeError, match=r"zo_h has shape \[3, 2, 5\], expected \[3, 2, 4\]"):
        op(*bad)
    bad = list(args)
    bad[i_rd] = torch.ones(2, 4, dtype=F32)
    with pytest.raises(RuntimeError, match=r"rd_mask has dtype Float, expected Double"):
        op(*bad)
    bad = list(args)
    bad[i_zh], bad[len(args) - n] = None, 1.0
    words = r"zoneout rates must be in \[0, 1\), got 1 and 0" if n == 2 else r"the zoneout rate must be in \[0, 1\), got 1"
    with pytest.raises(RuntimeError, match=name + ": " + words):
        op(*bad)
    if n == 2:
        bad = list(args)
        bad[i_zh + 1] = torch.zeros(3, 1, 4, dtype=F64)
        with pytest.raises(RuntimeError, match=r"zo_c has shape \[3, 1, 4\], expected \[3, 2, 4\]"):
            op(*bad)
    if family == "peephole":  # the backward checks the saved pre-zoneout cell state it reads
        outputs = op(*args)
        grads = [torch.ones_like(t) for t in outputs[:3]]
        bwd = list(_backward_args(family, args, outputs, grads))
        bwd[13] = torch.zeros(0, dtype=F64)
        with pytest.raises(RuntimeError, match=r"cn has shape \[0\], expected \[3, 2, 4\]"):
            ops.peephole_reg_bwd(*bwd)


@pytest.mark.parametrize("backend", ["fused", "auto"])
@pytest.mark.parametrize("cls, kwargs", [(rnnkit.LayerNormGRU, dict(recurrent_dropout=0.2)),
                                         (rnnkit.LSTM, dict(recurrent_dropout=0.2, zoneout=0.1))],
                         ids=["ln_gru", "lstm"])
def test_torch_compile_dynamic_in_training(cls, kwargs, backend):
    """torch.compile(fullgraph=True, dynamic=True) of a regularized layer in training, at two shapes: the eager
    value under the same seed (dynamic=True made the rates symbolic, and the backends' reason text, which
    formats them, broke the trace)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = cls(3, 4, backend=backend, dtype=F64, **kwargs)
    compiled = torch.compile(lambda x: layer(x)[0].sum(), fullgraph=True, backend="aot_eager", dynamic=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        for seed, shape in ((1, (5, 3, 3)), (2, (7, 2, 3))):
            x = torch.randn(shape, dtype=F64)
            torch.manual_seed(seed)
            got = compiled(x)
            torch.manual_seed(seed)
            want = layer(x)[0].sum()
            assert_close(got.detach(), want.detach(), F64, f"{shape}")


@pytest.mark.parametrize("family", ["lstm", "ln_gru", "peephole"])
def test_vmap_with_different_randomness(family):
    """torch.func.vmap(randomness="different") of a regularized layer in training (each sample its own masks:
    bernoulli_mask's ``out=`` had no batching rule): identical samples come out different, and the fused
    backend equals the reference under one seed; randomness="same" gives each sample the unbatched call's
    result under the same seed."""
    cls = rnnkit.LSTM if family == "lstm" else LAYERS[family]
    kwargs = dict(zoneout=0.2, recurrent_dropout=0.3)
    x = torch.randn(5, 2, 3, dtype=F64).expand(4, 5, 2, 3)  # four identical samples
    results = {}
    for backend in ("reference", "fused"):
        torch.manual_seed(0)
        layer = cls(3, 4, backend=backend, dtype=F64, **kwargs)
        torch.manual_seed(1)
        results[backend] = torch.func.vmap(lambda v: layer(v)[0], randomness="different")(x)
        torch.manual_seed(2)
        same = torch.func.vmap(lambda v: layer(v)[0], randomness="same")(x)
        torch.manual_seed(2)
        alone = layer(x[0])[0]
        for b in range(4):
            assert_close(same[b], alone, F64, f"{backend} same, sample {b}")
    assert_close(results["fused"], results["reference"], F64, "different")
    assert not torch.allclose(results["fused"][0], results["fused"][1])
