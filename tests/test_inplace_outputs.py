"""Changing a layer's or a cell's output in place before the backward (``F.relu(out, inplace=True)``,
``F.dropout(..., inplace=True)``, ``out.mul_(2)``) works as with torch.nn's op, on every backend.

The fused ops' backward reads the sequence output (every step's ``h``): the fused and triton backends
hand the caller a copy (``rnnkit.runner.own_output``); the ops save no final state (``UNREAD_OUTPUTS``),
which a fused cell returns as its new state. The oracle: the reference backend's gradients after the
same in-place change."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.backends import why_not
from helpers import flatten_states, runnable_backends, with_torch_nn_twin

F64 = torch.float64
NAMES = sorted(n for n in rnnkit.LAYERS if not n.endswith("3d"))
BACKENDS = runnable_backends()


def _grads_after_inplace(module, x, kwargs):
    xi = x.clone().requires_grad_()
    out, h = module(xi, **kwargs)
    out.mul_(2)
    out = F.relu(out, inplace=True)  # last: relu's backward reads its own result
    for s in flatten_states(h):
        s.mul_(3)  # the final states too
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + sum(
        s.sum() for s in flatten_states(h))
    return torch.autograd.grad(loss, [xi, *module.parameters()], allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"batch_first": True}, {"num_layers": 2}], ids=["plain", "batch_first",
                                                                                        "2 layers"])
@pytest.mark.parametrize("name", NAMES)
def test_an_output_changed_in_place_backpropagates_as_on_the_reference(name, options, backend):
    entry = rnnkit.LAYERS[name]
    torch.manual_seed(0)
    module = entry.make(3, 4, dtype=F64, **options)
    x = torch.randn(entry.input_shape(5, 2, 3, batch_first=options.get("batch_first", False)), dtype=F64)
    if backend != "auto" and why_not(backend, module, x.transpose(0, 1) if options.get("batch_first") else x):
        pytest.skip(f"{backend} cannot run {name}")
    module.backend = backend
    ref = copy.deepcopy(module)
    ref.backend = "reference"
    got, want = _grads_after_inplace(module, x, {}), _grads_after_inplace(ref, x, {})
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["auto", "fused", "torch", "reference"])
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_an_output_changed_in_place_equals_torch_nn(kind, backend):
    ours, theirs = with_torch_nn_twin(kind, 3, 4, backend=backend)
    x = torch.randn(5, 2, 3, dtype=F64)
    for a, b in zip(_grads_after_inplace(ours, x, {}), _grads_after_inplace(theirs, x, {})):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["auto", "fused", "torch", "reference"])
@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_a_cell_state_changed_in_place_equals_torch_nn(kind, backend):
    ours, theirs = with_torch_nn_twin(kind, 3, 4, backend=backend)
    x = torch.randn(2, 3, dtype=F64)

    def grads(cell, inplace=True):
        xi = x.clone().requires_grad_()
        new = cell(xi)
        h = new[0] if isinstance(new, tuple) else new
        h = h.mul_(2) if inplace else h * 2
        return torch.autograd.grad(h.sum(), [xi, *cell.parameters()])
    try:
        want = grads(theirs)
    except RuntimeError as e:  # torch.nn's RNNCell: tanh's backward reads its result
        assert "inplace" in str(e)
        want = grads(theirs, inplace=False)  # the function it stands for
        try:
            got = grads(ours)
        except RuntimeError as e:  # the same error as torch.nn (reference), or ...
            assert "inplace" in str(e)
            return
        for a, b in zip(got, want):  # ... the right gradient (fused: its backward reads a saved copy)
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        return
    for a, b in zip(grads(ours), want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
