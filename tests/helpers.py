"""Shared test helpers: tolerances, loss weights, gradient collection."""

from __future__ import annotations

import torch

import rnnkit
from rnnkit.backends import BACKENDS

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def runnable_backends():
    """Every registered backend that can run on this machine, plus 'auto'."""
    return [name for name, b in BACKENDS.items() if b.unavailable() is None] + ["auto"]


def weighted_sum(tensors, seed=123):
    """A scalar that depends on every element with a distinct random weight, so
    gradients of every output element are checked (not just their sum)."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in tensors:
        w = torch.randn(t.shape, generator=g, dtype=t.dtype)
        total = total + (t * w.to(t.device)).sum()
    return total


def flatten_states(h):
    return list(h) if isinstance(h, tuple) else [h]


def assert_close(a, b, dtype, what=""):
    tol = TOL[dtype]
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


TORCH_NN = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}
RNNKIT = {"LSTM": rnnkit.LSTM, "GRU": rnnkit.GRU, "RNN": rnnkit.RNN}
