"""rnnkit's standard layers and cells ARE torch.nn layers and cells: isinstance, and what
PyTorch's tools do with them (parametrizations, pruning, quantization through
``rnnkit.to_torch_nn``), on every backend, against torch.nn doing the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import rnnkit
from helpers import flatten_states, runnable_backends

F64 = torch.float64
BACKENDS = runnable_backends()
LAYER_KINDS = ["RNN", "LSTM", "GRU"]
CELL_KINDS = ["RNNCell", "LSTMCell", "GRUCell"]


def _pair(kind, backend, **kwargs):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available")
    torch.manual_seed(0)
    ours = getattr(rnnkit, kind)(3, 5, dtype=F64, backend=backend, **kwargs)
    theirs = getattr(nn, kind)(3, 5, dtype=F64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _run(module, kind):
    torch.manual_seed(1)
    x = torch.randn(2, 3, dtype=F64) if kind.endswith("Cell") else torch.randn(4, 2, 3, dtype=F64)
    out = module(x)
    return flatten_states(out) if kind.endswith("Cell") else [out[0], *flatten_states(out[1])]


@pytest.mark.parametrize("kind", LAYER_KINDS + CELL_KINDS)
def test_isinstance_of_the_torch_nn_namesake(kind):
    module = getattr(rnnkit, kind)(3, 4)
    assert isinstance(module, getattr(nn, kind))
    assert isinstance(module, nn.RNNBase if kind in LAYER_KINDS else nn.RNNCellBase)


def test_zoo_layers_are_not_torch_nn_layers():
    assert not isinstance(rnnkit.PeepholeLSTM(3, 4), nn.LSTM)
    assert not isinstance(rnnkit.LayerNormGRU(3, 4), nn.GRU)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("backend", ["auto", "reference", "torch", "fused"])
@pytest.mark.parametrize("kind", LAYER_KINDS + CELL_KINDS)
def test_parametrizations_work_as_on_torch_nn(kind, backend, norm):
    ours, theirs = _pair(kind, backend)
    name = "weight_hh" if kind.endswith("Cell") else "weight_hh_l0"
    for m in (ours, theirs):
        torch.manual_seed(2)
        getattr(parametrizations, norm)(m, name)
        m.eval()  # spectral_norm's power iteration runs at every access in training; compare the function
    for a, b in zip(_run(ours, kind), _run(theirs, kind)):
        torch.testing.assert_close(a, b)
    for m in (ours, theirs):
        sum((t * torch.linspace(-1, 2, t.numel(), dtype=F64).view(t.shape)).sum() for t in _run(m, kind)).backward()
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert a.grad is not None, n
        torch.testing.assert_close(a.grad, b.grad, msg=n)
    with torch.no_grad():  # the direct inference step declines parametrized weights
        for a, b in zip(_run(ours, kind), _run(theirs, kind)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["auto", "reference", "torch", "fused"])
@pytest.mark.parametrize("kind", LAYER_KINDS + CELL_KINDS)
def test_pruning_works_as_on_torch_nn(kind, backend):
    ours, theirs = _pair(kind, backend)
    suffix = "" if kind.endswith("Cell") else "_l0"
    for m in (ours, theirs):
        prune.l1_unstructured(m, "weight_hh" + suffix, amount=0.5)
        prune.random_unstructured(m, "bias_ih" + suffix, amount=0.5)
    ours.get_parameter("bias_ih" + suffix + "_orig").data.copy_(theirs.get_parameter("bias_ih" + suffix + "_orig"))
    getattr(ours, "bias_ih" + suffix + "_mask").copy_(getattr(theirs, "bias_ih" + suffix + "_mask"))
    for no_grad in (False, True):
        with torch.set_grad_enabled(not no_grad):
            for a, b in zip(_run(ours, kind), _run(theirs, kind)):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", LAYER_KINDS + CELL_KINDS)
def test_to_torch_nn_gives_the_namesake_with_the_same_function(kind):
    ours, theirs = _pair(kind, "auto")
    converted = rnnkit.to_torch_nn(ours)
    assert type(converted) is getattr(nn, kind)
    for a, b in zip(_run(converted, kind), _run(theirs, kind)):
        torch.testing.assert_close(a, b)


def test_quantize_dynamic_through_to_torch_nn():
    """quantize_dynamic matches modules by exact type (type(m) is nn.LSTM), so rnnkit layers
    reach it through to_torch_nn; the result equals torch.nn's own quantized model."""
    torch.manual_seed(0)
    model = nn.Sequential(rnnkit.LSTM(8, 16, batch_first=True))
    twin = nn.Sequential(nn.LSTM(8, 16, batch_first=True))
    twin.load_state_dict(model.state_dict())
    q_ours = torch.ao.quantization.quantize_dynamic(rnnkit.to_torch_nn(model), {nn.LSTM}, dtype=torch.qint8)
    q_theirs = torch.ao.quantization.quantize_dynamic(twin, {nn.LSTM}, dtype=torch.qint8)
    assert type(q_ours[0]).__module__.startswith("torch.ao.nn.quantized")
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(q_ours(x)[0], q_theirs(x)[0])
    assert isinstance(model[0], rnnkit.LSTM)  # the original model is left as it was


def test_to_torch_nn_refuses_what_torch_nn_lacks():
    with pytest.raises(ValueError, match="torch.nn.LSTM has no zoneout"):
        rnnkit.to_torch_nn(rnnkit.LSTM(3, 4, zoneout=0.1))
    with pytest.raises(ValueError, match="nonlinearity='gelu'"):
        rnnkit.to_torch_nn(rnnkit.RNN(3, 4, nonlinearity="gelu"))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_to_and_apply_keep_working(kind):
    ours, theirs = _pair(kind, "auto")
    ours.float()
    theirs.float()
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    assert "_flat_weight_refs" not in ours.__dict__
