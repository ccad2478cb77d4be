"""The fused backend: its ops against gradcheck and the reference scan (the
lengths oracle), torch.library's opcheck, torch.compile tracing, the cells'
fused step, auto's measured choice, and the fallback when it cannot build.

test_parity.py runs the fused backend against torch.nn on the whole grid."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from rnnkit.fused import _build, _ops
from rnnkit.fused import backend as fb
from rnnkit.runner import reference_scan
from rnnkit.functional import GRU_SPEC, LSTM_SPEC, rnn_spec
from helpers import assert_close, flatten_states, weighted_sum

FUSED = BACKENDS["fused"]
REASON = FUSED.unavailable()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
DT = torch.float64


def _params(spec, h_in, hidden, proj=0, bias=True, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = spec.gates * hidden
    h_out = proj or hidden

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=dtype) - 0.5).requires_grad_()
    p = {"weight_ih": r(G, h_in), "weight_hh": r(G, h_out)}
    p.update({"bias_ih": r(G), "bias_hh": r(G)} if bias else {"bias_ih": None, "bias_hh": None})
    if proj:
        p["weight_hr"] = r(proj, hidden)
    return p


SPECS = {"rnn_tanh": rnn_spec("tanh"), "rnn_relu": rnn_spec("relu"), "lstm": LSTM_SPEC, "gru": GRU_SPEC}
FAMILIES = [("rnn_tanh", 0), ("rnn_relu", 0), ("lstm", 0), ("lstm", 2), ("gru", 0)]


def _state0(spec, n, hidden, proj, dtype=DT, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(n, proj or hidden, generator=g, dtype=dtype)]
    if spec.num_states == 2:
        s.append(torch.randn(n, hidden, generator=g, dtype=dtype))
    return tuple(t.requires_grad_() for t in s)


# ------------------------------------------------------------------ the ops against the oracles

@needs_fused
@pytest.mark.parametrize("family,proj", FAMILIES)
@pytest.mark.parametrize("lengths", [None, [3, 0, 5, 1]], ids=["full", "lengths"])
def test_scan_matches_reference_scan(family, proj, lengths):
    """Outputs, final state and every gradient equal the reference scan's, with
    zero-length rows and rows ending early (state held past the length)."""
    spec = SPECS[family]
    L, N, h_in, hidden = 5, 4, 3, 4
    lengths = None if lengths is None else torch.tensor(lengths)
    p = _params(spec, h_in, hidden, proj)
    x = torch.randn(L, N, h_in, dtype=DT, requires_grad=True)
    s0 = _state0(spec, N, hidden, proj)
    results = []
    for scan in (fb.fused_scan, reference_scan):
        out, state = scan(spec, p, x, s0, lengths)
        leaves = [x, *s0, *[v for v in p.values() if v is not None]]
        grads = torch.autograd.grad(weighted_sum([out, *state]), leaves)
        results.append((out, state, grads))
    (o1, s1, g1), (o2, s2, g2) = results
    assert_close(o1, o2, DT, "output")
    for i, (a, b) in enumerate(zip(s1, s2)):
        assert_close(a, b, DT, f"state {i}")
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert_close(a, b, DT, f"grad {i}")
    if lengths is not None:  # a zero-length row keeps its initial state exactly
        for a, b in zip(s1, s0):
            assert torch.equal(a[1], b[1])


@needs_fused
@pytest.mark.parametrize("family,proj", FAMILIES)
def test_ops_gradcheck(family, proj):
    """gradcheck (float64) of each sequence op with its hand-written backward,
    with a zero-length row, a short row and a full row."""
    spec = SPECS[family]
    L, N, hidden = 4, 3, 3
    G = spec.gates * hidden
    lengths = torch.tensor([0, 2, 4])
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=DT) - 0.5).requires_grad_()
    xp, h0 = r(L, N, G), r(N, proj or hidden)
    w_hh = r(G, proj or hidden)
    if family.startswith("rnn"):
        fn = lambda xp, w, h0: _ops.rnn_sequence(xp, w, h0, lengths, _ops.ACT[family])  # noqa: E731
        args = (xp, w_hh, h0)
    elif family == "gru":
        fn = lambda xp, w, b, h0: _ops.gru_sequence(xp, w, b, h0, lengths)  # noqa: E731
        args = (xp, w_hh, r(G), h0)
    elif proj:
        fn = lambda xp, w, wr, h0, c0: _ops.lstm_sequence(xp, w, wr, h0, c0, lengths)  # noqa: E731
        args = (xp, w_hh, r(proj, hidden), h0, r(N, hidden))
    else:
        fn = lambda xp, w, h0, c0: _ops.lstm_sequence(xp, w, None, h0, c0, lengths)  # noqa: E731
        args = (xp, w_hh, h0, r(N, hidden))
    assert torch.autograd.gradcheck(fn, args)


def _op_samples():
    g = torch.Generator().manual_seed(5)
    L, N, H, P = 3, 2, 4, 2

    def r(*shape, grad=True):
        return (torch.rand(*shape, generator=g, dtype=DT) - 0.5).requires_grad_(grad)
    lengths = torch.tensor([3, 1])
    ops = torch.ops.rnnkit_fused
    samples = [
        (ops.rnn_fwd.default, (r(L, N, H), r(H, H), r(N, H), lengths, 0)),
        (ops.rnn_fwd.default, (r(L, N, H), r(H, H), r(N, H), None, 1)),
        (ops.lstm_fwd.default, (r(L, N, 4 * H), r(4 * H, H), None, r(N, H), r(N, H), lengths)),
        (ops.lstm_fwd.default, (r(L, N, 4 * H), r(4 * H, P), r(P, H), r(N, P), r(N, H), None)),
        (ops.gru_fwd.default, (r(L, N, 3 * H), r(3 * H, H), r(3 * H), r(N, H), lengths)),
        (ops.gru_fwd.default, (r(L, N, 3 * H), r(3 * H, H), None, r(N, H), None)),
        (ops.lstm_cell.default, (r(N, 3, grad=False), r(N, H, grad=False), r(N, H, grad=False),
                                 r(4 * H, 3, grad=False), r(4 * H, H, grad=False), r(4 * H, grad=False), None)),
        (ops.gru_cell.default, (r(N, 3, grad=False), r(N, H, grad=False), r(3 * H, 3, grad=False),
                                r(3 * H, H, grad=False), None, r(3 * H, grad=False))),
        (ops.rnn_cell.default, (r(N, 3, grad=False), r(N, H, grad=False), r(H, 3, grad=False),
                                r(H, H, grad=False), r(H, grad=False), r(H, grad=False), 0)),
    ]
    samples += [(ops.lstm_infer.default, (r(L, N, 3, grad=False), r(4 * H, 3, grad=False), r(4 * H, grad=False),
                                          r(4 * H, H, grad=False), None, r(N, H, grad=False), r(N, H, grad=False),
                                          lengths)),
                (ops.lstm_infer.default, (r(L, N, 3, grad=False), r(4 * H, 3, grad=False), None,
                                          r(4 * H, P, grad=False), r(P, H, grad=False), r(N, P, grad=False),
                                          r(N, H, grad=False), None))]
    samples += [(ops.gru_infer.default, (r(L, N, 3, grad=False), r(3 * H, 3, grad=False), r(3 * H, grad=False),
                                         r(3 * H, H, grad=False), r(3 * H, grad=False), r(N, H, grad=False), lengths)),
                (ops.gru_infer.default, (r(L, N, 3, grad=False), r(3 * H, 3, grad=False), None,
                                         r(3 * H, H, grad=False), None, r(N, H, grad=False), None))]
    out, h_n, c_n, gates, cs, ms = ops.lstm_fwd(r(L, N, 4 * H, grad=False), r(4 * H, H, grad=False), None,
                                                r(N, H, grad=False), r(N, H, grad=False), lengths)
    samples.append((ops.lstm_bwd.default, (r(L, N, H, grad=False), r(N, H, grad=False), r(N, H, grad=False),
                                           r(4 * H, H, grad=False), None, r(N, H, grad=False), r(N, H, grad=False),
                                           lengths, out, gates, cs, ms)))
    out, h_n, rzn, hn = ops.gru_fwd(r(L, N, 3 * H, grad=False), r(3 * H, H, grad=False), None,
                                    r(N, H, grad=False), None)
    samples.append((ops.gru_bwd.default, (r(L, N, H, grad=False), r(N, H, grad=False), r(3 * H, H, grad=False),
                                          r(N, H, grad=False), None, out, rzn, hn)))
    out, h_n = ops.rnn_fwd(r(L, N, H, grad=False), r(H, H, grad=False), r(N, H, grad=False), lengths, 0)
    samples.append((ops.rnn_bwd.default, (r(L, N, H, grad=False), r(N, H, grad=False), r(H, H, grad=False),
                                          r(N, H, grad=False), lengths, out, 0)))
    return samples


@needs_fused
def test_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake tensors and
    AOT dispatch of every op."""
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


