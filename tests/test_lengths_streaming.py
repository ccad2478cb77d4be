"""lengths without packing, and streaming, for every registered layer and backend.

The oracle for ``lengths`` is running each sequence alone, unpadded; for
streaming it is one call on the whole sequence.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from rnnkit.backends import why_not
from helpers import assert_close, flatten_states, runnable_backends, weighted_sum

LAYOUTS = [  # num_layers, bidirectional, batch_first
    (1, False, False), (2, True, True), (2, False, True), (1, True, False),
]
DT = torch.float64


def _make(name, backend, num_layers, bidirectional, batch_first, dtype=DT):
    entry = rnnkit.LAYERS[name]
    torch.manual_seed(0)
    module = entry.make(3, 4, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                        dtype=dtype)
    reason = why_not(backend, module) if backend != "auto" else None
    if reason:
        pytest.skip(f"{backend} cannot run {name}: {reason}")
    module.backend = backend
    return entry, module


def _time(x, batch_first, start, stop):
    return x[:, start:stop] if batch_first else x[start:stop]


def _row(x, batch_first, b):
    """Keep batch row b as a batch of one."""
    return x[b:b + 1] if batch_first else x[:, b:b + 1]


def _random_state(module, batch, feature_shape):
    shapes = module._state_shapes(batch, feature_shape)
    states = tuple(torch.randn(s, dtype=DT) for s in shapes)
    return states if len(states) > 1 else states[0]


def _state_row(hx, b):
    return tuple(s[:, b:b + 1] for s in flatten_states(hx))


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"l{l[0]}{'-bi' if l[1] else ''}{'-bf' if l[2] else ''}")
@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_lengths_equal_each_sequence_alone(name, layout, backend):
    num_layers, bidirectional, batch_first = layout
    entry, m = _make(name, backend, num_layers, bidirectional, batch_first)
    lengths = [5, 2, 0, 7, 1]
    L, N = 7, len(lengths)
    x = torch.randn(entry.input_shape(L, N, 3, batch_first), dtype=DT, requires_grad=True)
    hx = _random_state(m, N, tuple(x.shape[2:]))
    hx = tuple(s.requires_grad_() for s in flatten_states(hx))
    hx_arg = hx if len(hx) > 1 else hx[0]

    out, h = m(x, hx_arg, lengths=torch.tensor(lengths))
    states = flatten_states(h)
    w_out = torch.randn(out.shape, dtype=DT)
    w_states = [torch.randn(s.shape, dtype=DT) for s in states]
    loss = (out * w_out).sum() + sum((s * w).sum() for s, w in zip(states, w_states))
    grads = torch.autograd.grad(loss, [x, *hx, *m.parameters()], allow_unused=True)

    loss_alone = 0
    for b, n in enumerate(lengths):
        out_b = _row(out, batch_first, b)
        if n == 0:  # all padding; the final state is the initial one
            assert torch.count_nonzero(out_b) == 0
            for s, s0 in zip(states, hx):
                assert torch.equal(s[:, b], s0[:, b])
            loss_alone = loss_alone + sum((s0[:, b] * w[:, b]).sum() for s0, w in zip(hx, w_states))
            continue
        xb = _time(_row(x, batch_first, b), batch_first, 0, n)
        hb = _state_row(hx, b)
        o_alone, h_alone = m(xb, hb if len(hb) > 1 else hb[0])
        assert_close(_time(out_b, batch_first, 0, n), o_alone, DT, f"output of row {b}")
        assert torch.count_nonzero(_time(out_b, batch_first, n, L)) == 0, "padding must be zero"
        for i, (s, s_alone) in enumerate(zip(states, flatten_states(h_alone))):
            assert_close(s[:, b:b + 1], s_alone, DT, f"state {i} of row {b}")
        w_b = _time(_row(w_out, batch_first, b), batch_first, 0, n)
        loss_alone = loss_alone + (o_alone * w_b).sum() + sum(
            (s * w[:, b:b + 1]).sum() for s, w in zip(flatten_states(h_alone), w_states))
    grads_alone = torch.autograd.grad(loss_alone, [x, *hx, *m.parameters()], allow_unused=True)
    for i, (g, g_alone) in enumerate(zip(grads, grads_alone)):
        g = torch.zeros_like(g_alone) if g is None else g
        g_alone = torch.zeros_like(g) if g_alone is None else g_alone
        assert_close(g, g_alone, DT, f"gradient {i}")


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_lengths_equal_torch_nn_on_packed(mode, backend):
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, dtype=DT)
    ours = getattr(rnnkit, mode)(3, 4, backend=backend, **kw)
    ref = getattr(torch.nn, mode)(3, 4, **kw)
    ref.load_state_dict(ours.state_dict())
    lengths = torch.tensor([3, 6, 1, 5])
    x = torch.randn(4, 6, 3, dtype=DT)
    out, h = ours(x, lengths=lengths)
    out_p, h_p = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out_ref, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=6)
    assert_close(out, out_ref, DT, "output")
    for a, b in zip(flatten_states(h), flatten_states(h_p)):
        assert_close(a, b, DT, "state")


def test_lengths_as_list_and_on_any_device_order_and_padding_value():
    gru = rnnkit.GRU(3, 4, batch_first=True)
    x = torch.randn(3, 5, 3)
    a, ha = gru(x, lengths=[2, 5, 3])
    b, hb = gru(x, lengths=torch.tensor([2, 5, 3], dtype=torch.int32))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ha, hb)
    c, _ = gru(x, lengths=[2, 5, 3], padding_value=-1.0)
    assert torch.all(c[0, 2:] == -1.0) and torch.all(c[2, 3:] == -1.0)
    torch.testing.assert_close(c[1], a[1])


def test_packed_in_gives_packed_out():
    lstm = rnnkit.LSTM(3, 4)
    packed = pack_padded_sequence(torch.randn(5, 3, 3), [2, 5, 3], enforce_sorted=False)
    out, _ = lstm(packed)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)


def test_classifier_on_padded_batch_needs_no_packing():
    """As a new user would: the final state of a padded batch with lengths is
    each sequence's own final state, so a classifier head just reads h_n."""
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(8, 16, batch_first=True)
    head = torch.nn.Linear(16, 3)
    seqs = [torch.randn(n, 8) for n in (4, 9, 6)]
    x = rnnkit.pad_sequence(seqs, batch_first=True)
    lengths = torch.tensor([len(s) for s in seqs])
    _, (h_n, _) = lstm(x, lengths=lengths)
    logits = head(h_n[-1])
    for b, s in enumerate(seqs):
        _, (h_alone, _) = lstm(s.unsqueeze(0))
        torch.testing.assert_close(logits[b], head(h_alone[-1, 0]))


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_chunked_streaming_equals_one_call(name, batch_first, with_lengths, backend):
    entry, m = _make(name, backend, 2, False, batch_first)
    L, N = 9, 3
    x = torch.randn(entry.input_shape(L, N, 3, batch_first), dtype=DT)
    lengths = torch.tensor([9, 4, 6]) if with_lengths else None
    whole, h_whole = m(x, lengths=lengths)

    stream = rnnkit.Stream(m)
    pieces = []
    for start in range(0, L, 4):
        chunk = _time(x, batch_first, start, start + 4)
        size = chunk.shape[1] if batch_first else chunk.shape[0]
        pieces.append(stream(chunk, lengths=rnnkit.chunk_lengths(lengths, start, size) if with_lengths else None))
    chunked = torch.cat(pieces, dim=1 if batch_first else 0)
    assert_close(chunked, whole, DT, "output")
    for a, b in zip(flatten_states(stream.state), flatten_states(h_whole)):
        assert_close(a, b, DT, "final state")


