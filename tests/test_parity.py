"""Every backend against torch.nn on a randomized grid of configurations:
outputs, final states and the gradients of the input, hx and every parameter."""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from helpers import RNNKIT, TORCH_NN, assert_close, flatten_states, runnable_backends, weighted_sum

MODES = [("RNN", "tanh"), ("RNN", "relu"), ("LSTM", None), ("GRU", None)]


def _grid(count=48, seed=0):
    """A random sample of the full product, plus each mode x dtype x packed corner."""
    rng = random.Random(seed)
    configs = []
    for (mode, nl), dtype, packed in itertools.product(MODES, [torch.float32, torch.float64], [False, True]):
        configs.append(dict(mode=mode, nl=nl, num_layers=2, bidirectional=True, batch_first=False, bias=True,
                            proj=3 if mode == "LSTM" else 0, unbatched=False, packed=packed, hx=True, dtype=dtype))
    while len(configs) < count + 16:
        mode, nl = rng.choice(MODES)
        packed = rng.random() < 0.3
        configs.append(dict(
            mode=mode, nl=nl, num_layers=rng.randint(1, 3), bidirectional=rng.random() < 0.5,
            batch_first=rng.random() < 0.5, bias=rng.random() < 0.7,
            proj=rng.choice([0, 2]) if mode == "LSTM" else 0,
            unbatched=(not packed) and rng.random() < 0.2, packed=packed, hx=rng.random() < 0.5,
            dtype=rng.choice([torch.float32, torch.float64])))
    return configs


def _id(c):
    return "-".join([c["mode"] + (f"_{c['nl']}" if c["nl"] else ""), f"l{c['num_layers']}",
                     "bi" if c["bidirectional"] else "uni", "bf" if c["batch_first"] else "tm",
                     "bias" if c["bias"] else "nobias", f"p{c['proj']}",
                     "unbatched" if c["unbatched"] else ("packed" if c["packed"] else "padded"),
                     "hx" if c["hx"] else "nohx", str(c["dtype"]).split(".")[-1]])


def _make_pair(c, backend):
    kw = dict(num_layers=c["num_layers"], bias=c["bias"], batch_first=c["batch_first"],
              bidirectional=c["bidirectional"], dtype=c["dtype"])
    if c["nl"]:
        kw["nonlinearity"] = c["nl"]
    if c["proj"]:
        kw["proj_size"] = c["proj"]
    ours = RNNKIT[c["mode"]](4, 5, backend=backend, **kw)
    ref = TORCH_NN[c["mode"]](4, 5, **kw)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("c", _grid(), ids=_id)
def test_matches_torch_nn(c, backend):
    torch.manual_seed(zlib.crc32(_id(c).encode()) % 1000)
    ours, ref = _make_pair(c, backend)
    dtype, L, N = c["dtype"], 6, 4
    D = 2 if c["bidirectional"] else 1
    h_out = c["proj"] or 5
    x = torch.randn((N, L, 4) if c["batch_first"] else (L, N, 4), dtype=dtype)
    if c["unbatched"]:
        x = x[0] if c["batch_first"] else x[:, 0]
    lengths = torch.tensor([3, 6, 1, 5])  # unsorted on purpose
    hx = None
    if c["hx"]:
        batch = () if c["unbatched"] else (N,)
        hx = torch.randn(D * c["num_layers"], *batch, h_out, dtype=dtype)
        if c["mode"] == "LSTM":
            hx = (hx, torch.randn(D * c["num_layers"], *batch, 5, dtype=dtype))

    results = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        hxi = None if hx is None else tuple(t.clone().requires_grad_() for t in flatten_states(hx))
        inp = pack_padded_sequence(xi, lengths, batch_first=c["batch_first"], enforce_sorted=False) if c["packed"] else xi
        hx_arg = None if hxi is None else (hxi if c["mode"] == "LSTM" else hxi[0])
        out, h = module(inp, hx_arg)
        out_t = out.data if c["packed"] else out
        states = flatten_states(h)
        weighted_sum([out_t, *states]).backward()
        grads = {"input": xi.grad}
        if hxi is not None:
            grads.update({f"hx{i}": t.grad for i, t in enumerate(hxi)})
        grads.update({n: p.grad for n, p in module.named_parameters()})
        results.append((out, states, grads))

    (o1, s1, g1), (o2, s2, g2) = results
    if c["packed"]:
        assert isinstance(o1, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(o1.batch_sizes, o2.batch_sizes)
        assert torch.equal(o1.sorted_indices, o2.sorted_indices)
        o1, o2 = o1.data, o2.data
    assert_close(o1, o2, dtype, "output")
    assert len(s1) == len(s2)
    for i, (a, b) in enumerate(zip(s1, s2)):
        assert_close(a, b, dtype, f"state {i}")
    assert g1.keys() == g2.keys()
    for name in g1:
        assert g1[name] is not None, f"no gradient for {name}"
        assert_close(g1[name], g2[name], dtype, f"grad {name}")


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_state_dict_round_trip(mode, backend):
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True)
    if mode == "LSTM":
        kw["proj_size"] = 3
    theirs = TORCH_NN[mode](6, 7, **kw)
    ours = RNNKIT[mode](6, 7, backend=backend, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = TORCH_NN[mode](6, 7, **kw)
    back.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(5, 2, 6)
    for a, b in zip(flatten_states(ours(x)[1]), flatten_states(back(x)[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_same_seed_same_weights_as_torch_nn(mode):
    """Parameters are registered and initialised in torch.nn's order."""
    kw = dict(num_layers=2, bidirectional=True, proj_size=2) if mode == "LSTM" else dict(num_layers=2)
    torch.manual_seed(7)
    ours = RNNKIT[mode](3, 4, **kw)
    torch.manual_seed(7)
    theirs = TORCH_NN[mode](3, 4, **kw)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    bound = 1 / 4 ** 0.5
    assert all(p.abs().max() <= bound for p in ours.parameters())


def test_all_weights_and_flatten_parameters():
    ours = rnnkit.LSTM(3, 4, 2, bidirectional=True)
    theirs = torch.nn.LSTM(3, 4, 2, bidirectional=True)
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [[p.shape for p in ws] for ws in theirs.all_weights]
    ours.flatten_parameters()  # accepted, as in torch.nn


def test_unbatched_equals_batch_of_one():
    lstm = rnnkit.LSTM(3, 4, 2, bidirectional=True, backend="reference")
    x = torch.randn(5, 3)
    out, (h, c) = lstm(x)
    out_b, (h_b, c_b) = lstm(x.unsqueeze(1))
    assert out.shape == (5, 8) and h.shape == (4, 4) and c.shape == (4, 4)
    torch.testing.assert_close(out, out_b[:, 0])
    torch.testing.assert_close(h, h_b[:, 0])
