"""The fused backend in bfloat16 (RNN tanh/relu, LSTM with and without
``proj_size``, GRU): bf16 tensors at the op boundary, float32 gate math and cell
state inside.

The oracle is the reference backend in float64 run on the very same (bf16-exact)
weights, input and initial states, so what is measured is the arithmetic error
alone. The yardstick is the reference backend's OWN bfloat16 error against that
oracle (ATen ops in bf16, every step): the fused error must be within a small
factor of it, and below an absolute bound. Every output, final state and gradient
is checked, with lengths (a zero-length row, rows ending early), 2 layers,
bidirectional; on the MKL bf16 GEMM path (batch >= 4), the few-rows path
(batch < 4) and the float32 fallback (RNNKIT_FUSED_BF16_GEMM=0)."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from rnnkit.functional import GRU_SPEC, LSTM_SPEC
from rnnkit.fused import backend as fb
from rnnkit.fused.cells import cell_unsupported

FUSED = BACKENDS["fused"]
REASON = FUSED.unavailable()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
BF = torch.bfloat16

# Criterion, per tensor, with errors measured as max |a - oracle| / max |oracle| (relative to the tensor's scale):
#   fused_err <= FACTOR * reference_bf16_err + SLACK   and   fused_err <= BOUND.
# SLACK = 2^-8 is one bf16 ulp at the tensor's largest element: every checked tensor is itself rounded to bf16
# (unit roundoff 2^-9), so two implementations may differ by that much even when both are as exact as bf16 allows.
# BOUND: bf16 keeps 8 significant bits; a few steps, two layers and short GEMMs (K <= 2 * 19) accumulate tens of
# roundoffs of 2^-9, i.e. a few percent at most; a wrong formula or a wrong gate/row is off by O(1) of the scale.
FACTOR, SLACK, BOUND = 2.0, 2.0 ** -8, 0.05

L, H_IN, HIDDEN, LAYERS = 6, 5, 19, 2  # 19: whole bf16 vectors (16) and a remainder
CONFIGS = {  # name -> (class, kwargs)
    "rnn_tanh": (rnnkit.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}),
    "lstm": (rnnkit.LSTM, {}),
    "lstm_proj": (rnnkit.LSTM, {"proj_size": 7}),
    "gru": (rnnkit.GRU, {}),
}


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16 and back to float64: a value both dtypes hold exactly."""
    return t.to(BF).to(torch.float64)


def _models(name: str, seed: int = 0):
    cls, kw = CONFIGS[name]
    torch.manual_seed(seed)
    m64 = cls(H_IN, HIDDEN, LAYERS, bidirectional=True, dtype=torch.float64, backend="reference", **kw)
    with torch.no_grad():
        for p in m64.parameters():
            p.copy_(_bf16_exact(p))
    mods = {"oracle": m64}
    for backend in ("fused", "reference"):
        m = cls(H_IN, HIDDEN, LAYERS, bidirectional=True, dtype=BF, backend=backend, **kw)
        m.load_state_dict({k: v.to(BF) for k, v in m64.state_dict().items()})
        mods[backend] = m
    return mods


def _run(m, x, state0, lengths, weights):
    """Outputs, final states and the gradients of a weighted sum of all of them
    with respect to the input, the initial states and every parameter."""
    dtype = next(m.parameters()).dtype
    xi = x.to(dtype).requires_grad_()
    s0 = tuple(s.to(dtype).requires_grad_() for s in state0)
    out, h = m(xi, s0 if len(s0) > 1 else s0[0], lengths=lengths)
    results = [out, *(h if isinstance(h, tuple) else (h,))]
    loss = sum((r * w.to(dtype)).sum() for r, w in zip(results, weights))
    leaves = [xi, *s0, *m.parameters()]
    grads = torch.autograd.grad(loss, leaves)
    names = ["output"] + [f"state {i}" for i in range(len(results) - 1)] + ["grad input"] + \
        [f"grad state0 {i}" for i in range(len(s0))] + [f"grad {n}" for n, _ in m.named_parameters()]
    return dict(zip(names, [t.detach().to(torch.float64) for t in [*results, *grads]]))