@needs_fused
def test_torch_compile_traces_the_ops():
    """torch.compile (fullgraph, aot_eager: fake tensors + the registered autograd)
    gives the eager results and gradients."""
    torch._dynamo.reset()
    lstm = rnnkit.LSTM(3, 4, backend="fused", dtype=DT)
    p = lstm._layer_params(0)
    x = torch.randn(5, 2, 3, dtype=DT)
    s0 = (torch.zeros(2, 4, dtype=DT), torch.zeros(2, 4, dtype=DT))

    def f(x):
        out, (h, c) = fb.scan_lstm(LSTM_SPEC, p, x, s0, None)
        return (out * out).sum() + h.sum() + c.sum()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = f(xe), compiled(xc)
    ye.backward()
    yc.backward()
    assert_close(yc, ye, DT, "compiled output")
    assert_close(xc.grad, xe.grad, DT, "compiled grad")


@needs_fused
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_padded_lengths_bidirectional_batch_first_match_reference(mode):
    """Padded input with lengths (no packing), bidirectional, 2 layers, batch_first:
    fused equals the reference backend (the lengths oracle), gradients included."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, dtype=DT)
    if mode == "LSTM":
        kw["proj_size"] = 2
    fused = getattr(rnnkit, mode)(3, 4, backend="fused", **kw)
    ref = getattr(rnnkit, mode)(3, 4, backend="reference", **kw)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(4, 6, 3, dtype=DT)
    lengths = torch.tensor([6, 0, 2, 5])
    res = []
    for m in (fused, ref):
        xi = x.clone().requires_grad_()
        out, h = m(xi, lengths=lengths, padding_value=-1.0)
        weighted_sum([out, *flatten_states(h)]).backward()
        res.append([out, *flatten_states(h), xi.grad, *[q.grad for q in m.parameters()]])
    assert fused.last_backend == "fused"
    for i, (a, b) in enumerate(zip(*res)):
        assert_close(a, b, DT, f"tensor {i}")


@needs_fused
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_streaming_in_chunks_equals_whole_sequence(mode):
    """Feeding a sequence in chunks, carrying the state, equals one call."""
    torch.manual_seed(1)
    m = getattr(rnnkit, mode)(3, 5, num_layers=2, backend="fused", dtype=DT)
    x = torch.randn(9, 2, 3, dtype=DT)
    whole, h_whole = m(x)
    state, outs = None, []
    for chunk in x.split([4, 1, 4]):
        out, state = m(chunk, state)
        outs.append(out)
    assert_close(torch.cat(outs), whole, DT, "output")
    for a, b in zip(flatten_states(state), flatten_states(h_whole)):
        assert_close(a, b, DT, "state")


# ------------------------------------------------------------------ cells

@needs_fused
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell", "RNNCell_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cells_fused_step_matches_torch_nn(name, dtype):
    """The fused step (inference op, and the L=1 sequence op under autograd)
    against torch.nn's cell: outputs and every gradient."""
    kw = {"nonlinearity": "relu"} if name.endswith("relu") else {}
    cls = name.split("_")[0]
    torch.manual_seed(2)
    ours = getattr(rnnkit, cls)(3, 5, backend="fused", dtype=dtype, **kw)
    theirs = getattr(torch.nn, cls)(3, 5, dtype=dtype, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, dtype=dtype)
    hx = torch.randn(4, 5, dtype=dtype)
    hx = (hx, torch.randn(4, 5, dtype=dtype)) if cls == "LSTMCell" else hx
    with torch.no_grad():
        a, b = flatten_states(ours(x, hx)), flatten_states(theirs(x, hx))
    assert ours.last_backend == "fused"
    for u, v in zip(a, b):
        assert_close(u, v, dtype, "no-grad step")
    res = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        hi = tuple(t.clone().requires_grad_() for t in flatten_states(hx))
        new = flatten_states(m(xi, hi if cls == "LSTMCell" else hi[0]))
        weighted_sum(new).backward()
        res.append([*new, xi.grad, *[t.grad for t in hi], *[q.grad for q in m.parameters()]])
    for i, (u, v) in enumerate(zip(*res)):
        assert_close(u, v, dtype, f"tensor {i}")
    # unbatched
    with torch.no_grad():
        one = flatten_states(ours(x[0], tuple(t[0] for t in flatten_states(hx)) if cls == "LSTMCell" else hx[0]))
    for u, v in zip(one, b):
        assert_close(u, v[0], dtype, "unbatched")


