"""The fused LSTM's row split (lstm_rows in csrc/lstm.cpp): at N * H >= 1536 cell
units per step the gate math of each step (forward and backward) is split
across torch's OpenMP threads. Outputs, final states and every gradient must
equal the reference scan's (the oracle) with the split on, with and without a
projection, with lengths (zero-length and early-ending rows) and with a batch
that does not divide evenly between the threads; repeated, because a data race
would show as a flaky mismatch."""

from __future__ import annotations

import pytest
import torch

from rnnkit.backends import BACKENDS
from rnnkit.fused import backend as fb
from rnnkit.functional import LSTM_SPEC
from rnnkit.runner import reference_scan
from helpers import assert_close, weighted_sum

REASON = BACKENDS["fused"].unavailable()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _params(h_in, hidden, proj, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 4 * hidden

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=dtype) - 0.5).requires_grad_()
    p = {"weight_ih": r(G, h_in), "weight_hh": r(G, proj or hidden), "bias_ih": r(G), "bias_hh": r(G)}
    if proj:
        p["weight_hr"] = r(proj, hidden)
    return p


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("proj", [0, 16], ids=["plain", "proj"])
@pytest.mark.parametrize("batch", [24, 33], ids=["even", "odd"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_split_matches_reference_scan(two_threads, dtype, proj, batch, with_lengths):
    L, h_in, hidden = 6, 5, 64  # batch * hidden >= 1536: the split path
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, L + 1, (batch,), generator=g) if with_lengths else None
    if lengths is not None:
        lengths[0], lengths[-1] = 0, L
    p = _params(h_in, hidden, proj, dtype)
    x = torch.randn(L, batch, h_in, generator=g, dtype=dtype).requires_grad_()
    s0 = (torch.randn(batch, proj or hidden, generator=g, dtype=dtype).requires_grad_(),
          torch.randn(batch, hidden, generator=g, dtype=dtype).requires_grad_())
    leaves = [x, *s0, *p.values()]
    ref_out, ref_state = reference_scan(LSTM_SPEC, p, x, s0, lengths)
    ref_grads = torch.autograd.grad(weighted_sum([ref_out, *ref_state]), leaves)
    for _ in range(3):
        out, state = fb.fused_scan(LSTM_SPEC, p, x, s0, lengths)
        grads = torch.autograd.grad(weighted_sum([out, *state]), leaves)
        assert_close(out, ref_out, dtype, "output")
        for i, (a, b) in enumerate(zip(state, ref_state)):
            assert_close(a, b, dtype, f"state {i}")
        for i, (a, b) in enumerate(zip(grads, ref_grads)):
            assert_close(a, b, dtype, f"grad {i}")
