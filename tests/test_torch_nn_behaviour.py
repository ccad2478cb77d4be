"""The behaviours PyTorch's ``test/test_nn.py`` checks on its recurrent modules,
written again for rnnkit and run on every backend.

Each test names the PyTorch test it follows (``test_RNN_input_size_zero``,
``test_rnn_args_check``, ...). CUDA-only tests become their CPU counterparts
where one exists (devices: the ``meta`` device stands in for a second one;
dropout: the CPU kernels instead of cuDNN's); the rest are left out.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import rnn as rnn_utils

import rnnkit
from rnnkit.backends import why_not

BACKENDS = ["reference", "torch", "fused", "auto"]
LAYERS = ["RNN", "GRU", "LSTM"]
CELLS = ["RNNCell", "GRUCell", "LSTMCell"]


def make(name, *args, backend, **kwargs):
    """rnnkit's ``name`` on ``backend``; skips, with the backend's reason, where it cannot run."""
    if backend != "auto":
        reason = why_not(backend, getattr(rnnkit, name)(*args, **kwargs, backend="reference"))
        if reason is not None:
            pytest.skip(f"backend={backend!r}: {reason}")
    return getattr(rnnkit, name)(*args, **kwargs, backend=backend)


def state(name, *shape, c_shape=None, **kw):
    """A random state for layer or cell ``name``: ``(h, c)`` for an LSTM."""
    h = torch.randn(*shape, **kw)
    return (h, torch.randn(*(c_shape or shape), **kw)) if name.startswith("LSTM") else h



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These modules are tiny: one intra-op thread is faster than two waking each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("name", LAYERS)
def test_rnn_args_check(name, backend):
    """test_rnn_args_check: a wrong input batch, hidden batch, input size, hidden size
    or hidden layer count is a RuntimeError (for an LSTM with either state wrong)."""
    input_size, hidden_size, layers, batch, seq, bad = 3, 5, 2, 4, 6, 7
    good_in, good_h = (seq, batch, input_size), (layers, batch, hidden_size)
    m = make(name, input_size, hidden_size, layers, backend=backend)

    def with_dim(shape, dim, size):
        return tuple(size if i == dim else n for i, n in enumerate(shape))

    for in_shape, h_shape in [(with_dim(good_in, 1, bad), good_h), (good_in, with_dim(good_h, 1, bad)),
                              (with_dim(good_in, 2, bad), good_h), (good_in, with_dim(good_h, 2, bad)),
                              (good_in, with_dim(good_h, 0, bad))]:
        x, h = torch.randn(in_shape), torch.randn(h_shape)
        if name == "LSTM" and h_shape != good_h:
            hxs = [(h, torch.randn(good_h)), (torch.randn(good_h), h)]
        else:
            hxs = [(h, h) if name == "LSTM" else h]
        for hx in hxs:
            with pytest.raises(RuntimeError):
                m(x, hx)


def test_projections_lstm_args_check(backend):
    """test_projections_lstm_args_check: h is (layers, N, proj_size), c is (layers, N, hidden_size)."""
    input_size, hidden_size, proj, layers, batch, seq, bad = 3, 5, 2, 2, 4, 6, 7
    m = make("LSTM", input_size, hidden_size, layers, proj_size=proj, backend=backend)
    x = torch.randn(seq, batch, input_size)
    h_good, c_good = (layers, batch, proj), (layers, batch, hidden_size)
    cases = [
        (torch.randn(seq, bad, input_size), h_good, c_good),      # input batch
        (x, (layers, bad, proj), (layers, bad, hidden_size)),     # state batch
        (torch.randn(seq, batch, bad), h_good, c_good),           # input size
        (x, (layers, batch, bad), (layers, batch, bad)),          # state sizes
        (x, (bad, batch, proj), (bad, batch, hidden_size)),       # layer count
        (x, (layers, batch, hidden_size), c_good),                # h sized hidden_size, not proj_size
        (x, (layers, batch, bad), c_good),                        # h neither
        (x, h_good, (layers, batch, bad)),                        # c wrong
    ]
    for inp, h_shape, c_shape in cases:
        with pytest.raises(RuntimeError):
            m(inp, (torch.randn(h_shape), torch.randn(c_shape)))
    m(x, (torch.randn(h_good), torch.randn(c_good)))  # and the right shapes run


@pytest.mark.parametrize("name", LAYERS)
def test_rnn_check_device(name, backend):
    """test_rnn_check_device on one CPU: a 'meta' tensor stands in for the other device.
    Input and parameters apart, or input and state apart: RuntimeError with torch.nn's words."""
    m = make(name, 3, 5, 2, backend=backend)
    x, h = torch.randn(6, 4, 3), torch.randn(2, 4, 5)
    with pytest.raises(RuntimeError, match="^Input and parameter tensors are not at the same device"):
        m(x.to("meta"))
    far = h.to("meta")
    with pytest.raises(RuntimeError, match="^Input and hidden tensors are not at the same device"):
        m(x, (far, far) if name == "LSTM" else far)
    if name == "LSTM":  # the states on different devices
        with pytest.raises(RuntimeError, match="^Input and hidden tensors are not at the same device"):
            m(x, (h, far))