@needs_fused
def test_cell_auto_uses_fused_only_without_grad():
    cell = rnnkit.LSTMCell(3, 4)
    x = torch.randn(2, 3)
    cell(x)
    assert cell.last_backend == "torch"
    with torch.no_grad():
        cell(x)
    assert cell.last_backend == "fused"


def test_cell_fused_rejects_unsupported_cell():
    with pytest.raises(ValueError, match=r"RNNCell: backend='fused' cannot run this cell: .*(no fused kernel for "
                                         r"the 'rnn_gelu' cell|disabled|failed)"):
        rnnkit.RNNCell(3, 4, nonlinearity="gelu", backend="fused")


# ------------------------------------------------------------------ errors from the ops

@needs_fused
def test_op_shape_errors_name_what_was_received():
    ops = torch.ops.rnnkit_fused
    w = torch.zeros(8, 2, dtype=DT)
    with pytest.raises(RuntimeError, match=r"lstm_fwd: xp must be \(L, N, G\), got \[3, 8\]"):
        ops.lstm_fwd(torch.zeros(3, 8, dtype=DT), w, None, torch.zeros(1, 2, dtype=DT), torch.zeros(1, 2, dtype=DT),
                     None)
    with pytest.raises(RuntimeError, match=r"h0 has shape \[1, 3\], expected \[1, 2\]"):
        ops.lstm_fwd(torch.zeros(3, 1, 8, dtype=DT), w, None, torch.zeros(1, 3, dtype=DT),
                     torch.zeros(1, 2, dtype=DT), None)
    with pytest.raises(RuntimeError, match=r"lengths must be \(N,\) = \(1,\), got \[2\]"):
        ops.gru_fwd(torch.zeros(3, 1, 6, dtype=DT), torch.zeros(6, 2, dtype=DT), None, torch.zeros(1, 2, dtype=DT),
                    torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"float32 or float64 only, got Half"):
        ops.rnn_fwd(torch.zeros(3, 1, 2, dtype=torch.half), torch.zeros(2, 2, dtype=torch.half),
                    torch.zeros(1, 2, dtype=torch.half), None, 0)
    with pytest.raises(RuntimeError, match=r"act must be 0 \(tanh\) or 1 \(relu\), got 7"):
        ops.rnn_fwd(torch.zeros(3, 1, 2), torch.zeros(2, 2), torch.zeros(1, 2), None, 7)