def _inputs(name: str, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = _bf16_exact(torch.randn(L, batch, H_IN, generator=g, dtype=torch.float64))
    proj = CONFIGS[name][1].get("proj_size", 0)
    h0 = _bf16_exact(0.5 * torch.randn(2 * LAYERS, batch, proj or HIDDEN, generator=g, dtype=torch.float64))
    state0 = (h0,)
    if name.startswith("lstm"):
        state0 = (h0, _bf16_exact(0.5 * torch.randn(2 * LAYERS, batch, HIDDEN, generator=g, dtype=torch.float64)))
    lengths = torch.tensor([L, 3, 0, 5, 1][:batch]) if batch > 2 else torch.tensor([L, 2])
    return x, state0, lengths


def _weights(results: dict, seed: int = 2):
    """Loss weights, bf16-exact so every run backpropagates the same seeds."""
    g = torch.Generator().manual_seed(seed)
    shapes = [v.shape for k, v in results.items() if not k.startswith("grad")]
    return [_bf16_exact(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


def _rel_err(a: torch.Tensor, oracle: torch.Tensor) -> float:
    scale = oracle.abs().max().item()
    return (a - oracle).abs().max().item() / max(scale, 1e-30)


def _check_against_oracle(name: str, batch: int):
    mods = _models(name)
    x, state0, lengths = _inputs(name, batch)
    shapes_probe = _run(mods["oracle"], x, state0, lengths, weights=[torch.zeros(1)] * 3)
    weights = _weights(shapes_probe)
    res = {k: _run(m, x, state0, lengths, weights) for k, m in mods.items()}
    assert mods["fused"].last_backend == "fused"
    assert set(res["fused"]) == set(res["oracle"])
    report = []
    for key, oracle in res["oracle"].items():
        fused_err = _rel_err(res["fused"][key], oracle)
        ref_err = _rel_err(res["reference"][key], oracle)
        report.append(f"{key}: fused {fused_err:.2e}, reference bf16 {ref_err:.2e}")
        assert fused_err <= FACTOR * ref_err + SLACK, "\n".join(report)
        assert fused_err <= BOUND, "\n".join(report)
    # a zero-length row keeps its initial state (exactly: it is copied, never rounded)
    if batch > 2:
        for i, s0 in enumerate(state0):
            assert torch.equal(res["fused"][f"state {i}"][:, 2], s0[:, 2]), f"state {i} of the empty row"


@needs_fused
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [5, 2], ids=["gemm", "few_rows"])
def test_bf16_matches_float64_oracle_as_well_as_reference_bf16(name, batch):
    _check_against_oracle(name, batch)


@needs_fused
@pytest.mark.parametrize("name", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_bf16_float32_fallback_matches_oracle(name, monkeypatch):
    """Without MKL's bf16 GEMM (another BLAS, or RNNKIT_FUSED_BF16_GEMM=0) the
    product runs in float32 on a float32 copy of the weights: same criterion."""
    monkeypatch.setenv("RNNKIT_FUSED_BF16_GEMM", "0")
    assert torch.ops.rnnkit_fused.bf16_gemm() == 0
    _check_against_oracle(name, 5)


@needs_fused
def test_bf16_outputs_are_bf16_and_saved_tensors_float32():
    ops = torch.ops.rnnkit_fused
    xp, w = torch.randn(3, 4, 8, dtype=BF), torch.randn(8, 2, dtype=BF)
    out = ops.lstm_fwd(xp, w, None, torch.zeros(4, 2, dtype=BF), torch.zeros(4, 2, dtype=BF), None)
    assert [t.dtype for t in out] == [BF, BF, BF, torch.float32, torch.float32, BF]
    out = ops.gru_fwd(torch.randn(3, 4, 6, dtype=BF), torch.randn(6, 2, dtype=BF), None, torch.zeros(4, 2, dtype=BF),
                      None)
    assert [t.dtype for t in out] == [BF, BF, torch.float32, torch.float32]


# ------------------------------------------------------------------ torch.library / torch.compile

def _bf16_op_samples():
    ops = torch.ops.rnnkit_fused
    g = torch.Generator().manual_seed(0)
    L_, N, H, P = 4, 5, 3, 2

    def r(*shape, grad=True):
        return (0.5 * torch.randn(*shape, generator=g)).to(BF).requires_grad_(grad)
    lengths = torch.tensor([4, 2, 0, 1, 3])
    samples = [
        (ops.rnn_fwd.default, (r(L_, N, H), r(H, H), r(N, H), lengths, 1)),
        (ops.lstm_fwd.default, (r(L_, N, 4 * H), r(4 * H, H), None, r(N, H), r(N, H), lengths)),
        (ops.lstm_fwd.default, (r(L_, N, 4 * H), r(4 * H, P), r(P, H), r(N, P), r(N, H), None)),
        (ops.gru_fwd.default, (r(L_, N, 3 * H), r(3 * H, H), r(3 * H), r(N, H), lengths)),
    ]
    out = ops.lstm_fwd(r(L_, N, 4 * H, grad=False), r(4 * H, P, grad=False), r(P, H, grad=False),
                       r(N, P, grad=False), r(N, H, grad=False), lengths)
    samples.append((ops.lstm_bwd.default, (r(L_, N, P, grad=False), r(N, P, grad=False), r(N, H, grad=False),
                                           r(4 * H, P, grad=False), r(P, H, grad=False), r(N, P, grad=False),
                                           r(N, H, grad=False), lengths, out[0], out[3], out[4], out[5])))
    out = ops.gru_fwd(r(L_, N, 3 * H, grad=False), r(3 * H, H, grad=False), None, r(N, H, grad=False), None)
    samples.append((ops.gru_bwd.default, (r(L_, N, H, grad=False), r(N, H, grad=False), r(3 * H, H, grad=False),
                                          r(N, H, grad=False), None, out[0], out[2], out[3])))
    out = ops.rnn_fwd(r(L_, N, H, grad=False), r(H, H, grad=False), r(N, H, grad=False), lengths, 0)
    samples.append((ops.rnn_bwd.default, (r(L_, N, H, grad=False), r(N, H, grad=False), r(H, H, grad=False),
                                          r(N, H, grad=False), lengths, out[0], 0)))
    return samples


@needs_fused
def test_opcheck_bf16():
    """torch.library.opcheck on bf16 samples: the fake implementations give the
    bf16 outputs and the float32 saved tensors, autograd is registered."""
    for op, args in _bf16_op_samples():
        torch.library.opcheck(op, args)


@needs_fused
def test_torch_compile_fullgraph_bf16():
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(3, 4, backend="fused", dtype=BF)
    p = lstm._layer_params(0)
    x = torch.randn(5, 4, 3, dtype=BF)
    s0 = (torch.zeros(4, 4, dtype=BF), torch.zeros(4, 4, dtype=BF))

    def f(x):
        out, (h, c) = fb.scan_lstm(LSTM_SPEC, p, x, s0, None)
        return (out.float() ** 2).sum() + h.float().sum() + c.float().sum()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = f(xe), compiled(xc)
    ye.backward()
    yc.backward()
    assert xc.grad.dtype == BF
    torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)  # the same kernels, eager and traced
    torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)


# ------------------------------------------------------------------ what is declined, and auto's choice

@needs_fused
def test_bf16_declined_where_no_bf16_kernel():
    with pytest.raises(ValueError, match=r"backend='fused' cannot run this configuration: the fused kernels run "
                                         r"float32 and float64, got parameters of dtype torch.bfloat16"):
        rnnkit.PeepholeLSTM(3, 4, backend="fused", dtype=BF)
    with pytest.raises(ValueError, match=r"the fused kernels run float32, float64 and bfloat16, got parameters of "
                                         r"dtype torch.float16"):
        rnnkit.LSTM(3, 4, backend="fused", dtype=torch.float16)
    # the single-step cells run bf16 through the sequence op on one step (float16: declined, with the reason)
    cell = rnnkit.LSTMCell(3, 4, dtype=BF)
    assert cell_unsupported(cell, torch.randn(2, 3, dtype=BF)) is None
    assert cell_unsupported(rnnkit.LSTMCell(3, 4, dtype=torch.float16)) == \
        "the fused kernels run float32, float64 and bfloat16, got parameters of dtype torch.float16"


@needs_fused
@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_bf16_cells_step_like_the_bf16_sequence(kind):
    """A bf16 fused cell step equals its layer's bf16 fused sequence op on one step, bit for bit."""
    torch.manual_seed(0)
    cell = getattr(rnnkit, kind)(3, 4, dtype=BF, backend="fused")
    layer = getattr(rnnkit, kind[:-4])(3, 4, dtype=BF, backend="fused")
    layer.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(2, 3, dtype=BF)
    with torch.no_grad():
        got = cell(x)
        want = layer(x.unsqueeze(0))[1]
    got = got[0] if isinstance(got, tuple) else got
    want = want[0][0] if isinstance(want, tuple) else want[0]
    assert cell.last_backend == "fused"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_fused
def test_bwd_op_names_a_saved_tensor_of_the_wrong_dtype():
    ops = torch.ops.rnnkit_fused
    z = torch.zeros
    with pytest.raises(RuntimeError, match=r"gates has dtype BFloat16, expected Float \(the bfloat16 kernels save "
                                           r"it in float32\)"):
        ops.lstm_bwd(z(3, 1, 2, dtype=BF), z(1, 2, dtype=BF), z(1, 2, dtype=BF), z(8, 2, dtype=BF), None,
                     z(1, 2, dtype=BF), z(1, 2, dtype=BF), None, z(3, 1, 2, dtype=BF), z(3, 1, 8, dtype=BF),
                     z(3, 1, 2), z(0, dtype=BF))
    with pytest.raises(RuntimeError, match=r"w_hh has dtype Float, expected BFloat16"):
        ops.gru_fwd(z(3, 1, 6, dtype=BF), z(6, 2), None, z(1, 2, dtype=BF), None)


def test_table_key_has_a_dtype_dimension():
    assert fb.table_key(rnnkit.LSTM(3, 4)) == "lstm"
    assert fb.table_key(rnnkit.LSTM(3, 4, dtype=torch.float64)) == "lstm"
    assert fb.table_key(rnnkit.LSTM(3, 4, dtype=BF)) == "lstm_bfloat16"
    assert fb.table_key(rnnkit.LSTM(3, 4, proj_size=2, dtype=BF)) == "lstm_proj_bfloat16"
    assert fb.table_key(rnnkit.GRU(3, 4, dtype=BF)) == "gru_bfloat16"


@needs_fused
def test_auto_follows_the_bf16_rows_of_the_table(monkeypatch):
    table = {"fastest": {"lstm": {"S": "fused", "M": "fused"},
                         "lstm_bfloat16": {"S": "torch", "M": "fused"},
                         "lstm_bfloat16_lengths": {"S": "fused"},
                         "gru_bfloat16": {"S": "torch"}}}
    monkeypatch.setattr(FUSED, "_table", table)
    x_s, x_m = torch.randn(10, 1, 32, dtype=BF), torch.randn(10, 16, 64, dtype=BF)
    assert rnnkit.LSTM(32, 64, dtype=BF).which_backend(x_s) == "torch"
    assert rnnkit.LSTM(32, 64).which_backend(x_s.float()) == "fused"  # float32 reads its own row
    assert rnnkit.LSTM(64, 128, dtype=BF).which_backend(x_m) == "fused"
    assert rnnkit.LSTM(32, 64, dtype=BF).which_backend(x_s, lengths=torch.tensor([10])) == "fused"
    assert rnnkit.GRU(32, 64, dtype=BF).which_backend(x_s) == "torch"
    # unmeasured bf16 row (no rnn_tanh_bfloat16): the default order, fused first
    assert rnnkit.RNN(32, 64, dtype=BF).which_backend(x_s) == "fused"
    # a table without any bf16 row: bf16 layers keep the default order too
    monkeypatch.setattr(FUSED, "_table", {"fastest": {"lstm": {"S": "torch"}}})
    assert rnnkit.LSTM(32, 64, dtype=BF).which_backend(x_s) == "fused"
    assert rnnkit.LSTM(32, 64).which_backend(x_s.float()) == "torch"