def test_streaming_refuses_bidirectional():
    with pytest.raises(ValueError, match=r"LSTM\(input_size=3, hidden_size=4, bidirectional=True\) is bidirectional and "
                                         r"cannot stream"):
        rnnkit.Stream(rnnkit.LSTM(3, 4, bidirectional=True))


def test_detach_state_for_truncated_bptt():
    lstm = rnnkit.LSTM(3, 4)
    _, state = lstm(torch.randn(5, 2, 3))
    assert all(s.requires_grad for s in state)
    detached = rnnkit.detach_state(state)
    assert isinstance(detached, tuple) and not any(s.requires_grad for s in detached)
    assert all(torch.equal(a, b) for a, b in zip(state, detached))
    assert not rnnkit.detach_state(state[0]).requires_grad
    assert rnnkit.detach_state(None) is None
    with pytest.raises(TypeError, match=r"detach_state: state must be a Tensor or a tuple/list of Tensors, got str"):
        rnnkit.detach_state("h")


def test_reset_state_rows():
    h = torch.randn(2, 3, 4)
    c = torch.randn(2, 3, 4)
    mask = torch.tensor([True, False, True])
    h2, c2 = rnnkit.reset_state((h, c), mask)
    for new, old in ((h2, h), (c2, c)):
        assert torch.count_nonzero(new[:, 0]) == 0 and torch.count_nonzero(new[:, 2]) == 0
        assert torch.equal(new[:, 1], old[:, 1])
    assert torch.count_nonzero(h[:, 0]) > 0  # not in place
    cell_state = rnnkit.reset_state(torch.ones(3, 4), [False, True, False], batch_dim=0)
    assert cell_state[1].sum() == 0 and cell_state[0].sum() == 4