@needs_fused
def test_backend_declines_what_it_cannot_run():
    with pytest.raises(ValueError, match=r"backend='fused' cannot run this configuration: the fused kernels run "
                                         r"float32, float64 and bfloat16, got parameters of dtype torch.float16"):
        rnnkit.LSTM(3, 4, backend="fused", dtype=torch.float16)
    lstm = rnnkit.LSTM(3, 4, dtype=torch.float16)
    assert lstm.which_backend(torch.randn(2, 1, 3, dtype=torch.float16)) != "fused"


# ------------------------------------------------------------------ auto's measured choice

def test_size_class_picks_the_nearest_benchmark_size():
    assert fb.size_class(1, 64) == "S"
    assert fb.size_class(2, 48) == "S"
    assert fb.size_class(16, 128) == "M"
    assert fb.size_class(64, 256) == "L"
    assert fb.size_class(256, 1024) == "L"


@needs_fused
def test_auto_follows_the_measured_table(monkeypatch):
    table = {"fastest": {"lstm": {"S": "torch", "M": "fused", "L": "torch"}, "gru": {"S": "fused"}}}
    monkeypatch.setattr(FUSED, "_table", table)
    lstm = rnnkit.LSTM(32, 64)
    assert lstm.which_backend(torch.randn(10, 1, 32)) == "torch"
    assert rnnkit.LSTM(64, 128).which_backend(torch.randn(10, 16, 64)) == "fused"
    assert rnnkit.GRU(32, 64).which_backend(torch.randn(10, 1, 32)) == "fused"
    # unmeasured key (lstm with projection): the default order, fused first
    assert rnnkit.LSTM(32, 64, proj_size=8).which_backend(torch.randn(10, 1, 32)) == "fused"


