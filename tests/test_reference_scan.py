"""The reference scan reads its steps with one ``unbind`` (one backward node) instead
of ``xp[t]`` per step (whose backward filled a zero tensor of ``xp``'s full size at
every step: O(L^2) for L steps). Its values and gradients are those of the indexing
loop, exactly; benchmarks/reference_scaling.py measures the time."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from rnnkit.functional import GRU_SPEC, LSTM_SPEC, rnn_spec
from rnnkit.runner import _per_row, reference_scan

SPECS = {"rnn_tanh": rnn_spec("tanh"), "lstm": LSTM_SPEC, "gru": GRU_SPEC}


def indexing_scan(spec, p, x, state, lengths: Optional[torch.Tensor]):
    """The reference scan's loop as it was, with ``xp[t]`` per step."""
    xp = spec.project(x, p)
    seq_len = x.shape[0]
    masked_from = seq_len if lengths is None else int(lengths.min())
    outputs = []
    for t in range(seq_len):
        new = spec.step(xp[t], state, p)
        if t >= masked_from:
            keep = _per_row(t < lengths, new[0])
            new = tuple(torch.where(keep, n, s) for n, s in zip(new, state))
        state = new
        outputs.append(state[0])
    return torch.stack(outputs), state


def _inputs(spec, seq_len=9, batch=3, h_in=4, hidden=5):
    g = torch.Generator().manual_seed(0)
    G = spec.gates * hidden

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    p = {"weight_ih": r(G, h_in), "weight_hh": r(G, hidden), "bias_ih": r(G), "bias_hh": r(G)}
    state = tuple(r(batch, hidden) for _ in range(2 if spec is LSTM_SPEC else 1))
    return p, r(seq_len, batch, h_in), state


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("lengths", [None, [9, 4, 1]], ids=["full", "lengths"])
def test_values_and_gradients_equal_the_indexing_loop(name, lengths):
    spec = SPECS[name]
    p, x, state = _inputs(spec)
    lengths = None if lengths is None else torch.tensor(lengths)
    leaves = [x, *state, *p.values()]
    results = []
    for scan in (reference_scan, indexing_scan):
        out, final = scan(spec, p, x, state, lengths)
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.rand(t.shape, generator=g, dtype=t.dtype)).sum() for t in (out, *final))
        results.append((out, final, torch.autograd.grad(loss, leaves)))
    (out, final, grads), (out0, final0, grads0) = results
    assert torch.equal(out, out0)
    assert all(torch.equal(a, b) for a, b in zip(final, final0))
    for leaf_grad, old_grad in zip(grads, grads0):
        assert torch.equal(leaf_grad, old_grad)


def test_one_backward_node_reads_every_step():
    """The steps' inputs come from one UnbindBackward node, not one SelectBackward per step."""
    spec = SPECS["gru"]
    p, x, state = _inputs(spec, seq_len=12)
    out, _ = reference_scan(spec, p, x, state, None)
    seen, stack, kinds = set(), [out.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert kinds.get("UnbindBackward0") == 1, kinds
    assert "SelectBackward0" not in kinds, kinds