@pytest.mark.parametrize("name", ["RNN", "GRU"])
def test_projections_errors_on_gru_and_rnn(name):
    """test_projections_errors_on_gru_and_rnn."""
    with pytest.raises(ValueError, match="^proj_size argument is only supported for LSTM, not RNN or GRU"):
        getattr(rnnkit, name)(30, 20, 2, proj_size=10)


def test_RNN_nonlinearity():
    """test_RNN_nonlinearity and test_RNN_nonlinearity_passed_as_arg."""
    assert rnnkit.RNN(1, 10).nonlinearity == "tanh"
    assert rnnkit.RNN(1, 10, nonlinearity="relu").nonlinearity == "relu"
    assert rnnkit.RNN(1, 10, 1, "relu").nonlinearity == "relu"
    with pytest.raises(ValueError, match="^Unknown nonlinearity 'garbage'"):
        rnnkit.RNN(1, 10, nonlinearity="garbage")


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_error_RNN_seq_len_zero(name, bidirectional, backend):
    """test_error_RNN_seq_len_zero: an empty sequence is a RuntimeError with torch.nn's words."""
    m = make(name, 5, 6, bidirectional=bidirectional, backend=backend)
    with pytest.raises(RuntimeError, match="^Expected sequence length to be larger than 0 in RNN"):
        m(torch.ones(0, 10, 5))


# ----------------------------------------------------------------------------- edge cases torch.nn accepts


@pytest.mark.parametrize("name", LAYERS)
def test_RNN_input_size_zero(name, backend):
    """test_RNN_input_size_zero: a batch of 0 runs, output (5, 0, 4), and backward works."""
    m = make(name, input_size=3, hidden_size=4, backend=backend)
    out, _ = m(torch.zeros(5, 0, 3, requires_grad=True))
    assert out.shape == (5, 0, 4)
    out.sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.parameters())


@pytest.mark.parametrize("cell_args", [(10, 0), (0, 20), (0, 0)], ids=["hidden0", "input0", "both0"])
@pytest.mark.parametrize("name,kwargs", [("RNNCell", {"nonlinearity": "relu"}), ("RNNCell", {"nonlinearity": "tanh"}),
                                         ("GRUCell", {}), ("LSTMCell", {})])
