"""Generic oracle checks for any registered rnnkit layer (used by the test_zoo_* files).

Each check compares a layer against an independent oracle: the layer run on
each sequence alone (lengths), its own cell (one step), torch.autograd.gradcheck
(float64), or the time-major padded run (batch_first, unbatched, PackedSequence,
chunked streaming by carrying the state).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

TOL64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread: these tests run many tiny ops, which
    two threads on a shared 2-core machine slow down by up to 50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def as_tuple(h):
    return tuple(h) if isinstance(h, (tuple, list)) else (h,)


def random_hx(layer, batch, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = layer._state_shapes(batch, (layer.input_size,))
    states = tuple(torch.randn(s, generator=g, dtype=dtype) for s in shapes)
    return states if len(states) > 1 else states[0]


def randomize_(module, seed=0, scale=0.5):
    """Random values for every parameter (gains and shifts included), so no
    parameter sits at a value (0 or 1) that could hide a wrong formula."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def check_lengths_oracle(layer, input_size, lengths=(4, 1, 6, 0, 3), seq_len=6):
    """A batch with ``lengths`` equals running each sequence alone."""
    torch.manual_seed(1)
    n = len(lengths)
    x = torch.randn(seq_len, n, input_size, dtype=torch.float64)
    hx = random_hx(layer, n)
    out, h_n = layer(x, hx, lengths=torch.tensor(lengths), padding_value=-7.0)
    h_n = as_tuple(h_n)
    for i, length in enumerate(lengths):
        hx_i = tuple(s[:, i:i + 1] for s in as_tuple(hx))
        hx_i = hx_i if len(hx_i) > 1 else hx_i[0]
        if length == 0:
            for s_batch, s0 in zip(h_n, as_tuple(hx_i)):
                torch.testing.assert_close(s_batch[:, i:i + 1], s0, **TOL64)
            assert torch.all(out[:, i] == -7.0)
            continue
        out_i, h_i = layer(x[:length, i:i + 1], hx_i)
        torch.testing.assert_close(out[:length, i:i + 1], out_i, **TOL64)
        assert torch.all(out[length:, i] == -7.0)
        for s_batch, s_alone in zip(h_n, as_tuple(h_i)):
            torch.testing.assert_close(s_batch[:, i:i + 1], s_alone, **TOL64)


def check_cell_is_one_step(layer, cell, input_size):
    """The cell, loaded with the layer's ``_l0`` parameters, equals one step of the layer."""
    state = {k[: -len("_l0")]: v for k, v in layer.state_dict().items() if k.endswith("_l0")}
    cell.load_state_dict(state, strict=True)
    torch.manual_seed(2)
    x = torch.randn(1, 3, input_size, dtype=torch.float64)
    hx = random_hx(layer, 3)
    out, h_n = layer(x, hx)
    step = cell(x[0], tuple(s[0] for s in as_tuple(hx)) if isinstance(hx, tuple) else hx[0])
    for a, b in zip(as_tuple(step), as_tuple(h_n)):
        torch.testing.assert_close(a, b[0], **TOL64)
    torch.testing.assert_close(as_tuple(step)[0], out[0], **TOL64)
    # unbatched cell input
    step_u = cell(x[0, 0], tuple(s[0, 0] for s in as_tuple(hx)) if isinstance(hx, tuple) else hx[0, 0])
    for a, b in zip(as_tuple(step_u), as_tuple(step)):
        torch.testing.assert_close(a, b[0], **TOL64)


def check_gradcheck(layer, input_size, seq_len=3, batch=2, lengths=None):
    """torch.autograd.gradcheck in float64 of output and final states w.r.t. the
    input, the initial state and every parameter."""
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    torch.manual_seed(3)
    x = torch.randn(seq_len, batch, input_size, dtype=torch.float64, requires_grad=True)
    hx = tuple(s.clone().requires_grad_() for s in as_tuple(random_hx(layer, batch)))

    def f(x, *rest):
        states, ps = rest[:len(hx)], rest[len(hx):]
        out, h_n = torch.func.functional_call(layer, dict(zip(names, ps)),
                                              (x, states if len(states) > 1 else states[0]),
                                              {"lengths": lengths})
        return (out, *as_tuple(h_n))

    assert torch.autograd.gradcheck(f, (x, *hx, *params), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def check_layouts(layer_tm, layer_bf, input_size):
    """batch_first, unbatched and PackedSequence inputs equal the time-major padded run."""
    layer_bf.load_state_dict(layer_tm.state_dict())
    torch.manual_seed(4)
    lengths = torch.tensor([2, 5, 3])
    x = torch.randn(5, 3, input_size, dtype=torch.float64)
    hx = random_hx(layer_tm, 3)
    out, h_n = layer_tm(x, hx, lengths=lengths)
    out_bf, h_bf = layer_bf(x.transpose(0, 1), hx, lengths=lengths)
    torch.testing.assert_close(out_bf.transpose(0, 1), out, **TOL64)
    for a, b in zip(as_tuple(h_bf), as_tuple(h_n)):
        torch.testing.assert_close(a, b, **TOL64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_p, h_p = layer_tm(packed, hx)
    torch.testing.assert_close(out_p.data, pack_padded_sequence(out, lengths, enforce_sorted=False).data, **TOL64)
    for a, b in zip(as_tuple(h_p), as_tuple(h_n)):
        torch.testing.assert_close(a, b, **TOL64)
    hx1 = tuple(s[:, 1] for s in as_tuple(hx))
    out_u, h_u = layer_tm(x[:, 1], hx1 if len(hx1) > 1 else hx1[0])
    torch.testing.assert_close(out_u, out[:, 1], **TOL64)
    for a, b in zip(as_tuple(h_u), as_tuple(h_n)):
        torch.testing.assert_close(a, b[:, 1], **TOL64)


def check_chunked_streaming(layer, input_size, cut=3, seq_len=7):
    """A one-way layer run on two chunks, carrying the state, equals one run."""
    torch.manual_seed(5)
    x = torch.randn(seq_len, 2, input_size, dtype=torch.float64)
    hx = random_hx(layer, 2)
    out, h_n = layer(x, hx)
    out1, h1 = layer(x[:cut], hx)
    out2, h2 = layer(x[cut:], h1)
    torch.testing.assert_close(torch.cat([out1, out2]), out, **TOL64)
    for a, b in zip(as_tuple(h2), as_tuple(h_n)):
        torch.testing.assert_close(a, b, **TOL64)
