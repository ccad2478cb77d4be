"""The input projection op (csrc/project.cpp, ``rnnkit_fused::project_fwd/bwd``): ``x W^T + b``
and its backward as ATen computes them, each product on the calling thread when small. Checked
against ``torch.addmm`` (outputs and every gradient), gradcheck in float64, opcheck, the layer
path that uses it, and its errors."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.fused import _build, _ops, backend

pytestmark = pytest.mark.skipif(_build.load() is not None, reason="fused extension unavailable")


def _inputs(M=12, K=5, G=7, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(G, K, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(G, generator=g, dtype=dtype).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_project_matches_addmm(bias, dtype):
    x, w, b = _inputs(dtype=dtype, bias=bias)
    out = _ops.project(x, w, b)
    ref = torch.addmm(b, x, w.t()) if bias else torch.mm(x, w.t())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same ATen product
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad)
    want = torch.autograd.grad(ref, [t for t in (x, w, b) if t is not None], grad)
    for g1, g2 in zip(got, want):
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g1, g2, **tol)


def test_project_gradcheck_and_gradgradcheck():
    x, w, b = _inputs()
    assert torch.autograd.gradcheck(_ops.project, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: _ops.project(x, w, None), (x, w))
    assert torch.autograd.gradgradcheck(_ops.project, (x, w, b))  # through the twin (addmm)


def test_project_backward_computes_only_what_is_asked():
    x, w, b = _inputs()
    grad = torch.randn(12, 7, dtype=torch.float64)
    dx, dw, db = torch.ops.rnnkit_fused.project_bwd(grad, x.detach(), w.detach(), [False, True, False])
    assert dx.numel() == 0 and db.numel() == 0
    torch.testing.assert_close(dw, grad.t() @ x.detach())
    x.requires_grad_(False)
    out = _ops.project(x, w, b)
    (gw, gb) = torch.autograd.grad(out.sum(), [w, b])
    torch.testing.assert_close(gb, torch.full((7,), 12.0, dtype=torch.float64))


def test_project_opcheck():
    x, w, b = _inputs(dtype=torch.float32)
    torch.library.opcheck(torch.ops.rnnkit_fused.project_fwd.default, (x, w, b))
    grad = torch.randn(12, 7)
    torch.library.opcheck(torch.ops.rnnkit_fused.project_bwd.default,
                          (grad, x.detach(), w.detach(), [True, True, True]))


@pytest.mark.parametrize("args, message", [
    (((3, 4), (5, 6), None), "x (M, K) and w (G, K) must share K, got [3, 4] and [5, 6]"),
    (((3, 4), (5, 4), (6,)), "b has shape [6], expected [5]"),
    (((3, 4, 1), (5, 4), None), "project_fwd: x must be 2-D, got [3, 4, 1]"),
])
def test_project_errors(args, message):
    x, w, b = (None if s is None else torch.zeros(*s) for s in args)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        torch.ops.rnnkit_fused.project_fwd(x, w, b)
    with pytest.raises(RuntimeError, match="w has dtype Double, expected Float"):
        torch.ops.rnnkit_fused.project_fwd(torch.zeros(3, 4), torch.zeros(5, 4, dtype=torch.float64), None)


def test_small_layers_project_through_the_op_large_ones_through_addmm(monkeypatch):
    calls = []
    real = _ops.project
    monkeypatch.setattr(_ops, "project", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    small = rnnkit.RNN(32, 32, backend="fused")
    ref = torch.nn.RNN(32, 32)
    ref.load_state_dict(small.state_dict())
    x = torch.randn(10, 1, 32, requires_grad=True)
    out, h = small(x)
    out.sum().backward()
    assert calls == [torch.Size([10, 32])]
    x2 = x.detach().clone().requires_grad_()
    r_out, r_h = ref(x2)
    r_out.sum().backward()
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(x.grad, x2.grad)
    for name, p in small.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad)
    calls.clear()
    big = rnnkit.LSTM(256, 256, backend="fused")  # 100 x 1024 x 256 = 26M multiply-adds: ATen as before
    try:
        _ops.load_policy("parallel")  # (on an oversubscribed machine the under-load policy sends it to the op)
        big(torch.randn(100, 1, 256))
        assert calls == []
        _ops.load_policy("serial")  # ... as here: the whole call on one thread, its projection too
        big(torch.randn(100, 1, 256))
        assert calls == [torch.Size([100, 256])]
        calls.clear()
    finally:
        _ops.load_policy("env")
    x3 = torch.randn(10, 1, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # rnnkit casts to bf16 itself: the op gives addmm's result
        got, _ = small(x3)
        monkeypatch.setattr(backend, "_serial_projection", lambda *a: False)
        want, _ = small(x3)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert backend._serial_projection.__name__ == "<lambda>"
    monkeypatch.undo()
    assert backend._serial_projection(torch.zeros(10, 32), torch.zeros(32, 32), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # ATen autocast itself must see ATen's addmm
        assert not backend._serial_projection(torch.zeros(10, 32), torch.zeros(32, 32), None)