def test_RNN_cell_forward_zero_hidden_size(name, kwargs, cell_args, backend):
    """test_RNN_cell_forward_zero_hidden_size, and input_size=0: torch.nn's cells take
    sizes of 0; rnnkit's give the same shapes and values on every backend."""
    input_size, hidden_size = cell_args
    theirs = getattr(nn, name)(input_size, hidden_size, **kwargs)
    ours = make(name, input_size, hidden_size, backend=backend, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x, hx = torch.randn(3, input_size), state(name, 3, hidden_size)
    for args in [(x,), (x, hx)]:
        expected = theirs(*args)
        got = ours(*args)
        got, expected = (got, expected) if name == "LSTMCell" else ((got,), (expected,))
        for a, b in zip(got, expected):
            assert a.shape == b.shape == (3, hidden_size)
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", CELLS)
def test_cell_batch_of_zero(name, backend):
    cell = make(name, 10, 20, backend=backend)
    out = cell(torch.randn(0, 10, requires_grad=True))
    for t in out if isinstance(out, tuple) else (out,):
        assert t.shape == (0, 20)


@pytest.mark.parametrize("name", CELLS)
def test_cell_bias_takes_any_truth_value(name):
    """torch.nn's cells read ``bias`` by its truth value (``bias=1`` works)."""
    assert rnnkit.RNNCell(10, 20, bias=0).bias_ih is None
    ours, theirs = getattr(rnnkit, name)(10, 20, bias=1), getattr(nn, name)(10, 20, bias=1)
    assert list(ours.state_dict()) == list(theirs.state_dict())


# ----------------------------------------------------------------------------- cells


@pytest.mark.parametrize("name", CELLS)
def test_RNN_cell_no_broadcasting(name, backend):
    """test_RNN_cell_no_broadcasting: no broadcasting of a size-1 batch or size-1
    feature axis; each is a RuntimeError (for an LSTMCell, with either state bad)."""
    cell = make(name, 10, 20, backend=backend)
    x, good = torch.randn(3, 10), torch.randn(3, 20)
    for bad_x, bad_h in [(x, torch.randn(1, 20)), (x, torch.randn(3, 1)), (torch.randn(3, 1), good)]:
        hxs = [(bad_h, good), (good, bad_h)] if name == "LSTMCell" else [bad_h]
        for hx in hxs:
            with pytest.raises(RuntimeError):
                cell(bad_x, hx)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", CELLS)
def test_RNN_cell(name, bias, backend):
    """test_RNN_cell / test_LSTM_cell: six steps from a state, then backward; and the
    values equal torch.nn's."""
    theirs = getattr(nn, name)(10, 20, bias=bias)
    ours = make(name, 10, 20, bias=bias, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    x, hx = torch.randn(3, 10), state(name, 3, 20)
    h_ours = h_theirs = hx
    for _ in range(6):
        h_ours, h_theirs = ours(x, h_ours), theirs(x, h_theirs)
    total = sum(h_ours) if name == "LSTMCell" else h_ours
    total.sum().backward()
    assert all(p.grad is not None for p in ours.parameters())
    torch.testing.assert_close(h_ours, h_theirs)


def test_LSTM_cell_forward_input_size_and_hidden_size(backend):
    """test_LSTM_cell_forward_input_size / _hidden_size."""
    lstm = make("LSTMCell", 10, 20, backend=backend)
    with pytest.raises(RuntimeError, match="^input has inconsistent input_size: got 11 expected 10"):
        lstm(torch.randn(3, 11), (torch.randn(3, 20), torch.randn(3, 20)))
    x, h, wrong = torch.randn(3, 10), torch.randn(3, 20), torch.randn(3, 21)
    with pytest.raises(RuntimeError, match="^hidden0 has inconsistent hidden_size: got 21, expected 20"):
        lstm(x, (wrong, h))
    with pytest.raises(RuntimeError, match="^hidden1 has inconsistent hidden_size: got 21, expected 20"):
        lstm(x, (h, wrong))


@pytest.mark.parametrize("index", [0, 1])
def test_lstmcell_backward_only_one_output_grad(index, backend):
    """test_lstmcell_backward_only_one_output_grad (CUDA there): a gradient through h
    alone or c alone reaches the input."""
    cell = make("LSTMCell", 2, 3, backend=backend).double()
    s = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    cell(s)[index].sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- state and values


@pytest.mark.parametrize("name", LAYERS)
def test_rnn_initial_hidden_state(name, backend):
    """test_rnn_initial_hidden_state: a zero state equals no state."""
    m = make(name, 6, 5, 2, backend=backend)
    x, zeros = torch.randn(4, 3, 6), torch.zeros(2, 3, 5)
    out1, h1 = m(x, (zeros, zeros) if name == "LSTM" else zeros)
    out2, h2 = m(x)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_projections_lstm_initial_hidden_state(bidirectional, backend):
    """test_projections_lstm_initial_hidden_state."""
    m = make("LSTM", 6, 5, 2, bidirectional=bidirectional, proj_size=3, backend=backend)
    d = 2 if bidirectional else 1
    x = torch.randn(4, 3, 6)
    out1, h1 = m(x, (torch.zeros(2 * d, 3, 3), torch.zeros(2 * d, 3, 5)))
    out2, h2 = m(x)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("enforce_sorted,lengths", [(True, [6, 6, 4, 2, 1]), (False, [2, 1, 3, 6, 4])])
def test_variable_sequence(enforce_sorted, lengths, backend):
    """test_variable_sequence: a packed batch (bidirectional, 2 layers; without
    projection or initial state, and with both) equals running each sequence alone,
    in outputs, final states and gradients."""
    for use_default_hiddens, proj_size in [(True, 0), (False, 2)]:
        torch.manual_seed(len(lengths) + proj_size)
        x_leaf = torch.randn(max(lengths), len(lengths), 3, requires_grad=True)
        lstm = make("LSTM", 3, 4, bidirectional=True, num_layers=2, proj_size=proj_size, backend=backend)
        lstm2 = copy.deepcopy(lstm)
        hidden0 = None
        if not use_default_hiddens:
            hidden0 = (torch.randn(4, len(lengths), proj_size or 4), torch.randn(4, len(lengths), 4))
        outs, hiddens = [], []
        for i, n in enumerate(lengths):
            h_i = None if hidden0 is None else tuple(h[:, i:i + 1].contiguous() for h in hidden0)
            out, hid = lstm2(x_leaf[:n, i:i + 1], h_i)
            outs.append(torch.cat([out, out.new_zeros(max(lengths) - n, *out.shape[1:])]))
            hiddens.append(hid)
        seq_out = torch.cat(outs, 1)
        seq_hidden = tuple(torch.cat(h, 1) for h in zip(*hiddens))
        packed = rnn_utils.pack_padded_sequence(x_leaf, lengths, enforce_sorted=enforce_sorted)
        packed_out, packed_hidden = lstm(packed, hidden0)
        unpacked, unpacked_len = rnn_utils.pad_packed_sequence(packed_out)
        for a, b in zip(packed_hidden, seq_hidden):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(unpacked, seq_out, atol=1e-5, rtol=0)
        assert unpacked_len.tolist() == lengths
        g_seq = torch.autograd.grad(seq_out.sum(), [x_leaf, *lstm2.parameters()])
        g_packed = torch.autograd.grad(unpacked.sum(), [x_leaf, *lstm.parameters()])
        torch.testing.assert_close(g_packed[0], g_seq[0], atol=1e-5, rtol=0)
        for a, b in zip(g_packed[1:], g_seq[1:]):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_rnn_retain_variables(name, backend):
    """test_rnn_retain_variables: backward twice through one graph (retain_graph) gives
    the same gradients each time."""
    m = make(name, 4, 5, num_layers=2, backend=backend).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    output = m(x)
    grads = []
    for _ in range(2):
        m.zero_grad()
        x.grad = None
        output[0].sum().backward(retain_graph=True)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- dropout


def test_RNN_dropout(backend):
    """test_RNN_dropout (cuDNN there): dropout sits between the layers only, with
    inverted scaling, training only. All-ones weights and input make it countable:
    layer 0 gives 10 per unit, layer 1 sums 1000 of them (each kept and scaled by
    1/(1-p), or zeroed)."""
    rnn = make("RNN", 10, 1000, 2, bias=False, nonlinearity="relu", backend=backend).double()
    with torch.no_grad():
        for w in rnn.parameters():
            w.fill_(1)
    x, hx = torch.ones(1, 1, 10, dtype=torch.float64), torch.zeros(2, 1, 1000, dtype=torch.float64)
    for p, train in itertools.product((0, 0.276, 0.731, 1), (True, False)):
        rnn.dropout = p
        rnn.train(train)
        output, hy = rnn(x, hx)
        assert output.min() == output.max()
        value = output[0, 0, 0].item()
        if p == 0 or not train:
            assert value == 10000
        elif p == 1:
            assert value == 0
        else:
            assert 8000 < value < 12000
            kept = value * (1 - p) / 10  # a whole number of kept units
            assert abs(kept - round(kept)) < 1e-6
        assert hy[0].min() == hy[0].max() == 10
        assert hy[1].min() == hy[1].max() == value


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("p", [0, 0.1234])
def test_RNN_dropout_state(p, train, backend):
    """test_RNN_dropout_state: with dropout in training two calls differ, and so does
    a pickled copy; otherwise all three agree."""
    rnn = make("RNN", 100, 100, 2, bias=False, dropout=p, nonlinearity="relu", backend=backend)
    rnn.train(train)
    x, hx = torch.rand(1, 1, 100), torch.rand(2, 1, 100)
    out1, hy1 = rnn(x, hx)
    out2, hy2 = rnn(x, hx)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    rnn2 = torch.load(buf, weights_only=False)
    rnn2.flatten_parameters()
    out3, hy3 = rnn2(x, hx)
    if p == 0 or not train:
        for a, b in [(out1, out2), (out1, out3), (hy1, hy2), (hy1, hy3)]:
            torch.testing.assert_close(a, b)
    else:
        for a, b in [(out1, out2), (out1, out3), (hy1, hy2), (hy1, hy3)]:
            assert not torch.equal(a, b)


@pytest.mark.parametrize("train", [True, False])
def test_RNN_change_dropout(train, backend):
    """test_RNN_change_dropout: assigning ``rnn.dropout`` after construction takes effect."""
    rnn = make("RNN", 20, 20, 2, dropout=0, nonlinearity="relu", backend=backend).double()
    rnn.train(train)
    x = torch.rand(3, 2, 20, dtype=torch.float64)
    prev = None
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        rnn.dropout = p
        out1, hy1 = rnn(x)
        out2, hy2 = rnn(x)
        if p == 0 or p == 1 or not train:
            torch.testing.assert_close(out1, out2)
            torch.testing.assert_close(hy1, hy2)
        else:
            assert not torch.equal(out1, out2) and not torch.equal(hy1, hy2)
        if prev is not None:
            if not train:
                torch.testing.assert_close(out1, prev)
            else:
                assert not torch.equal(out1, prev)
        prev = out1


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", ["weight_hh_l0", "weight_hr_l0"])
def test_rnn_weight_norm(name, backend):
    """test_rnn_weight_norm: weight normalization on a recurrent weight (a pre-forward
    hook that recomputes it) gives the same outputs, also after it is removed."""
    m = make("LSTM", 10, 6, 2, proj_size=3 if name == "weight_hr_l0" else 0, backend=backend)
    x = torch.randn(7, 6, 10)
    expected = m(x)[0]
    m = torch.nn.utils.weight_norm(m, name=name)
    assert name not in dict(m.named_parameters())
    torch.testing.assert_close(m(x)[0], expected)
    m = torch.nn.utils.remove_weight_norm(m, name=name)
    torch.testing.assert_close(m(x)[0], expected)


def test_rnn_parametrized_weight(backend):
    """torch.nn.utils.parametrize on a recurrent weight: each forward reads its current value."""
    m = make("GRU", 4, 5, backend=backend)
    x = torch.randn(3, 2, 4)
    expected = torch.nn.GRU(4, 5)
    expected.load_state_dict(m.state_dict())
    expected.weight_hh_l0.data *= 2

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w
    torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", Double())
    torch.testing.assert_close(m(x)[0], expected(x)[0])


@pytest.mark.parametrize("name", LAYERS)
def test_weight_changes_after_forward_are_seen(name, backend):
    """torch.nn.RNNBase re-reads its weights when they change (``_weights_have_changed``):
    an in-place change, a new Parameter, and functional_call's substitutes all reach
    the next forward."""
    m = make(name, 4, 5, backend=backend)
    ref = getattr(nn, name)(4, 5)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(m(x)[0], ref(x)[0])
    with torch.no_grad():  # in place
        m.weight_hh_l0.mul_(0.5)
        ref.weight_hh_l0.mul_(0.5)
    torch.testing.assert_close(m(x)[0], ref(x)[0])
    new = nn.Parameter(torch.randn_like(m.weight_ih_l0))  # a new Parameter object
    m.weight_ih_l0, ref.weight_ih_l0 = new, nn.Parameter(new.detach().clone())
    torch.testing.assert_close(m(x)[0], ref(x)[0])
    swap = {k: torch.randn_like(v) for k, v in m.named_parameters()}  # functional_call
    torch.testing.assert_close(functional_call(m, swap, (x,))[0], functional_call(ref, swap, (x,))[0])
    torch.testing.assert_close(m(x)[0], ref(x)[0])  # and the module's own weights are back


def test_partial_flat_weights(backend):
    """test_partial_flat_weights (CUDA there): delete a weight, put it back, and the
    module runs as before."""
    m = make("LSTM", 10, 6, 2, backend=backend)
    x = torch.randn(3, 2, 10)
    expected = m(x)[0]
    weight = m.weight_hh_l0
    del m.weight_hh_l0
    assert not hasattr(m, "weight_hh_l0")
    m.weight_hh_l0 = weight
    torch.testing.assert_close(m(x)[0], expected)


# ----------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("backend_", ["reference", "torch", "fused", "auto"])
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_grad_and_gradgrad(name, backend_):
    """test_LSTM_grad_and_gradgrad / test_GRU_grad_and_gradgrad: gradcheck and
    gradgradcheck, float64, through the input, the state and the parameters."""
    m = make(name, 3, 4, backend=backend_).double()
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    if backend_ in ("fused", "auto"):  # the input alone first: where it fails, it fails fast
        assert torch.autograd.gradgradcheck(lambda x: m(x)[0], (x,), fast_mode=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    states = (h, c) if name == "LSTM" else (h,)

    def fn(x, *rest):
        hx = rest[:len(states)]
        out, hn = functional_call(m, dict(zip(names, rest[len(states):])), (x, hx if name == "LSTM" else hx[0]))
        return (out, *(hn if isinstance(hn, tuple) else (hn,)))
    inputs = (x, *states, *params)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------------------- tracing and autocast


@pytest.mark.parametrize("name,backend_", [(n, b) for n in ("GRU", "LSTMCell") for b in ("reference", "torch", "fused",
                                                                                         "auto")])
def test_jit_trace(name, backend_):
    """torch.jit.trace of a layer or a cell replays the module on a new input."""
    m = make(name, 3, 4, backend=backend_)
    shape = (2, 3) if name.endswith("Cell") else (5, 2, 3)
    traced = torch.jit.trace(m, (torch.randn(shape),))
    x = torch.randn(shape)
    for a, b in zip(traced(x), m(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend_", ["reference", "torch", "fused", "auto"])
@pytest.mark.parametrize("name", ["RNN", "GRU"])
def test_cpu_autocast(name, backend_):
    """Under CPU autocast (bfloat16) a float32 module runs as torch.nn's does (torch.nn
    skips its dtype check under autocast). The LSTM is left out: torch.nn's own LSTM
    fails in oneDNN on some CPUs under bfloat16 autocast. torch.nn's GRU runs mixed precision
    there (bfloat16 products, float32 state), which the fused kernels cannot: pinned, they refuse
    (tests/test_autocast.py checks every case)."""
    m = make(name, 3, 4, backend=backend_)
    ref = getattr(nn, name)(3, 4)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3)
    if name == "GRU" and backend_ == "fused":
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="mixed precision"):
            m(x)
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = m(x)[0], ref(x)[0]
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("seq_len", [1, 5])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
@pytest.mark.parametrize("backend_", ["auto", "fused", "reference", "torch"])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_output_strides_are_torch_nns(name, backend_, batch_first, grad, seq_len):
    """The output and the final states have torch.nn's strides: a batch_first output is the transposed
    view of a time-major one (so ``out.transpose(0, 1).view(...)`` works as with torch.nn), also from
    the fused direct inference entry."""
    m = make(name, 3, 4, batch_first=batch_first, backend=backend_)
    ref = getattr(nn, name)(3, 4, batch_first=batch_first)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, seq_len, 3) if batch_first else torch.randn(seq_len, 2, 3)
    with torch.set_grad_enabled(grad):
        ours, theirs = m(x), ref(x)
    def flat(o):
        return [o[0], *(o[1] if isinstance(o[1], tuple) else (o[1],))]
    for a, b in zip(flat(ours), flat(theirs)):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b)
    if batch_first:
        ours[0].transpose(0, 1).view(seq_len * 2, 4)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend_", ["auto", "torch", "reference", "fused"])
@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cells_take_a_sparse_input_as_torch_nn(name, backend_, grad):
    """A sparse COO input (torch.nn's cells take it: their products accept it): the same values and gradients
    on auto, torch and reference (dense zero states, as torch.nn makes them); the fused kernels take dense
    tensors only, so pinned they refuse with a ValueError that says so (it recursed before)."""
    m = make(name, 3, 4, backend="reference")
    m.backend = backend_
    ref = getattr(nn, name)(3, 4)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3).to_sparse()
    if backend_ == "fused":
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="dense \\(strided\\) tensors, got an "
                                                                              "input of layout torch.sparse_coo"):
            m(x)
        return
    with torch.set_grad_enabled(grad):
        ours, theirs = m(x), ref(x)
    ours, theirs = (list(o) if isinstance(o, tuple) else [o] for o in (ours, theirs))
    for a, b in zip(ours, theirs):
        assert a.layout == b.layout == torch.strided
        torch.testing.assert_close(a, b)
    if grad:
        sum(t.sum() for t in ours).backward()
        sum(t.sum() for t in theirs).backward()
        for p, q in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("shape", [(2, 3), (3,), (0, 3)], ids=["batched", "unbatched", "batch0"])