def test_shipped_table_is_well_formed():
    table = fb.load_table()
    assert table, f"{fb.TABLE_PATH} is missing: run benchmarks/fused_bench.py --write-table"
    assert "machine" in table
    for key, per_size in table["fastest"].items():
        assert key.removesuffix("_lengths").removesuffix("_bfloat16").removesuffix("_proj") in fb.KERNELS
        assert set(per_size) <= set(fb.SIZE_CLASSES)
        assert set(per_size.values()) <= {"fused", "torch"}


# ------------------------------------------------------------------ without the extension

def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(_build.DISABLE_ENV, "1")
    assert "RNNKIT_DISABLE_FUSED=1" in FUSED.unavailable()
    with pytest.raises(ValueError, match=r"backend='fused' cannot run this configuration: disabled by the "
                                         r"environment variable RNNKIT_DISABLE_FUSED=1"):
        rnnkit.GRU(3, 4, backend="fused")
    gru = rnnkit.GRU(3, 4)
    gru(torch.randn(5, 2, 3))
    assert gru.last_backend == "torch"
    assert rnnkit.describe_backends()["fused"].startswith("disabled")


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    """A failed build: auto warns once (with the compiler's first error line) and
    runs on torch; an explicit backend='fused' raises with the reason."""
    monkeypatch.delenv(_build.DISABLE_ENV, raising=False)
    reason = "building the C++ extension failed: fused.cpp:1:10: error: boom"
    monkeypatch.setitem(_build._state, "loaded", False)
    monkeypatch.setitem(_build._state, "reason", reason)
    monkeypatch.setattr(FUSED, "_warned", False)
    lstm = rnnkit.LSTM(3, 4)
    with pytest.warns(RuntimeWarning, match=r"fused backend is unavailable \(building the C\+\+ extension failed: "
                                            r"fused.cpp:1:10: error: boom\)") as record:
        lstm(torch.randn(5, 2, 3))
        lstm(torch.randn(5, 2, 3))
    assert len([w for w in record if "fused backend" in str(w.message)]) == 1
    assert lstm.last_backend == "torch"
    with pytest.raises(ValueError, match=r"backend='fused' cannot run this configuration: building the C\+\+ "
                                         r"extension failed: fused.cpp:1:10: error: boom"):
        rnnkit.LSTM(3, 4, backend="fused")
    cell = rnnkit.LSTMCell(3, 4)
    with torch.no_grad():
        cell(torch.randn(1, 3))
    assert cell.last_backend == "torch"