def test_reset_state_errors():
    with pytest.raises(ValueError, match=r"reset_state: mask has shape \(2,\) but the state of shape \(1, 3, 4\) has "
                                         r"N=3 rows on its batch axis \(batch_dim=1\); expected \(3,\)"):
        rnnkit.reset_state(torch.zeros(1, 3, 4), [True, False])
    with pytest.raises(TypeError, match=r"reset_state: mask must hold booleans"):
        rnnkit.reset_state(torch.zeros(1, 3, 4), [1, 0, 1])
    with pytest.raises(ValueError, match=r"batch_dim=3 is out of range"):
        rnnkit.reset_state(torch.zeros(1, 3, 4), [True, False, True], batch_dim=3)


def test_stream_reset_and_detach():
    torch.manual_seed(0)
    gru = rnnkit.GRU(3, 4)
    stream = rnnkit.Stream(gru)
    stream(torch.randn(5, 2, 3))
    stream.detach()
    assert not stream.state.requires_grad
    stream.reset(torch.tensor([True, False]))
    assert torch.count_nonzero(stream.state[:, 0]) == 0 and torch.count_nonzero(stream.state[:, 1]) > 0
    x = torch.randn(3, 2, 3)
    expected, _ = gru(x[:, :1])  # a reset row continues as if it had just started
    torch.testing.assert_close(stream(x)[:, :1], expected)
    stream.reset()
    assert stream.state is None


def test_chunk_lengths():
    assert rnnkit.chunk_lengths([9, 4, 6], 4, 4).tolist() == [4, 0, 2]
    assert rnnkit.chunk_lengths([9, 4, 6], 0, 4).tolist() == [4, 4, 4]
    assert rnnkit.chunk_lengths([9, 4, 6], 8, 4).tolist() == [1, 0, 0]


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_nan_in_padding_reaches_nothing(name, backend):
    """NaN and inf past the lengths (padding) change nothing: the outputs, the final states and every gradient
    (input and parameters) equal those of the same batch with zero padding, all finite (the input projection
    runs over every step, so a NaN there reached W_ih's gradient, and the reference loop's every gradient)."""
    entry = rnnkit.LAYERS[name]
    torch.manual_seed(0)
    layer = entry.make(3, 4, dtype=torch.float64)
    layer.backend = backend
    if backend != "auto" and why_not(backend, layer) is not None:
        pytest.skip(why_not(backend, layer))
    x = torch.randn(entry.input_shape(4, 3, 3), dtype=torch.float64)
    lengths = torch.tensor([4, 2, 0])
    dirty = x.clone()
    dirty[2:, 1] = float("nan")
    dirty[:, 2] = float("inf")
    clean = x.clone()
    clean[2:, 1] = 0.0
    clean[:, 2] = 0.0
    results = []
    for inp in (clean, dirty):
        xi = inp.clone().requires_grad_()
        out, h = layer(xi, lengths=lengths)
        states = list(h) if isinstance(h, tuple) else [h]
        grads = torch.autograd.grad(weighted_sum([out, *states]), [xi, *layer.parameters()], allow_unused=True)
        results.append([out, *states, *(g for g in grads if g is not None)])
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