@pytest.mark.parametrize("backend_", ["auto", "fused", "reference", "torch"])
@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cells_with_hidden_size_zero_train_as_torch_nn(name, backend_, shape):
    """torch.nn's cells take hidden_size=0: forward and backward (the input's gradient is zeros) on every
    backend (the fused backward's weight gradient reshaped a zero-size gate axis with -1 and raised)."""
    m = make(name, 3, 0, backend=backend_)
    ref = getattr(nn, name)(3, 0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    m, ref = m.double(), ref.double()
    grads = []
    for module in (m, ref):
        out = module(x)
        out = out if isinstance(out, tuple) else (out,)
        assert all(o.shape == (*shape[:-1], 0) for o in out)
        (g,) = torch.autograd.grad(sum(o.sum() for o in out), x, allow_unused=True)
        grads.append(torch.zeros_like(x) if g is None else g)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("how", ["packed_sorted", "packed_unsorted", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("backend_", ["auto", "fused", "reference", "torch"])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_training_dropout_on_a_packed_batch_draws_torch_nns_masks(name, backend_, bidirectional, how):
    """Inter-layer dropout in training on a PackedSequence (enforce_sorted True or False, ties in the
    lengths) draws torch.nn's masks under one seed, in its packed data's order, and leaves the random
    stream where torch.nn leaves it; ``lengths=`` draws the masks of torch.nn on
    ``pack_padded_sequence(x, lengths, enforce_sorted=False)`` (it drew a mask over the padded batch)."""
    m = make(name, 3, 4, num_layers=3, dropout=0.4, bidirectional=bidirectional, backend=backend_)
    ref = getattr(nn, name)(3, 4, num_layers=3, dropout=0.4, bidirectional=bidirectional)
    ref.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 6, (20,), generator=g)  # 20 rows: torch.sort is not stable from 17
    if how == "packed_sorted":
        lengths = lengths.sort(descending=True).values
    x = torch.randn(5, 20, 3, generator=g)
    packed = rnn_utils.pack_padded_sequence(x, lengths, enforce_sorted=how == "packed_sorted")
    torch.manual_seed(1)
    ours = m(x, lengths=lengths) if how == "lengths" else m(packed)
    after_ours = torch.rand(())
    torch.manual_seed(1)
    theirs = ref(packed)
    after_theirs = torch.rand(())
    out = rnn_utils.pack_padded_sequence(ours[0], lengths, enforce_sorted=False) if how == "lengths" else ours[0]
    torch.testing.assert_close(out.data, theirs[0].data)
    for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in (ours[1], theirs[1]))):
        torch.testing.assert_close(a, b)
    assert after_ours == after_theirs


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("attr, value, kwargs", [("num_layers", 1, dict(num_layers=2)), ("num_layers", 3, dict(num_layers=2)),
                                                 ("bidirectional", True, {}),
                                                 ("bidirectional", False, dict(bidirectional=True))])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_a_stack_changed_after_construction_raises(name, attr, value, kwargs, grad):
    """num_layers or bidirectional set after construction to a stack the parameters do not hold: a RuntimeError
    (torch.nn's class: its op raises, except oneDNN's LSTM, which runs the first layers) that names both
    attributes and the count, on every path (rnnkit ran the first layers, or raised IndexError)."""
    m = getattr(rnnkit, name)(3, 4, **kwargs)
    setattr(m, attr, value)
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=r"num_layers=\d and bidirectional=\w+ need "
                                                                         r"\d layer-directions of parameters, but "
                                                                         r"this module holds \d"):
        m(torch.randn(5, 2, 3))
    setattr(m, attr, kwargs.get(attr, attr == "num_layers" and 1))
    m(torch.randn(5, 2, 3))  # set back: runs


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_training_dropout_with_a_zero_length_is_the_same_on_every_backend(name):
    """``lengths=`` with an empty sequence (rnnkit's, not torch.nn's): under one seed every backend draws the same
    inter-layer dropout masks (the torch backend runs the empty row for one step; the runner draws as it packs)."""
    results = []
    for backend in ("reference", "fused", "torch"):
        m = make(name, 3, 4, num_layers=2, dropout=0.5, backend=backend)
        torch.manual_seed(0)
        m = getattr(rnnkit, name)(3, 4, num_layers=2, dropout=0.5, backend=backend)
        x = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        out, h = m(x, lengths=torch.tensor([4, 0, 2]))
        results.append((out, *(h if isinstance(h, tuple) else (h,)), torch.rand(())))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)