def test_first_error_line_is_the_compilers():
    log = ("[1/2] c++ -MMD -c fused.cpp -o fused.o\nFAILED: fused.o\n"
           "fused.cpp:583:47: error: 'op' is not a constant expression\n  583 | x\nninja: build stopped\n")
    assert _build._first_error_line("Error building extension 'x'\n" + log) == \
        "fused.cpp:583:47: error: 'op' is not a constant expression"


def test_auto_with_lengths_reads_the_lengths_row():
    """torch has to pack for lengths, so auto consults the measured `lstm_lengths` row."""
    table = fb.load_table()["fastest"]
    if "lstm_lengths" not in table:
        pytest.skip("the shipped table has no lstm_lengths row")
    lstm = rnnkit.LSTM(64, 128)
    x = torch.randn(10, 16, 64)  # size class M
    assert lstm.which_backend(x) == table["lstm"]["M"]
    assert lstm.which_backend(x, lengths=[10] * 16) == table["lstm_lengths"]["M"]
    lstm(x, lengths=torch.full((16,), 10))
    assert lstm.last_backend == table["lstm_lengths"]["M"]
    lstm_bf = rnnkit.LSTM(64, 128, batch_first=True)  # which_backend reads batch_first inputs like forward
    assert lstm_bf.which_backend(x.transpose(0, 1), lengths=[10] * 16) == table["lstm_lengths"]["M"]


def test_eager_route_equals_the_transform_route(monkeypatch):
    """In plain eager mode _ops.apply takes EAGER_FUNCTIONS (the op below its Python autograd kernel,
    no setup_context); inside a torch.func transform it takes FUNCTIONS. Same outputs, same gradients,
    and the eager route's backward is differentiable again (create_graph)."""
    torch.manual_seed(0)
    xp = torch.randn(4, 3, 4 * 5, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(4 * 5, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, 5, dtype=torch.float64)
    used = []
    for table in ("EAGER_FUNCTIONS", "FUNCTIONS"):
        fn = getattr(_ops, table)["lstm_fwd"]
        monkeypatch.setitem(getattr(_ops, table), "lstm_fwd",
                            type(fn.__name__, (fn,), {"apply": classmethod(
                                lambda cls, *a, _t=table, _f=fn: used.append(_t) or _f.apply(*a))}))
    out_e, h_e, c_e = _ops.lstm_sequence(xp, w_hh, None, h0, c0, None)
    assert used == ["EAGER_FUNCTIONS"]
    g_e = torch.autograd.grad((out_e.sin().sum() + h_e.sum() + c_e.sum()), (xp, w_hh, h0), create_graph=True)
    gg_e = torch.autograd.grad(sum(g.square().sum() for g in g_e), (xp, w_hh, h0))

    def loss(xp, w_hh, h0):
        out, h, c = _ops.lstm_sequence(xp, w_hh, None, h0, c0, None)
        return out.sin().sum() + h.sum() + c.sum()

    g_f = torch.func.grad(loss, argnums=(0, 1, 2))(xp, w_hh, h0)
    assert used[-1] == "FUNCTIONS"
    out_f = torch.func.vmap(lambda a: _ops.lstm_sequence(a, w_hh, None, h0, c0, None)[0])(xp.unsqueeze(0))[0]
    torch.testing.assert_close(out_e, out_f, rtol=0, atol=0)
    for a, b in zip(g_e, g_f):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ref = torch.autograd.grad(sum(g.square().sum() for g in torch.autograd.grad(
        loss(xp, w_hh, h0), (xp, w_hh, h0), create_graph=True)), (xp, w_hh, h0))
    for a, b in zip(gg_e, ref):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no gradient: the op below its autograd kernel, the same numbers
        out_n = _ops.lstm_sequence(xp, w_hh, None, h0, c0, None)[0]
    torch.testing.assert_close(out_n, out_e.detach(), rtol=0, atol=0)
